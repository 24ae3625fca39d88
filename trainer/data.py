"""Batch sources for training: the DALI pipeline or the reference DataLoader, behind one
small interface that also saves and restores the data position."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from jigsawdata.pipelines.config import JigsawConfig


class DaliSource:
    """DALI jigsaw batches; the data position is DALI's own reader/RNG checkpoint.

    The labels always leave DALI on the CPU (they are stacked there), and so do the images
    of the CPU backend: both are moved to the training device here, as the reference
    source does. On the CPU, ``workers`` is the number of one-thread pipelines (DALI runs a
    pipeline's CPU operators one at a time, so separate pipelines keep every core busy, as
    DataLoader workers do); on a GPU it is one pipeline's threads."""

    kind = "dali"

    def __init__(
        self,
        shards: Path,
        batch: int,
        cfg: JigsawConfig,
        *,
        device: torch.device,
        workers: int,
        rank: int,
        world_size: int,
        state: str | None = None,
    ) -> None:
        from jigsawdata.pipelines.dali import DaliJigsawLoader

        gpu = device.type == "cuda"
        self._device = device
        self._loader = DaliJigsawLoader(
            shards,
            batch,
            cfg,
            device="gpu" if gpu else "cpu",
            device_id=device.index if gpu else None,
            num_threads=workers if gpu else 1,
            pipelines=1 if gpu else workers,
            rank=rank,
            world_size=world_size,
            checkpoint=state,
        )

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self._loader)
        return images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)

    def state(self) -> str:
        return self._loader.state()


class ReferenceSource:
    """Reference DataLoader batches; its stream is deterministic, so the data position is
    the number of batches consumed, and restoring it skips that many."""

    kind = "reference"

    def __init__(
        self,
        shards: Path | str,
        batch: int,
        cfg: JigsawConfig,
        *,
        device: torch.device,
        workers: int,
        rank: int,
        world_size: int,
        state: int | None = None,
    ) -> None:
        from jigsawdata.pipelines.reference import reference_loader

        self._device = device
        self._iterator = iter(reference_loader(shards, batch, cfg, workers=workers, rank=rank, world_size=world_size))
        self._consumed = 0
        for _ in itertools.islice(self._iterator, state or 0):
            self._consumed += 1

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self._iterator)
        self._consumed += 1
        return images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)

    def state(self) -> int:
        return self._consumed


SOURCES = {"dali": DaliSource, "reference": ReferenceSource}
