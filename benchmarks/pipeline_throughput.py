"""Assembled jigsaw images per second: DALI (CPU backend; GPU too where present) versus the
reference PyTorch DataLoader with as many worker processes as DALI has threads, in one run.

Shards are built from the real COCO subset into a temporary directory first (small shards,
so every reference worker owns some). On a GPU it also measures how many images/s a
ResNet-50 AMP training step consumes, the rate the pipeline has to keep up with. Usage:

    python -m benchmarks.pipeline_throughput [--workers 2] [--batch 64] [--batches 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from jigsawdata.build import BuildConfig, build_shards
from jigsawdata.coco import load_coco, resolve_coco_root
from pipelines.config import JigsawConfig
from pipelines.dali import DaliJigsawLoader
from pipelines.reference import reference_loader

from .common import DEFAULT_COCO, environment, report, stats, timed


def build_benchmark_shards(coco: Path, out: Path, split: str = "train2017", shard_samples: int = 100) -> Path:
    source = load_coco(*resolve_coco_root(coco, split))
    build_shards(source, out, BuildConfig(shard_samples=shard_samples), workers=2)
    return out


def measure(loader, batch: int, batches: int, repeats: int, warmup: int = 3, sync: bool = False) -> dict:
    """Images/s of pulling ``batches`` batches, ``repeats`` times, after ``warmup`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    rates = [batch * batches / timed(lambda: [next(it) for _ in range(batches)], sync) for _ in range(repeats)]
    return stats(rates)


def rn50_consumption(batch: int, steps: int, repeats: int) -> dict:
    """Images/s a ResNet-50 training step (AMP bf16, channels_last) consumes on the GPU."""
    import torchvision

    model = torchvision.models.resnet50(num_classes=81).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 81, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    rates = [batch * steps / timed(lambda: [step() for _ in range(steps)], True) for _ in range(repeats)]
    return stats(rates)


def run(coco: Path = DEFAULT_COCO, workers: int = 2, batch: int = 64, batches: int = 20, repeats: int = 3,
        shards: Path | None = None) -> dict:
    cfg = JigsawConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = shards or build_benchmark_shards(coco, Path(tmp) / "shards")
        results = {
            "dali_cpu": measure(DaliJigsawLoader(root, batch, cfg, num_threads=workers, rank=0, world_size=1),
                                batch, batches, repeats),
            "reference": measure(reference_loader(root, batch, cfg, workers=workers, rank=0, world_size=1),
                                 batch, batches, repeats),
        }
        if torch.cuda.is_available():
            results["dali_gpu"] = measure(DaliJigsawLoader(root, batch, cfg, device="gpu", device_id=0,
                                                           num_threads=workers, rank=0, world_size=1),
                                          batch, batches, repeats, sync=True)
            results["rn50_amp_step"] = rn50_consumption(batch, batches, repeats)
    out = {"benchmark": "pipeline_throughput", "workers": workers, "batch": batch, "batches": batches,
           "repeats": repeats, "images_per_s": results,
           "ratio_dali_cpu_over_reference": results["dali_cpu"]["median"] / results["reference"]["median"],
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "environment": environment()}
    if "dali_gpu" in results:
        out["ratio_dali_gpu_over_rn50_step"] = results["dali_gpu"]["median"] / results["rn50_amp_step"]["median"]
    return out


def format_table(result: dict) -> str:
    lines = [f"jigsaw pipeline throughput, batch {result['batch']}, {result['workers']} threads/workers, "
             f"device {result['device']}", f"{'pipeline':<16}{'images/s':>10}{'min':>10}{'max':>10}"]
    for name, s in result["images_per_s"].items():
        lines.append(f"{name:<16}{s['median']:>10.1f}{s['min']:>10.1f}{s['max']:>10.1f}")
    lines.append(f"DALI-CPU / reference: {result['ratio_dali_cpu_over_reference']:.2f}x")
    if "ratio_dali_gpu_over_rn50_step" in result:
        lines.append(f"DALI-GPU / RN50 AMP step consumption: {result['ratio_dali_gpu_over_rn50_step']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO)
    parser.add_argument("--shards", type=Path, help="Use this shard set instead of building one.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.coco, args.workers, args.batch, args.batches, args.repeats, args.shards)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
