"""Region top-1 accuracy on fixed jigsaw images: a learning signal for pre-training.

The images come from shards of a held-out split through the reference pipeline with every
random augmentation off (scale 1, no flip, centred windows) and a fixed reader seed, so the
same shards always give the same images in the same order, and the same weights always
the same figure. A region's prediction is the arg-max of its cells' logits averaged over
the region (as the block-wise loss pools them); the majority-class rate beside each figure
is what always answering the most frequent class would score.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jigsawdata.errors import InputError
from jigsawdata.pipelines.config import JigsawConfig
from jigsawdata.pipelines.reference import reference_loader
from jigsawdata.pipelines.template import REGION_NAMES, Template
from jigsawdata.shardset.open import ShardSet, as_shard_set

from .erf import level_region_maps
from .losses import region_mean
from .model import level_logits

log = logging.getLogger(__name__)

REGION_ROLES = {"TL": "small S", "TR": "W", "BL": "T", "BR": "large S"}
_READER_SEED = 20_200_428
"""Fixed seed of the validation readers' order: independent of the run's --seed, so two
runs are measured on the same images."""


@dataclass(frozen=True)
class ValidationSet:
    images: torch.Tensor
    """``(N, 3, H, W)`` normalised jigsaw images."""
    labels: torch.Tensor
    """``(N, 4)`` labels in region order TL, TR, BL, BR."""
    class_names: tuple[str, ...]


def validation_config(template: Template, fit: str = "pad_crop") -> JigsawConfig:
    """The un-augmented assembly: resize 1, no flip, each window centred on its sample."""
    return JigsawConfig(template=template, scale=(1.0, 1.0), flip_p=0.0, fit=fit, crop_pos=0.5, seed=_READER_SEED)


def load_validation_set(
    shards: ShardSet | Path | str,
    template: Template,
    count: int,
    fit: str = "pad_crop",
    class_names: tuple[str, ...] | None = None,
) -> ValidationSet:
    """The first ``count`` fixed jigsaw images of ``shards``; with ``class_names``, refuses
    shards whose classes differ (their labels would mean other things)."""
    if count < 1:
        raise InputError("--val-images must be >= 1")
    shards = as_shard_set(shards)
    names = shards.class_names
    if class_names is not None and tuple(names) != tuple(class_names):
        raise InputError(
            f"{shards.root} has other classes than the training shards: build both from the same "
            "category list (e.g. train2017 and val2017)"
        )
    loader = reference_loader(shards, min(count, 64), validation_config(template, fit), workers=0, rank=0, world_size=1)
    images, labels, seen = [], [], 0
    for batch_images, batch_labels in loader:
        images.append(batch_images[: count - seen])
        labels.append(batch_labels[: count - seen])
        seen += len(images[-1])
        if seen >= count:
            break
    return ValidationSet(torch.cat(images), torch.cat(labels), tuple(names))


@torch.no_grad()
def region_predictions(
    model: nn.Module, images: torch.Tensor, template: Template, chunk: int = 64
) -> "OrderedDict[str, torch.Tensor]":
    """``{level: (N, 4)}`` predicted class of each region by each classified level, and under
    ``"all"`` by the levels together: the arg-max of the region-averaged logits (averaged over
    the levels for ``"all"``), in eval mode and fp32 (the training mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    region_maps = level_region_maps(template, model.strides, device)
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in ("all", *region_maps)}
    try:
        for i in range(0, len(images), chunk):
            levels = {
                name: region_mean(logits.float(), region_maps[name])
                for name, logits in level_logits(model(images[i : i + chunk].to(device))).items()
            }
            for name, scores in levels.items():
                pooled[name].append(scores.argmax(dim=1).cpu())
            pooled["all"].append(torch.stack(list(levels.values())).mean(dim=0).argmax(dim=1).cpu())
    finally:
        model.train(was_training)
    return OrderedDict((name, torch.cat(parts)) for name, parts in pooled.items())


def _majority(labels: torch.Tensor) -> float:
    return float(torch.bincount(labels.reshape(-1)).max()) / labels.numel()


def region_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy overall and per region, each with its majority-class rate."""
    correct = (predictions == labels).float()
    metrics = {"val_accuracy": float(correct.mean()), "val_majority": _majority(labels)}
    for r, name in enumerate(REGION_NAMES):
        metrics[f"val_accuracy_{name}"] = float(correct[:, r].mean())
        metrics[f"val_majority_{name}"] = _majority(labels[:, r])
    metrics["val_images"] = len(labels)
    return metrics


def validate(model: nn.Module, data: ValidationSet, template: Template) -> dict[str, float]:
    """:func:`region_accuracy` of the levels together; with several levels (``--neck fpn``)
    also each level's own top-1 as ``val_accuracy_P2`` .. ``val_accuracy_P5``."""
    predictions = region_predictions(model, data.images, template)
    metrics = region_accuracy(predictions.pop("all"), data.labels)
    if len(predictions) > 1:
        for name, predicted in predictions.items():
            metrics[f"val_accuracy_{name}"] = float((predicted == data.labels).float().mean())
    return metrics


def format_validation(metrics: dict) -> str:
    """A fixed-width table of accuracy and majority rate, overall and per region, in percent."""
    lines = [f"{'region':<16}{'top-1 %':>9}{'majority %':>12}"]
    rows = [("all", "")] + [(name, f"_{name}") for name in REGION_NAMES]
    for name, suffix in rows:
        label = name if not suffix else f"{name} ({REGION_ROLES[name]})"
        lines.append(
            f"{label:<16}{100 * metrics['val_accuracy' + suffix]:>9.1f}{100 * metrics['val_majority' + suffix]:>12.1f}"
        )
    levels = [key.removeprefix("val_accuracy_") for key in metrics if key.startswith("val_accuracy_P")]
    for name in levels:
        lines.append(f"{'level ' + name:<16}{100 * metrics['val_accuracy_' + name]:>9.1f}")
    lines.append(
        f"({metrics['val_images']} fixed jigsaw images" + (", all: the levels' logits averaged)" if levels else ")")
    )
    return "\n".join(lines)
