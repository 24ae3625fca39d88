"""The jigsaw template: where the four crops go on the canvas and on the feature grid.

One definition serves the pipelines (region sizes), the trainer (region masks for the loss
and the ERF weights) and the tests. Regions are numbered in label order:
0 = top-left (smaller S), 1 = top-right (W), 2 = bottom-left (T), 3 = bottom-right (larger S).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REGION_NAMES: tuple[str, ...] = ("TL", "TR", "BL", "BR")
READER_GROUPS: tuple[str, ...] = ("S", "S", "T", "W")
"""The group each of a pipeline's four readers draws from: two S, then T, then W."""


@dataclass(frozen=True)
class Template:
    canvas: int = 224
    split: int = 64
    """Where both axes are cut. 64 (docs/method.md 3) keeps TR a W shape and BL a T shape and
    falls on the stride-32 grid, so region masks on the feature map are exact."""
    stride: int = 32
    """Output stride of the backbone whose feature grid the regions are mapped onto."""

    def __post_init__(self) -> None:
        if not 0 < self.split < self.canvas:
            raise ValueError(f"split must be inside the canvas (0 < split < {self.canvas}), got {self.split}")
        if self.canvas % self.stride:
            raise ValueError(f"canvas {self.canvas} is not a multiple of the stride {self.stride}")
        if self.canvas < 2 * self.stride:
            raise ValueError(
                f"canvas {self.canvas} holds one cell of the stride-{self.stride} feature grid, too few "
                f"for four regions: use a canvas of at least {2 * self.stride}"
            )
        low, high = self.stride // 2, self.canvas - self.stride // 2
        if not low < self.split <= high:  # a region without a cell has no loss: its mean is 0 / 0 = NaN
            fit = self.stride * min(max(1, round(self.split / self.stride)), self.grid - 1)
            raise ValueError(
                f"split {self.split} leaves a region without a cell of the stride-{self.stride} feature "
                f"grid (cell centres at {low}, {low + self.stride}, ...): use a split in {low + 1}.."
                f"{high}, e.g. {fit}"
            )

    @property
    def boxes(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(x0, y0, x1, y1)`` of each region on the canvas, in region order."""
        c, s = self.canvas, self.split
        return ((0, 0, s, s), (s, 0, c, s), (0, s, s, c), (s, s, c, c))

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of each region, in region order."""
        return tuple((x1 - x0, y1 - y0) for x0, y0, x1, y1 in self.boxes)

    @property
    def grid(self) -> int:
        return self.canvas // self.stride

    @property
    def exact_on_grid(self) -> bool:
        return self.split % self.stride == 0

    def region_map(self) -> np.ndarray:
        """``(canvas, canvas)`` int array of region ids on the input."""
        ids = np.empty((self.canvas, self.canvas), dtype=np.int64)
        for r, (x0, y0, x1, y1) in enumerate(self.boxes):
            ids[y0:y1, x0:x1] = r
        return ids

    def masks(self) -> np.ndarray:
        """``(4, canvas, canvas)`` float masks M_i of docs/method.md section 4."""
        ids = self.region_map()
        return np.stack([(ids == r).astype(np.float32) for r in range(4)])

    def feature_region_map(self) -> np.ndarray:
        """``(grid, grid)`` region id of each feature cell: the region holding its centre
        (exact when the split is a multiple of the stride)."""
        centres = np.arange(self.grid) * self.stride + self.stride // 2
        return self.region_map()[np.ix_(centres, centres)]
