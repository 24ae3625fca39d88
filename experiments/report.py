"""The grid's results as a researcher reads them: one row per arm and schedule, every
figure the mean +- standard deviation over the seeds that have finished (each seed's AP
beside it), the AP difference to a baseline arm marked only when it exceeds twice the
spread, and each arm's measured cost. Written as ``table.md``, ``experiment.json`` and
``experiment.png`` (AP against total cost) after every result, so a partial grid already
has its table.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from jigsawdata.files import write_json_atomic, write_text_atomic
from jigsawdata.trainer.evaluate import METRICS

from .config import ExperimentConfig

SIGNIFICANCE = 2.0
"""A difference is marked when it exceeds this many standard deviations (the larger of the
two rows' seed spreads)."""


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _ap(result: dict, metric: str = "AP") -> float | None:
    """A run's figure in percent; None where COCOeval says -1 (no object of that size)."""
    value = result["eval"]["bbox"][metric]
    return 100 * value if value >= 0 else None


def table_rows(results: list[dict], baseline: str) -> list[dict]:
    """One row per (arm, schedule), in the order the results first appear."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["schedule"]), []).append(r)
    rows = []
    for (arm, schedule), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        row: dict = {
            "arm": arm,
            "schedule": schedule,
            "initialisation": runs[0]["description"],
            "detector": runs[0].get("detector"),
            "seeds": [r["seed"] for r in runs],
            "AP_by_seed": {r["seed"]: _ap(r) for r in runs},
            "epochs": sorted({r["epochs"] for r in runs}),
            "full_lr_iterations": min(r["full_lr_iterations"] for r in runs),
        }
        for metric in METRICS:
            values = [_ap(r, metric) for r in runs]
            row[metric], row[f"{metric}_std"] = _stats(values) if None not in values else (None, None)
        external = any(r["pretrain_device_hours"] is None for r in runs)  # ImageNet: paid elsewhere
        row["pretrain_device_hours"] = None if external else _mean([r["pretrain_device_hours"] for r in runs])
        row["finetune_device_hours"] = _mean([r["finetune_device_hours"] for r in runs])
        row["total_device_hours"] = (row["pretrain_device_hours"] or 0.0) + row["finetune_device_hours"]
        if "budget_device_hours" in runs[0]:
            row["matched_to"] = runs[0]["matched_to"]
            row["budget_device_hours"] = _mean([r["budget_device_hours"] for r in runs])
            row["planned_device_hours"] = _mean([r["planned_device_hours"] for r in runs])
            spent = [
                (
                    r["pretrain_device_hours"] + r["finetune_device_hours"],
                    r["budget_device_hours"],
                    r["planned_device_hours"],
                )
                for r in runs
            ]
            row["budget_ratio"] = min((s / b for s, b, _ in spent if b > 0), default=1.0)
            row["plan_ratio"] = max((s / p for s, _, p in spent if p > 0), default=1.0)
        validation = [r.get("validation") for r in runs]
        if all(validation):
            row["val_accuracy"] = _mean([100 * v["val_accuracy"] for v in validation])
            row["val_majority"] = 100 * validation[0]["val_majority"]
        knn = [r.get("knn") for r in runs]
        if all(knn):
            row["knn_top1"] = _mean([100 * k["knn_top1"] for k in knn])
            row["knn_majority"] = 100 * knn[0]["knn_majority"]
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if b["arm"] == baseline and b["schedule"] == row["schedule"]), None)
        if base is None or base is row:
            continue
        _compare(row, base)
    return rows


def _compare(row: dict, base: dict) -> None:
    """ΔAP over the seeds both rows have (a partial grid may have more of one), marked
    significant only beyond :data:`SIGNIFICANCE` x the larger of the two seed spreads."""
    shared = [
        s
        for s in row["seeds"]
        if s in base["seeds"] and row["AP_by_seed"][s] is not None and base["AP_by_seed"][s] is not None
    ]
    if not shared:
        return
    mine, theirs = ([r["AP_by_seed"][s] for s in shared] for r in (row, base))
    (mean, spread), (base_mean, base_spread) = _stats(mine), _stats(theirs)
    row["delta_AP"], row["delta_seeds"] = mean - base_mean, shared
    row["significant"] = len(shared) > 1 and abs(row["delta_AP"]) > SIGNIFICANCE * max(spread, base_spread)


def _pm(row: dict, metric: str) -> str:
    if row[metric] is None:
        return "–"
    return f"{row[metric]:.1f} ± {row[metric + '_std']:.1f}" if len(row["seeds"]) > 1 else f"{row[metric]:.1f}"


def _pct(row: dict, key: str) -> str:
    return f"{row[key]:.1f} ({row[key.split('_')[0] + '_majority']:.1f})" if key in row else "–"


OFF_PLAN = 0.1
"""A scratch run whose measured cost exceeds its plan (the budget rounded up to whole epochs
at the timing probe's speed) by more than this fraction is flagged: the machine's speed
changed between the probe and the run (other load, thermal limits), and the match missed."""


def _initialisation(row: dict) -> str:
    text = row["initialisation"]
    if "budget_device_hours" in row:
        text += f"; given {row['matched_to']}'s {_hours(row['budget_device_hours'])} h"
        if row["budget_ratio"] < 1.0:
            text += f" (measured below it: {row['budget_ratio']:.2f}x)"
        if row["plan_ratio"] > 1.0 + OFF_PLAN:
            text += f" (measured {row['plan_ratio']:.2f}x the whole epochs planned for it: not matched)"
    return text


def _signed(value: float) -> str:
    """``+1.2``, ``-0.3``; a difference that rounds to nothing is ``0.0`` (not ``-0.0``)."""
    return "0.0" if round(value, 1) == 0 else f"{value:+.1f}"


def _hours(value: float) -> str:
    """Device-hours to three decimals; ``0`` is no cost (nothing pre-trained), a measured cost
    too small to show is ``<0.001``."""
    return "0" if value == 0 else "<0.001" if value < 0.0005 else f"{value:.3f}"


def format_markdown(rows: list[dict], device: str, baseline: str) -> str:
    head = [
        "arm",
        "initialisation",
        "detector",
        "schedule (epochs, full-lr it.)",
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        f"ΔAP vs {baseline}",
        f"pre-train {device}-h",
        f"fine-tune {device}-h",
        f"total {device}-h",
        "region top-1 % (majority)",
        "kNN top-1 % (majority)",
        "AP per seed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = f"{_signed(r['delta_AP'])}{' *' if r['significant'] else ''}" if "delta_AP" in r else "–"
        epochs = "/".join(str(e) for e in r["epochs"])
        pretrain = "external" if r["pretrain_device_hours"] is None else _hours(r["pretrain_device_hours"])
        per_seed = ", ".join(f"s{s}: {'–' if ap is None else f'{ap:.1f}'}" for s, ap in r["AP_by_seed"].items())
        cells = [
            r["arm"],
            _initialisation(r),
            r["detector"] or "–",
            f"{r['schedule']} ({epochs}, {r['full_lr_iterations']})",
            *(_pm(r, m) for m in METRICS),
            delta,
            pretrain,
            _hours(r["finetune_device_hours"]),
            _hours(r["total_device_hours"]),
            _pct(r, "val_accuracy"),
            _pct(r, "knn_top1"),
            per_seed,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines.append("")
    lines.append(
        f"Mean ± standard deviation over seeds {', '.join(str(s) for s in seeds)} (AP per seed: sN); ΔAP "
        f"over the seeds both rows have, `*` where |ΔAP| > {SIGNIFICANCE:g} x the larger of their seed "
        "spreads (never with one seed). Cost: measured training time x processes (no validation, "
        "evaluation or checkpoint I/O); external: pre-trained elsewhere. Schedule: epochs (a/b: the "
        "seeds' epochs differ, as scratch's follow each seed's matched cost) and iterations at the full "
        "learning rate (the fewest of the seeds')."
    )
    return "\n".join(lines)


def render_chart(rows: list[dict], title: str) -> Image.Image:
    """AP (mean, with a bar of +- one standard deviation) against total device-hours, one
    labelled point per row."""
    font = ImageFont.load_default()
    width, height, left, bottom, top, right = 760, 460, 70, 50, 40, 200
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black", font=font)
    rows = [r for r in rows if r["AP"] is not None]
    max_x = max([r["total_device_hours"] for r in rows], default=0.0) * 1.1 or 1.0
    max_y = max([r["AP"] + r["AP_std"] for r in rows], default=0.0) * 1.15 or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + plot_w * x / max_x, top + plot_h * (1 - y / max_y)

    draw.line((left, top, left, top + plot_h, left + plot_w, top + plot_h), fill="black")
    for i in range(5):
        x, y = max_x * i / 4, max_y * i / 4
        px, _ = at(x, 0)
        _, py = at(0, y)
        draw.text((px - 10, top + plot_h + 5), f"{x:.3g}", fill="black", font=font)
        draw.text((left - 40, py - 5), f"{y:.1f}", fill="black", font=font)
    draw.text((left + plot_w // 2 - 60, height - 20), "total device-hours", fill="black", font=font)
    draw.text((5, top - 15), "AP", fill="black", font=font)
    palette = [
        (52, 101, 164),
        (204, 0, 0),
        (78, 154, 6),
        (117, 80, 123),
        (245, 121, 0),
        (193, 125, 17),
        (46, 52, 54),
        (114, 159, 207),
    ]
    for i, r in enumerate(rows):
        color = palette[i % len(palette)]
        x, y = at(r["total_device_hours"], r["AP"])
        _, lo = at(0, r["AP"] - r["AP_std"])
        _, hi = at(0, r["AP"] + r["AP_std"])
        draw.line((x, lo, x, hi), fill=color, width=2)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=color)
        label = f"{r['arm']} {r['schedule']}" + (" (+ external)" if r["pretrain_device_hours"] is None else "")
        draw.text((x + 6, y - 6), label, fill=color, font=font)
        draw.text(
            (left + plot_w + 15, top + 14 * i),
            f"{label}: {r['AP']:.1f} AP, {r['total_device_hours']:.3g} h",
            fill=color,
            font=font,
        )
    return img


def write_report(out: Path, cfg: ExperimentConfig, results: list[dict]) -> dict:
    """Rewrite ``experiment.json``, ``table.md`` and ``experiment.png`` from every result so far."""
    baseline = cfg.baseline_arm
    rows = table_rows(results, baseline)
    devices = {r["device"] for r in results}
    device = "GPU" if devices == {"cuda"} else "CPU" if devices == {"cpu"} else "device"
    report = {"config": asdict(cfg), "baseline": baseline, "results": results, "table": rows}
    write_json_atomic(out / "experiment.json", report)
    write_text_atomic(out / "table.md", format_markdown(rows, device, baseline) + "\n")
    render_chart(rows, f"COCO-style bbox AP against cost ({cfg.detector}, {cfg.arch})").save(out / "experiment.png")
    return report
