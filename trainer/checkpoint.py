"""Checkpoints that hold only tensors and plain data, saved atomically, loaded with
``weights_only=True`` (never unpickling arbitrary objects)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from jigsawdata.errors import InputError, first_line

FORMAT = "jigsawdata-pretrain-1"


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a foreign pickle, a truncated file, ...
        reason = first_line(exc, type(exc).__name__)
        raise InputError(f"{path} is not a loadable checkpoint: {reason}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path} is not a jigsawdata pre-training checkpoint")
    return ckpt

