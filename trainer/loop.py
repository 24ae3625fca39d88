"""The plumbing both trainers share: the run's metrics log, the mixed-precision step, and the
training state a checkpoint saves and a resume restores, with the checks a resume makes.

Pre-training (:mod:`.pretrain`) and fine-tuning (:mod:`.finetune`) differ in their data,
model, loss and schedule; what they share lives here once, so that a resume refuses changed
settings, restores the RNG and the cost clock, and trims ``metrics.jsonl`` the same way in both.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Iterable

import torch

from jigsawdata.errors import InputError
from jigsawdata.layout import METRICS_NAME
from jigsawdata.pipelines.ranks import DistInfo

from .metricsplot import write_metrics_png
from .runtime import (
    Precision,
    TrainClock,
    check_resume_device,
    drop_records_after,
    gather,
    rng_state,
    set_rng_state,
    tensorboard_writer,
)


class MetricsLog:
    """A run's ``metrics.jsonl`` and TensorBoard scalars, written by the main rank alone;
    ``metrics.png`` is drawn from the file when the log closes."""

    def __init__(self, out: Path, main: bool, title: str) -> None:
        self.out, self.title = out, title
        self._file = open(out / METRICS_NAME, "a") if main else None
        self._tb = tensorboard_writer(out) if main else None

    def write(self, record: dict, scalars: Iterable[str]) -> None:
        """Append ``record`` (it holds its ``iteration``) and plot its ``scalars`` keys."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb:
            for key in scalars:
                self._tb.add_scalar(key, record[key], record["iteration"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            write_metrics_png(self.out, self.title)
        if self._tb:
            self._tb.close()


def changed_settings(saved: dict, cfg, resumable: set[str]) -> list[str]:
    """Settings of ``cfg`` that differ from a saved run's, but for ``resumable``; a setting
    newer than the saved run counts as its default there (what the run had)."""
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    names = (set(saved) | set(defaults)) - resumable
    return sorted(k for k in names if saved.get(k, defaults.get(k)) != getattr(cfg, k, None))


class TrainingRun:
    """Base of both trainers: the attributes below are set by the trainer's ``__init__``."""

    out: Path
    dist: DistInfo
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    scaler: torch.amp.GradScaler
    clock: TrainClock
    iteration: int

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.precision.dtype, enabled=self.precision.enabled)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def check_resumable(self, ckpt: dict, saved: dict, cfg, resumable: set[str]) -> None:
        """Refuse a resume on another kind of device or with changed settings (but ``resumable``)."""
        check_resume_device(ckpt.get("device_type"), self.device, self.out)
        diff = changed_settings(saved, cfg, resumable)
        if diff:
            raise InputError(f"cannot resume {self.out}: settings differ from the saved run in {', '.join(diff)}")

    def training_state(self) -> dict:
        """What every checkpoint holds of the run's state; called on every rank (it gathers the
        ranks' RNG states), saved by the main one."""
        return {
            "iteration": self.iteration,
            "device_type": self.device.type,
            "train_device_seconds": self.clock.seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": gather(rng_state(self.device), self.dist),
        }

    def restore_training_state(self, ckpt: dict) -> None:
        """The state :meth:`training_state` saved; the metrics logged after it are dropped (the
        resumed run logs them again)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.clock = TrainClock(self.device, self.dist.world, ckpt.get("train_device_seconds", 0.0))
        set_rng_state(ckpt["rng"][self.dist.rank], self.device)
        if self.dist.main:
            drop_records_after(self.out / METRICS_NAME, self.iteration)
