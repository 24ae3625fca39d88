"""Reading a COCO-format detection set: streamed, checked, one split or a held-out cut of one."""

from .reader import CocoSource, ImageRecord, load_coco, load_image, resolve_coco_root
from .split import split_annotations
from .validate import check_coco

__all__ = [
    "CocoSource",
    "ImageRecord",
    "check_coco",
    "load_coco",
    "load_image",
    "resolve_coco_root",
    "split_annotations",
]
