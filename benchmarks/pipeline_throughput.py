"""Assembled jigsaw images per second: DALI (CPU backend; GPU too where present) versus the
reference PyTorch DataLoader with as many worker processes as DALI has threads (on the CPU:
as many one-thread DALI pipelines, taking turns like the DataLoader's workers), and versus
"decode whole": the same workers reading the same four crops per image and only decoding
each whole with PIL (the work that decoding just the window avoids), in one run.

Shards are built from the real COCO subset into a temporary directory first (small shards,
so every reference worker owns some). On a GPU it also measures how many images/s a
ResNet-50 AMP training step consumes, the rate the pipeline has to keep up with. Usage:

    python -m jigsawdata.benchmarks.pipeline_throughput [--workers 2] [--batch 64] [--batches 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import io
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.coco.reader import load_coco, resolve_coco_root
from jigsawdata.pipelines.config import JigsawConfig
from jigsawdata.pipelines.dali import DaliJigsawLoader
from jigsawdata.pipelines.reference import reader_streams, reference_loader, worker_part
from jigsawdata.shardset.open import read_shard_set

from .common import DEFAULT_COCO, cpu_seconds, environment, interleaved, report, stats, timed


def build_benchmark_shards(coco: Path, out: Path, split: str = "train2017", shard_samples: int = 100) -> Path:
    source = load_coco(*resolve_coco_root(coco, split))
    build_shards(source, out, BuildConfig(shard_samples=shard_samples), workers=2)
    return out


class DecodeWhole(torch.utils.data.IterableDataset):
    """Per jigsaw image, the four crops it draws (S, S, T, W), each decoded whole with PIL
    and nothing else: a lower bound on a pipeline that decodes every crop whole."""

    def __init__(self, root: Path, cfg: JigsawConfig) -> None:
        super().__init__()
        self.shards, self.cfg = read_shard_set(root), cfg

    def __iter__(self) -> Iterator[np.ndarray]:
        part, parts = worker_part(0, 1)
        for drawn in zip(*reader_streams(self.shards, self.cfg, part, parts)):
            for jpeg, _, _ in drawn:
                Image.open(io.BytesIO(jpeg)).load()
            yield np.zeros((), dtype=np.uint8)


def decode_whole_loader(root: Path, batch: int, cfg: JigsawConfig, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        DecodeWhole(root, cfg), batch_size=batch, num_workers=workers, persistent_workers=workers > 0
    )


def one_repeat(make_loader, batch: int, batches: int, warmup: int, sync: bool = False):
    """A callable measuring one repeat: images/s of ``batches`` batches from a fresh loader,
    after ``warmup`` batches that empty its prefetch queue (so no pipeline starts the clock
    with work done in advance), and the CPU milliseconds per image its threads and worker
    processes used meanwhile (``None`` without /proc). Each batch is dropped as it arrives,
    as a training step drops it: held, every batch would need fresh memory (for DALI, whose
    outputs are its own reused buffers, ~150 page faults per image). The loader is closed
    afterwards, so that its workers take no CPU from the next pipeline measured."""

    def run() -> tuple[float, float | None]:
        it = iter(make_loader())
        for _ in range(warmup):
            next(it)
        cpu = cpu_seconds()
        rate = batch * batches / timed(lambda: _drain(it, batches), sync)
        cpu_ms = None if cpu is None else (cpu_seconds() - cpu) * 1e3 / (batch * batches)
        it = None  # the pipeline goes before the next one is built
        gc.collect()
        return rate, cpu_ms

    return run


def _drain(batches_of, count: int) -> None:
    for _ in range(count):
        next(batches_of)


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


def run(
    coco: Path = DEFAULT_COCO,
    workers: int = 2,
    batch: int = 64,
    batches: int = 20,
    repeats: int = 3,
    shards: Path | None = None,
) -> dict:
    cfg = JigsawConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = shards or build_benchmark_shards(coco, Path(tmp) / "shards")
        # More than any pipeline prefetches: DALI 2 batches, a DataLoader 2 per worker.
        warmup = 2 * workers + 3
        cases = {
            # As many one-thread pipelines as the DataLoaders have worker processes (see DaliJigsawLoader).
            "dali_cpu": lambda: DaliJigsawLoader(
                root, batch, cfg, num_threads=1, pipelines=workers, rank=0, world_size=1
            ),
            "reference": lambda: reference_loader(root, batch, cfg, workers=workers, rank=0, world_size=1),
            "decode_whole": lambda: decode_whole_loader(root, batch, cfg, workers),
        }
        repeats_of = {name: one_repeat(make, batch, batches, warmup) for name, make in cases.items()}
        if torch.cuda.is_available():
            repeats_of["dali_gpu"] = one_repeat(
                lambda: DaliJigsawLoader(
                    root, batch, cfg, device="gpu", device_id=0, num_threads=workers, rank=0, world_size=1
                ),
                batch,
                batches,
                warmup,
                sync=True,
            )
        runs = interleaved(repeats_of, repeats)
        results = {name: stats([rate for rate, _ in r]) for name, r in runs.items()}
        cpu_ms = {name: stats([ms for _, ms in r]) for name, r in runs.items() if None not in (ms for _, ms in r)}
        if torch.cuda.is_available():
            results["rn50_amp_step"] = rn50_consumption(batch, batches, repeats)
    out = {
        "benchmark": "pipeline_throughput",
        "workers": workers,
        "batch": batch,
        "batches": batches,
        "repeats": repeats,
        "images_per_s": results,
        "cpu_ms_per_image": cpu_ms,
        "ratio_dali_cpu_over_reference": results["dali_cpu"]["median"] / results["reference"]["median"],
        "ratio_dali_cpu_over_decode_whole": results["dali_cpu"]["median"] / results["decode_whole"]["median"],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "environment": environment(),
    }
    if "dali_gpu" in results:
        out["ratio_dali_gpu_over_rn50_step"] = results["dali_gpu"]["median"] / results["rn50_amp_step"]["median"]
    return out


def format_table(result: dict) -> str:
    lines = [
        f"jigsaw pipeline throughput, batch {result['batch']}, {result['workers']} threads/workers, "
        f"device {result['device']}",
        f"{'pipeline':<16}{'images/s':>10}{'min':>10}{'max':>10}{'CPU ms/image':>14}",
    ]
    for name, s in result["images_per_s"].items():
        cpu = result["cpu_ms_per_image"].get(name)
        lines.append(
            f"{name:<16}{s['median']:>10.1f}{s['min']:>10.1f}{s['max']:>10.1f}"
            + (f"{cpu['median']:>14.2f}" if cpu else "")
        )
    lines.append(f"DALI-CPU / reference: {result['ratio_dali_cpu_over_reference']:.2f}x")
    lines.append(f"DALI-CPU / decode whole: {result['ratio_dali_cpu_over_decode_whole']:.2f}x")
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
