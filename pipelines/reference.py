"""The jigsaw pipeline in plain PyTorch + PIL over webdataset: the yardstick and the fallback.

It implements exactly the sampling and geometry of the DALI pipeline (see
:mod:`jigsawdata.pipelines.fit`), reads the same shards (local paths, or streamed from any fsspec URL) and
runs wherever PyTorch does. Use it with a ``torch.utils.data.DataLoader``; each worker of
each rank reads its own shards, or, when a group has too few shards for that, its own
samples of every shard. PIL cannot decode part of a JPEG, so each crop is decoded whole;
only the window that reaches the canvas is resampled.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from jigsawdata.errors import InputError
from jigsawdata.shardset.location import url_filesystem
from jigsawdata.shardset.open import ShardSet, as_shard_set, check_enough_samples
from jigsawdata.shardset.shards import check_member_name, jpeg_problem

from .config import IMAGENET_MEAN, IMAGENET_STD, JigsawConfig
from .fit import fit_inside, place, scaled_size, window, window_anchor
from .ranks import process_info
from .template import READER_GROUPS

log = logging.getLogger(__name__)

_VERIFY_HINT = "run `jigsawdata verify` on the set, which names every such sample, and fetch or build it again"
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def normalize(canvas: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float32 normalised with the ImageNet mean and std."""
    chw = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32) / 255.0
    return torch.from_numpy((chw - _MEAN) / _STD)


def _open_streams(urls: Sequence[str]) -> Iterator[dict]:
    """Open each shard with fsspec (a local path or any URL) for webdataset's tar expander."""
    for url in urls:
        fs, path = url_filesystem(url)
        with fs.open(path, "rb") as stream:
            yield {"url": url, "stream": stream}


def _checked(files: Iterator[dict]) -> Iterator[dict]:
    """Shards from strangers are data: refuse members with unsafe or foreign names."""
    for item in files:
        problem = check_member_name(item["fname"]) if "fname" in item else None  # {} marks a shard's end
        if problem:
            raise ValueError(f"{item.get('__url__')}: {problem}")
        yield item


def read_samples(tars: Sequence[str]) -> Iterator[dict]:
    """Every sample of ``tars``, in order, once: webdataset's ``{"jpg": bytes, "cls": bytes, ...}``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(_checked(tar_file_expander(_open_streams(tars))))


Drawn = tuple[bytes, int, str]
"""A sample as a reader draws it: ``(jpeg bytes, label, where)``, ``where`` naming its shard
and key for errors."""


def _samples(tars: Sequence[str], cfg: JigsawConfig, part: int, parts: int, stream: int) -> Iterator[Drawn]:
    """Endless samples of one group for one reader, epoch after epoch."""
    import webdataset as wds

    by_shard = len(tars) >= parts
    mine = list(tars[part::parts]) if by_shard else list(tars)
    for epoch in itertools.count():
        order = list(mine)
        if cfg.shuffle:
            random.Random(f"{cfg.seed}/{stream}/{part}/{epoch}").shuffle(order)
        samples = read_samples(order)
        if cfg.shuffle:
            samples = wds.shuffle(cfg.initial_fill, rng=random.Random(f"{cfg.seed}/{stream}/{part}/{epoch}/buffer"))(
                samples
            )
        for i, sample in enumerate(samples):
            if by_shard or i % parts == part:
                where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
                try:
                    jpeg, label = sample["jpg"], int(sample["cls"])
                except (KeyError, ValueError) as exc:
                    raise InputError(f"{where} has no .jpg or no integer .cls ({exc}): {_VERIFY_HINT}") from None
                yield jpeg, label, where


def worker_part(rank: int, world_size: int) -> tuple[int, int]:
    """``(part, parts)``: this DataLoader worker's share among every worker of every rank."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + worker, world_size * workers


def reader_streams(shards: ShardSet, cfg: JigsawConfig, part: int, parts: int) -> list[Iterator[Drawn]]:
    """One endless stream of samples per reader of the template: S, S, T, W."""
    return [_samples(shards.groups[g].tars, cfg, part, parts, i) for i, g in enumerate(READER_GROUPS)]


def _decode(jpeg: bytes, where: str, cfg: JigsawConfig, rng: np.random.Generator) -> tuple[Image.Image, int, int]:
    """Decode and draw the random resize: (image, width, height) with the resized size. A
    sample that does not decode stops the run naming it (only a set read with --no-verify
    can hold one)."""
    try:
        img = Image.open(io.BytesIO(jpeg))
        img.load()
        img = img.convert("RGB") if img.mode != "RGB" else img
    except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
        raise InputError(f"{where}: its .jpg {jpeg_problem(jpeg)}: {_VERIFY_HINT}") from None
    lo, hi = cfg.scale
    if cfg.fit == "pad_crop" and (lo, hi) != (1.0, 1.0):
        return (img, *scaled_size(*img.size, rng.uniform(lo, hi)))
    return (img, *img.size)


def fit_region(
    img: Image.Image, width: int, height: int, region: tuple[int, int], cfg: JigsawConfig, rng: np.random.Generator
) -> np.ndarray:
    """One region's pixels: resize (only the window, as DALI does), window, flip, pad."""
    rw, rh = region
    pos_x = cfg.crop_pos if cfg.crop_pos is not None else rng.random()
    pos_y = cfg.crop_pos if cfg.crop_pos is not None else rng.random()
    flip = cfg.flip_p > 0 and rng.random() < cfg.flip_p
    if cfg.fit == "pad_crop":
        xs, xe, xo = window(width, rw, pos_x)
        ys, ye, yo = window(height, rh, pos_y)
        if (width, height) == img.size:
            piece = np.asarray(img.crop((xs, ys, xe, ye)))
        else:
            sx, sy = img.width / width, img.height / height
            piece = np.asarray(
                img.resize((xe - xs, ye - ys), Image.Resampling.BILINEAR, box=(xs * sx, ys * sy, xe * sx, ye * sy))
            )
    else:
        size = (rw, rh) if cfg.fit == "warp" else fit_inside(img.width, img.height, rw, rh)
        piece = np.asarray(img.resize(size, Image.Resampling.BILINEAR))
        ph, pw = piece.shape[:2]
        xo, yo = -window_anchor(pw, rw, pos_x), -window_anchor(ph, rh, pos_y)
    if flip:
        piece = piece[:, ::-1]
    return place(piece, rw, rh, xo, yo)


def assemble(
    samples: Sequence[tuple[Image.Image, int, int, int]], cfg: JigsawConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[int]]:
    """Place four decoded samples ``(image, width, height, label)`` — two S, then T, then W —
    on the canvas. Returns the canvas and the labels in region order TL, TR, BL, BR."""
    s_a, s_b, tall, wide = samples
    if s_a[1] * s_a[2] > s_b[1] * s_b[2]:
        s_a, s_b = s_b, s_a
    placed = (s_a, wide, tall, s_b)
    tl, tr, bl, br = (fit_region(*p[:3], size, cfg, rng) for p, size in zip(placed, cfg.template.sizes))
    canvas = np.concatenate([np.concatenate([tl, tr], axis=1), np.concatenate([bl, br], axis=1)], axis=0)
    return canvas, [p[3] for p in placed]


class ReferenceJigsaw(torch.utils.data.IterableDataset):
    """Endless ``(image (3, H, W) float32, labels (4,) int64)`` jigsaw samples."""

    def __init__(
        self,
        root: ShardSet | Path | str,
        cfg: JigsawConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or JigsawConfig()
        self.shards = as_shard_set(root)
        if rank is None or world_size is None:
            here = process_info()
            rank, world_size = here.rank, here.world
        self.rank, self.world_size = rank, world_size
        check_enough_samples(self.shards, world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        part, parts = worker_part(self.rank, self.world_size)
        rng = np.random.default_rng([self.cfg.seed, 3, part])
        for drawn in zip(*reader_streams(self.shards, self.cfg, part, parts)):
            samples = [(*_decode(jpeg, where, self.cfg, rng), label) for jpeg, label, where in drawn]
            canvas, labels = assemble(samples, self.cfg, rng)
            yield normalize(canvas), torch.tensor(labels, dtype=torch.int64)


def reference_loader(
    root: ShardSet | Path | str,
    batch_size: int,
    cfg: JigsawConfig | None = None,
    *,
    workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ReferenceJigsaw(root, cfg, rank=rank, world_size=world_size),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
