"""How much of a jigsaw canvas is zero padding: the pixels that teach nothing.

The paper's motivation is fewer uninformative pixels. This measures the padding share for a
shard set's real crop sizes under a jigsaw configuration by drawing assembled images the way
the pipelines do — 2 S + 1 T + 1 W crops at random, the random resize (pad_crop only, as in
the pipelines), the smaller S (by resized area) top-left — and applying each fit mode's
geometry from :mod:`jigsawdata.pipelines.fit`. Pixels are never decoded: only sizes matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jigsawdata.shardset.location import ShardLocation

from .config import JigsawConfig
from .fit import fit_inside
from .template import REGION_NAMES


def crop_sizes(location: Path | str) -> dict[str, np.ndarray]:
    """``(n, 2)`` width, height of every crop per group, from a shard set's index (local or at
    a URL)."""
    where = ShardLocation.of(location)
    table = where.index(where.manifest())
    groups = np.array(table.column("group").to_pylist())
    sizes = np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], axis=1)
    return {g: sizes[groups == g] for g in ("S", "T", "W")}


def _covered(sizes: np.ndarray, region: tuple[int, int], cfg: JigsawConfig) -> np.ndarray:
    """Pixels of the region a crop of each (already resized) size fills."""
    rw, rh = region
    if cfg.fit == "warp":
        return np.full(len(sizes), rw * rh, dtype=np.float64)
    if cfg.fit == "resize":
        return np.array([np.prod(fit_inside(int(w), int(h), rw, rh)) for w, h in sizes], dtype=np.float64)
    return np.minimum(sizes[:, 0], rw).astype(np.float64) * np.minimum(sizes[:, 1], rh)


def padding_share(sizes: dict[str, np.ndarray], cfg: JigsawConfig, images: int = 20_000, seed: int = 0) -> dict:
    """Share of canvas pixels left zero, overall and per region, over ``images`` draws."""
    rng = np.random.default_rng(seed)
    drawn = [sizes[g][rng.integers(len(sizes[g]), size=images)].astype(np.float64) for g in ("S", "S", "T", "W")]
    lo, hi = cfg.scale
    if cfg.fit == "pad_crop" and (lo, hi) != (1.0, 1.0):
        drawn = [np.maximum(1, np.floor(d * rng.uniform(lo, hi, size=(images, 1)) + 0.5)) for d in drawn]
    s_a, s_b, tall, wide = drawn
    a_smaller = (s_a[:, 0] * s_a[:, 1] <= s_b[:, 0] * s_b[:, 1])[:, None]
    placed = (np.where(a_smaller, s_a, s_b), wide, tall, np.where(a_smaller, s_b, s_a))  # TL, TR, BL, BR
    regions = cfg.template.sizes
    covered = np.stack([_covered(p, r, cfg) for p, r in zip(placed, regions)], axis=1)  # (images, 4)
    area = np.array([w * h for w, h in regions], dtype=np.float64)
    return {
        "padding_share": float(1.0 - covered.sum(axis=1).mean() / cfg.template.canvas**2),
        "per_region": {name: float(1.0 - covered[:, r].mean() / area[r]) for r, name in enumerate(REGION_NAMES)},
        "images": images,
        "fit": cfg.fit,
        "scale": list(cfg.scale),
        "canvas": cfg.template.canvas,
        "template_split": cfg.template.split,
    }
