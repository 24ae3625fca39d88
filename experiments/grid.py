"""``jigsawdata experiment``: the paper's comparisons end to end, under one protocol (docs/method.md 7).

A grid is *arms* (ways to start a detector) x fine-tuning *schedules* x *seeds*:

- jigsaw arms pre-train here: one per ``losses`` entry (Table 2), the ERF loss at other
  ``taus`` (Fig. 7a), at other pre-training ``lengths`` (Fig. 7b), without context
  (``no_context``: positives not enlarged, Sec. 3.1), and the block-wise loss with other
  ``fits`` (Table 1, whose pad & crop row is Table 2's block-wise one: docs/method.md 7);
- ``imagenet`` (a weights file) and ``random`` (random weights: the control) are fine-tuned
  exactly as the jigsaw arms are: same detector, box head and schedule;
- ``scratch`` is the one arm with its own recipe (Table 5, He et al. 2019: GroupNorm in the
  backbone, the FPN and a 4conv1fc box head, everything trainable), trained for as long as
  the ``match`` arm's pre-training + fine-tuning cost, measured per seed and schedule, at the
  speed a short timing probe of the scratch model itself measures on the same device.

Cost is each run's training time (:class:`~.runtime.TrainClock`: no validation, evaluation or
checkpoint I/O) times its processes. Every seed seeds the models, augmentation and data order;
the data (the synthetic set and the shards) are the same for every seed.

Layout: ``config.json``; the data; ``arms/<arm>/seed-<k>/`` holding ``pretrain/`` and
``finetune-<schedule>/`` run directories and, each written last, ``pretrain.json`` and
``<schedule>.json``; ``table.md``, ``experiment.json`` and ``experiment.png`` rewritten after
every result. A written result is never redone (and is refused, by name, when damaged); an
interrupted run resumes from its checkpoint. Rank 0 holds a lock on the folder while the
grid runs, so a second grid there is refused rather than interleaved. Under ``torchrun``
every rank trains, rank 0 alone builds data, evaluates and writes results, and the ranks
meet after each step.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from jigsawdata.build.outdir import BuildLock
from jigsawdata.coco.reader import resolve_coco_root
from jigsawdata.errors import InputError, Stopped
from jigsawdata.files import write_json_atomic
from jigsawdata.layout import CHECKPOINT_NAME, CONFIG_NAME, MANIFEST_NAME, METRICS_NAME, annotation_name
from jigsawdata.trainer.config import FinetuneConfig, PretrainConfig, schedule_epochs, schedule_multiple
from jigsawdata.trainer.evaluate import EVALUATED_KEY, METRICS
from jigsawdata.trainer.runtime import init_distributed

from .config import FORMAT, FULL_LENGTH, Arm, ExperimentConfig, arms, describe

log = logging.getLogger(__name__)

_PROBE_WARMUP = 2
"""Iterations the scratch timing probe runs before it starts timing, besides the batches
its data loader fetched ahead."""
LOCK_NAME = ".experiment.lock"
"""Held by the grid's rank 0 while it runs: one process group per folder."""
_RANK_WAIT = datetime.timedelta(hours=6)
"""How long the other ranks wait while rank 0 alone builds the shards (hours on COCO
train2017) or evaluates: longer than torch's default collective timeout."""


def pretrain_config(
    cfg: ExperimentConfig, arm: Arm, seed: int, shards: str, val_shards: str, run: Path
) -> PretrainConfig:
    """The arm's pre-training run: the preset's settings with the arm's loss, tau, fit and
    length (the warm-up and checkpoint interval kept within a shortened run)."""
    neck = {}
    if arm.neck == "fpn":  # the pyramid the arm's detector will have
        neck = {"neck": "fpn", "fpn_channels": cfg.finetune_config(coco="", out="").fpn_channels}
    base = cfg.pretrain_config(
        shards=shards,
        out=str(run),
        loss=arm.loss,
        fit=arm.fit,
        val_shards=val_shards,
        seed=seed,
        **({"tau": arm.tau} if arm.tau is not None else {}),
        **neck,
    )
    iterations = max(1, round(base.iterations * arm.length / FULL_LENGTH))
    return replace(
        base,
        iterations=iterations,
        warmup=min(base.warmup, iterations),
        erf_images=min(base.erf_images, base.batch),
        checkpoint_every=min(base.checkpoint_every, iterations),
        log_every=cfg.pretrain.get("log_every", max(1, iterations // 20)),
    )


def finetune_config(
    cfg: ExperimentConfig, arm: Arm, seed: int, data: "Data", run: Path, init: str, epochs: int
) -> FinetuneConfig:
    """The init arms share one recipe. Random weights have no statistics to freeze, so the
    control trains GroupNorm in the backbone (He et al. 2019's choice for random init) and
    freezes nothing, with the detector, head and schedule the others have. Scratch is He et
    al.'s recipe whatever the grid's detector (as the paper's Table 5 set it against C4):
    an FPN detector (Mask R-CNN for a mask grid) with GroupNorm in the backbone, the FPN and
    a 4conv1fc head."""
    norm, head, detector = {
        "jigsaw": (None, None, cfg.detector),
        "imagenet": (None, None, cfg.detector),
        "random": ("gn", None if cfg.detector == "c4" else "2fc", cfg.detector),
        "scratch": ("gn", "4conv1fc", "mask" if cfg.detector == "mask" else "fpn"),
    }[arm.init]
    return cfg.finetune_config(
        coco=data.coco,
        out=str(run),
        init=init,
        norm=norm,
        box_head=head,
        detector=detector,
        split=data.split,
        val_split=data.val_split,
        epochs=epochs,
        seed=seed,
    )


def schedule_epochs_of(cfg: ExperimentConfig, schedule: str) -> int:
    """Epochs of an ``Nx`` schedule: N times the preset's 1x."""
    return max(1, round(cfg.epochs_1x * schedule_multiple(schedule, "--schedules")))


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    coco: str
    split: str
    val_split: str
    shards: str
    val_shards: str
    shards_no_context: str | None


def prepare_data(cfg: ExperimentConfig, out: Path, build: bool = True) -> Data:
    """The detection set (made for the synthetic presets) and its shard sets; with
    ``build`` False only their paths (the other ranks). Builds resume and are not redone."""
    coco, split, val_split = cfg.coco, cfg.split, cfg.val_split
    if coco is None:
        if cfg.synthetic_images < 1:
            raise InputError("give --coco ROOT, or use a synthetic preset (tiny, gpu)")
        coco, split, val_split = str(out / "data"), "train", "val"
    data = Data(
        coco,
        split,
        val_split,
        str(out / "shards"),
        str(out / "val-shards"),
        str(out / "shards-nocontext") if cfg.no_context else None,
    )
    if build:
        _build(cfg, data)
    return data


def _build(cfg: ExperimentConfig, data: Data) -> None:
    from jigsawdata.build.run import BuildConfig, build_shards
    from jigsawdata.build.sampling import SamplingConfig
    from jigsawdata.coco.reader import load_coco

    if cfg.coco is None:
        from jigsawdata.synthetic.clutter import make_clutter_coco

        root = Path(data.coco)
        if not (root / "annotations" / annotation_name("train")).is_file():
            make_clutter_coco(root, cfg.synthetic_images, seed=cfg.seed, split="train")
        if not (root / "annotations" / annotation_name("val")).is_file():
            make_clutter_coco(
                root, cfg.synthetic_val_images or max(4, cfg.synthetic_images // 4), seed=cfg.seed + 1, split="val"
            )
    workers = max(1, min(8, os.cpu_count() or 1))
    sets = [(data.shards, data.split, SamplingConfig()), (data.val_shards, data.val_split, SamplingConfig())]
    if data.shards_no_context:
        sets.append((data.shards_no_context, data.split, SamplingConfig(max_enlarge=1.0)))
    sets = [
        (shards, split, sampling) for shards, split, sampling in sets if not (Path(shards) / MANIFEST_NAME).is_file()
    ]
    # Every split is read before any is built: a malformed held-out split is refused up
    # front, not after hours of building the training shards.
    sources = {split: load_coco(*resolve_coco_root(Path(data.coco), split)) for _, split, _ in sets}
    for shards, split, sampling in sets:
        build_shards(sources[split], Path(shards), BuildConfig(seed=cfg.seed, sampling=sampling), workers=workers)


# ---------------------------------------------------------------------------------- the output folder

_MAY_CHANGE = {
    "out",
    "losses",
    "taus",
    "lengths",
    "fits",
    "no_context",
    "fpn_neck",
    "random",
    "scratch",
    "schedules",
    "seeds",
    "baseline",
    "threads",
}
"""Settings that only add or drop arms, schedules or seeds (or change nothing measured):
a grid may be continued with others. Every other setting defines what a result means."""


def claim_experiment_dir(out: Path, cfg: ExperimentConfig) -> bool:
    """A new or empty folder, or this grid's own (same settings but for :data:`_MAY_CHANGE`);
    returns whether the grid starts here (new or empty). Nothing is written: a refused grid
    leaves nothing behind."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"--out {out}: {folder} is a file, not a folder")
            break
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if not entries:
        return True
    saved_file = out / CONFIG_NAME
    if not saved_file.is_file():
        raise InputError(
            f"--out {out} is not empty ({', '.join(entries[:5])}) and holds no experiment: a new grid "
            "needs a new or empty folder"
        )
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{saved_file} is damaged ({exc}): restore it, or start the grid in another --out") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("config"), dict):
        made = saved.get("format") if isinstance(saved, dict) else None
        raise InputError(
            f"{saved_file} is not a grid of this version of jigsawdata ({made or 'no format'}; this "
            f"one writes {FORMAT}): use another --out"
        )
    mine = _jsonable(cfg)
    defaults = _jsonable(ExperimentConfig(out=""))  # a setting newer than the saved grid has its default there
    differ = sorted(k for k in mine if k not in _MAY_CHANGE and saved["config"].get(k, defaults[k]) != mine[k])
    if differ:
        raise InputError(
            f"{out} holds a grid with other settings ({', '.join(differ)}; its config.json has the "
            "grid's): its results would mean something else; use another --out"
        )
    return False


def check_sources(cfg: ExperimentConfig) -> None:
    """Both splits' annotation files exist: checked before anything is built (on COCO the
    training shards take hours)."""
    if cfg.coco is not None:
        resolve_coco_root(Path(cfg.coco), cfg.split)
        resolve_coco_root(Path(cfg.coco), cfg.val_split, "--val-split")


def _discard(out: Path, created: bool) -> None:
    """Remove what a refused new grid wrote (the folder too when this run made it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        if entry.name != LOCK_NAME:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _jsonable(cfg: ExperimentConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


# ---------------------------------------------------------------------------------- runs


@dataclass
class Grid:
    """What every step of a grid needs: its settings, data, folder and processes."""

    cfg: ExperimentConfig
    data: Data
    out: Path
    world: int
    main: bool
    say: Callable[[str], None] = log.info
    """Where progress lines go (rank 0)."""
    knn: Any = None
    """The kNN probe's crops (train, val), loaded on first use (rank 0)."""

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank: what rank 0 sees of the folder decides."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def result(self, path: Path, compute: Callable[[], dict], keys: tuple[str, ...]) -> dict:
        """``path``'s result, computed (on every rank) and written (by rank 0) when rank 0
        finds it missing. Every rank returns what rank 0 wrote, so decisions taken from it
        (the scratch arm's epochs) are the same on every rank (the ranks share the folder).
        A result read back must hold ``keys``."""
        if not self.agree(path.is_file()):
            value = compute()
            if self.main:
                write_json_atomic(path, value)
            self.barrier()
        return read_result(path, keys)

    def resumable(self, run: Path) -> bool:
        """Whether ``run`` holds a checkpoint to continue from; a run folder without one (a
        run stopped before its first checkpoint) is removed so that the run starts anew."""
        started = self.agree((run / CHECKPOINT_NAME).is_file())
        if not started and self.main and run.exists():
            shutil.rmtree(run)
        self.barrier()
        return started


RUN_KEYS = (
    "arm",
    "init",
    "seed",
    "schedule",
    "epochs",
    "iterations_per_epoch",
    "full_lr_iterations",
    "pretrain_device_hours",
    "finetune_device_hours",
    "device",
    "eval",
)
"""What a fine-tuning result (``<schedule>.json``) holds that the table reads."""
START_KEYS = ("pretrain_device_hours",)
PROBE_KEYS = ("device_seconds_per_iteration", "iterations_per_epoch")


def read_result(path: Path, keys: tuple[str, ...]) -> dict:
    """A written result, refused with the way out when it was damaged or edited: a
    fine-tuning result must agree with its run's own ``eval.json``."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problem = str(exc)
    else:
        problem = _result_problem(path, value, keys)
    if problem:
        raise InputError(f"{path} is damaged ({problem}): delete it and rerun the command to redo that run")
    return value


def _result_problem(path: Path, value: Any, keys: tuple[str, ...]) -> str | None:
    if not isinstance(value, dict):
        return "not a JSON object"
    missing = [k for k in keys if k not in value]
    if missing:
        return f"no {', '.join(missing)}"
    if "eval" not in keys:
        return None
    bbox = value["eval"].get("bbox") if isinstance(value["eval"], dict) else None
    if not isinstance(bbox, dict) or any(not isinstance(bbox.get(m), (int, float)) for m in METRICS):
        return "its eval holds no bbox metrics"
    run_eval = path.parent / f"finetune-{value['schedule']}" / "eval.json"
    try:
        saved = json.loads(run_eval.read_text())
        if {k: v for k, v in saved.items() if k != EVALUATED_KEY} != value["eval"]:
            return f"its metrics differ from {run_eval}"
    except (OSError, ValueError):
        pass  # the run's own copy is gone or damaged: the result is all there is
    return None


def _knn(grid: Grid, backbone: torch.nn.Module) -> dict:
    from jigsawdata.trainer.probe import knn_probe, load_crops

    if not grid.main or grid.cfg.knn_train == 0:
        return {}
    if grid.knn is None:
        size = max(32, grid.cfg.pretrain_config(shards="", out="").canvas // 2)
        grid.knn = (
            load_crops(grid.data.shards, grid.cfg.knn_train, size),
            load_crops(grid.data.val_shards, grid.cfg.knn_val, size),
        )
    return knn_probe(backbone, *grid.knn)


def _pretrain(grid: Grid, arm: Arm, seed: int, folder: Path) -> dict:
    from jigsawdata.trainer.pretrain import Trainer

    run = folder / "pretrain"
    shards = grid.data.shards if arm.context else grid.data.shards_no_context
    pcfg = pretrain_config(grid.cfg, arm, seed, shards, grid.data.val_shards, run)

    def progress(m: dict) -> None:
        grid.say(f"{arm.name}, seed {seed}: pre-training {m['iteration']}/{pcfg.iterations}, loss {m['loss']:.3f}")

    trainer = Trainer(pcfg, resume=grid.resumable(run), on_log=progress)
    if trainer.iteration < pcfg.iterations:
        try:
            trainer.train()
        except Stopped as exc:  # the grid, not the run, is what the user reruns
            raise Stopped(
                f"stopped by SIGTERM at iteration {trainer.iteration} of {pcfg.iterations} of {run}, "
                "checkpoint saved: rerun the same experiment command to continue the grid",
                exc.exit_code,
            ) from None
    records = [json.loads(line) for line in (run / METRICS_NAME).read_text().splitlines()] if grid.main else []
    losses = [r["loss"] for r in records if "loss" in r]
    validation = [r for r in records if "val_accuracy" in r]
    return {
        "pretrain_iterations": pcfg.iterations,
        "pretrain_loss": losses[-1] if losses else None,
        "pretrain_device_hours": trainer.clock.seconds / 3600,
        "validation": validation[-1] if validation else None,
        "knn": _knn(grid, trainer.model.backbone),
    }


def _initial(grid: Grid, arm: Arm, seed: int) -> dict:
    """What the kNN probe says of an arm's starting backbone: ImageNet weights, or the
    random GroupNorm ResNet the control starts from. ImageNet's pre-training cost was paid
    elsewhere: None, shown as external."""
    from jigsawdata.trainer.detection import resnet_with_norm

    torch.manual_seed(seed)
    backbone = _imagenet_backbone(grid.cfg) if arm.init == "imagenet" else resnet_with_norm(grid.cfg.arch, "gn")
    return {"pretrain_device_hours": None if arm.init == "imagenet" else 0.0, "knn": _knn(grid, backbone)}


def _imagenet_backbone(cfg: ExperimentConfig) -> torch.nn.Module:
    """The ``--imagenet`` weights in the grid's backbone (refused in one line if they do not fit)."""
    from jigsawdata.trainer.detection import load_backbone_weights, read_init
    from jigsawdata.trainer.model import build_backbone

    backbone = build_backbone(cfg.arch)
    load_backbone_weights(
        backbone, read_init(f"imagenet:{cfg.imagenet}", cfg.arch).backbone, f"imagenet:{cfg.imagenet}"
    )
    return backbone


def _finetune(grid: Grid, arm: Arm, seed: int, run: Path, init: str, epochs: int) -> dict:
    from jigsawdata.trainer.finetune import Finetuner, evaluate_run

    fcfg = finetune_config(grid.cfg, arm, seed, grid.data, run, init, epochs)
    trainer = Finetuner(
        fcfg,
        resume=grid.resumable(run),
        on_log=lambda m: grid.say(
            f"{arm.name}, seed {seed}: fine-tuning epoch {m['epoch'] + 1}/"
            f"{epochs}, iteration {m['iteration']}, loss {m['loss']:.3f}"
        ),
    )
    trainer.train()
    grid.say(f"{arm.name}, seed {seed}: evaluating on {grid.data.val_split}")
    metrics = (
        evaluate_run(run, split=grid.data.val_split, max_images=fcfg.max_images, device=grid.cfg.device)
        if grid.main
        else None
    )
    grid.barrier()
    _, milestones = schedule_epochs(epochs=epochs)
    per_epoch = trainer.iterations_per_epoch
    return {
        "epochs": epochs,
        "iterations_per_epoch": per_epoch,
        "iterations": trainer.iteration,
        "full_lr_iterations": max(0, min(milestones[0] * per_epoch, trainer.iteration) - fcfg.warmup),
        "finetune_device_hours": trainer.clock.seconds / 3600,
        "detector": fcfg.detector,
        "device": trainer.device.type,
        "eval": metrics,
    }


def _time_scratch(grid: Grid, arm: Arm, seed: int, folder: Path) -> dict:
    """Device-seconds per training iteration of the scratch model on this device, over
    ``probe_iterations`` iterations after a warm-up long enough to drain what the data
    loader's workers fetched ahead (the timed steps then wait for data as training does)."""
    from jigsawdata.trainer.finetune import Finetuner

    run = folder / "timing-probe"
    if grid.main and run.exists():
        shutil.rmtree(run)  # an interrupted probe is timed again
    grid.barrier()
    base = finetune_config(grid.cfg, arm, seed, grid.data, run, "scratch", 10**6)
    warmup = _PROBE_WARMUP + 2 * base.workers  # a DataLoader fetches 2 batches ahead per worker
    steps = warmup + grid.cfg.probe_iterations
    trainer = Finetuner(replace(base, max_iters=steps, log_every=1))
    trainer.train()
    grid.barrier()
    clock = {}
    if grid.main:
        for line in (run / METRICS_NAME).read_text().splitlines():
            record = json.loads(line)
            clock[record["iteration"]] = record["train_device_seconds"]
        shutil.rmtree(run)
    seconds = (clock[steps] - clock[warmup]) / grid.cfg.probe_iterations if grid.main else 0.0
    return {
        "device_seconds_per_iteration": seconds,
        "iterations_per_epoch": trainer.iterations_per_epoch,
        "warmup_iterations": warmup,
        "timed_iterations": grid.cfg.probe_iterations,
    }


def scratch_epochs(budget_hours: float, probe: dict) -> int:
    """Epochs of the scratch model that cost at least ``budget_hours`` at the probe's speed
    (rounded up: scratch is never given less than the arm it is matched to)."""
    per_epoch = probe["device_seconds_per_iteration"] * probe["iterations_per_epoch"] / 3600
    return max(1, math.ceil(budget_hours / per_epoch)) if per_epoch > 0 else 1


def run_arm(grid: Grid, arm: Arm, seed: int, done: dict[tuple[str, str, int], dict]) -> list[dict]:
    """Pre-train (jigsaw arms) and fine-tune for every schedule; returns the result rows."""
    cfg = grid.cfg
    folder = grid.out / "arms" / arm.name / f"seed-{seed}"
    if grid.main:
        folder.mkdir(parents=True, exist_ok=True)
    grid.barrier()
    start: dict[str, Any] = {"pretrain_device_hours": 0.0}
    if arm.init == "jigsaw":
        start = grid.result(folder / "pretrain.json", lambda: _pretrain(grid, arm, seed, folder), START_KEYS)
    elif arm.init in ("random", "imagenet"):
        start = grid.result(folder / "pretrain.json", lambda: _initial(grid, arm, seed), START_KEYS)
    init = {"jigsaw": str(folder / "pretrain"), "imagenet": f"imagenet:{cfg.imagenet}"}.get(arm.init, "scratch")
    rows = []
    for schedule in cfg.schedules:

        def compute() -> dict:
            epochs, plan = schedule_epochs_of(cfg, schedule), {}
            if arm.init == "scratch":
                matched = done[(cfg.match, schedule, seed)]
                budget = matched["pretrain_device_hours"] + matched["finetune_device_hours"]
                probe = grid.result(
                    folder / "timing-probe.json", lambda: _time_scratch(grid, arm, seed, folder), PROBE_KEYS
                )
                epochs = scratch_epochs(budget, probe)
                plan = {
                    "matched_to": cfg.match,
                    "budget_device_hours": budget,
                    "planned_device_hours": epochs
                    * probe["iterations_per_epoch"]
                    * probe["device_seconds_per_iteration"]
                    / 3600,
                    "timing_probe": probe,
                }
            grid.say(f"{arm.name}, seed {seed}, {schedule}: fine-tuning {epochs} epochs from {init}")
            result = _finetune(grid, arm, seed, folder / f"finetune-{schedule}", init, epochs)
            return {
                "arm": arm.name,
                "init": arm.init,
                "description": describe(arm),
                "seed": seed,
                "schedule": schedule,
                **start,
                **result,
                **plan,
            }

        row = grid.result(folder / f"{schedule}.json", compute, RUN_KEYS)
        copied = [k for k, v in start.items() if row.get(k) != v]
        if copied:  # the row carries its arm's start (cost, probes): both must say the same
            raise InputError(
                f"{folder / f'{schedule}.json'} is damaged (its {', '.join(copied)} differ from "
                f"{folder / 'pretrain.json'}): delete it and rerun the command to redo that run"
            )
        done[(arm.name, schedule, seed)] = row
        rows.append(row)
    return rows


def run_experiment(
    cfg: ExperimentConfig,
    on_result: Callable[[dict], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Run (or continue) every arm x schedule x seed of the grid, seeds outermost so that a
    partial grid already compares every arm; returns ``experiment.json``'s content.
    ``on_result`` gets each result row, ``on_progress`` a line of progress (rank 0 only)."""
    from .report import write_report

    out = Path(cfg.out)
    info, _ = init_distributed(cfg.device, timeout=_RANK_WAIT)
    fresh = claim_experiment_dir(out, cfg)
    check_sources(cfg)
    if cfg.imagenet:
        _imagenet_backbone(cfg)  # a file that does not fit is refused now, not hours in
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = (on_progress or log.info) if info.main else (lambda line: None)
    grid = Grid(cfg, prepare_data(cfg, out, build=False), out, info.world, info.main, say)
    grid.barrier()  # every rank has checked the folder before rank 0 writes into it
    with contextlib.ExitStack() as held:
        if grid.main:
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(BuildLock(out / LOCK_NAME, "experiment"))  # refused: the folder is the other's
            try:
                write_json_atomic(out / CONFIG_NAME, {"format": FORMAT, "config": _jsonable(cfg)})
                prepare_data(cfg, out)
            except InputError:
                if fresh:  # the data were refused: the new grid leaves nothing behind
                    _discard(out, created)
                raise
        grid.barrier()
        done: dict[tuple[str, str, int], dict] = {}
        report: dict = {}
        for seed in cfg.run_seeds:
            for arm in arms(cfg):
                for row in run_arm(grid, arm, seed, done):
                    if grid.main:
                        report = write_report(out, cfg, list(done.values()))
                        if on_result:
                            on_result(row)
    return report
