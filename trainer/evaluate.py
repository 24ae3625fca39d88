"""COCO evaluation with pycocotools' COCOeval: the paper's AP table."""

from __future__ import annotations

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_eval(coco_gt: COCO, results: list[dict], iou_type: str = "bbox", image_ids: list[int] | None = None) -> dict:
    """AP, AP50, AP75, APs, APm, APl (as fractions; -1 where COCO has no ground truth)."""
    if not results:
        return {m: 0.0 for m in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(METRICS, (float(v) for v in evaluator.stats[:6])))


def format_table(metrics: dict[str, dict]) -> str:
    """``{iou_type: {metric: value}}`` -> a fixed-width table in percent."""
    lines = [f"{'':<6}" + "".join(f"{m:>8}" for m in METRICS)]
    for iou_type, values in metrics.items():
        lines.append(f"{iou_type:<6}" + "".join(f"{100 * values[m]:>8.1f}" for m in METRICS))
    return "\n".join(lines)
