"""Detection fine-tuning (docs/method.md 5: the 1x / 2x schedules) and COCO evaluation.

Epoch-based like the paper's schedules; a checkpoint after every epoch (and at
``max_iters``) holds model, optimizer, grad scaler, RNG and position, and ``--resume``
continues from it. Under ``torchrun`` the model is wrapped in DistributedDataParallel and
each rank trains on its part of every epoch; evaluation runs on rank 0.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from jigsawdata.coco.reader import resolve_coco_root
from jigsawdata.errors import InputError, TrainingError
from jigsawdata.files import sha256_file, write_json_atomic, write_text_atomic
from jigsawdata.layout import CONFIG_NAME
from jigsawdata.settings import RESOLVED_KEY

from . import checkpoint as ckpt_io
from .coco_data import CocoDetection, collate, to_coco_results
from .config import FinetuneConfig, config_from, schedule_epochs, train_files, val_files
from .detection import build_detector, default_norm
from .evaluate import EVALUATED_KEY, coco_eval, format_table
from .loop import MetricsLog, TrainingRun
from .runtime import (
    Precision,
    TrainClock,
    claim_run_dir,
    dump_config,
    init_distributed,
    pick_device,
    provenance,
    resolved,
    wrap_ddp,
)

log = logging.getLogger(__name__)


FORMAT = "jigsawdata-finetune-1"
_RESUMABLE = {"out", "workers", "log_every", "device", "max_iters", "val_split", "val_ann", "val_image_dir"}
"""Settings a resumed run may change: where and how fast it runs, how far, what it is evaluated on."""


def lr_factor(iteration: int, epoch: int, warmup: int, milestones: tuple[int, ...]) -> float:
    """Linear warm-up from 1/1000 (torchvision's references), then x0.1 per milestone passed."""
    warm = 1.0 if iteration >= warmup else 0.001 + (1 - 0.001) * iteration / warmup
    return warm * 0.1 ** sum(epoch >= m for m in milestones)


class Finetuner(TrainingRun):
    def __init__(self, cfg: FinetuneConfig, resume: bool = False, on_log: Callable[[dict], None] | None = None):
        self.cfg, self.on_log = cfg, on_log
        self.dist, self.device = init_distributed(cfg.device)
        self.out = claim_run_dir(cfg.out, resume)
        # A resume is checked first (a changed setting is refused before any work), and starts
        # from the checkpoint's weights: --init need not exist any more.
        ckpt = load_run(self.out) if resume else None  # to the CPU: RNG states must stay CPU tensors
        if ckpt is not None:
            self.check_resumable(ckpt, ckpt["config"], cfg, _RESUMABLE)
        self.masks = cfg.detector == "mask"
        self.train_set = CocoDetection(
            *train_files(cfg), train=True, masks=self.masks, flip_p=cfg.flip_p, max_images=cfg.max_images
        )
        local = max(1, cfg.batch // self.dist.world)
        if len(self.train_set) // self.dist.world < local:
            raise InputError(
                f"--batch {cfg.batch} needs {local} training images per process, but split {cfg.split} "
                f"has {len(self.train_set)}: lower --batch (drop_last would train no step)"
            )
        torch.manual_seed(cfg.seed)
        self.model = build_detector(
            cfg.detector,
            cfg.arch,
            self.train_set.num_classes,
            init=cfg.init,
            norm=cfg.norm,
            box_head=cfg.box_head,
            fpn_channels=cfg.fpn_channels,
            trainable_layers=cfg.trainable_layers,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            rois_per_image=cfg.rois_per_image,
            load_init=ckpt is None,
        ).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.base_lr = cfg.lr * cfg.batch / 16
        self.optimizer = torch.optim.SGD(params, lr=self.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.precision = Precision.of(cfg.amp, self.device)
        self.scaler = self.precision.scaler()
        self.epoch, self.iteration = 0, 0
        self.clock = TrainClock(self.device, self.dist.world)
        if ckpt is not None:
            self.restore_training_state(ckpt)
            self.epoch = int(ckpt["epoch"])
        if self.dist.main:
            dump_config(self.out, cfg, resolved(self.device, self.precision, self.dist, self._provenance(resume)))
        self.net = wrap_ddp(self.model, self.dist, self.device)

    def _provenance(self, resumed: bool) -> dict:
        """The annotation file trained on and the initial weights, by sha256 (the images are
        named by the annotations; hashing them all would cost a pass over the set). A resumed
        run keeps the record of the weights it started from: they may be gone by now."""
        ann, _ = train_files(self.cfg)
        data = {"annotations": {"location": str(ann), "sha256": sha256_file(ann)}}
        if resumed:
            config = self.out / CONFIG_NAME
            saved = json.loads(config.read_text()).get(RESOLVED_KEY, {}) if config.is_file() else {}
            saved = saved.get("provenance", {})
            if "init" in saved:
                data["init"] = saved["init"]
        elif self.cfg.init != "scratch":
            init = self.cfg.init.removeprefix("imagenet:")
            data["init"] = {"location": self.cfg.init, "sha256": sha256_file(ckpt_io.checkpoint_file(init))}
        return provenance(**data)

    def save(self) -> None:
        state = self.training_state()
        if self.dist.main:
            ckpt_io.save_atomic(
                {
                    "format": FORMAT,
                    "config": asdict(self.cfg),
                    "epoch": self.epoch,
                    **state,
                    "cat_ids": self.train_set.cat_ids,
                },
                self.out / ckpt_io.CHECKPOINT_NAME,
            )

    def _loader(self, epoch: int, done: int = 0) -> torch.utils.data.DataLoader:
        """The batches of ``epoch`` after its first ``done`` (trained before a resume): the
        epoch's order is a function of the seed and the epoch, so a run stopped mid-epoch
        (``--max-iters``) goes on with the batches an uninterrupted run trains next."""
        local = max(1, self.cfg.batch // self.dist.world)
        sampler = torch.utils.data.distributed.DistributedSampler(
            self.train_set, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=self.cfg.seed
        )
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=local,
            sampler=list(sampler)[done * local :],
            drop_last=True,
            num_workers=self.cfg.workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.cfg.seed + epoch),
        )

    @property
    def iterations_per_epoch(self) -> int:
        """Steps of one epoch on each rank (the sampler pads the set to a multiple of the ranks)."""
        local = max(1, self.cfg.batch // self.dist.world)
        return math.ceil(len(self.train_set) / self.dist.world) // local

    def _done(self) -> bool:
        return self.cfg.max_iters is not None and self.iteration >= self.cfg.max_iters

    def train(self) -> dict:
        epochs, milestones = schedule_epochs(self.cfg.schedule, self.cfg.epochs)
        metrics: dict = {}
        self.metrics = MetricsLog(
            self.out, self.dist.main, f"finetune {self.out.name}: {self.cfg.detector}, {self.cfg.arch}"
        )
        self.clock.start()
        try:
            while self.epoch < epochs and not self._done():
                start, wait, t0 = time.perf_counter(), 0.0, time.perf_counter()
                window: dict[str, float] = {}
                steps = 0
                done = min(max(self.iteration - self.epoch * self.iterations_per_epoch, 0), self.iterations_per_epoch)
                for images, targets in self._loader(self.epoch, done):
                    wait += time.perf_counter() - t0
                    losses = self.step(
                        images, targets, lr_factor(self.iteration, self.epoch, self.cfg.warmup, milestones)
                    )
                    for name, value in losses.items():
                        window[name] = window.get(name, 0.0) + value
                    steps += 1
                    self.iteration += 1
                    if self.iteration % self.cfg.log_every == 0 or self._done():
                        # Means over the steps since the last record: one batch of a few images
                        # swings the detection losses by 2-3x, which would hide the trend.
                        metrics = {
                            "epoch": self.epoch,
                            "iteration": self.iteration,
                            "lr": self.optimizer.param_groups[0]["lr"],
                            **{name: total / steps for name, total in window.items()},
                            "seconds": time.perf_counter() - start,
                            "data_wait_s": wait,
                            "train_device_seconds": self.clock.seconds,
                        }
                        window, steps = {}, 0
                        if self.dist.main:
                            self.metrics.write(metrics, [k for k in metrics if k not in ("epoch", "iteration")])
                            if self.on_log:
                                self.on_log(metrics)
                    if self._done():
                        break
                    t0 = time.perf_counter()
                if self.iteration >= (self.epoch + 1) * self.iterations_per_epoch:  # all of its batches trained
                    self.epoch += 1
                with self.clock.paused():
                    self.save()
        finally:
            self.clock.stop()
            self.metrics.close()
        return metrics

    def step(self, images, targets, factor: float) -> dict:
        self.set_lr(self.base_lr * factor)
        images = [i.to(self.device, non_blocking=True) for i in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with self.autocast():
            losses = self.net(images, targets)
        loss = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not math.isfinite(sum(values.values())):
            raise TrainingError(
                f"the loss became {sum(values.values())} at iteration {self.iteration} ({values}): "
                f"the run diverged (lower --lr, or --amp off); {self.out} keeps the last checkpoint "
                "from before"
            )
        self.optimizer_step(loss)
        return {"loss": sum(values.values()), **values}


def load_run(run_dir: Path) -> dict:
    return ckpt_io.load(run_dir, fmt=FORMAT, kind="fine-tuning")


def evaluation_name(split: str, max_images: int | None, own: bool) -> str:
    """The stem of an evaluation's files: ``eval`` for the run's own evaluation (its split and
    image count, as ``finetune`` ends with), else ``eval-<split>`` (``-first<N>``), so an
    evaluation of another split or of a subset never replaces the run's figures."""
    if own:
        return "eval"
    return f"eval-{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}" + (f"-first{max_images}" if max_images else "")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    out: Path | None = None,
    batch: int = 2,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    name: str = "eval",
    evaluated: dict | None = None,
) -> dict[str, dict]:
    """Run the detector over ``dataset``, return COCOeval's APs; with ``out``, write them as
    ``<name>.json`` (with ``evaluated``: what was evaluated) and ``<name>.txt``, and the
    COCO-format predictions beside them. ``progress(images, total)`` is called after every
    batch with the images it held."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
    results: dict[str, list] = {"bbox": [], "segm": []}
    cat_ids = dataset.cat_ids
    for images, targets in loader:
        outputs = model([i.to(device) for i in images])
        part = to_coco_results(outputs, [t["image_id"] for t in targets], cat_ids, dataset.masks)
        for key in results:
            results[key].extend(part[key])
        if progress is not None:
            progress(len(images), len(dataset))
    iou_types = ("bbox", "segm") if dataset.masks else ("bbox",)
    metrics = {t: coco_eval(dataset.coco, results[t], t, dataset.ids) for t in iou_types}
    if out is not None:
        suffix = name.removeprefix("eval")
        for t in iou_types:
            write_text_atomic(out / f"predictions_{t}{suffix}.json", json.dumps(results[t]))
        write_json_atomic(
            out / f"{name}.json", {**metrics, EVALUATED_KEY: {**(evaluated or {}), "images": len(dataset)}}
        )
        write_text_atomic(out / f"{name}.txt", format_table(metrics) + "\n")
    return metrics


def evaluate_run(
    run_dir: Path,
    coco: str | None = None,
    split: str | None = None,
    max_images: int | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    *,
    ann: str | None = None,
    image_dir: str | None = None,
) -> dict[str, dict]:
    """Evaluate a fine-tuning run's checkpoint on ``split`` of ``coco``, or on ``ann`` with
    ``image_dir``; by default on what the run itself is evaluated on (:func:`val_files`).
    The files written say what was evaluated (:func:`evaluation_name`)."""
    dev = pick_device(device)
    ckpt = load_run(run_dir)
    cfg = config_from(FinetuneConfig, ckpt["config"])
    own_files = val_files(cfg)
    if ann is not None:
        if coco is not None or split is not None:
            raise InputError("evaluate takes --ann with --image-dir, or --coco with --split: not both")
        files = (Path(ann), Path(image_dir) if image_dir else own_files[1])
        name = Path(ann).stem.removeprefix("instances_")
    elif coco is not None or split is not None:
        if cfg.coco is None and coco is None:
            raise InputError(
                f"{run_dir} was trained with --ann: evaluate another set with --ann (and --image-dir), "
                "or give --coco with --split"
            )
        split = split or cfg.val_split or cfg.split
        files = resolve_coco_root(Path(coco or cfg.coco), split)
        name = split
    else:
        files, name = own_files, Path(own_files[0]).stem.removeprefix("instances_")
    own = (Path(files[0]).resolve(), Path(files[1]).resolve(), max_images) == (
        Path(own_files[0]).resolve(),
        Path(own_files[1]).resolve(),
        cfg.max_images,
    )
    dataset = CocoDetection(*files, train=False, masks=cfg.detector == "mask", max_images=max_images)
    if dataset.cat_ids != list(ckpt["cat_ids"]):
        raise InputError(f"{files[0]} has other categories than the set {run_dir} was trained on")
    model = build_detector(
        cfg.detector,
        cfg.arch,
        len(dataset.cat_ids),
        norm=cfg.norm or default_norm(cfg.init),
        box_head=cfg.box_head,
        fpn_channels=cfg.fpn_channels,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
    ).to(dev)
    model.load_state_dict(ckpt["model"])
    evaluated = {
        "annotations": str(Path(files[0]).resolve()),
        "image_dir": str(Path(files[1]).resolve()),
        "max_images": max_images,
        "checkpoint": str(ckpt_io.checkpoint_file(Path(run_dir)).resolve()),
        "epoch": int(ckpt["epoch"]),
        "iteration": int(ckpt["iteration"]),
    }
    return evaluate(
        model,
        dataset,
        dev,
        Path(run_dir),
        progress=progress,
        name=evaluation_name(name, max_images, own),
        evaluated=evaluated,
    )
