"""Settings of the jigsaw assembly, shared by the DALI and the reference pipelines."""

from __future__ import annotations

from dataclasses import dataclass, field

from jigsawdata.errors import InputError
from jigsawdata.settings import check, setting

from .template import Template

FIT_MODES = ("pad_crop", "warp", "resize")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class JigsawConfig:
    template: Template = field(default_factory=Template)
    scale: tuple[float, float] = (0.8, 1.5)
    """Random resize factor per sample, same on both axes (docs/method.md 3)."""
    flip_p: float = 0.5
    fit: str = "pad_crop"
    """How a sample meets its region: ``pad_crop`` (zero-pad or random-crop each axis: the
    paper's choice), ``warp`` (resize to the region, aspect ignored) or ``resize`` (largest
    aspect-keeping size that fits, then pad): the ablation of the paper's Table 1."""
    crop_pos: float | None = None
    """Where the region window sits on a sample, per axis, as a fraction of the slack
    (``anchor = round(pos * (sample - region))``); ``None`` draws it uniformly per sample
    and axis. Padding places the sample the same way [ours]."""
    shuffle: bool = True
    initial_fill: int = 1024
    """Shuffle buffer of each reader, on top of the seeded write-time shuffle of the shards."""
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be a range 0 < lo <= hi, got {self.scale}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability, got {self.flip_p}")
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {self.fit!r}")
        if self.crop_pos is not None and not 0.0 <= self.crop_pos <= 1.0:
            raise ValueError(f"crop_pos must be in [0, 1], got {self.crop_pos}")
        if self.initial_fill < 1:
            raise ValueError("initial_fill must be >= 1")


@dataclass
class JigsawSettings:
    """The jigsaw settings a user gives (flags, ``--config``), in one place: ``pretrain``
    inherits them and ``preview`` takes them as its options, so both assemble alike; ``erf``
    reads them from the run it draws."""

    canvas: int = setting(224, "Side of the assembled image in pixels.", min=1)
    template_split: int = setting(
        64,
        "Where the template cuts both canvas axes, in pixels from the top-left (docs/method.md 3); not a data split.",
        min=1,
    )
    fit: str = setting(
        "pad_crop",
        "How a crop meets its region: pad or crop each axis (the paper), or the warp / resize ablations (Table 1).",
        choices=FIT_MODES,
    )
    resize_min: float = setting(0.8, "Smallest random resize factor of a crop.", min=0.0, min_open=True)
    resize_max: float = setting(1.5, "Largest random resize factor of a crop.", min=0.0, min_open=True)
    flip_p: float = setting(0.5, "Horizontal flip probability of a crop.", min=0.0, max=1.0)

    def __post_init__(self) -> None:
        check(self)
        try:
            self.jigsaw_config(0)
        except ValueError as exc:
            raise InputError(
                f"jigsaw settings (--canvas, --template-split, --resize-min/--resize-max, --flip-p, --fit): {exc}"
            ) from exc

    @property
    def template(self) -> Template:
        return Template(canvas=self.canvas, split=self.template_split)

    def jigsaw_config(self, seed: int, **overrides) -> JigsawConfig:
        return JigsawConfig(
            template=self.template,
            scale=(self.resize_min, self.resize_max),
            flip_p=self.flip_p,
            fit=self.fit,
            seed=seed,
            **overrides,
        )


def fixed(template: Template | None = None, crop_pos: float = 0.5, **kwargs) -> JigsawConfig:
    """A configuration with every random augmentation off: scale 1, no flip, fixed crop,
    no reader shuffle. Two pipelines given the same shards must then agree."""
    return JigsawConfig(
        template=template or Template(), scale=(1.0, 1.0), flip_p=0.0, crop_pos=crop_pos, shuffle=False, **kwargs
    )
