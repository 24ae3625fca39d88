"""Iteration-based jigsaw pre-training with ERF-adaptive dense classification.

One process per GPU under ``torchrun`` (DistributedDataParallel, every rank reading its own
share of the shards), or a single process on one GPU or the CPU. A checkpoint holds model,
optimizer, grad scaler, ERF weights, RNG states and every rank's data position, so
``resume`` continues to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from jigsawdata.errors import InputError, Stopped, TrainingError
from jigsawdata.files import sha256_file
from jigsawdata.layout import MANIFEST_NAME
from jigsawdata.pipelines.dali import require_dali
from jigsawdata.pipelines.ranks import process_info
from jigsawdata.shardset.open import ShardSet, open_shard_set

from . import checkpoint as ckpt_io
from .config import PretrainConfig, saved_config
from .data import SOURCES
from .erf import blockwise_weights, level_receptive_fields, level_region_maps, level_weights, region_fractions
from .loop import MetricsLog, TrainingRun
from .losses import blockwise_loss, erf_dense_loss, global_loss, mean_over_levels
from .model import BACKBONE_LEVEL, build_model, level_logits
from .runtime import (
    Precision,
    TrainClock,
    claim_run_dir,
    dump_config,
    gather,
    init_distributed,
    provenance,
    resolved,
    stop_requests,
    wrap_ddp,
)
from .schedule import learning_rate, scaled
from .validate import load_validation_set, validate

log = logging.getLogger(__name__)


# Settings that may differ between a run and its resumption.
_RESUMABLE = {
    "out",
    "workers",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "cache_dir",
    "verify",
    "val_shards",
    "val_every",
    "val_images",
    "iterations",
}


class Trainer(TrainingRun):
    def __init__(
        self,
        cfg: PretrainConfig,
        resume: bool = False,
        on_log: Callable[[dict], None] | None = None,
        on_validate: Callable[[dict], None] | None = None,
    ) -> None:
        if cfg.pipeline == "dali":
            require_dali()
        self.cfg, self.on_log, self.on_validate = cfg, on_log, on_validate
        world = process_info().world
        if cfg.batch % world:
            raise InputError(f"--batch {cfg.batch} is not divisible by the {world} ranks")
        self.dist, self.device = init_distributed(cfg.device)
        self.local_batch = cfg.batch // self.dist.world
        self.out = claim_run_dir(cfg.out, resume)
        self.shards = self._open_shards()
        self.class_names = self.shards.class_names
        self.template = cfg.template
        self.jigsaw = cfg.jigsaw_config(cfg.seed + 1000 * self.dist.rank)
        data = {"shards": _data_record(cfg.shards, self.shards.root)}
        self.validation = None
        if cfg.val_shards and self.dist.main:
            val = open_shard_set(cfg.val_shards, verify=cfg.verify, cache_dir=cfg.cache_dir)
            self.validation = load_validation_set(val, self.template, cfg.val_images, cfg.fit, self.class_names)
            data["val_shards"] = _data_record(cfg.val_shards, val.root)
        self.provenance = provenance(**data)
        self.last_validation: dict = {}
        self.area = torch.from_numpy(region_fractions(self.template)).to(self.device)

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.arch, len(self.class_names), cfg.neck, cfg.fpn_channels).to(self.device)
        self.levels = {name: replace(self.template, stride=stride) for name, stride in self.model.strides.items()}
        self.region_maps = level_region_maps(self.template, self.model.strides, self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.precision = Precision.of(cfg.amp, self.device)
        self.scaler = self.precision.scaler()
        self.iteration = 0
        self.clock = TrainClock(self.device, self.dist.world)
        self.weights: dict[str, torch.Tensor] | None = None
        """Eq. 2 weights of each classified level (:attr:`levels`)."""
        data_state = None
        if resume:
            data_state = self._restore()
        if self.dist.main:
            dump_config(self.out, cfg, resolved(self.device, self.precision, self.dist, self.provenance))
        self.net = wrap_ddp(self.model, self.dist, self.device)
        self.source = SOURCES[cfg.pipeline](
            self.shards,
            self.local_batch,
            self.jigsaw,
            device=self.device,
            workers=cfg.workers,
            rank=self.dist.rank,
            world_size=self.dist.world,
            state=data_state,
        )

    def _open_shards(self) -> ShardSet:
        """A URL is fetched (every file checked against the manifest) into the cache by one
        process per node while the others wait, for either pipeline: training never reads
        a byte that was not verified. The set is opened once, here, and handed down."""
        cfg = self.cfg
        first = self.dist.local_rank == 0
        shards = open_shard_set(cfg.shards, verify=cfg.verify, cache_dir=cfg.cache_dir) if first else None
        if self.dist.world > 1:
            dist.barrier()
        return shards or open_shard_set(cfg.shards, verify=False, cache_dir=cfg.cache_dir, fetch=False)

    # ------------------------------------------------------------------ state

    def _restore(self):
        # Loaded to the CPU: the RNG states must stay CPU tensors; load_state_dict places the rest.
        ckpt = ckpt_io.load(self.out / ckpt_io.CHECKPOINT_NAME, map_location="cpu")
        saved = saved_config(ckpt["config"])
        self.check_resumable(ckpt, saved, self.cfg, _RESUMABLE)
        if (
            self.cfg.pipeline == "dali"
            and self.device.type == "cpu"
            and saved.get("workers", self.cfg.workers) != self.cfg.workers
        ):
            raise InputError(
                f"cannot resume {self.out} with --workers {self.cfg.workers}: on the CPU they are DALI "
                f"pipelines, each with its own data position; resume with --workers {saved['workers']}"
            )
        if len(ckpt["data"]["states"]) != self.dist.world:
            raise InputError(f"{self.out} was saved by {len(ckpt['data']['states'])} ranks; resume it with as many")
        self._check_new_length(int(saved["iterations"]), int(ckpt["iteration"]))
        self.restore_training_state(ckpt)
        self.weights = _saved_weights(ckpt["erf_weights"], self.device)
        log.info("resumed %s at iteration %d", self.out, self.iteration)
        return ckpt["data"]["states"][self.dist.rank]

    def _check_new_length(self, saved_total: int, at: int) -> None:
        """``--iterations`` may change on resume, past the saved iteration. The cosine decay is
        a function of the total, so from the saved iteration on the rate follows the new
        schedule: said here with the step it makes."""
        total = self.cfg.iterations
        if total == saved_total:
            return
        if total <= at:
            raise InputError(f"cannot resume {self.out} with --iterations {total}: it is at iteration {at} already")
        c = self.cfg
        old = learning_rate(
            at,
            total=saved_total,
            warmup=c.warmup,
            lr_start=scaled(c.lr_start, c.batch),
            lr_peak=scaled(c.lr_peak, c.batch),
        )
        log.warning(
            "--iterations %d instead of %d: from iteration %d the learning rate follows the %d-iteration "
            "schedule (%.5f there, against %.5f in the saved one); a run of %d from the start would have had "
            "other rates before it",
            total,
            saved_total,
            at,
            total,
            self._lr(at),
            old,
            total,
        )

    def save(self) -> None:
        data_states = gather(self.source.state(), self.dist)
        state = self.training_state()
        if not self.dist.main:
            return
        path = self.out / ckpt_io.CHECKPOINT_NAME
        ckpt_io.save_atomic(
            {
                "format": ckpt_io.FORMAT,
                **state,
                "arch": self.cfg.arch,
                "class_names": list(self.class_names),
                "config": asdict(self.cfg),
                "erf_weights": self.weights,
                "data": {"kind": self.source.kind, "states": data_states},
                "schedule": {
                    "warmup": self.cfg.warmup,
                    "total": self.cfg.iterations,
                    "lr_start": self._lr(0),
                    "lr_peak": scaled(self.cfg.lr_peak, self.cfg.batch),
                },
                "provenance": self.provenance,
            },
            path,
        )
        ckpt_io.keep_last(path, self.iteration, self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ steps

    def _lr(self, iteration: int) -> float:
        c = self.cfg
        return learning_rate(
            iteration,
            total=c.iterations,
            warmup=c.warmup,
            lr_start=scaled(c.lr_start, c.batch),
            lr_peak=scaled(c.lr_peak, c.batch),
        )

    def refresh_erf(self) -> None:
        """Recompute each level's (4, g, g) label weights from the current model on real jigsaw images."""
        if self.cfg.loss != "erf":
            self.weights = {name: blockwise_weights(level).to(self.device) for name, level in self.levels.items()}
            return
        images, _ = next(self.source)
        maps = level_receptive_fields(self.model, images[: self.cfg.erf_images], self.template)
        if self.dist.world > 1:
            for level in maps.values():
                dist.all_reduce(level)
                level /= self.dist.world
        self.weights = dict(level_weights(maps, self.template, self.model.strides, self.cfg.tau))

    def loss(self, output, labels: torch.Tensor) -> torch.Tensor:
        """The loss of every classified level, averaged over the levels (one level: its own)."""
        return mean_over_levels(
            [self._level_loss(name, logits, labels) for name, logits in level_logits(output).items()]
        )

    def _level_loss(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "erf":
            return erf_dense_loss(logits, labels, self.weights[name], self.region_maps[name])
        if self.cfg.loss == "blockwise":
            return blockwise_loss(logits, labels, self.region_maps[name])
        return global_loss(logits, labels, self.area)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.set_lr(self._lr(self.iteration))
        # channels_last on the GPU (DALI's HWC output already is: no copy); the CPU's kernels
        # are NCHW ones, so a channels_last view from DALI's CPU backend is made contiguous.
        cuda = self.device.type == "cuda"
        images = images.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
        with self.autocast():
            output = self.net(images)
        loss = self.loss(output, labels)
        self.optimizer_step(loss)
        return loss.detach()

    def train(self) -> dict:
        """Run to ``cfg.iterations``; returns the last logged metrics. On SIGTERM (a scheduler's
        preemption) it saves a checkpoint and raises :class:`Stopped`."""
        self.metrics = MetricsLog(
            self.out, self.dist.main, f"pretrain {self.out.name}: {self.cfg.arch}, {self.cfg.loss} loss"
        )
        self.clock.start()
        try:
            with stop_requests() as requested:
                return self._loop(requested)
        finally:
            self.clock.stop()
            self.metrics.close()

    def _loop(self, requested: Callable[[], bool]) -> dict:
        cfg, metrics = self.cfg, {}
        window = self._new_window()
        while self.iteration < cfg.iterations:
            if self.weights is None or self.iteration % cfg.erf_every == 0:
                self.refresh_erf()
            t0 = time.perf_counter()
            images, labels = next(self.source)
            window["wait"] += time.perf_counter() - t0
            loss = self.step(images, labels)
            self.iteration += 1
            window["loss"] += loss  # stays on the device: no synchronisation per step
            window["steps"] += 1
            logged = self.iteration % cfg.log_every == 0 or self.iteration == cfg.iterations
            if logged:
                metrics = self._log(window)
                window = self._new_window()
            if self.validation and (self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations):
                with self.clock.paused():
                    self._validate()
            stop = self._stop_agreed(requested(), logged)
            if stop or self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                with self.clock.paused():
                    self.save()
            if stop and self.iteration < cfg.iterations:
                raise Stopped(
                    f"stopped by SIGTERM at iteration {self.iteration} of {cfg.iterations}, checkpoint "
                    f"saved: continue with `jigsawdata pretrain --out {self.out} --resume`",
                    128 + 15,
                )
        return metrics

    def _stop_agreed(self, requested: bool, logged: bool) -> bool:
        """Whether every rank stops now. A lone process stops at the next iteration; ranks agree
        at the next log step (one all-reduce there), so that they save the same iteration."""
        if self.dist.world == 1:
            return requested
        if not logged:
            return False
        flag = torch.tensor(int(requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _new_window(self) -> dict:
        return {"loss": torch.zeros((), device=self.device), "wait": 0.0, "start": time.perf_counter(), "steps": 0}

    def _validate(self) -> None:
        """Region accuracy on the fixed held-out images (main rank only), logged as its own
        ``metrics.jsonl`` record."""
        self.last_validation = {"iteration": self.iteration, **validate(self.model, self.validation, self.template)}
        self.metrics.write(
            self.last_validation,
            [key for key in self.last_validation if key.startswith("val_accuracy") or key == "val_majority"],
        )
        if self.on_validate:
            self.on_validate(self.last_validation)

    def _log(self, window: dict) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - window["start"]
        steps = window["steps"]
        self._check_finite(window["loss"])
        metrics = {
            "iteration": self.iteration,
            "loss": float(window["loss"]) / steps,
            "lr": self._lr(self.iteration - 1),
            "images_per_s": steps * self.cfg.batch / elapsed,
            "step_s": elapsed / steps,
            "data_wait_s": window["wait"] / steps,
            "data_wait_fraction": window["wait"] / elapsed,
            "train_device_seconds": self.clock.seconds,
        }
        if self.device.type == "cuda":
            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.dist.main:
            self.metrics.write(metrics, [key for key in metrics if key != "iteration"])
            if self.on_log:
                self.on_log(metrics)
        return metrics

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Stop when the loss of the last log window is NaN or infinite, on every rank at once
        (one rank stopping alone would leave the others waiting in their next collective).
        Nothing of it is saved: the last checkpoint holds the weights from before."""
        finite = torch.isfinite(loss_sum).to(torch.int32)
        if self.dist.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise TrainingError(
                f"the loss became {float(loss_sum)} by iteration {self.iteration}: the run diverged "
                f"(lower --lr-peak, or --amp off); {self.out} keeps the last checkpoint from before"
            )


def _data_record(location: str, local: Path) -> dict:
    """Where a shard set was read from and the sha256 of its manifest, which vouches for every
    file of it: the run is tied to exactly these shards."""
    return {"location": str(location), "manifest_sha256": sha256_file(Path(local) / MANIFEST_NAME)}


def _saved_weights(saved, device: torch.device) -> dict[str, torch.Tensor] | None:
    """A checkpoint's ERF weights by level; earlier checkpoints saved the one level's tensor."""
    if saved is None:
        return None
    if isinstance(saved, torch.Tensor):
        return {BACKBONE_LEVEL: saved.to(device)}
    return {name: weights.to(device) for name, weights in saved.items()}
