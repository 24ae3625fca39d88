"""``jigsawdata experiment``: the paper's ablation grid end to end, one resumable cell at a time.

A grid is pre-training cells — one per loss (erf, blockwise, global: Table 2), optionally the
ERF loss with other fit modes (Table 1) — plus ``scratch`` (GroupNorm everywhere, trained for
as long as the erf cell's pre-training + fine-tuning cost: Table 5) and ``imagenet:FILE``
when given. Every cell is fine-tuned with the same detector and schedule and evaluated on
the held-out split. A cell's directory holds its runs and, written last, ``cell.json``; a
finished cell is never rerun, an interrupted one resumes its runs. After each cell the
table (``table.md``), ``experiment.json`` and ``experiment.png`` are rewritten.

Device-hours are measured wall time x devices of each stage's invocation (an interrupted
invocation's time is lost), on whatever device the run used.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from jigsawdata.errors import InputError
from jigsawdata.files import write_json_atomic

from .checkpoint import CHECKPOINT_NAME
from .config import LOSSES, FinetuneConfig, PretrainConfig, schedule_epochs
from .runtime import pick_device

log = logging.getLogger(__name__)

PRESETS = ("tiny", "paper")
CELL_FILE = "cell.json"


@dataclass(frozen=True)
class ExperimentConfig:
    out: str
    coco: str | None = None
    """COCO root holding ``split`` and ``val_split``; the tiny preset makes its own."""
    split: str = "train2017"
    val_split: str = "val2017"
    losses: tuple[str, ...] = LOSSES
    fits: tuple[str, ...] = ()
    """Extra fit modes pre-trained with the ERF loss (warp, resize: Table 1)."""
    scratch: bool = True
    imagenet: str | None = None
    """A local torchvision ResNet state dict: adds an ``imagenet`` cell."""
    arch: str = "resnet50"
    device: str = "auto"
    threads: int | None = None
    """CPU threads for torch (None: torch's default)."""
    seed: int = 0
    synthetic_images: int = 0
    """With no ``coco``: images of the cluttered synthetic train split (val gets a quarter)."""
    pretrain: Mapping[str, Any] = field(default_factory=dict)
    """:class:`PretrainConfig` settings of every pre-training cell; the rest are its defaults
    (PAPER.md 5), and the cell decides data, loss, fit, arch, device and seed."""
    finetune: Mapping[str, Any] = field(default_factory=dict)
    """:class:`FinetuneConfig` settings of every fine-tuning run, likewise."""

    def __post_init__(self) -> None:
        self.pretrain_config(shards="", out="")
        self.finetune_config(coco="", out="")

    def pretrain_config(self, **cell: Any) -> PretrainConfig:
        return _settings(PretrainConfig, {**self.pretrain, "arch": self.arch, "device": self.device,
                                          "seed": self.seed, **cell})

    def finetune_config(self, **cell: Any) -> FinetuneConfig:
        return _settings(FinetuneConfig, {**self.finetune, "arch": self.arch, "device": self.device,
                                          "seed": self.seed, **cell})


def _settings(cls, values: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"experiment: {cls.__name__} has no settings {', '.join(unknown)}")
    return cls(**values)


def preset(name: str, out: str, pretrain: Mapping[str, Any] | None = None, finetune: Mapping[str, Any] | None = None,
           **overrides) -> ExperimentConfig:
    """``tiny``: the cluttered synthetic set, ResNet-18, 128 px jigsaws and ~200 px detection,
    a grid that fits a 2-core CPU in well under an hour. ``paper``: COCO train2017 -> val2017,
    ResNet-50, the paper's schedules (GPUs). ``pretrain`` / ``finetune`` override single
    settings of the runs; ``None`` values are ignored throughout."""
    if name == "tiny":
        base = ExperimentConfig(
            out=out, arch="resnet18", device="cpu", threads=2, synthetic_images=240,
            pretrain=dict(iterations=160, batch=32, warmup=16, canvas=128, template_split=32, erf_every=40,
                          erf_images=16, val_every=40, val_images=96, pipeline="reference", workers=1),
            finetune=dict(detector="fpn", epochs=2, batch=4, lr=0.02, warmup=50, min_size=160, max_size=224,
                          rois_per_image=64, workers=1))
    elif name == "paper":
        base = ExperimentConfig(out=out)
    else:
        raise InputError(f"--preset must be one of {PRESETS}")

    def given(values: Mapping[str, Any] | None) -> dict:
        return {k: v for k, v in (values or {}).items() if v is not None}

    return replace(base, pretrain={**base.pretrain, **given(pretrain)}, finetune={**base.finetune, **given(finetune)},
                   **given(overrides))


@dataclass(frozen=True)
class Cell:
    name: str
    init: str
    """``jigsaw`` (pre-trained here), ``scratch`` or ``imagenet``."""
    loss: str | None = None
    fit: str = "pad_crop"


def cells(cfg: ExperimentConfig) -> list[Cell]:
    grid = [Cell(loss, "jigsaw", loss) for loss in cfg.losses]
    grid += [Cell(f"erf-{fit}", "jigsaw", "erf", fit) for fit in cfg.fits if fit != "pad_crop"]
    if cfg.scratch:
        grid.append(Cell("scratch", "scratch"))
    if cfg.imagenet:
        grid.append(Cell("imagenet", "imagenet"))
    return grid


@dataclass
class Data:
    coco: str
    split: str
    val_split: str
    shards: str
    val_shards: str


def prepare_data(cfg: ExperimentConfig, out: Path) -> Data:
    """The detection set (made for the tiny preset) and its train / held-out shard sets
    (builds resume and are not redone)."""
    from jigsawdata.build import BuildConfig, build_shards
    from jigsawdata.coco import load_coco, resolve_coco_root

    coco, split, val_split = cfg.coco, cfg.split, cfg.val_split
    if coco is None:
        if cfg.synthetic_images < 1:
            raise InputError("give --coco ROOT, or use --preset tiny for a synthetic set")
        from jigsawdata.clutter import make_clutter_coco

        coco, split, val_split = str(out / "data"), "train", "val"
        if not (Path(coco) / "annotations" / "instances_val.json").is_file():
            make_clutter_coco(Path(coco), cfg.synthetic_images, seed=cfg.seed, split="train")
            make_clutter_coco(Path(coco), max(4, cfg.synthetic_images // 4), seed=cfg.seed + 1, split="val")
    shards = {}
    for name, which in (("shards", split), ("val-shards", val_split)):
        source = load_coco(*resolve_coco_root(Path(coco), which))
        build_shards(source, out / name, BuildConfig(seed=cfg.seed), workers=1)
        shards[name] = str(out / name)
    return Data(coco, split, val_split, shards["shards"], shards["val-shards"])


def _timed(stage_file: Path, body: Callable[[], object]) -> float:
    """Run a stage, adding its wall seconds to those recorded by earlier invocations."""
    before = json.loads(stage_file.read_text())["seconds"] if stage_file.is_file() else 0.0
    start = time.perf_counter()
    body()
    seconds = before + time.perf_counter() - start
    write_json_atomic(stage_file, {"seconds": seconds})
    return seconds


def _pretrain(cfg: ExperimentConfig, cell: Cell, data: Data, run: Path) -> dict:
    from .checkpoint import load
    from .pretrain import Trainer

    base = cfg.pretrain_config(shards=data.shards, out=str(run), loss=cell.loss, fit=cell.fit,
                               val_shards=data.val_shards)
    pcfg = replace(base, erf_images=min(base.erf_images, base.batch),
                   checkpoint_every=cfg.pretrain.get("checkpoint_every", max(1, base.iterations // 4)),
                   log_every=cfg.pretrain.get("log_every", max(1, base.iterations // 20)))
    started = (run / CHECKPOINT_NAME).is_file()
    if not started or load(run)["iteration"] < pcfg.iterations:
        trainer = Trainer(pcfg, resume=started)
        seconds = _timed(run.parent / "pretrain-time.json", trainer.train)
        devices = trainer.dist.world
    else:
        seconds, devices = json.loads((run.parent / "pretrain-time.json").read_text())["seconds"], 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_accuracy" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    return {"pretrain_device_hours": seconds * devices / 3600, "pretrain_loss": losses[-1] if losses else None,
            "validation": val[-1] if val else None}


def _finetune(cfg: ExperimentConfig, cell: Cell, data: Data, run: Path, init: str, epochs: int | None) -> dict:
    from .finetune import Finetuner, evaluate_run

    fcfg = cfg.finetune_config(coco=data.coco, out=str(run), init=init, norm="gn" if cell.init == "scratch" else None,
                               split=data.split, val_split=data.val_split, epochs=epochs,
                               log_every=cfg.finetune.get("log_every", 50))
    trainer = Finetuner(fcfg, resume=(run / CHECKPOINT_NAME).is_file())
    seconds = _timed(run.parent / "finetune-time.json", trainer.train)
    metrics = evaluate_run(run, split=data.val_split, max_images=fcfg.max_images, device=fcfg.device)
    return {"finetune_device_hours": seconds * trainer.dist.world / 3600, "finetune_epochs": trainer.epoch,
            "eval": metrics}


def _scratch_epochs(cfg: ExperimentConfig, done: dict[str, dict]) -> int | None:
    """Fine-tuning epochs that cost what the reference jigsaw cell's pre-training plus
    fine-tuning cost, at that cell's measured fine-tuning time per epoch (the paper's
    Table 5 matches total cost)."""
    base = cfg.finetune_config(coco="", out="")
    reference = done.get("erf") or next((r for r in done.values() if r["init"] == "jigsaw"), None)
    if reference is None:
        return base.epochs
    epochs = schedule_epochs(base.schedule, base.epochs)[0]
    per_epoch = reference["finetune_device_hours"] / max(1, reference["finetune_epochs"] or epochs)
    total = reference["pretrain_device_hours"] + reference["finetune_device_hours"]
    return max(epochs, round(total / per_epoch)) if per_epoch > 0 else epochs


def run_cell(cfg: ExperimentConfig, cell: Cell, data: Data, out: Path, done: dict[str, dict]) -> dict:
    cell_dir = out / "cells" / cell.name
    if (cell_dir / CELL_FILE).is_file():
        return json.loads((cell_dir / CELL_FILE).read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"name": cell.name, "init": cell.init, "loss": cell.loss, "fit": cell.fit,
                    "pretrain_device_hours": 0.0, "pretrain_loss": None, "validation": None}
    epochs = cfg.finetune.get("epochs")
    if cell.init == "jigsaw":
        log.info("cell %s: pre-training", cell.name)
        result.update(_pretrain(cfg, cell, data, cell_dir / "pretrain"))
        init = str(cell_dir / "pretrain")
    elif cell.init == "scratch":
        init, epochs = "scratch", _scratch_epochs(cfg, done)
        result["matched_to"] = "erf" if "erf" in done else None
    else:
        init = f"imagenet:{cfg.imagenet}"
    log.info("cell %s: fine-tuning from %s", cell.name, init)
    result.update(_finetune(cfg, cell, data, cell_dir / "finetune", init, epochs))
    result["device"] = pick_device(cfg.device).type
    write_json_atomic(cell_dir / CELL_FILE, result)
    return result


def run_experiment(cfg: ExperimentConfig, on_cell: Callable[[str, dict], None] | None = None) -> dict:
    """Run (or resume) every cell of the grid; returns ``experiment.json``'s content."""
    from .experiment_report import write_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_json_atomic(out / "config.json", asdict(cfg))
    data = prepare_data(cfg, out)
    done: dict[str, dict] = {}
    report: dict = {}
    for cell in cells(cfg):
        done[cell.name] = run_cell(cfg, cell, data, out, done)
        report = write_report(out, cfg, done)
        if on_cell:
            on_cell(cell.name, done[cell.name])
    return report

