"""``jigsawdata bench all``: every benchmark that fits the machine, one report.

Writes ``report.json`` (every figure with its device, versions, settings and command),
``report.md`` (the tables) and two PNG charts: images/s per pipeline, and the cost of
pre-training next to the paper's. ``quick=True`` runs each benchmark for a couple of steps
only (a smoke test: its figures mean nothing).
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from . import build_shards, cost_claim, loss_overhead, pipeline_throughput
from .common import DEFAULT_COCO, command, environment

BENCHMARKS = ("build", "pipeline", "loss", "cost")
NEED_DALI = ("pipeline", "cost")
"""The benchmarks that measure a DALI pipeline."""


def settings(quick: bool, cuda: bool) -> dict:
    if quick:
        return {
            "build": dict(repeats=1),
            "pipeline": dict(batch=4, batches=1, repeats=1, workers=1),
            "loss": dict(arch="resnet18", batch=2, steps=1, repeats=1, erf_images=1),
            "cost": dict(arch="resnet18", batch=4, steps=1, repeats=1, warmup=1, erf_images=1),
        }
    if cuda:
        return {
            "build": dict(repeats=3),
            "pipeline": dict(batch=128, batches=20, repeats=3, workers=8),
            "loss": dict(arch="resnet50", batch=128, steps=20, repeats=3, erf_images=64),
            "cost": dict(arch="resnet50", batch=128, steps=20, repeats=3, threads=8),
        }
    return {
        "build": dict(repeats=3),
        "pipeline": dict(batch=64, batches=20, repeats=3, workers=2),
        "loss": dict(arch="resnet18", batch=16, steps=5, repeats=5, erf_images=8),
        "cost": dict(arch="resnet18", batch=16, steps=5, repeats=5),
    }


def run_all(
    out: Path,
    coco: Path = DEFAULT_COCO,
    split: str = "train2017",
    only: tuple[str, ...] = BENCHMARKS,
    quick: bool = False,
    log=print,
    skipped: dict[str, str] | None = None,
) -> dict:
    """Run the ``only`` benchmarks into one report; ``skipped`` names those left out, and why."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings(quick, torch.cuda.is_available())
    results: dict = {
        "command": command(),
        "quick": quick,
        "environment": environment(),
        "machine": platform.node(),
        "results": {},
        "skipped": dict(skipped or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shards = None
        if {"pipeline", "cost"} & set(only):
            shards = pipeline_throughput.build_benchmark_shards(coco, Path(tmp) / "shards", split)
        for name in only:
            log(f"running {name} ...")
            if name == "build":
                r = build_shards.run(coco, split, **cfg["build"])
                table = build_shards.format_table(r)
            elif name == "pipeline":
                r = pipeline_throughput.run(coco, shards=shards, **cfg["pipeline"])
                table = pipeline_throughput.format_table(r)
            elif name == "loss":
                r = loss_overhead.run(**cfg["loss"])
                table = loss_overhead.format_table(r)
            else:
                r = cost_claim.run(coco, split, shards=shards, **cfg["cost"])
                table = cost_claim.format_table(r)
            results["results"][name] = {"result": r, "table": table}
            log(table)
    (out / "report.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_markdown(results))
    if "pipeline" in results["results"]:
        r = results["results"]["pipeline"]["result"]
        bar_chart(
            {k: v["median"] for k, v in r["images_per_s"].items()},
            "assembled images/s",
            f"jigsaw pipelines, batch {r['batch']}, {r['device']}",
        ).save(out / "pipelines.png")
    if "cost" in results["results"]:
        p = results["results"]["cost"]["result"]["projection"]
        bar_chart(
            {
                "paper Jigsaw": cost_claim.PAPER_GPU_DAYS["jigsaw"] / cost_claim.PAPER_GPU_DAYS["imagenet"],
                "paper ImageNet": 1.0,
                "ours Jigsaw": p["ratio"],
                "ours ImageNet": 1.0,
            },
            "cost relative to ImageNet pre-training",
            f"paper: 1.73 vs 6.80 GPU-days; ours: {p['jigsaw']:.0f} vs {p['imagenet']:.0f} {p['unit']}",
        ).save(out / "cost.png")
    return results


def _markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# jigsawdata benchmark report",
        "",
        f"Command: `{results['command']}`"
        + ("  (quick: smoke-test settings, figures mean nothing)" if results["quick"] else ""),
        f"Python {env['python']} on {env['machine']} with {env['cpus']} CPUs; packages: "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
        "",
    ]
    for name, item in results["results"].items():
        lines += [f"## {name}", "", "```", item["table"], "```", ""]
    for name, why in results["skipped"].items():
        lines += [f"## {name}: not run", "", why, ""]
    return "\n".join(lines)


def bar_chart(values: dict[str, float], ylabel: str, title: str, width: int = 640, height: int = 360) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    draw.text((12, 8), title, fill=(0, 0, 0), font=font)
    draw.text((12, 26), ylabel, fill=(80, 80, 80), font=font)
    top, bottom, left = 56, height - 40, 40
    peak = max(values.values()) or 1.0
    slot = (width - 2 * left) / max(1, len(values))
    colours = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (196, 160, 0)]
    for i, (name, value) in enumerate(values.items()):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y0 = bottom - (bottom - top) * value / peak
        draw.rectangle((x0, y0, x1, bottom), fill=colours[i % len(colours)])
        draw.text((x0, y0 - 16), f"{value:.3g}", fill=(0, 0, 0), font=font)
        draw.text((x0, bottom + 6), name, fill=(0, 0, 0), font=font)
    draw.line((left, bottom, width - left, bottom), fill=(0, 0, 0))
    return img
