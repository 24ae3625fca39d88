"""Export a pre-trained backbone for detection frameworks.

- ``torchvision``: a plain state dict with torchvision's ResNet keys; loads with
  ``resnet50().load_state_dict(sd, strict=False)`` missing only ``fc.*``.
- ``detectron2``: ``{"model": ..., "__author__": ..., "matching_heuristics": True}`` with
  Detectron2's ResNet names (``stem.conv1.norm.weight``, ``res2.0.conv1.weight``,
  ``res2.0.shortcut.norm.bias``, ...), the renaming of Detectron2's own
  ``tools/convert-torchvision-to-d2.py``; use it as ``MODEL.WEIGHTS`` with
  ``MODEL.PIXEL_MEAN/STD`` of torchvision models and ``INPUT.FORMAT = "RGB"``.
- ``mmdet``: ``{"state_dict": ..., "meta": ...}``; MMDetection's ResNet uses torchvision's key
  names, so ``init_cfg=dict(type="Pretrained", checkpoint=FILE)`` loads it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from jigsawdata import __version__
from jigsawdata.errors import InputError

from .checkpoint import checkpoint_file, load, save_atomic

FORMATS = ("torchvision", "detectron2", "mmdet")


def backbone_state(ckpt: dict) -> "OrderedDict[str, torch.Tensor]":
    prefix = "backbone."
    return OrderedDict((k[len(prefix):], v) for k, v in ckpt["model"].items() if k.startswith(prefix))


def detectron2_name(key: str) -> str:
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def export(checkpoint: Path, fmt: str, out: Path) -> dict:
    """Write the backbone of a pre-training checkpoint in ``fmt``; returns what was saved."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    source = checkpoint_file(checkpoint)
    if Path(out).resolve() == source.resolve():
        raise InputError(f"--out {out} would overwrite its input {source}: choose another file")
    if Path(out).exists() and Path(out).resolve().parent == source.resolve().parent:
        raise InputError(f"--out {out} would overwrite a file of the run it exports: choose another file")
    ckpt = load(checkpoint)
    state = backbone_state(ckpt)
    meta = {"arch": ckpt["arch"], "iteration": ckpt["iteration"], "source": "jigsawdata " + __version__}
    if fmt == "torchvision":
        payload = state
    elif fmt == "detectron2":
        payload = {"model": OrderedDict((detectron2_name(k), v) for k, v in state.items()
                                        if not k.endswith("num_batches_tracked")),
                   "__author__": "jigsawdata", "matching_heuristics": True}
    else:
        payload = {"state_dict": state, "meta": meta}
    save_atomic(payload, Path(out))
    return payload
