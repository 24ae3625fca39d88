"""Evaluation, in one module: COCO AP of a detector (pycocotools' COCOeval, the paper's AP
table) and region accuracy of a pre-training checkpoint on held-out shards."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_eval(coco_gt: COCO, results: list[dict], iou_type: str = "bbox", image_ids: list[int] | None = None) -> dict:
    """AP, AP50, AP75, APs, APm, APl (as fractions; -1 where COCO has no ground truth)."""
    if not results:
        return _no_detections(coco_gt, image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(METRICS, (float(v) for v in evaluator.stats[:6])))


_AREAS = {"AP": (0, 1e10), "APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, 1e10)}
"""COCOeval's area ranges (inclusive bounds on an object's ``area``)."""


def _no_detections(coco_gt: COCO, image_ids: list[int] | None) -> dict:
    """What COCOeval reports for a model that detects nothing (``loadRes`` refuses an empty
    list): 0 where there are objects to find, -1 where the images hold none of that size."""
    ids = coco_gt.getImgIds() if image_ids is None else list(image_ids)
    # COCOeval ignores crowd regions (its own "ignore" flag is set from iscrowd alone).
    areas = [a["area"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=ids)) if not a.get("iscrowd", 0)]
    found = {name: any(low <= area <= high for area in areas) for name, (low, high) in _AREAS.items()}
    found["AP50"] = found["AP75"] = found["AP"]
    return {m: 0.0 if found[m] else -1.0 for m in METRICS}


EVALUATED_KEY = "evaluated"
"""Key of an ``eval*.json`` that says what was evaluated; the other keys are the metrics."""


def format_table(metrics: dict[str, dict]) -> str:
    """``{iou_type: {metric: value}}`` -> a fixed-width table in percent ("-": no object of
    that size to find, COCOeval's -1)."""
    lines = [f"{'':<6}" + "".join(f"{m:>8}" for m in METRICS)]
    for iou_type, values in metrics.items():
        lines.append(
            f"{iou_type:<6}" + "".join(f"{100 * values[m]:>8.1f}" if values[m] >= 0 else f"{'-':>8}" for m in METRICS)
        )
    return "\n".join(lines)


def evaluate_checkpoint(
    run: Path | str,
    shards: Path | str,
    images: int = 256,
    device: str = "auto",
    *,
    verify: bool = True,
    cache_dir: Path | str | None = None,
) -> dict:
    """:func:`validate` for a pre-training run directory or checkpoint file, on ``shards``
    (a directory or URL, checked first as training checks its own)."""
    from jigsawdata.shardset.open import open_shard_set

    from .model import load_pretrained
    from .runtime import pick_device
    from .validate import load_validation_set, validate

    dev = pick_device(device)
    ckpt, cfg, model = load_pretrained(run)
    data = load_validation_set(
        open_shard_set(shards, verify=verify, cache_dir=cache_dir),
        cfg.template,
        images,
        cfg.fit,
        tuple(ckpt["class_names"]),
    )
    return {"iteration": int(ckpt["iteration"]), **validate(model.to(dev), data, cfg.template)}
