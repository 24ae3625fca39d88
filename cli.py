"""The ``jigsawdata`` command: one click group, one subcommand per job."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click

from jigsawdata import __version__
from jigsawdata.errors import InputError

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
    """Turns :class:`InputError` into a one-line error and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="jigsawdata")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Cheap object-detection pre-training: jigsaw shards from your own detection data."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("make-synthetic")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=48, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True)
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
@click.option("--seed", default=0, show_default=True, help="Seed of all sampling and of the shuffle.")
@click.option("--workers", default=1, show_default=True, help="Processes that decode and encode.")
@click.option("--part", "part_spec", default="0/1", show_default=True, help="Build only part K of N (K/N), e.g. in a Slurm array.")
@click.option("--pos-per-neg", default=10.0, show_default=True, help="Positives per negative crop.")
@click.option("--max-enlarge", default=2.0, show_default=True, help="Largest context growth per axis.")
@click.option("--min-box-size", default=4, show_default=True, help="Smallest GT box side (px) kept as a positive.")
@click.option("--jpeg-quality", default=90, show_default=True)
@click.option("--shard-size", default="256MB", show_default=True, help="Largest shard payload.")
@click.option("--shard-samples", default=10_000, show_default=True, help="Most samples per shard.")
@click.option("--chunk-images", default=64, show_default=True, help="Images per work unit (unit of resumption).")
@click.option("--keep-staging/--no-keep-staging", default=False, show_default=True)
def build_shards_cmd(coco_root, out, split, ann, images, seed, workers, part_spec, pos_per_neg,
                     max_enlarge, min_box_size, jpeg_quality, shard_size, shard_samples, chunk_images,
                     keep_staging) -> None:
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
                                                              min_box_size=min_box_size),
                          jpeg_quality=jpeg_quality, shard_size=parse_size(shard_size),
                          shard_samples=shard_samples, chunk_images=chunk_images)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    ann_file, image_dir = _resolve_source(coco_root, split, ann, images)
    source = load_coco(ann_file, image_dir)
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
                                keep_staging=keep_staging, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    groups = ", ".join(f"{g}: {v['samples']} in {len(v['shards'])} shards" for g, v in manifest["groups"].items())
    click.echo(f"{out}: {groups}")
    skipped = len(manifest["skipped_images"])
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
    click.echo(f"merged {manifest['parts']} parts: " +
               ", ".join(f"{g}: {v['samples']}" for g, v in manifest["groups"].items()))


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(root: Path, as_json: bool) -> None:
    """Summarise a shard set: samples per group and class, sizes, skips."""
    from jigsawdata.verify import summarize

    summary = summarize(root)
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


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(root: Path) -> None:
    """Re-hash every shard and check counts against the manifest and the index."""
    from tqdm import tqdm

    from jigsawdata.manifest import read_manifest
    from jigsawdata.verify import verify_shard_set

    total = sum(len(v["shards"]) for v in read_manifest(root)["groups"].values())
    with tqdm(total=total, unit="shard", desc="verify", dynamic_ncols=True) as bar:
        problems = verify_shard_set(root, on_shard=lambda _: bar.update(1))
    if problems:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        sys.exit(1)
    click.echo(f"OK: {total} shards match the manifest and the index")


def _jigsaw_config(canvas: int, split: int, fit: str, seed: int, **overrides):
    from pipelines.config import JigsawConfig
    from pipelines.template import Template

    try:
        return JigsawConfig(template=Template(canvas=canvas, split=split), fit=fit, seed=seed, **overrides)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
@click.option("--count", default=8, show_default=True, help="Assembled images to draw.")
@click.option("--columns", default=4, show_default=True)
@click.option("--pipeline", type=click.Choice(["dali", "reference"]), default="dali", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--fit", type=click.Choice(["pad_crop", "warp", "resize"]), default="pad_crop", show_default=True)
@click.option("--canvas", default=224, show_default=True)
@click.option("--split", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
def preview(shards: Path, out: Path, count: int, columns: int, pipeline: str, device: str, fit: str,
            canvas: int, split: int, seed: int) -> None:
    """Draw assembled jigsaw images with region borders and class names."""
    from pipelines.preview import render_grid
    from pipelines.shardset import open_shard_set

    cfg = _jigsaw_config(canvas, split, fit, seed, initial_fill=256)
    if pipeline == "dali":
        from pipelines.dali import DaliJigsawLoader

        loader = DaliJigsawLoader(shards, count, cfg, device=device, device_id=0 if device == "gpu" else None,
                                  rank=0, world_size=1)
    else:
        from pipelines.reference import reference_loader

        loader = reference_loader(shards, count, cfg, workers=0, rank=0, world_size=1)
    images, labels = next(iter(loader))
    render_grid(images, labels, open_shard_set(shards).class_names, cfg.template, columns).save(out)
    click.echo(f"wrote {out} ({count} images, {pipeline} pipeline)")


if __name__ == "__main__":
    main()
