"""``make gpu-check``: everything that needs a CUDA GPU, in one command, into one report folder.

In order, each step timed and its outcome recorded even when an earlier one failed:

1. ``tests``: the ``gpu``-marked tests (``pytest -m gpu``);
2. ``bench``: ``jigsawdata bench all`` on the GPU (ResNet-50, bf16, channels_last; DALI-GPU
   vs DALI-CPU vs the reference pipeline; the ERF loss overhead; the cost claim);
3. ``pretrain``: a 200-iteration ResNet-50 pre-training with the DALI GPU pipeline, then a
   resume of the finished run (a GPU checkpoint loads back);
4. ``finetune``: a Faster R-CNN FPN fine-tune from those weights, 25 iterations, resumed to
   50, then COCO evaluation on the first images.

Writes ``summary.md`` and ``summary.json`` (every figure, step status and time), the pytest
log and the benchmark report into ``--out``. Without a GPU it says so and exits 0, running
nothing. Usage::

    python -m jigsawdata.benchmarks.gpu_check [--out gpu-report] [--coco ../shared/data/coco-train288]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from jigsawdata.layout import MANIFEST_NAME

from .common import DEFAULT_COCO, environment

ROOT = Path(__file__).resolve().parents[1]


class _Skipped(Exception):
    """A step that cannot run here, for the reason given (not a failure)."""


def _tests(out: Path, coco: Path) -> dict:
    if not (ROOT / "tests").is_dir():
        raise _Skipped("the tests ship with the source checkout, not with the installed package")
    log = out / "pytest-gpu.log"
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    tail = log.read_text().strip().splitlines()[-1:]
    if done.returncode:
        raise RuntimeError(f"gpu tests failed ({tail[0] if tail else 'no output'}): see {log.name}")
    return {"summary": tail[0] if tail else ""}


def _bench(out: Path, coco: Path) -> dict:
    from .report import run_all

    results = run_all(out / "bench", coco)["results"]
    figures = {}
    pipe = results["pipeline"]["result"]
    figures["pipeline_images_per_s"] = {k: v["median"] for k, v in pipe["images_per_s"].items()}
    for key in ("ratio_dali_cpu_over_reference", "ratio_dali_gpu_over_rn50_step"):
        if key in pipe:
            figures[key] = pipe[key]
    figures["loss_overhead"] = {
        k: v for k, v in results["loss"]["result"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    cost = results["cost"]["result"]
    figures["cost"] = {
        "jigsaw_images_per_s": cost["jigsaw"]["images_per_s"],
        "imagenet_images_per_s": cost["imagenet"]["images_per_s"],
        "jigsaw_data_wait": cost["jigsaw"]["data_wait_fraction"]["median"],
        "imagenet_data_wait": cost["imagenet"]["data_wait_fraction"]["median"],
        "ratio": cost["projection"]["ratio"],
        "paper_ratio": cost["projection"]["paper_ratio"],
    }
    return figures


def _pretrain_config(shards: Path, out: Path):
    from jigsawdata.trainer.pretrain import PretrainConfig

    return PretrainConfig(
        shards=str(shards),
        out=str(out),
        arch="resnet50",
        iterations=200,
        batch=256,
        warmup=20,
        erf_every=100,
        erf_images=64,
        checkpoint_every=100,
        log_every=20,
        device="cuda",
        pipeline="dali",
        workers=8,
        amp="bf16",
    )


def _pretrain(out: Path, coco: Path) -> dict:
    from jigsawdata.build.run import BuildConfig, build_shards
    from jigsawdata.coco.reader import load_coco, resolve_coco_root
    from jigsawdata.trainer.pretrain import Trainer

    shards = out / "work" / "shards"
    if not (shards / MANIFEST_NAME).is_file():
        build_shards(load_coco(*resolve_coco_root(coco, "train2017")), shards, BuildConfig(), workers=8)
    logs: list[dict] = []
    start = time.perf_counter()
    Trainer(_pretrain_config(shards, out / "work" / "pretrain"), on_log=logs.append).train()
    seconds = time.perf_counter() - start
    resumed = Trainer(_pretrain_config(shards, out / "work" / "pretrain"), resume=True)
    last = logs[-1]
    return {
        "iterations": resumed.iteration,
        "seconds": seconds,
        "first_loss": logs[0]["loss"],
        "last_loss": last["loss"],
        "images_per_s": last["images_per_s"],
        "data_wait_fraction": last["data_wait_fraction"],
        "peak_memory_mb": last.get("peak_memory_mb"),
        "resumed_at": resumed.iteration,
    }


def _finetune(out: Path, coco: Path) -> dict:
    from jigsawdata.trainer.finetune import FinetuneConfig, Finetuner, evaluate_run

    def cfg(max_iters: int) -> FinetuneConfig:
        return FinetuneConfig(
            coco=str(coco),
            out=str(out / "work" / "finetune"),
            init=str(out / "work" / "pretrain"),
            detector="fpn",
            arch="resnet50",
            batch=8,
            warmup=50,
            workers=8,
            device="cuda",
            max_iters=max_iters,
            log_every=5,
        )

    logs: list[dict] = []
    start = time.perf_counter()
    Finetuner(cfg(25), on_log=logs.append).train()
    Finetuner(cfg(50), resume=True, on_log=logs.append).train()
    seconds = time.perf_counter() - start
    metrics = evaluate_run(out / "work" / "finetune", max_images=64, device="cuda")
    return {
        "iterations": logs[-1]["iteration"],
        "seconds": seconds,
        "first_loss": logs[0]["loss"],
        "last_loss": logs[-1]["loss"],
        "bbox_AP_after_50_iterations": metrics["bbox"].get("AP"),
    }


STEPS = {"tests": _tests, "bench": _bench, "pretrain": _pretrain, "finetune": _finetune}


def run(out: Path, coco: Path = DEFAULT_COCO, only: tuple[str, ...] = tuple(STEPS)) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {"device": device, "environment": environment(), "steps": {}}
    for name in only:
        print(f"[gpu-check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            figures, status = STEPS[name](out, coco), "ok"
        except _Skipped as exc:
            figures, status = {"reason": str(exc)}, "skipped"
        except Exception as exc:  # every step runs and reports, whatever broke before it
            figures, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, "failed"
        summary["steps"][name] = {"status": status, "seconds": time.perf_counter() - start, **figures}
        print(f"[gpu-check] {name}: {status} in {summary['steps'][name]['seconds']:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _markdown(summary: dict) -> str:
    lines = [f"# gpu-check on {summary['device']}", "", f"Command: `{summary['environment']['command']}`", ""]
    for name, step in summary["steps"].items():
        lines += [f"## {name}: {step['status']} ({step['seconds']:.0f} s)", "", "```"]
        lines += [f"{k}: {v}" for k, v in step.items() if k not in ("status", "seconds", "traceback")]
        if "traceback" in step:
            lines.append(step["traceback"])
        lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-report"))
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO)
    parser.add_argument("--only", nargs="+", choices=tuple(STEPS), default=list(STEPS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch; nothing was run.")
        return 0
    if not args.coco.is_dir():
        parser.error(f"--coco {args.coco} is not a folder: give a COCO-format set of real photographs")
    summary = run(args.out, args.coco, tuple(args.only))
    print((args.out / "summary.md").read_text())
    return 1 if any(s["status"] == "failed" for s in summary["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
