"""Aspect-ratio groups: which jigsaw region a crop can fill.

S (square, 0.5 <= w/h <= 1.5) fills the top-left and bottom-right regions, T (tall,
w/h < 0.5) the bottom-left, W (wide, w/h > 1.5) the top-right. The comparison is done in
integers so that crops exactly at the 0.5 and 1.5 boundaries land in S on every platform.
"""

from __future__ import annotations

GROUPS: tuple[str, ...] = ("S", "T", "W")


def group_of(width: int, height: int) -> str:
    if width <= 0 or height <= 0:
        raise ValueError(f"crop must have a positive size, got {width}x{height}")
    if 2 * width < height:
        return "T"
    if 2 * width > 3 * height:
        return "W"
    return "S"
