"""The ablation grid's results as the paper shows them: a table shaped like Tables 2 and 5
(AP, AP50, AP75, measured pre-training and fine-tuning device-hours), ``experiment.json``
and a bar chart. Rewritten after every cell, so a partial grid already has its table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from jigsawdata.files import write_json_atomic, write_text_atomic

_DESCRIPTIONS = {
    "erf": "Jigsaw, ERF-adaptive dense (ours)",
    "blockwise": "Jigsaw, block-wise",
    "global": "Jigsaw, global",
    "scratch": "from scratch (GN, cost-matched)",
    "imagenet": "ImageNet weights",
}


def describe(cell: dict) -> str:
    if cell["name"] in _DESCRIPTIONS:
        return _DESCRIPTIONS[cell["name"]]
    return f"Jigsaw, {cell['loss']}, fit {cell['fit']}"


def table_rows(cells: dict[str, dict]) -> list[dict]:
    rows = []
    for name, cell in cells.items():
        bbox = cell["eval"]["bbox"]
        val = cell.get("validation") or {}
        pre, fine = cell["pretrain_device_hours"], cell["finetune_device_hours"]
        rows.append({"cell": name, "initialisation": describe(cell), "AP": 100 * bbox["AP"],
                     "AP50": 100 * bbox["AP50"], "AP75": 100 * bbox["AP75"], "pretrain_device_hours": pre,
                     "finetune_device_hours": fine, "total_device_hours": pre + fine,
                     "finetune_epochs": cell.get("finetune_epochs"),
                     "val_accuracy": val.get("val_accuracy"), "val_majority": val.get("val_majority")})
    return rows


def format_markdown(rows: list[dict], device: str) -> str:
    head = (f"| cell | initialisation | AP | AP50 | AP75 | pre-train {device}-h | fine-tune {device}-h | "
            f"total {device}-h | fine-tune epochs | pre-train val top-1 (majority) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        val = (f"{100 * r['val_accuracy']:.1f}% ({100 * r['val_majority']:.1f}%)"
               if r["val_accuracy"] is not None else "–")
        lines.append(f"| {r['cell']} | {r['initialisation']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | "
                     f"{r['pretrain_device_hours']:.3f} | {r['finetune_device_hours']:.3f} | "
                     f"{r['total_device_hours']:.3f} | {r['finetune_epochs']} | {val} |")
    return "\n".join(lines)


def render_chart(rows: list[dict], title: str) -> Image.Image:
    """AP and AP50 per cell as horizontal bars, with the total device-hours beside them."""
    font = ImageFont.load_default()
    bar_h, left, width = 22, 250, 420
    img = Image.new("RGB", (left + width + 170, 50 + len(rows) * 2 * bar_h + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black", font=font)
    top = max([r["AP50"] for r in rows] + [1e-6])
    for i, r in enumerate(rows):
        y = 40 + i * 2 * bar_h
        draw.text((10, y + 4), f"{r['cell']}: {r['initialisation']}"[:40], fill="black", font=font)
        for j, (key, color) in enumerate((("AP", (52, 101, 164)), ("AP50", (114, 159, 207)))):
            length = int(width * r[key] / top)
            draw.rectangle((left, y + j * 10, left + max(1, length), y + j * 10 + 9), fill=color)
            draw.text((left + length + 4, y + j * 10 - 1), f"{key} {r[key]:.1f}", fill="black", font=font)
        draw.text((left + width + 60, y + 4), f"{r['total_device_hours']:.3f} dev-h", fill="gray", font=font)
    return img


def write_report(out: Path, cfg, cells: dict[str, dict]) -> dict:
    rows = table_rows(cells)
    devices = {c.get("device", "cpu") for c in cells.values()}
    device = "GPU" if devices == {"cuda"} else "CPU" if devices == {"cpu"} else "device"
    report = {"config": asdict(cfg), "cells": cells, "table": rows}
    write_json_atomic(out / "experiment.json", report)
    write_text_atomic(out / "table.md", format_markdown(rows, device) + "\n")
    detector = cfg.finetune_config(coco="", out="").detector
    render_chart(rows, f"COCO-style bbox AP per initialisation ({detector}, {cfg.arch})").save(
        out / "experiment.png")
    return report
