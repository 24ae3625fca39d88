"""Checkpoints that hold only tensors and plain data, saved atomically, loaded with
``weights_only=True`` (never unpickling arbitrary objects)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch

from jigsawdata.errors import InputError, first_line
from jigsawdata.files import atomic_path
from jigsawdata.layout import CHECKPOINT_NAME

FORMAT = "jigsawdata-pretrain-1"


def checkpoint_file(path: Path | str) -> Path:
    """``path`` itself, or the checkpoint of the run directory it names."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_tensors(path: Path, map_location="cpu", *, what: str) -> object:
    """A torch file of tensors and plain data, loaded with ``weights_only=True``; anything else
    is refused as ``"<what>: <why>"``. torch's own message advises loading with
    ``weights_only=False``, which would run whatever code the file holds: it is never shown,
    nor are the unpickler's warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{what}: {_refusal(str(exc))}") from exc
    except Exception as exc:  # a truncated file, not a torch file at all, ...
        raise InputError(f"{what}: {first_line(exc, type(exc).__name__)}") from exc


def _refusal(text: str) -> str:
    """Why torch's weights-only unpickler refused a file, without its advice."""
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return (
            f"it names Python code ({named[1]}) that loading would run: refused (a Detectron2 .pkl or another "
            "tool's checkpoint is not read here)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return f"not a file of tensors and plain data ({detail[1].strip() if detail else 'unreadable'})"


def save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path, map_location="cpu", *, fmt: str = FORMAT, kind: str = "pre-training") -> dict:
    """The checkpoint at ``path`` (a file or a run directory) when it is a ``fmt`` one."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    ckpt = load_tensors(path, map_location, what=f"{path} is not a loadable checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise InputError(f"{path} is not a jigsawdata {kind} checkpoint")
    return ckpt


def keep_last(latest: Path, iteration: int, keep: int) -> None:
    """With ``keep`` > 1, also keep the checkpoint just written as ``checkpoint-<iteration>.pt``
    (a hard link: no second copy on disk) and delete all but the newest ``keep`` of those."""
    if keep <= 1:
        return
    named = latest.with_name(f"{latest.stem}-{iteration:08d}{latest.suffix}")
    named.unlink(missing_ok=True)
    try:
        os.link(latest, named)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(latest, named)
    for old in sorted(latest.parent.glob(f"{latest.stem}-[0-9]*{latest.suffix}"))[:-keep]:
        old.unlink(missing_ok=True)
