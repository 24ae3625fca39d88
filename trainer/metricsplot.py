"""``metrics.png``: a run's curves from its ``metrics.jsonl``, drawn with Pillow alone.

One panel per series (training loss, learning rate, and for pre-training with validation
the held-out region accuracy), each against the iteration, so a run can be judged at a
glance without TensorBoard. Records that lack a series are skipped for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from jigsawdata.files import atomic_path
from jigsawdata.layout import METRICS_NAME, METRICS_PLOT_NAME

SERIES = (("loss", "training loss"), ("lr", "learning rate"), ("val_accuracy", "held-out region top-1"))
_WIDTH, _PANEL, _LEFT, _RIGHT, _TOP, _BOTTOM = 640, 170, 70, 20, 24, 22


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [
        (r["iteration"], float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]


def render_metrics(records: list[dict], title: str) -> Image.Image | None:
    """The panels of every series with at least one point; None when there is none."""
    panels = [(label, points) for key, label in SERIES if (points := _points(records, key))]
    if not panels:
        return None
    font = ImageFont.load_default()
    img = Image.new("RGB", (_WIDTH, 20 + _PANEL * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 4), title, fill="black", font=font)
    last = max(i for _, points in panels for i, _ in points) or 1
    for n, (label, points) in enumerate(panels):
        top = 20 + n * _PANEL + _TOP
        height, width = _PANEL - _TOP - _BOTTOM, _WIDTH - _LEFT - _RIGHT
        low, high = min(v for _, v in points), max(v for _, v in points)
        span = (high - low) or abs(high) or 1.0

        def at(i: int, v: float) -> tuple[float, float]:
            return _LEFT + width * i / last, top + height * (1 - (v - low) / span)

        draw.text((_LEFT, top - 14), label, fill="black", font=font)
        draw.line((_LEFT, top, _LEFT, top + height, _LEFT + width, top + height), fill="black")
        draw.text((4, top - 5), f"{high:.4g}", fill="black", font=font)
        draw.text((4, top + height - 5), f"{low:.4g}", fill="black", font=font)
        draw.text((_LEFT + width - 40, top + height + 4), f"it {last}", fill="black", font=font)
        xy = [at(i, v) for i, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=(52, 101, 164), width=2)
        for x, y in xy if len(xy) <= 50 else xy[-1:]:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(52, 101, 164))
    return img


def write_metrics_png(run: Path, title: str) -> Path | None:
    """Draw ``run/metrics.jsonl`` into ``run/metrics.png``; returns the path (None: nothing to draw)."""
    source = Path(run) / METRICS_NAME
    img = render_metrics(read_records(source), title) if source.is_file() else None
    if img is None:
        return None
    out = Path(run) / METRICS_PLOT_NAME
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return out
