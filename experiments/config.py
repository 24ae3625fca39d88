"""An experiment grid's settings and its presets (``tiny``, ``gpu``, ``paper``).

What a grid compares (arms, schedules, seeds) and under which run settings; the grid
(:mod:`.grid`) runs it and the report (:mod:`.report`) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from jigsawdata.errors import InputError
from jigsawdata.pipelines.config import FIT_MODES
from jigsawdata.trainer.config import ARCHS, DETECTORS, LOSSES, FinetuneConfig, PretrainConfig, schedule_multiple

PRESETS = ("tiny", "gpu", "paper")
FORMAT = "jigsawdata-experiment-2"
INITS = ("jigsaw", "imagenet", "random", "scratch")
FULL_LENGTH = 4.0
"""Pre-training lengths are multiples of a quarter of the preset's iterations: Fig. 7b's
x-axis counts 16k-iteration units and the paper's default, 64k, is its 4x."""


@dataclass(frozen=True)
class ExperimentConfig:
    out: str
    coco: str | None = None
    """COCO root holding ``split`` and ``val_split``; the synthetic presets make their own."""
    split: str = "train2017"
    val_split: str = "val2017"
    losses: tuple[str, ...] = ("erf",)
    taus: tuple[float, ...] = ()
    """Extra ERF arms at these tau (Fig. 7a)."""
    lengths: tuple[float, ...] = ()
    """Extra ERF arms pre-trained for these multiples of a quarter of the iterations (Fig. 7b)."""
    fits: tuple[str, ...] = ()
    """Extra block-wise arms with these fit modes (Table 1)."""
    no_context: bool = False
    """An ERF arm pre-trained on shards whose positives are not enlarged."""
    fpn_neck: bool = False
    """An ERF arm pre-trained with the detector's FPN on its backbone (``--neck fpn``),
    fine-tuned with that FPN: does pre-training the neck close the paper's FPN gap?"""
    imagenet: str | None = None
    """A local torchvision ResNet state dict: adds an ``imagenet`` arm."""
    random: bool = True
    scratch: bool = True
    match: str = "erf"
    """The arm whose total cost the scratch arm is given."""
    baseline: str | None = None
    """The arm every AP difference is taken against (default: random if present, else the first)."""
    detector: str = "c4"
    arch: str = "resnet50"
    schedules: tuple[str, ...] = ("1x",)
    epochs_1x: int = 13
    """Epochs of the 1x schedule (the paper's: 13, lr drops after 9 and 12)."""
    seeds: int = 1
    seed: int = 0
    """The first seed; seed k of the grid is ``seed + k``. Also the data's seed."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads for torch (None: torch's default)."""
    synthetic_images: int = 0
    """With no ``coco``: images of the cluttered synthetic train split."""
    synthetic_val_images: int = 0
    """... and of its held-out split (0: a quarter of the train split's)."""
    knn_train: int = 2048
    """Training crops the kNN probe remembers (0: no probe)."""
    knn_val: int = 1024
    """Held-out crops the kNN probe labels."""
    probe_iterations: int = 10
    """Iterations the scratch model is timed over (after a short warm-up)."""
    pretrain: Mapping[str, Any] = field(default_factory=dict)
    """:class:`PretrainConfig` settings of every pre-training run; the rest are its defaults
    (docs/method.md 5), and the arm decides data, loss, tau, fit, length and seed."""
    finetune: Mapping[str, Any] = field(default_factory=dict)
    """:class:`FinetuneConfig` settings of every fine-tuning run, likewise (the arm decides
    initialisation, normalisation, box head, epochs and seed)."""

    def __post_init__(self) -> None:
        _subset("--losses", self.losses, LOSSES)
        _subset("--fits", self.fits, tuple(f for f in FIT_MODES if f != "pad_crop"))
        if self.detector not in DETECTORS:
            raise InputError(f"--detector must be one of {', '.join(DETECTORS)}")
        if self.arch not in ARCHS:
            raise InputError(f"--arch must be one of {', '.join(ARCHS)}")
        if any(not 0.0 <= t <= 1.0 for t in self.taus):
            raise InputError("--taus must lie in [0, 1]")
        if any(n <= 0 for n in self.lengths):
            raise InputError("--pretrain-iterations multiples must be > 0")
        if not self.schedules:
            raise InputError("--schedules needs at least one schedule, e.g. 1x")
        multiples = [schedule_multiple(schedule, "--schedules") for schedule in self.schedules]
        if len(set(multiples)) != len(multiples):
            raise InputError(f"--schedules {','.join(self.schedules)} names one schedule twice")
        if FULL_LENGTH in self.lengths:
            raise InputError(
                f"--pretrain-iterations {FULL_LENGTH:g}x is the full length, the erf arm's own: give other multiples"
            )
        for name, value, low in (
            ("--seeds", self.seeds, 1),
            ("--epochs-1x", self.epochs_1x, 1),
            ("--seed", self.seed, 0),
            ("knn_train", self.knn_train, 0),
            ("knn_val", self.knn_val, 1),
            ("probe_iterations", self.probe_iterations, 1),
        ):
            if value < low:
                raise InputError(f"{name} must be >= {low}")
        names = [a.name for a in arms(self)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(
                f"arms given twice: {', '.join(repeated)} (--losses, --taus, --fits and "
                "--pretrain-iterations each name an arm once)"
            )
        if not names:
            raise InputError("the grid has no arm: give --losses, --imagenet, --random or --scratch")
        jigsaw = [a.name for a in arms(self) if a.init == "jigsaw"]
        if self.scratch and self.match not in jigsaw:
            raise InputError(
                f"--match {self.match}: the scratch arm is given the total cost of a jigsaw arm of the "
                f"grid ({', '.join(jigsaw) or 'none: add --losses erf or use --no-scratch'})"
            )
        if self.fpn_neck and self.detector == "c4":
            raise InputError(
                "--fpn-neck pre-trains an FPN for the fpn and mask detectors: c4 has none (use --detector fpn)"
            )
        if self.baseline is not None and self.baseline not in names:
            raise InputError(f"--baseline {self.baseline} is not an arm of the grid ({', '.join(names)})")
        tau = self.pretrain_config(shards="", out="").tau
        if tau in self.taus:
            raise InputError(f"--taus {tau:g} is the erf arm's own tau (the preset's): give other values")
        self.finetune_config(coco="", out="")

    def pretrain_config(self, **run: Any) -> PretrainConfig:
        return _settings(
            PretrainConfig, {**self.pretrain, "arch": self.arch, "device": self.device, "seed": self.seed, **run}
        )

    def finetune_config(self, **run: Any) -> FinetuneConfig:
        values = {
            **self.finetune,
            "arch": self.arch,
            "device": self.device,
            "detector": self.detector,
            "seed": self.seed,
            **run,
        }
        if values["detector"] == "c4":
            values.pop("fpn_channels", None)  # a preset's pyramid width: C4 has no pyramid
        return _settings(FinetuneConfig, values)

    @property
    def baseline_arm(self) -> str:
        names = [a.name for a in arms(self)]
        return self.baseline or ("random" if "random" in names else names[0])

    @property
    def run_seeds(self) -> range:
        return range(self.seed, self.seed + self.seeds)


def _subset(option: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if any(v not in allowed for v in values):
        raise InputError(f"{option} takes a comma-separated subset of {', '.join(allowed)}")


def _settings(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``, naming settings the run config does not have."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"experiment: {cls.__name__} has no settings {', '.join(unknown)}")
    return cls(**values)


def _given(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a caller gave (``None``: left to the preset)."""
    return {k: v for k, v in (values or {}).items() if v is not None}


def preset(
    name: str,
    out: str,
    pretrain: Mapping[str, Any] | None = None,
    finetune: Mapping[str, Any] | None = None,
    **overrides,
) -> ExperimentConfig:
    """A named grid; ``pretrain`` / ``finetune`` override single run settings and
    ``overrides`` :class:`ExperimentConfig` fields (``None`` values are ignored throughout).

    - ``tiny``: the cluttered synthetic set, ResNet-18, a 2-core CPU (see the README for its
      measured wall time).
    - ``gpu``: a larger cluttered set made on the device, ResNet-18 at the paper's canvas,
      DALI-GPU pre-training, sized for about ten minutes on one H100 / H200.
    - ``paper``: COCO train2017 -> val2017, ResNet-50, the paper's settings (GPUs, torchrun).
    """
    if name == "tiny":
        base = ExperimentConfig(
            out=out,
            arch="resnet18",
            detector="fpn",
            device="cpu",
            threads=2,
            synthetic_images=200,
            synthetic_val_images=80,
            seeds=2,
            epochs_1x=3,
            knn_train=1024,
            knn_val=512,
            probe_iterations=8,
            pretrain=dict(
                iterations=96,
                batch=16,
                warmup=8,
                canvas=128,
                template_split=32,
                erf_every=48,
                erf_images=16,
                val_every=96,
                val_images=128,
                pipeline="reference",
                workers=1,
                checkpoint_every=48,
            ),
            finetune=dict(
                batch=4,
                lr=0.02,
                warmup=20,
                min_size=160,
                max_size=240,
                rois_per_image=64,
                fpn_channels=64,
                workers=1,
                log_every=25,
            ),
        )
    elif name == "gpu":
        base = ExperimentConfig(
            out=out,
            arch="resnet18",
            detector="fpn",
            device="cuda",
            synthetic_images=1500,
            synthetic_val_images=1000,
            seeds=2,
            epochs_1x=11,
            knn_train=4096,
            knn_val=2048,
            pretrain=dict(
                iterations=1000,
                batch=256,
                warmup=100,
                canvas=224,
                template_split=64,
                erf_every=250,
                erf_images=64,
                val_every=500,
                val_images=512,
                pipeline="dali",
                workers=8,
                checkpoint_every=500,
            ),
            finetune=dict(
                batch=16, lr=0.02, warmup=100, min_size=320, max_size=480, rois_per_image=128, workers=8, log_every=100
            ),
        )
    elif name == "paper":
        base = ExperimentConfig(out=out)
    else:
        raise InputError(f"--preset must be one of {', '.join(PRESETS)}")
    given = _given(overrides)
    if "coco" not in given and ({"split", "val_split"} & set(given)):
        raise InputError(
            "--split and --val-split name splits of --coco; without it the preset makes its own synthetic set"
        )
    return replace(
        base, pretrain={**base.pretrain, **_given(pretrain)}, finetune={**base.finetune, **_given(finetune)}, **given
    )


# ---------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    init: str
    """``jigsaw`` (pre-trained here), ``imagenet``, ``random`` or ``scratch``."""
    loss: str | None = None
    tau: float | None = None
    """None: the preset's tau."""
    fit: str = "pad_crop"
    length: float = FULL_LENGTH
    context: bool = True
    neck: str = "none"


def arms(cfg: ExperimentConfig) -> list[Arm]:
    """The grid's arms, in table order."""
    grid = [Arm(loss, "jigsaw", loss) for loss in cfg.losses]
    grid += [Arm(f"erf-tau{tau:g}", "jigsaw", "erf", tau=tau) for tau in cfg.taus]
    grid += [Arm(f"erf-{n:g}x", "jigsaw", "erf", length=n) for n in cfg.lengths]
    if cfg.no_context:
        grid.append(Arm("erf-nocontext", "jigsaw", "erf", context=False))
    if cfg.fpn_neck:
        grid.append(Arm("fpn-neck", "jigsaw", "erf", neck="fpn"))
    if cfg.fits and "blockwise" not in cfg.losses:
        grid.append(Arm("blockwise", "jigsaw", "blockwise"))  # the fits' pad & crop reference
    grid += [Arm(f"blockwise-{fit}", "jigsaw", "blockwise", fit=fit) for fit in cfg.fits]
    if cfg.imagenet:
        grid.append(Arm("imagenet", "imagenet"))
    if cfg.random:
        grid.append(Arm("random", "random"))
    if cfg.scratch:
        grid.append(Arm("scratch", "scratch"))
    return grid


def describe(arm: Arm) -> str:
    """The arm as the table's ``initialisation`` column names it."""
    if arm.init == "imagenet":
        return "ImageNet weights"
    if arm.init == "random":
        return "random init, same detector/head/schedule (GN backbone, nothing frozen)"
    if arm.init == "scratch":
        return "from scratch: GN backbone + FPN + 4conv1fc head, cost-matched"
    parts = [f"Jigsaw, {arm.loss}"]
    if arm.tau is not None:
        parts.append(f"tau {arm.tau:g}")
    if arm.length != FULL_LENGTH:
        parts.append(f"{arm.length:g}/{FULL_LENGTH:g} length")
    if not arm.context:
        parts.append("no context")
    if arm.neck == "fpn":
        parts.append("FPN pre-trained too")
    if arm.fit != "pad_crop":
        parts.append(f"fit {arm.fit}")
    return ", ".join(parts)
