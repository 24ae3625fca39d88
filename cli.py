"""The ``jigsawdata`` command: one click group, one subcommand per job."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click

from jigsawdata import __version__
from jigsawdata.coco import DEFAULT_MAX_PIXELS
from jigsawdata.errors import InputError, first_line

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '4096' -> 4096."""
    match = _SIZE.match(str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 256MB or 1GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise click.BadParameter(f"unknown unit in {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise click.BadParameter(f"{text!r} is not K/N with 0 <= K < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


class _Group(click.Group):
    """Turns :class:`InputError` into a one-line error (exit status 1), and any other
    failure into one line naming it, with the traceback in the debug log (``-vv``): no stack
    trace reaches a user who did not ask for one."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            raise click.ClickException(str(exc)) from exc
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            logging.getLogger("jigsawdata").debug("unexpected failure", exc_info=True)
            message = f"{type(exc).__name__}: {first_line(exc)} (rerun with -vv for the traceback)"
            raise click.ClickException(message) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="jigsawdata")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Cheap object-detection pre-training: jigsaw shards from your own detection data."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("make-synthetic")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=48, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--split", default="train", show_default=True)
def make_synthetic(root: Path, images: int, seed: int, split: str) -> None:
    """Write a small synthetic COCO-format detection set (the embedded demo data)."""
    from jigsawdata.synthetic import make_synthetic_coco

    ann = make_synthetic_coco(root, images=images, seed=seed, split=split)
    click.echo(f"wrote {images} images and {ann}")


def _resolve_source(coco_root: Path | None, split: str | None, ann: Path | None, images: Path | None):
    from jigsawdata.coco import resolve_coco_root

    if ann or images:
        if not (ann and images):
            raise click.UsageError("--ann and --images go together")
        return ann, images
    if coco_root is None:
        raise click.UsageError("give COCO_ROOT, or --ann FILE --images DIR")
    if split is None:
        found = sorted((coco_root / "annotations").glob("instances_*.json"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise InputError(f"cannot pick a split under {coco_root / 'annotations'} (found: {names}); use --split")
        split = found[0].stem.removeprefix("instances_")
    return resolve_coco_root(coco_root, split)


@main.command("build-shards")
@click.argument("coco_root", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--split", help="Split name: reads annotations/instances_<split>.json and <split>/ (default: the only one).")
@click.option("--ann", type=click.Path(dir_okay=False, path_type=Path), help="Annotation file (with --images).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), help="Image folder (with --ann).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of all sampling and of the shuffle.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="Processes that decode and encode (0 or 1: in this process).")
@click.option("--part", "part_spec", default="0/1", show_default=True, help="Build only part K of N (K/N), e.g. in a Slurm array.")
@click.option("--pos-per-neg", default=10.0, show_default=True, help="Positives per negative crop.")
@click.option("--max-enlarge", default=2.0, show_default=True, help="Largest context growth per axis.")
@click.option("--min-box-size", default=4, show_default=True, help="Smallest GT box side (px) kept as a positive.")
@click.option("--negatives-avoid", type=click.Choice(["crops", "gt"]), default="crops", show_default=True,
              help="What negatives must not touch: the enlarged positive crops (the paper) or only the GT boxes.")
@click.option("--jpeg-quality", default=90, show_default=True, type=click.IntRange(1, 100))
@click.option("--shard-size", default="256MB", show_default=True, help="Largest shard payload.")
@click.option("--shard-samples", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Most samples per shard.")
@click.option("--chunk-images", default=64, show_default=True, type=click.IntRange(min=1), help="Images per work unit (unit of resumption).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Largest image (width x height) decoded; larger ones are skipped (decompression bombs).")
@click.option("--strict/--no-strict", default=False, show_default=True,
              help="A bad box or a file_name outside --images is an error instead of a counted skip.")
@click.option("--keep-staging/--no-keep-staging", default=False, show_default=True)
@click.option("--license", "license_", help="Licence of the source set, for the dataset card "
              "(default: COCO's terms for a COCO-derived set, else 'unknown').")
def build_shards_cmd(coco_root, out, split, ann, images, seed, workers, part_spec, pos_per_neg,
                     max_enlarge, min_box_size, negatives_avoid, jpeg_quality, shard_size, shard_samples,
                     chunk_images, max_pixels, strict, keep_staging, license_) -> None:
    """Extract positive and negative crops from a COCO set into grouped WebDataset shards.

    Rerunning the same command resumes an interrupted build.
    """
    from tqdm import tqdm

    from jigsawdata.build import BuildConfig, build_shards
    from jigsawdata.coco import load_coco
    from jigsawdata.sampling import SamplingConfig

    part, parts = parse_part(part_spec)
    try:
        cfg = BuildConfig(seed=seed, sampling=SamplingConfig(max_enlarge=max_enlarge, pos_per_neg=pos_per_neg,
                                                              min_box_size=min_box_size,
                                                              negatives_avoid=negatives_avoid),
                          jpeg_quality=jpeg_quality, shard_size=parse_size(shard_size),
                          shard_samples=shard_samples, chunk_images=chunk_images, max_pixels=max_pixels)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    ann_file, image_dir = _resolve_source(coco_root, split, ann, images)
    source = load_coco(ann_file, image_dir, strict=strict)
    n_images = sum(1 for i in range(len(source.images)) if i % parts == part)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, items: int, crops: int) -> None:
        if stage not in bars:
            total = n_images if stage == "extract" else None
            unit = "img" if stage == "extract" else "shard"
            bars[stage] = tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True)
            bars[stage].crops = 0
        bar = bars[stage]
        bar.crops += crops
        bar.set_postfix(crops=bar.crops, refresh=False)
        bar.update(items)

    try:
        manifest = build_shards(source, out, cfg, workers=workers, part=part, parts=parts,
                                keep_staging=keep_staging, progress=progress, license=license_)
    finally:
        for bar in bars.values():
            bar.close()
    groups = ", ".join(f"{g}: {v.samples} in {len(v.shards)} shards" for g, v in manifest.groups.items())
    click.echo(f"{out}: {groups}")
    skipped = len(manifest.skipped_images)
    if skipped:
        click.echo(f"{skipped} images skipped (see skipped_images in the manifest)")
    if parts > 1:
        click.echo(f"part {part} of {parts} done; when all are, run: jigsawdata merge-manifests {out}")


@main.command("merge-manifests")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
def merge_manifests(root: Path) -> None:
    """Join the partial manifests of a build made with --part into one shard set."""
    from jigsawdata.manifest import merge_parts

    manifest = merge_parts(root)
    click.echo(f"merged {manifest.parts} parts: " +
               ", ".join(f"{g}: {v.samples}" for g, v in manifest.groups.items()))


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--padding", is_flag=True, help="Also the share of jigsaw canvas pixels that are zero padding "
              "(the paper's setting: pad_crop, resize 0.8-1.5, 224 canvas cut at 64).")
def info(root: Path, as_json: bool, padding: bool) -> None:
    """Summarise a shard set: samples per group and class, sizes, skips (reads; does not verify)."""
    from jigsawdata.verify import summarize

    summary = summarize(root)
    if padding:
        from jigsawdata.pipelines.config import JigsawConfig
        from jigsawdata.pipelines.utilisation import crop_sizes, padding_share

        summary["padding"] = padding_share(crop_sizes(root), JigsawConfig())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"source: {summary['source']['annotation_file']} (sha256 {summary['source']['sha256'][:12]}…), "
               f"seed {summary['seed']}")
    click.echo(f"{'group':<6}{'shards':>8}{'samples':>10}{'MB':>10}")
    for g, v in summary["groups"].items():
        click.echo(f"{g:<6}{v['shards']:>8}{v['samples']:>10}{v['bytes'] / 1e6:>10.1f}")
    click.echo("samples per class: " + ", ".join(f"{k} {v}" for k, v in summary["classes"].items()))
    click.echo("counts: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()))
    click.echo(f"skipped images: {summary['skipped_images']}")
    if padding:
        p = summary["padding"]
        click.echo(f"zero padding: {100 * p['padding_share']:.1f}% of canvas pixels over {p['images']} drawn "
                   "images (" + ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["per_region"].items()) + ")")
    click.echo(f"(read from the manifest and index, not checked: run `jigsawdata verify {root}` for that)")


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(root: Path) -> None:
    """Re-hash every shard and check counts against the manifest and the index."""
    from tqdm import tqdm

    from jigsawdata.manifest import read_manifest
    from jigsawdata.verify import verify_shard_set

    total = len(read_manifest(root).shards)
    with tqdm(total=total, unit="shard", desc="verify", dynamic_ncols=True) as bar:
        problems = verify_shard_set(root, on_shard=lambda _: bar.update(1))
    if problems:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        sys.exit(1)
    click.echo(f"OK: {total} shards match the manifest and the index")


def _jigsaw_config(canvas: int, split: int, fit: str, seed: int, **overrides):
    from jigsawdata.pipelines.config import JigsawConfig
    from jigsawdata.pipelines.template import Template

    try:
        return JigsawConfig(template=Template(canvas=canvas, split=split), fit=fit, seed=seed, **overrides)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
@click.option("--count", default=8, show_default=True, type=click.IntRange(min=1), help="Assembled images to draw.")
@click.option("--columns", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--pipeline", type=click.Choice(["dali", "reference"]), default="dali", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--fit", type=click.Choice(["pad_crop", "warp", "resize"]), default="pad_crop", show_default=True)
@click.option("--canvas", default=224, show_default=True)
@click.option("--template-split", "split", default=64, show_default=True,
              help="Where the template cuts the canvas (px from the top-left), not a data split.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every shard against the manifest first (cached: free on later runs).")
def preview(shards: Path, out: Path, count: int, columns: int, pipeline: str, device: str, fit: str,
            canvas: int, split: int, seed: int, verify: bool) -> None:
    """Draw assembled jigsaw images with region borders and class names."""
    from jigsawdata.pipelines.integrity import check_shard_set
    from jigsawdata.pipelines.preview import render_grid
    from jigsawdata.pipelines.shardset import open_shard_set

    cfg = _jigsaw_config(canvas, split, fit, seed, initial_fill=256)
    if verify:
        check_shard_set(shards)
    if pipeline == "dali":
        from jigsawdata.pipelines.dali import DaliJigsawLoader

        loader = DaliJigsawLoader(shards, count, cfg, device=device, device_id=0 if device == "gpu" else None,
                                  rank=0, world_size=1)
    else:
        from jigsawdata.pipelines.reference import reference_loader

        loader = reference_loader(shards, count, cfg, workers=0, rank=0, world_size=1)
    images, labels = next(iter(loader))
    render_grid(images, labels, open_shard_set(shards).class_names, cfg.template, columns).save(out)
    click.echo(f"wrote {out} ({count} images, {pipeline} pipeline)")


@main.command()
@click.option("--shards", required=True, help="Shard set: a directory, or a URL (fetched to a cache for DALI, "
              "streamed by the reference pipeline).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--arch", type=click.Choice(["resnet18", "resnet50", "resnet101", "resnext101_32x4d"]),
              default="resnet50", show_default=True)
@click.option("--loss", type=click.Choice(["erf", "blockwise", "global"]), default="erf", show_default=True)
@click.option("--tau", default=0.7, show_default=True, type=click.FloatRange(0.0, 1.0), help="ERF weight floor of a cell's own region.")
@click.option("--iterations", default=64_000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=512, show_default=True, type=click.IntRange(min=1),
              help="Global batch of assembled images (all ranks).")
@click.option("--lr-start", default=0.2, show_default=True, type=click.FloatRange(min=0.0), help="Warm-up start lr at batch 512 (scaled linearly).")
@click.option("--lr-peak", default=0.8, show_default=True, type=click.FloatRange(min=0.0, min_open=True), help="Peak lr at batch 512 (scaled linearly).")
@click.option("--warmup", default=1250, show_default=True, type=click.IntRange(min=0), help="Warm-up iterations.")
@click.option("--canvas", default=224, show_default=True)
@click.option("--template-split", default=64, show_default=True,
              help="Where the template cuts the canvas (px from the top-left), not a data split.")
@click.option("--fit", type=click.Choice(["pad_crop", "warp", "resize"]), default="pad_crop", show_default=True,
              help="How a crop meets its region (paper Table 1).")
@click.option("--resize-min", default=0.8, show_default=True, help="Smallest random resize factor of a crop.")
@click.option("--resize-max", default=1.5, show_default=True, help="Largest random resize factor of a crop.")
@click.option("--flip-p", default=0.5, show_default=True, help="Horizontal flip probability of a crop.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--pipeline", type=click.Choice(["dali", "reference"]), default="dali", show_default=True)
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0),
              help="DALI threads (>= 1) or DataLoader workers per rank (0: in-process).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--erf-every", default=5000, show_default=True, type=click.IntRange(min=1), help="Iterations between ERF weight refreshes.")
@click.option("--erf-images", default=64, show_default=True, type=click.IntRange(min=1), help="Images the ERF is averaged over.")
@click.option("--checkpoint-every", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default="bf16", show_default=True)
@click.option("--cache-dir", help="Where --shards URLs are fetched to (default: $JIGSAWDATA_CACHE or "
              "~/.cache/jigsawdata).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every shard against the manifest before the first batch (cached: free on later runs).")
@click.option("--val-shards", help="Shards of a held-out split (e.g. val2017): region accuracy on fixed jigsaw "
              "images every --val-every iterations and at the end.")
@click.option("--val-every", default=1000, show_default=True)
@click.option("--val-images", default=256, show_default=True, help="Fixed jigsaw images validated on.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
def pretrain(resume: bool, **options) -> None:
    """ERF-adaptive dense classification pre-training on jigsaw batches (torchrun for many GPUs)."""
    from tqdm import tqdm

    from jigsawdata.trainer.checkpoint import CHECKPOINT_NAME
    from jigsawdata.trainer.pretrain import PretrainConfig, Trainer
    from jigsawdata.trainer.validate import format_validation

    cfg = PretrainConfig(**options)
    bar = None
    shown: dict = {}

    def on_log(m: dict) -> None:
        bar.n = m["iteration"]
        val = {"val": f"{100 * shown['val_accuracy']:.1f}%/{100 * shown['val_majority']:.1f}%"} if shown else {}
        bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.4f}", ips=f"{m['images_per_s']:.0f}",
                        wait=f"{100 * m['data_wait_fraction']:.1f}%", **val, refresh=False)
        bar.refresh()

    trainer = Trainer(cfg, resume=resume, on_log=on_log, on_validate=shown.update)
    bar = tqdm(total=cfg.iterations, initial=trainer.iteration, unit="it", desc="pretrain", dynamic_ncols=True,
               disable=not trainer.dist.main)
    try:
        metrics = trainer.train()
    finally:
        bar.close()
    if trainer.dist.main:
        click.echo(f"done: {trainer.iteration} iterations, last loss {metrics.get('loss', float('nan')):.4f}; "
                   f"checkpoint {Path(cfg.out) / CHECKPOINT_NAME}")
        if trainer.last_validation:
            click.echo(f"region accuracy on {cfg.val_shards} (majority-class rate beside it):")
            click.echo(format_validation(trainer.last_validation))


@main.command("evaluate-pretrain")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--shards", required=True, help="Shards of a held-out split, with the run's classes.")
@click.option("--images", default=256, show_default=True, help="Fixed jigsaw images to measure on.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def evaluate_pretrain(run: Path, shards: str, images: int, device: str, as_json: bool) -> None:
    """Region top-1 accuracy of a pre-training checkpoint on fixed jigsaw images, with the
    majority-class rate beside it (the same figure pretrain --val-shards logs)."""
    from jigsawdata.trainer.validate import evaluate_checkpoint, format_validation

    metrics = evaluate_checkpoint(run, shards, images, device)
    click.echo(json.dumps(metrics, indent=2) if as_json else format_validation(metrics))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["torchvision", "detectron2", "mmdet"]), default="torchvision",
              show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def export(checkpoint: Path, fmt: str, out: Path) -> None:
    """Write a pre-trained backbone for torchvision, Detectron2 or MMDetection."""
    from jigsawdata.trainer.export import export as export_backbone

    payload = export_backbone(checkpoint, fmt, out)
    n = len(payload.get("model", payload.get("state_dict", payload)))
    click.echo(f"wrote {out}: {n} tensors, {fmt} naming")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--region", type=click.Choice(["TL", "TR", "BL", "BR"]), default="TL", show_default=True)
@click.option("--images", default=16, show_default=True, type=click.IntRange(min=1), help="Jigsaw images to average over.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Shard set (default: the run's).")
def erf(run_dir: Path, out: Path, region: str, images: int, shards: str | None) -> None:
    """Draw the effective receptive field of a region's cells for a run's checkpoint."""

    from jigsawdata.pipelines.config import JigsawConfig
    from jigsawdata.pipelines.reference import reference_loader
    from jigsawdata.pipelines.template import REGION_NAMES
    from jigsawdata.trainer.checkpoint import load
    from jigsawdata.trainer.erf import effective_receptive_fields, erf_weights
    from jigsawdata.trainer.erfviz import render_erf
    from jigsawdata.trainer.model import DenseClassifier
    from jigsawdata.trainer.pretrain import PretrainConfig, saved_config
    from jigsawdata.trainer.runtime import config_from

    ckpt = load(run_dir)
    cfg = config_from(PretrainConfig, saved_config(ckpt["config"]))
    model = DenseClassifier(ckpt["arch"], len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model"])
    batch, _ = next(iter(reference_loader(shards or cfg.shards, images, JigsawConfig(template=cfg.template),
                                          workers=0, rank=0, world_size=1)))
    maps = effective_receptive_fields(model, batch)
    weights = erf_weights(maps, cfg.template, cfg.tau)
    render_erf(maps, weights, cfg.template, REGION_NAMES.index(region)).save(out)
    click.echo(f"wrote {out} (iteration {ckpt['iteration']}, {images} images)")


@main.command()
@click.option("--coco", required=True, type=click.Path(exists=True, file_okay=False), help="COCO root.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--init", default="scratch", show_default=True,
              help="A jigsaw run directory or checkpoint, an exported backbone, imagenet:FILE (a torchvision "
                   "ResNet state dict), or scratch.")
@click.option("--detector", type=click.Choice(["c4", "fpn", "mask"]), default="c4", show_default=True)
@click.option("--arch", type=click.Choice(["resnet18", "resnet50", "resnet101", "resnext101_32x4d"]),
              default="resnet50", show_default=True)
@click.option("--norm", type=click.Choice(["frozen_bn", "bn", "gn"]),
              help="Normalisation (default: frozen_bn with pretrained weights, bn from scratch); gn also puts "
                   "GroupNorm in the FPN and a 4conv1fc box head (the paper's scratch baseline).")
@click.option("--split", default="train2017", show_default=True)
@click.option("--val-split", help="Split evaluated after training (default: --split).")
@click.option("--schedule", default="1x", show_default=True,
              help="Nx = N times 13 epochs with drops after 9N and 12N: 1x, 2x, 3x, ...")
@click.option("--epochs", type=click.IntRange(min=1), help="Any length instead (drops at the same relative points), "
              "e.g. to match a from-scratch run's cost to pre-training + fine-tuning.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Global batch (all ranks).")
@click.option("--lr", default=0.02, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="At batch 16, scaled linearly.")
@click.option("--warmup", default=500, show_default=True, type=click.IntRange(min=0))
@click.option("--min-size", default=800, show_default=True, type=click.IntRange(min=1))
@click.option("--max-size", default=1333, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0), help="DataLoader workers (0: in-process).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default="bf16", show_default=True,
              help="Mixed precision on a GPU (the CPU runs fp32).")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-iters", type=click.IntRange(min=1), help="Stop after this many iterations.")
@click.option("--max-images", type=click.IntRange(min=1), help="Use only the first N images of each split.")
@click.option("--log-every", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
def finetune(resume: bool, **options) -> None:
    """Fine-tune a torchvision detector from jigsaw (or other) weights, then evaluate it."""
    from jigsawdata.trainer.evaluate import format_table
    from jigsawdata.trainer.finetune import FinetuneConfig, Finetuner, evaluate_run

    cfg = FinetuneConfig(**options)
    trainer = Finetuner(cfg, resume=resume, on_log=lambda m: click.echo(
        f"epoch {m['epoch']} it {m['iteration']} lr {m['lr']:.5f} loss {m['loss']:.4f}"))
    trainer.train()
    if trainer.dist.main:
        metrics = evaluate_run(cfg.out, split=cfg.val_split, max_images=cfg.max_images, device=cfg.device)
        click.echo(format_table(metrics))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--coco", type=click.Path(exists=True, file_okay=False), help="COCO root (default: the run's).")
@click.option("--split", help="Split to evaluate (default: the run's --val-split, else its --split).")
@click.option("--max-images", type=click.IntRange(min=1), help="Evaluate only the first N images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def evaluate(run_dir: Path, coco: str | None, split: str | None, max_images: int | None, device: str) -> None:
    """COCO AP of a fine-tuned detector; writes eval.json and predictions_*.json into RUN_DIR."""
    from jigsawdata.trainer.evaluate import format_table
    from jigsawdata.trainer.finetune import evaluate_run

    click.echo(format_table(evaluate_run(run_dir, coco, split, max_images, device)))


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Experiment directory (resumable).")
@click.option("--preset", type=click.Choice(["tiny", "paper"]), default="tiny", show_default=True,
              help="tiny: a cluttered synthetic set, ResNet-18, a 2-core CPU; paper: COCO, ResNet-50, GPUs.")
@click.option("--coco", type=click.Path(exists=True, file_okay=False), help="COCO root (the paper preset's data).")
@click.option("--split", help="Training split (paper preset: train2017).")
@click.option("--val-split", help="Held-out split: pre-training validation and detection evaluation (val2017).")
@click.option("--losses", default="erf,blockwise,global", show_default=True,
              help="Pre-training losses, one cell each (Table 2).")
@click.option("--fits", default="", help="Extra fit modes pre-trained with the ERF loss, e.g. warp,resize (Table 1).")
@click.option("--imagenet", type=click.Path(exists=True, dir_okay=False),
              help="A torchvision ResNet state dict: adds an ImageNet-initialised cell.")
@click.option("--scratch/--no-scratch", default=True, show_default=True,
              help="The from-scratch GN cell, cost-matched to the erf cell (Table 5).")
@click.option("--iterations", type=int, help="Pre-training iterations per cell (default: the preset's).")
@click.option("--epochs", type=int, help="Fine-tuning epochs per cell (default: the preset's schedule).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Default: the preset's.")
@click.option("--smoke", is_flag=True, help="A few iterations and images per cell: checks the grid runs.")
def experiment(out: str, preset: str, coco: str | None, split: str | None, val_split: str | None, losses: str,
               fits: str,
               imagenet: str | None, scratch: bool, iterations: int | None, epochs: int | None, device: str | None,
               smoke: bool) -> None:
    """The paper's ablation grid end to end: pre-train each loss (and fit mode), a
    cost-matched scratch baseline, fine-tune and evaluate each; writes table.md,
    experiment.json and experiment.png. Finished cells are not rerun."""
    from jigsawdata.pipelines.config import FIT_MODES
    from jigsawdata.trainer.experiment import preset as make_preset
    from jigsawdata.trainer.experiment import run_experiment
    from jigsawdata.trainer.losses import LOSSES

    chosen = tuple(name for name in losses.split(",") if name)
    if any(name not in LOSSES for name in chosen):
        raise click.BadParameter(f"--losses takes a comma-separated subset of {', '.join(LOSSES)}")
    extra = tuple(f for f in fits.split(",") if f)
    if any(f not in FIT_MODES for f in extra):
        raise click.BadParameter(f"--fits takes a comma-separated subset of {', '.join(FIT_MODES)}")
    overrides = dict(coco=coco, split=split, val_split=val_split, losses=chosen, fits=extra, imagenet=imagenet,
                     scratch=scratch, iterations=iterations, epochs=epochs, device=device)
    if smoke:
        overrides.update(synthetic_images=12, iterations=iterations or 1, batch=2, warmup=1, erf_every=1,
                         erf_images=2, val_every=1, val_images=2, max_iters=1, max_images=2, epochs=epochs or 1,
                         ft_batch=2, min_size=64, max_size=96, rois_per_image=8, pipeline="reference", workers=0)
    cfg = make_preset(preset, out, **overrides)
    report = run_experiment(cfg, on_cell=lambda name, cell: click.echo(
        f"cell {name}: AP {100 * cell['eval']['bbox']['AP']:.1f}"))
    click.echo((Path(out) / "table.md").read_text().rstrip())
    click.echo(f"wrote {out}/table.md, experiment.json and experiment.png ({len(report['cells'])} cells)")


@main.command()
@click.argument("which", type=click.Choice(["all", "build", "pipeline", "loss", "cost"]))
@click.option("--out", default="bench-report", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report directory (report.json, report.md, charts).")
@click.option("--coco", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="COCO root with real photographs (default: ../shared/data/coco-train288).")
@click.option("--split", default="train2017", show_default=True)
@click.option("--quick", is_flag=True, help="A couple of steps each: checks that everything runs.")
def bench(which: str, out: Path, coco: Path | None, split: str, quick: bool) -> None:
    """Throughput and cost benchmarks; `all` runs every one that fits the machine."""
    from jigsawdata.benchmarks.common import DEFAULT_COCO
    from jigsawdata.benchmarks.report import BENCHMARKS, run_all

    only = BENCHMARKS if which == "all" else (which,)
    run_all(out, coco or DEFAULT_COCO, split, only, quick, log=click.echo)
    click.echo(f"wrote {out}/report.json and {out}/report.md")


@main.command()
@click.argument("url")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=1), help="Parallel downloads.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=1),
              help="Attempts per file (each resumes the last where the server allows it).")
@click.option("--force", is_flag=True, help="Replace another shard set in --out (only once the new one is complete).")
def fetch(url: str, out: Path, workers: int, retries: int, force: bool) -> None:
    """Download a published shard set (https://, s3://, gs://, file://...) and verify every file."""
    from tqdm import tqdm

    from jigsawdata.fetch import fetch as fetch_shards

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="fetch", dynamic_ncols=True) as bar:
        def on_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        manifest = fetch_shards(url, out, workers=workers, retries=retries, progress=bar.update, on_total=on_total,
                                force=force)
    click.echo(f"{out}: {len(manifest.shards)} shards fetched and verified")


if __name__ == "__main__":
    main()
