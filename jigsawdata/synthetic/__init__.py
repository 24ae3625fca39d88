"""Synthetic COCO-format detection sets, byte-identical for a seed: the demo's and the
experiment's harder, cluttered one."""

from .clutter import make_clutter_coco
from .shapes import make_synthetic_coco

__all__ = ["make_clutter_coco", "make_synthetic_coco"]
