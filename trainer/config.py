"""Every setting of a pre-training and a fine-tuning run, in one torch-free module.

Each field carries its help text, choices and range (:func:`jigsawdata.settings.setting`):
the CLI builds its options from them, ``__post_init__`` checks values however they arrive
(flags, ``--config`` files, Python), and the trainers' modules import the choice lists from
here, so no default or choice is written twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from jigsawdata.coco.reader import resolve_coco_root
from jigsawdata.errors import InputError
from jigsawdata.pipelines.config import JigsawSettings
from jigsawdata.settings import check, setting

ARCHS = ("resnet18", "resnet50", "resnet101", "resnext101_32x4d")
LOSSES = ("erf", "blockwise", "global")
PIPELINES = ("dali", "reference")
AMP_MODES = ("bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
"""Every command's --device values; auto picks a CUDA GPU when torch sees one."""
DETECTORS = ("c4", "fpn", "mask")
NORMS = ("frozen_bn", "bn", "gn")
BOX_HEADS = ("2fc", "4conv1fc")
NECKS = ("none", "fpn")


_RENAMED = {"split": "template_split"}
"""Settings that earlier versions saved under another name."""


def saved_config(values: dict) -> dict:
    """A checkpoint's saved settings under today's names."""
    return {_RENAMED.get(k, k): v for k, v in values.items()}


def config_from(cls, values: dict):
    """A config dataclass from saved values, ignoring fields this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(kw_only=True)
class PretrainConfig(JigsawSettings):
    """Every pre-training setting, with its help text, choices and range (the CLI's options
    are built from these fields; see :mod:`jigsawdata.settings`). The jigsaw settings are
    :class:`JigsawSettings`' own, which ``preview`` takes too; ``erf`` reads them from the run."""

    shards: str = setting(help="Shard set: a directory, or a URL (fetched and verified into the cache first).")
    out: str = setting(help="Run directory (new or empty; --resume continues it).")
    arch: str = setting("resnet50", "Backbone.", choices=ARCHS)
    loss: str = setting(
        "erf", "Pre-training loss: ERF-adaptive dense, block-wise dense or global (Table 2).", choices=LOSSES
    )
    tau: float = setting(0.7, "ERF weight floor of a cell's own region (Eq. 2).", min=0.0, max=1.0)
    neck: str = setting(
        "none",
        "none: classify layer4's map (the paper). fpn: put torchvision's FPN on the backbone "
        "and classify densely on P2..P5 with one shared head, so `finetune --detector fpn|mask` "
        "starts with a pre-trained neck.",
        choices=NECKS,
    )
    fpn_channels: int = setting(
        256,
        "Channels of the pre-trained FPN (--neck fpn), a multiple of 32; fine-tune with the same --fpn-channels.",
        min=32,
    )
    iterations: int = setting(64_000, "Training iterations.", min=1)
    batch: int = setting(512, "Global batch of assembled images (all ranks together).", min=1)
    lr_start: float = setting(0.2, "Warm-up start learning rate at batch 512 (scaled linearly to --batch).", min=0.0)
    lr_peak: float = setting(
        0.8,
        "Peak learning rate at batch 512 (scaled linearly to --batch; docs/method.md 5).",
        min=0.0,
        min_open=True,
        aliases=("--lr",),
    )
    warmup: int = setting(1250, "Warm-up iterations.", min=0)
    momentum: float = setting(0.9, "SGD momentum.", min=0.0, max=1.0)
    weight_decay: float = setting(1e-4, "SGD weight decay.", min=0.0)
    device: str = setting("auto", "Where to train (auto: a CUDA GPU if torch sees one).", choices=DEVICES)
    pipeline: str = setting("dali", "Input pipeline: NVIDIA DALI, or the plain PyTorch reference.", choices=PIPELINES)
    workers: int = setting(
        4,
        "Per rank: DALI's one-thread pipelines on the CPU or its threads on a GPU (>= 1), "
        "or the reference pipeline's DataLoader workers (0: in-process).",
        min=0,
    )
    seed: int = setting(0, "Seed of the model, the augmentation and the readers.", min=0)
    erf_every: int = setting(5000, "Iterations between ERF weight refreshes.", min=1)
    erf_images: int = setting(64, "Images the ERF is averaged over.", min=1)
    checkpoint_every: int = setting(
        1000, "Iterations between checkpoints (and one on SIGTERM, e.g. Slurm preemption).", min=1
    )
    keep_checkpoints: int = setting(
        1,
        "Checkpoints kept: the latest is checkpoint.pt; above 1, the last K are "
        "also kept as checkpoint-<iteration>.pt.",
        min=1,
    )
    log_every: int = setting(10, "Iterations between log lines and metrics records.", min=1)
    amp: str = setting(
        "bf16",
        "Mixed precision on a GPU: bf16, fp16 (with a grad scaler) or off; the CPU runs fp32.",
        choices=AMP_MODES,
    )
    cache_dir: str | None = setting(
        None, "Where --shards URLs are fetched to (default: $JIGSAWDATA_CACHE or ~/.cache/jigsawdata)."
    )
    verify: bool = setting(
        True,
        "Check every shard against the manifest before the first batch (cached by size and mtime: free on later runs).",
    )
    val_shards: str | None = setting(
        None,
        "Shards of a held-out split (e.g. val2017): region accuracy on fixed "
        "jigsaw images every --val-every iterations and at the end.",
    )
    val_every: int = setting(1000, "Iterations between validations.", min=1)
    val_images: int = setting(256, "Fixed jigsaw images validated on.", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's type, choice and range, and the jigsaw template
        if self.pipeline == "dali" and self.workers < 1:
            raise InputError(
                f"--workers {self.workers}: DALI needs >= 1 thread; 0 (in-process) is for --pipeline reference"
            )
        if self.fpn_channels != 256 and self.neck != "fpn":
            raise InputError("--fpn-channels is for --neck fpn: without a neck there is no feature pyramid")
        if self.fpn_channels % 32:
            raise InputError(
                f"--fpn-channels {self.fpn_channels} is not a multiple of 32: fine-tuning's "
                "--fpn-channels must match it, and is one (GroupNorm's 32 groups)"
            )


def train_files(cfg: FinetuneConfig) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` a fine-tuning run trains on."""
    if cfg.ann is not None:
        return Path(cfg.ann), Path(cfg.image_dir)
    return resolve_coco_root(Path(cfg.coco), cfg.split)


def val_files(cfg: FinetuneConfig) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` a fine-tuning run is evaluated on after training."""
    if cfg.ann is not None:
        return Path(cfg.val_ann or cfg.ann), Path(cfg.val_image_dir or cfg.image_dir)
    return resolve_coco_root(Path(cfg.coco), cfg.val_split or cfg.split, "--val-split")


def schedule_epochs(schedule: str = "1x", epochs: int | None = None) -> tuple[int, tuple[int, ...]]:
    """Epochs and the epochs after which the learning rate drops tenfold (docs/method.md 5).

    ``Nx`` is N times the 1x schedule (13 epochs, drops after 9 and 12): 2x is 26 (18, 24),
    3x 39 (27, 36). ``epochs`` overrides the length and keeps the drops at the same relative
    points (9/13 and 12/13), e.g. to match a cost budget (the paper's Table 5 baseline).
    """
    if epochs is not None:
        if epochs < 1:
            raise InputError("--epochs must be >= 1")
        return epochs, (round(epochs * 9 / 13), round(epochs * 12 / 13))
    n = schedule_multiple(schedule)
    return max(1, round(13 * n)), (round(9 * n), round(12 * n))


def schedule_multiple(schedule: str, what: str = "--schedule") -> float:
    """N of an ``Nx`` schedule (``1x``, ``2x``, ``0.5x``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)x", schedule)
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{what} must look like 1x, 2x or 3x, got {schedule!r}")
    return float(match.group(1))


@dataclass
class FinetuneConfig:
    """Every fine-tuning setting, with its help text, choices and range (the CLI's options
    are built from these fields; see :mod:`jigsawdata.settings`)."""

    out: str = setting(help="Run directory (new or empty; --resume continues it).")
    coco: str | None = setting(
        None, "COCO root (annotations/instances_<split>.json and <split>/); or --ann and --image-dir."
    )
    ann: str | None = setting(
        None,
        "Training annotation file of any COCO-format set (LVIS, Objects365, your own), "
        "instead of --coco and --split; `jigsawdata split` cuts a held-out part from one.",
    )
    image_dir: str | None = setting(None, "Image folder of --ann (and of --val-ann unless --val-image-dir).")
    val_ann: str | None = setting(None, "Annotation file evaluated after training, with --ann (default: --ann).")
    val_image_dir: str | None = setting(None, "Image folder of --val-ann (default: --image-dir).")
    init: str = setting(
        "scratch",
        "A jigsaw run directory or checkpoint, an exported backbone, imagenet:FILE (a "
        "torchvision ResNet state dict), or scratch.",
    )
    detector: str = setting("c4", "Faster R-CNN C4, Faster R-CNN FPN, or Mask R-CNN FPN.", choices=DETECTORS)
    arch: str = setting("resnet50", "Backbone.", choices=ARCHS)
    norm: str | None = setting(
        None,
        "Normalisation (default: frozen_bn with pretrained weights, bn from scratch); gn "
        "also puts GroupNorm in the FPN and a 4conv1fc box head (the paper's scratch "
        "baseline).",
        choices=NORMS,
    )
    box_head: str | None = setting(
        None,
        "Box head of the fpn and mask detectors: 2fc (torchvision's), or 4conv1fc "
        "with GroupNorm in it and in the FPN (He et al. 2019). Default: 4conv1fc with "
        "--norm gn, else 2fc.",
        choices=BOX_HEADS,
    )
    trainable_layers: int | None = setting(
        None,
        "Backbone stages trained, counted from layer4 (torchvision's "
        "trainable_backbone_layers): default 3 with transferred weights (stem and "
        "layer1 frozen, as torchvision and Detectron2), 5 (all) otherwise.",
        min=0,
        max=5,
    )
    fpn_channels: int = setting(
        256,
        "Channels of the FPN and of its heads' convolutions (fpn, mask); torchvision's "
        "and the paper's are 256. A multiple of 32 (GroupNorm's groups).",
        min=32,
    )
    split: str = setting("train2017", "Training split of --coco.")
    val_split: str | None = setting(None, "Split evaluated after training (default: --split).")
    schedule: str = setting("1x", "Nx = N times 13 epochs with drops after 9N and 12N: 1x, 2x, 3x, ...")
    epochs: int | None = setting(
        None,
        "Any length instead of --schedule (drops at the same relative points), e.g. "
        "to match a from-scratch run's cost to pre-training + fine-tuning.",
        min=1,
    )
    batch: int = setting(16, "Global batch of images (all ranks).", min=1)
    lr: float = setting(0.02, "Learning rate at batch 16 (scaled linearly to --batch).", min=0.0, min_open=True)
    momentum: float = setting(0.9, "SGD momentum.", min=0.0, max=1.0)
    weight_decay: float = setting(1e-4, "SGD weight decay.", min=0.0)
    warmup: int = setting(500, "Warm-up iterations (linear from lr/1000).", min=0)
    min_size: int = setting(800, "Shorter image side after resizing.", min=1)
    max_size: int = setting(1333, "Longest image side after resizing.", min=1)
    flip_p: float = setting(0.5, "Horizontal flip probability of a training image.", min=0.0, max=1.0)
    rois_per_image: int = setting(512, "Sampled RoIs per image in the box head.", min=1)
    workers: int = setting(4, "DataLoader workers per rank (0: in-process).", min=0)
    device: str = setting("auto", "Where to train (auto: a CUDA GPU if torch sees one).", choices=DEVICES)
    amp: str = setting(
        "bf16",
        "Mixed precision on a GPU: bf16, fp16 (with a grad scaler) or off; the CPU runs "
        "fp32. fp16 overflows in the forward pass of some transferred backbones (frozen BN keeps "
        "their activation scale), which bf16's range avoids.",
        choices=AMP_MODES,
    )
    seed: int = setting(0, "Seed of the model initialisation and the data order.", min=0)
    max_iters: int | None = setting(None, "Stop after this many iterations (short runs, smoke tests).", min=1)
    max_images: int | None = setting(
        None, "Use only the first N images of each split (short runs, smoke tests).", min=1
    )
    log_every: int = setting(20, "Iterations between log lines.", min=1)

    def __post_init__(self) -> None:
        check(self)
        if (self.coco is None) == (self.ann is None):
            raise InputError("give --coco ROOT (with --split), or --ann FILE with --image-dir DIR: one of the two")
        if self.ann is not None and self.image_dir is None:
            raise InputError("--ann needs --image-dir, the folder its file_names are relative to")
        if self.coco is not None and (self.image_dir or self.val_ann or self.val_image_dir):
            raise InputError(
                "--image-dir, --val-ann and --val-image-dir go with --ann; with --coco use --split and --val-split"
            )
        schedule_epochs(self.schedule, self.epochs)
        if self.fpn_channels % 32:
            raise InputError(f"--fpn-channels {self.fpn_channels} is not a multiple of 32 (GroupNorm's 32 groups)")
        if self.box_head is not None and self.detector == "c4":
            raise InputError("--box-head is for the fpn and mask detectors: c4's box head is the ResNet's layer4")
        if self.fpn_channels != 256 and self.detector == "c4":
            raise InputError("--fpn-channels is for the fpn and mask detectors: c4 has no feature pyramid")
        if self.init == "scratch" and self.trainable_layers not in (None, 5):
            raise InputError(
                f"--trainable-layers {self.trainable_layers} would freeze randomly initialised stages: "
                "with --init scratch every stage is trained"
            )
