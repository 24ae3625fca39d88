"""Does Jigsaw pre-training cost about 1/4 of ImageNet pre-training? Measured, in one run.

On the machine it runs on (a GPU if there is one; otherwise the CPU, with a smaller model and
batch, and labelled so) it times, on the same model body and device:

1. a **Jigsaw step**: DALI jigsaw batches from real shards -> ResNet with the dense head ->
   ERF-adaptive loss -> backward -> SGD, with the ERF refresh amortised over its interval;
1b. the same **with the FPN** (``pretrain --neck fpn``): torchvision's 256-channel FPN on the
   ResNet, the dense head on P2..P5, each level's ERF-adaptive loss, its own ERF refresh
   amortised likewise; reported as its step time over the backbone-only step's;
2. an **ImageNet-style step**: the standard ImageNet input pipeline in DALI (decode of
   full-size JPEGs with random-resized-crop, resize to 224, flip, normalise) over real
   photographs -- the COCO source images stand in for ImageNet JPEGs -- -> the same ResNet
   with global pooling + FC -> cross-entropy -> backward -> SGD.

For both: step time (median over repeats, spread), images/s and the fraction of the step
spent waiting for data. Then it projects full runs -- Jigsaw 64k iterations x 512 images,
ImageNet 90 epochs x 1,281,167 images -- and compares their ratio with the paper's
1.73 / 6.80 GPU-days. Usage:

    python -m jigsawdata.benchmarks.cost_claim [--arch resnet50] [--batch 64] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jigsawdata.coco.reader import resolve_coco_root
from jigsawdata.pipelines.config import IMAGENET_MEAN, IMAGENET_STD, JigsawConfig
from jigsawdata.pipelines.dali import DaliJigsawLoader
from jigsawdata.pipelines.template import Template
from jigsawdata.trainer.erf import (
    effective_receptive_fields,
    erf_weights,
    level_receptive_fields,
    level_region_maps,
    level_weights,
)
from jigsawdata.trainer.losses import erf_dense_loss, mean_over_levels
from jigsawdata.trainer.model import DenseClassifier, PyramidDenseClassifier, build_backbone

from .common import DEFAULT_COCO, environment, interleaved, report, stats, timed
from .pipeline_throughput import build_benchmark_shards

JIGSAW_IMAGES = 64_000 * 512
IMAGENET_IMAGES = 90 * 1_281_167
PAPER_GPU_DAYS = {"jigsaw": 1.73, "imagenet": 6.80}


def imagenet_loader(image_dir: Path, batch: int, device: str, threads: int, seed: int = 0):
    """The standard ImageNet training input pipeline, in DALI, over a folder of JPEGs."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    files = sorted(str(p) for p in Path(image_dir).glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no JPEGs in {image_dir}")

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if device == "gpu" else None, seed=seed)
    def pipe():
        jpegs, labels = fn.readers.file(
            files=files,
            labels=[i % 1000 for i in range(len(files))],
            random_shuffle=True,
            initial_fill=256,
            name="reader",
        )
        images = fn.decoders.image_random_crop(
            jpegs,
            device="mixed" if device == "gpu" else "cpu",
            output_type=types.RGB,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
        )
        images = fn.resize(images, resize_x=224, resize_y=224)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=fn.random.coin_flip(),
        )
        return images, labels

    p = pipe()
    p.build()
    iterator = DALIGenericIterator([p], ["images", "labels"])

    class _Loader:
        def __next__(self):
            out = next(iterator)[0]
            return out["images"], out["labels"].view(-1).long()

    return _Loader()


def _repeat(loader, step, steps: int, cuda: bool):
    """One measured repeat: ``steps`` iterations of (next batch, step). Returns a callable
    giving ``(seconds per step, fraction of the time spent waiting for data)``."""

    def run() -> tuple[float, float]:
        wait = 0.0

        def body() -> None:
            nonlocal wait
            for _ in range(steps):
                t0 = time.perf_counter()
                images, labels = next(loader)
                wait += time.perf_counter() - t0
                step(images, labels)

        elapsed = timed(body, cuda)
        return elapsed / steps, wait / elapsed

    return run


def _summary(runs: list[tuple[float, float]], batch: int) -> dict:
    s = stats([r[0] for r in runs])
    return {"step_s": s, "images_per_s": batch / s["median"], "data_wait_fraction": stats([r[1] for r in runs])}


def _sgd_step(model, loss_fn, cuda: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(images, labels):
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            out = model(images)
        loss = loss_fn(out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(
    coco: Path = DEFAULT_COCO,
    split: str = "train2017",
    arch: str | None = None,
    batch: int | None = None,
    steps: int = 5,
    repeats: int = 3,
    warmup: int = 2,
    threads: int = 2,
    erf_every: int = 5000,
    erf_images: int | None = None,
    shards: Path | None = None,
) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    arch = arch or ("resnet50" if cuda else "resnet18")
    batch = batch or (128 if cuda else 16)
    erf_images = erf_images or (64 if cuda else 8)
    _, image_dir = resolve_coco_root(coco, split)
    template = Template()
    with tempfile.TemporaryDirectory() as tmp:
        root = shards or build_benchmark_shards(coco, Path(tmp) / "shards", split)
        dali_device = "gpu" if cuda else "cpu"
        fmt = torch.channels_last if cuda else torch.contiguous_format

        # 1. Jigsaw
        jigsaw = DaliJigsawLoader(
            root,
            batch,
            JigsawConfig(),
            device=dali_device,
            device_id=0 if cuda else None,
            num_threads=threads,
            rank=0,
            world_size=1,
        )
        dense = DenseClassifier(arch, 81).to(device, memory_format=fmt)
        region_map = torch.from_numpy(template.feature_region_map()).to(device)
        images, _ = next(jigsaw)
        result = {}
        erf_s = timed(
            lambda: result.update(
                weights=erf_weights(effective_receptive_fields(dense, images[:erf_images].to(device)), template)
            ),
            cuda,
        )
        weights = result["weights"]
        jig_step = _sgd_step(dense, lambda out, y: erf_dense_loss(out, y.to(device), weights, region_map), cuda)

        # 1b. Jigsaw with the FPN pre-trained too, on the same batches
        pyramid = PyramidDenseClassifier(arch, 81).to(device, memory_format=fmt)
        level_maps = level_region_maps(template, pyramid.strides, device)
        fpn_erf_s = timed(
            lambda: result.update(
                levels=level_weights(
                    level_receptive_fields(pyramid, images[:erf_images].to(device), template), template, pyramid.strides
                )
            ),
            cuda,
        )
        levels = result["levels"]
        fpn_step = _sgd_step(
            pyramid,
            lambda out, y: mean_over_levels(
                [erf_dense_loss(logits, y.to(device), levels[name], level_maps[name]) for name, logits in out.items()]
            ),
            cuda,
        )

        # 2. ImageNet-style
        plain = build_backbone(arch)
        plain.fc = torch.nn.Linear(plain.fc.in_features, 1000)
        plain = plain.to(device, memory_format=fmt)
        imnet_loader = imagenet_loader(image_dir, batch, dali_device, threads)
        imnet_step = _sgd_step(plain, lambda out, y: F.cross_entropy(out.float(), y.to(device)), cuda)

        for loader, step in ((jigsaw, jig_step), (jigsaw, fpn_step), (imnet_loader, imnet_step)):
            for _ in range(warmup):
                step(*next(loader))
        runs = interleaved(
            {
                "jigsaw": _repeat(jigsaw, jig_step, steps, cuda),
                "jigsaw_fpn": _repeat(jigsaw, fpn_step, steps, cuda),
                "imagenet": _repeat(imnet_loader, imnet_step, steps, cuda),
            },
            repeats,
        )
    jig, fpn, imnet = (_summary(runs[k], batch) for k in ("jigsaw", "jigsaw_fpn", "imagenet"))
    for summary, refresh in ((jig, erf_s), (fpn, fpn_erf_s)):
        summary["step_with_erf_s"] = summary["step_s"]["median"] + refresh / erf_every
        summary["erf_refresh_s"] = refresh
    jig_step_s = jig["step_with_erf_s"]
    fpn["over_backbone_only"] = fpn["step_with_erf_s"] / jig_step_s

    jig_hours = JIGSAW_IMAGES / batch * jig_step_s / 3600
    imnet_hours = IMAGENET_IMAGES / batch * imnet["step_s"]["median"] / 3600
    unit = "GPU-hours" if cuda else "core-hours"
    scale = 1 if cuda else (torch.get_num_threads() or 1)
    return {
        "benchmark": "cost_claim",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (not the paper's setting)",
        "arch": arch,
        "batch": batch,
        "threads": threads,
        "erf_every": erf_every,
        "erf_images": erf_images,
        "jigsaw": jig,
        "jigsaw_fpn": fpn,
        "imagenet": imnet,
        "projection": {
            "unit": unit,
            "jigsaw_images": JIGSAW_IMAGES,
            "imagenet_images": IMAGENET_IMAGES,
            "jigsaw": jig_hours * scale,
            "jigsaw_fpn": jig_hours * fpn["over_backbone_only"] * scale,
            "imagenet": imnet_hours * scale,
            "ratio": jig_hours / imnet_hours,
            "image_ratio": JIGSAW_IMAGES / IMAGENET_IMAGES,
            "paper_ratio": PAPER_GPU_DAYS["jigsaw"] / PAPER_GPU_DAYS["imagenet"],
        },
        "environment": environment(),
    }


def format_table(r: dict) -> str:
    p = r["projection"]
    lines = [
        f"pre-training cost, {r['arch']}, batch {r['batch']}, device {r['device']}",
        f"{'':<22}{'step s':>9}{'spread':>16}{'img/s':>9}{'data wait':>11}{p['unit']:>14}",
    ]
    for name, key in (
        ("Jigsaw (ERF-dense)", "jigsaw"),
        ("Jigsaw + FPN neck", "jigsaw_fpn"),
        ("ImageNet-style", "imagenet"),
    ):
        m = r[key]
        lines.append(
            f"{name:<22}{m['step_s']['median']:>9.3f}{m['step_s']['min']:>8.3f}-{m['step_s']['max']:<7.3f}"
            f"{m['images_per_s']:>9.1f}{100 * m['data_wait_fraction']['median']:>10.1f}%{p[key]:>14.1f}"
        )
    lines += [
        f"ERF refresh: {r['jigsaw']['erf_refresh_s']:.2f} s (with the FPN, every level: "
        f"{r['jigsaw_fpn']['erf_refresh_s']:.2f} s) every {r['erf_every']} iterations, included in the "
        "Jigsaw projections",
        f"Jigsaw step with the FPN neck / backbone only: {r['jigsaw_fpn']['over_backbone_only']:.2f}x",
        f"projected runs: Jigsaw 64k x 512 = {p['jigsaw_images'] / 1e6:.1f}M images; "
        f"ImageNet 90 x 1,281,167 = {p['imagenet_images'] / 1e6:.1f}M images (ratio {p['image_ratio']:.3f})",
        f"cost ratio Jigsaw / ImageNet: measured {p['ratio']:.3f}   paper 1.73 / 6.80 = {p['paper_ratio']:.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO)
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--arch", help="Default: resnet50 on a GPU, resnet18 on the CPU.")
    parser.add_argument("--batch", type=int, help="Default: 128 on a GPU, 16 on the CPU.")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads of each pipeline.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.coco, args.split, args.arch, args.batch, args.steps, args.repeats, threads=args.threads)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
