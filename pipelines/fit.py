"""Per-sample geometry of the jigsaw assembly, as pure numpy functions.

The reference pipeline runs these directly; the DALI pipeline computes the same formulas
inside its graph (resized size ``floor(x * scale + 0.5)``; the window anchor as DALI's
crop computes it), and the tests compare the two.
"""

from __future__ import annotations

import math

import numpy as np


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5))


def window_anchor(size: int, region: int, pos: float) -> int:
    """Start of the region-sized window on an axis of ``size``; negative when padding.

    DALI's crop takes ``pos`` as a float32, multiplies in double precision and rounds half
    away from zero; doing exactly the same puts both pipelines' windows on the same pixel.
    """
    slack = float(np.float32(pos)) * (size - region)
    return int(math.copysign(math.floor(abs(slack) + 0.5), slack))


def window(size: int, region: int, pos: float) -> tuple[int, int, int]:
    """The part of a sample axis that lands in the region: ``(start, end, offset)`` —
    sample pixels ``start:end`` go to region pixels ``offset:offset + end - start``.
    A larger axis is cropped (offset 0), a smaller one padded (start 0, end = size)."""
    anchor = window_anchor(size, region, pos)
    start, end = max(anchor, 0), min(anchor + region, size)
    return start, end, start - anchor


def place(piece: np.ndarray, region_w: int, region_h: int, offset_x: int, offset_y: int) -> np.ndarray:
    """Put a piece on a zero region at an offset (the padding half of pad-or-crop)."""
    out = np.zeros((region_h, region_w) + piece.shape[2:], dtype=piece.dtype)
    out[offset_y : offset_y + piece.shape[0], offset_x : offset_x + piece.shape[1]] = piece
    return out


def fit_inside(width: int, height: int, region_w: int, region_h: int) -> tuple[int, int]:
    """Largest aspect-keeping size not larger than the region (the ``resize`` fit mode)."""
    scale = min(region_w / width, region_h / height)
    return max(1, min(region_w, math.floor(width * scale + 0.5))), max(
        1, min(region_h, math.floor(height * scale + 0.5))
    )
