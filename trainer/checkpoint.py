"""Checkpoints that hold only tensors and plain data, saved atomically, loaded with
``weights_only=True`` (never unpickling arbitrary objects)."""

from __future__ import annotations

from pathlib import Path

import torch

from jigsawdata.errors import InputError, first_line
from jigsawdata.files import atomic_path

FORMAT = "jigsawdata-pretrain-1"
CHECKPOINT_NAME = "checkpoint.pt"
"""The checkpoint in a run directory, of pre-training and fine-tuning alike."""


def checkpoint_file(path: Path | str) -> Path:
    """``path`` itself, or the checkpoint of the run directory it names."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path, map_location="cpu", *, fmt: str = FORMAT, kind: str = "pre-training") -> dict:
    """The checkpoint at ``path`` (a file or a run directory) when it is a ``fmt`` one."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a foreign pickle, a truncated file, ...
        reason = first_line(exc, type(exc).__name__)
        raise InputError(f"{path} is not a loadable checkpoint: {reason}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise InputError(f"{path} is not a jigsawdata {kind} checkpoint")
    return ckpt

