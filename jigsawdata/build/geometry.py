"""Pure box geometry on integer pixel grids.

Crops are cut at whole pixels, so every box this module returns is ``(x0, y0, x1, y1)`` in
integers with ``x1``/``y1`` exclusive. Ground-truth boxes stay COCO floats (``x, y, w, h``);
the functions that compare the two say which convention they use.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Box = tuple[int, int, int, int]


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def pixel_hull(box_xyxy: Sequence[float]) -> Box:
    """Smallest integer box that contains a float box (floor the start, ceil the end)."""
    x0, y0, x1, y1 = box_xyxy
    return (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))


def clip_box(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    return (max(0, x0), max(0, y0), min(width, x1), min(height, y1))


def box_size(box: Box) -> tuple[int, int]:
    return (box[2] - box[0], box[3] - box[1])


def enlarge_box(hull: Box, rng: np.random.Generator, max_factor: float = 2.0) -> Box:
    """Grow a box for context by moving each of its four sides outwards independently.

    Each side moves by ``floor(u * (max_factor - 1) * side / 2)`` with ``u ~ U[0, 1)``, so
    width and height each grow by a factor in ``[1, max_factor]`` and the result always
    contains ``hull``. Integer moves keep the bound exact: the width never exceeds
    ``max_factor * width`` even by a rounding pixel. Not clipped: see :func:`clip_box`.
    """
    x0, y0, x1, y1 = hull
    w, h = x1 - x0, y1 - y0
    u = rng.random(4)
    half = (max_factor - 1.0) / 2.0
    return (
        x0 - math.floor(u[0] * half * w),
        y0 - math.floor(u[1] * half * h),
        x1 + math.floor(u[2] * half * w),
        y1 + math.floor(u[3] * half * h),
    )


def intersection_area(box: Box, others_xyxy: np.ndarray) -> np.ndarray:
    """Overlap area of one integer box with each row of an ``(N, 4)`` float xyxy array."""
    if len(others_xyxy) == 0:
        return np.zeros(0)
    ix = np.minimum(box[2], others_xyxy[:, 2]) - np.maximum(box[0], others_xyxy[:, 0])
    iy = np.minimum(box[3], others_xyxy[:, 3]) - np.maximum(box[1], others_xyxy[:, 1])
    return np.clip(ix, 0, None) * np.clip(iy, 0, None)


def iou(box: Box, others_xyxy: np.ndarray) -> np.ndarray:
    """IoU of one integer box with each row of an ``(N, 4)`` float xyxy array."""
    inter = intersection_area(box, others_xyxy)
    if len(inter) == 0:
        return inter
    area = (box[2] - box[0]) * (box[3] - box[1])
    other = (others_xyxy[:, 2] - others_xyxy[:, 0]) * (others_xyxy[:, 3] - others_xyxy[:, 1])
    return inter / np.maximum(area + other - inter, 1e-12)


def sample_background_box(
    size: tuple[int, int],
    width: int,
    height: int,
    objects_xyxy: np.ndarray,
    rng: np.random.Generator,
    max_tries: int,
) -> Box | None:
    """Place a box of ``size`` uniformly in the image so that it touches no object.

    IoU = 0 is tested as zero intersection area, which is the same thing and has no
    tolerance to argue about. All ``max_tries`` placements are drawn and tested at once;
    the first free one wins. Returns ``None`` when all of them overlap an object.
    """
    w, h = min(size[0], width), min(size[1], height)
    if w < 1 or h < 1:
        return None
    xs = rng.integers(0, width - w + 1, size=max_tries)
    ys = rng.integers(0, height - h + 1, size=max_tries)
    if len(objects_xyxy):
        ix = np.minimum(xs[:, None] + w, objects_xyxy[None, :, 2]) - np.maximum(xs[:, None], objects_xyxy[None, :, 0])
        iy = np.minimum(ys[:, None] + h, objects_xyxy[None, :, 3]) - np.maximum(ys[:, None], objects_xyxy[None, :, 1])
        free = np.flatnonzero(~np.any((ix > 0) & (iy > 0), axis=1))
    else:
        free = np.arange(max_tries)
    if len(free) == 0:
        return None
    x0, y0 = int(xs[free[0]]), int(ys[free[0]])
    return (x0, y0, x0 + w, y0 + h)
