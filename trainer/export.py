"""Export a pre-trained backbone for detection frameworks, in files each one opens as it is.

- ``torchvision``: a plain state dict with torchvision's ResNet keys; loads with
  ``resnet50().load_state_dict(sd, strict=False)`` missing only ``fc.*``.
- ``detectron2``: ``{"model": ..., "__author__": ..., "matching_heuristics": True}`` with
  Detectron2's ResNet names (``stem.conv1.norm.weight``, ``res2.0.conv1.weight``,
  ``res2.0.shortcut.norm.bias``, ...), the renaming of Detectron2's own
  ``tools/convert-torchvision-to-d2.py``. ``.pkl`` is what that converter writes and what
  Detectron2's checkpointer opens with ``pickle.load``: numpy arrays only, readable without
  torch. ``.pth`` holds the same dict as a torch file (Detectron2 reads it with ``torch.load``).
  The weights are torchvision's ResNet v1.5 on RGB input normalised as torchvision's, so a
  Detectron2 config needs :func:`detectron2_config`, or it builds a different network and the
  weights load into it without a warning.
- ``mmdet``: ``{"state_dict": ..., "meta": ...}``; MMDetection's ResNet uses torchvision's key
  names, so ``init_cfg=dict(type="Pretrained", checkpoint=FILE)`` loads it; with ``load_from``
  the keys are ``backbone.*``, a detector's, for ``load_from=FILE``.

``torchvision`` also writes ``.safetensors`` (the same state dict; tensors only, so loading
it runs no code): ``safetensors.torch.load_file`` and ``finetune --init`` read it.

A ``--neck fpn`` run exports its FPN too, under each framework's names for a whole
detector's backbone and neck, so the file initialises both (and the recipes above, made for
a bare backbone, no longer apply: ``backbone_only`` writes the backbone alone, as above):

- ``torchvision``: ``backbone.body.*`` and ``backbone.fpn.*``, the keys of its
  ``FasterRCNN`` / ``MaskRCNN`` FPN detectors (``load_state_dict(sd, strict=False)`` misses
  only ``rpn.*`` and ``roi_heads.*``);
- ``detectron2``: the ResNet names above plus ``fpn_lateral{2..5}.*`` and
  ``fpn_output{2..5}.*`` (its FPN's), matched to ``backbone.bottom_up.*`` and
  ``backbone.fpn_*`` by the same heuristics;
- ``mmdet``: ``backbone.*`` and ``neck.lateral_convs.{i}.conv.*`` /
  ``neck.fpn_convs.{i}.conv.*`` (its ``FPN`` neck's), for ``load_from=FILE``.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from jigsawdata import __version__
from jigsawdata.errors import InputError
from jigsawdata.files import write_bytes_atomic
from jigsawdata.pipelines.config import IMAGENET_MEAN, IMAGENET_STD

from .checkpoint import checkpoint_file, load, save_atomic
from .tensorfile import SUFFIX, write_safetensors

FORMATS = ("torchvision", "detectron2", "mmdet")
SUFFIXES = {"torchvision": (".pth", ".pt", SUFFIX), "detectron2": (".pkl", ".pth"), "mmdet": (".pth", ".pt")}
"""What each format's file may be called: its readers pick the loader by the suffix."""
_SUFFIX_WHY = {
    "torchvision": "a torch file, or tensors only as safetensors",
    "detectron2": "what Detectron2's converter writes, opened with pickle.load, or a torch file",
    "mmdet": "a torch file, as MMEngine's load_checkpoint reads",
}

# Detectron2's MODEL.RESNETS keys that differ from its defaults (DEPTH 50, NUM_GROUPS 1,
# WIDTH_PER_GROUP 64, RES2_OUT_CHANNELS 256) for each backbone; its first bottleneck is
# NUM_GROUPS * WIDTH_PER_GROUP channels wide, as torchvision's groups * width_per_group.
_DETECTRON2_RESNETS = {
    "resnet18": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64},
    "resnet50": {"DEPTH": 50},
    "resnet101": {"DEPTH": 101},
    "resnext101_32x4d": {"DEPTH": 101, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 4},
}


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: the backbone's architecture, its number of tensors and
    whether an FPN is among them."""

    arch: str
    tensors: int
    neck: bool = False
    fpn_channels: int | None = None
    """The exported FPN's width (None: no FPN)."""


def backbone_state(ckpt: dict, prefix: str = "backbone.") -> "OrderedDict[str, torch.Tensor]":
    """The checkpoint's tensors under ``prefix`` (the backbone's, or ``fpn.`` the neck's), without it."""
    return OrderedDict((k[len(prefix) :], v) for k, v in ckpt["model"].items() if k.startswith(prefix))


_NECK_NAMES = {
    "torchvision": lambda key: "backbone.fpn." + key,
    "detectron2": lambda key: re.sub(
        r"^(inner|layer)_blocks\.(\d)\.0\.",
        lambda m: f"fpn_{'lateral' if m[1] == 'inner' else 'output'}{int(m[2]) + 2}.",
        key,
    ),
    "mmdet": lambda key: re.sub(
        r"^(inner|layer)_blocks\.(\d)\.0\.",
        lambda m: f"neck.{'lateral' if m[1] == 'inner' else 'fpn'}_convs.{m[2]}.conv.",
        key,
    ),
}
"""torchvision's ``FeaturePyramidNetwork`` keys (``inner_blocks.{i}.0.weight``, ...) in each format."""
_BACKBONE_PREFIX_WITH_NECK = {"torchvision": "backbone.body.", "detectron2": "", "mmdet": "backbone."}


def detectron2_name(key: str) -> str:
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_state(state: "OrderedDict[str, torch.Tensor]", as_numpy: bool) -> OrderedDict:
    """Detectron2's names; numpy arrays where the file is to be read by ``pickle.load``. Its
    frozen batch norm has no ``num_batches_tracked``, which would only be reported unused."""
    return OrderedDict(
        (detectron2_name(k), v.detach().cpu().numpy() if as_numpy else v)
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    )


def detectron2_config(arch: str, weights: Path, fpn_channels: int | None = None) -> dict:
    """The Detectron2 config keys the exported weights need, as a nested dict for its YAML.

    torchvision's bottlenecks stride in the 3x3 convolution (``STRIDE_IN_1X1: False``; the
    default True is MSRA's layout) and take RGB scaled by torchvision's mean and std on 0-255
    values (Detectron2's defaults are BGR Caffe means with std 1)."""
    return {
        "MODEL": {
            "WEIGHTS": str(weights),
            "PIXEL_MEAN": [round(m * 255, 3) for m in IMAGENET_MEAN],
            "PIXEL_STD": [round(s * 255, 3) for s in IMAGENET_STD],
            "RESNETS": {**_DETECTRON2_RESNETS[arch], "STRIDE_IN_1X1": False},
            **({"FPN": {"OUT_CHANNELS": fpn_channels}} if fpn_channels else {}),
        },
        "INPUT": {"FORMAT": "RGB"},
    }


def _check_out(fmt: str, out: Path, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise InputError(f"--out {out} would overwrite its input {source}: choose another file")
    if out.exists() and out.resolve().parent == source.resolve().parent:
        raise InputError(f"--out {out} would overwrite a file of the run it exports: choose another file")
    if out.suffix not in SUFFIXES[fmt]:
        *first, last = SUFFIXES[fmt]
        raise InputError(
            f"--out {out}: a {fmt} export ends in {', '.join(first)} or {last} ({_SUFFIX_WHY[fmt]}), "
            f"not {out.suffix or 'no suffix'!r}"
        )


def export(checkpoint: Path, fmt: str, out: Path, backbone_only: bool = False, load_from: bool = False) -> Exported:
    """Write the backbone (and the FPN of a ``--neck fpn`` run, unless ``backbone_only``) of a
    pre-training checkpoint in ``fmt``. ``load_from`` (mmdet) names a lone backbone as a
    detector's (``backbone.*``), for MMDetection's ``load_from`` instead of ``init_cfg``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if load_from and fmt != "mmdet":
        raise InputError("--load-from is for --format mmdet: the other formats name keys one way")
    out = Path(out)
    source = checkpoint_file(checkpoint)
    _check_out(fmt, out, source)
    ckpt = load(checkpoint)
    backbone, neck = backbone_state(ckpt), OrderedDict() if backbone_only else backbone_state(ckpt, "fpn.")
    meta = {"arch": ckpt["arch"], "iteration": ckpt["iteration"], "source": "jigsawdata " + __version__}
    as_numpy = fmt == "detectron2" and out.suffix == ".pkl"
    state = detectron2_state(backbone, as_numpy) if fmt == "detectron2" else backbone
    if load_from and not neck:
        state = OrderedDict((_BACKBONE_PREFIX_WITH_NECK[fmt] + k, v) for k, v in state.items())
    if neck:
        meta["neck"] = "fpn"
        prefix = _BACKBONE_PREFIX_WITH_NECK[fmt]
        rename = _NECK_NAMES[fmt]
        state = OrderedDict(
            [
                *((prefix + k, v) for k, v in state.items()),
                *((rename(k), v.detach().cpu().numpy() if as_numpy else v) for k, v in neck.items()),
            ]
        )
    if fmt == "torchvision":
        payload = state
    elif fmt == "detectron2":
        payload = {"model": state, "__author__": "jigsawdata", "matching_heuristics": True}
    else:
        payload = {"state_dict": state, "meta": meta}
    if fmt == "detectron2" and out.suffix == ".pkl":
        write_bytes_atomic(out, pickle.dumps(payload))
    elif out.suffix == SUFFIX:
        write_safetensors(out, state, {"format": "pt", **{k: str(v) for k, v in meta.items()}})
    else:
        save_atomic(payload, out)
    width = int(neck["layer_blocks.0.0.weight"].shape[0]) if neck else None
    return Exported(ckpt["arch"], len(state), bool(neck), width)
