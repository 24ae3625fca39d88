"""The ``jigsawdata`` command: one click group, one subcommand per job."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from jigsawdata import __version__
from jigsawdata.build.run import BuildConfig
from jigsawdata.build.sampling import SamplingConfig
from jigsawdata.errors import InputError, Stopped, first_line, message
from jigsawdata.layout import ANNOTATION_GLOB, CONFIG_NAME
from jigsawdata.pipelines.config import JigsawSettings
from jigsawdata.pipelines.template import REGION_NAMES
from jigsawdata.settings import field_types, flag, read_config_file, spec_of
from jigsawdata.trainer.config import ARCHS, DETECTORS, DEVICES, PIPELINES, FinetuneConfig, PretrainConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '4096' -> 4096."""
    match = _SIZE.match(str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 256MB or 1GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise click.BadParameter(f"unknown unit in {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


class _Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


SHOWN_PROBLEMS = 20
"""The problems ``verify`` prints by default: a damaged shard can fail every one of its samples."""

SIZE = _Size()
"""A byte count given as 4096, 256MB or 1GiB."""


def parse_part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise click.BadParameter(f"{text!r} is not K/N with 0 <= K < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


class LocalPath(click.Path):
    """A file or folder this command writes: a URL is refused in one line instead of becoming
    a local ``s3:/`` tree, ``file://`` is the path it names, and a file's folder must exist."""

    def convert(self, value, param, ctx):
        from jigsawdata.shardset.location import is_url

        text = str(value)
        if is_url(text):
            raise InputError(
                f"{param.opts[0] if param.opts else param.name} {text} is a URL: this writes a local "
                "file or folder; write it locally, then copy it up (e.g. aws s3 sync DIR s3://bucket/DIR)"
            )
        converted = super().convert(text.removeprefix("file://"), param, ctx)
        if not self.dir_okay and not Path(converted).parent.is_dir():
            raise InputError(
                f"{param.opts[0] if param.opts else param.name} {text}: the folder "
                f"{Path(converted).parent} does not exist"
            )
        return converted


class _Group(click.Group):
    """Turns :class:`InputError` into a one-line error (exit status 1), and any other
    failure into one line naming it, with the traceback in the debug log (``-vv``): no stack
    trace reaches a user who did not ask for one."""

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # here, not at exit, so that a reader gone is handled below
            return result
        except BrokenPipeError:  # the reader of our output left (`| head`): 128 + SIGPIPE, silently
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush goes nowhere
            raise click.exceptions.Exit(141) from None
        except InputError as exc:
            raise click.ClickException(message(exc)) from exc
        except Stopped as exc:
            click.echo(str(exc), err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            logging.getLogger("jigsawdata").debug("unexpected failure", exc_info=True)
            raise click.ClickException(
                f"{type(exc).__name__}: {first_line(exc)} (rerun with -vv for the traceback)"
            ) from exc

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Every subcommand takes ``-v`` and ``-q`` too, so they work after its name as well as
        before it (``jigsawdata build-shards coco/ -q``)."""
        cmd.params.extend(
            [
                click.Option(
                    ["-v", "--verbose"],
                    count=True,
                    expose_value=False,
                    callback=_more_verbose,
                    help="More log output (-vv for debug); also accepted before the command.",
                ),
                click.Option(
                    ["-q", "--quiet"],
                    is_flag=True,
                    expose_value=False,
                    callback=_quieter,
                    help="No progress bars; also accepted before the command.",
                ),
            ]
        )
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """In workflow order, topic by topic (:data:`TOPICS`)."""
        return [name for _, names in TOPICS for name in names]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """``--help`` lists the commands under their topics, in the order of a workflow."""
        for topic, names in TOPICS:
            rows = [
                (name, self.commands[name].get_short_help_str(formatter.width - 6 - max(map(len, names))))
                for name in names
            ]
            with formatter.section(topic):
                formatter.write_dl(rows)


TOPICS = (
    (
        "Data: from a COCO-format set to checked shards",
        ("make-synthetic", "split", "build-shards", "merge-manifests", "info", "verify", "preview"),
    ),
    ("Sharing", ("fetch",)),
    ("Pre-training", ("pretrain", "evaluate-pretrain", "erf", "export")),
    ("Detection", ("finetune", "evaluate")),
    ("Evidence: the paper's comparisons and the cost claim", ("experiment", "bench")),
)
"""The commands of ``--help``, by topic in workflow order; every command is in one."""


def _log_level(verbose: int) -> int:
    return logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG


def _more_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        state = ctx.find_root().obj
        state["verbose"] += value
        logging.getLogger().setLevel(_log_level(state["verbose"]))


def _quieter(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_root().obj["quiet"] = True
        logging.getLogger(_WARNINGS).setLevel(logging.ERROR)


_WARNINGS = "py.warnings"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Libraries' warnings (torch's DataLoader, pycocotools, ...) as one log line each, which
    ``-q`` silences, instead of a source excerpt on stderr."""
    logging.getLogger(_WARNINGS).warning("%s: %s", category.__name__, first_line(Warning(str(message))))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jigsawdata")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they are also off when stderr is not a terminal).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Cheap object-detection pre-training: jigsaw shards from your own detection data."""
    logging.basicConfig(level=_log_level(verbose), format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _warning_line
    if quiet:
        logging.getLogger(_WARNINGS).setLevel(logging.ERROR)
    ctx.obj = {"quiet": quiet, "verbose": verbose}


def _quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and (ctx.find_root().obj or {}).get("quiet"))


def progress_bar(**kwargs):
    """A tqdm bar on stderr, off with ``-q`` or when stderr is not a terminal (logs, CI, pipes)."""
    from tqdm import tqdm

    return tqdm(disable=True if _quiet() else None, dynamic_ncols=True, **kwargs)


def _evaluation_bar():
    """A progress bar for detector evaluation and the callback that feeds it."""
    bar = progress_bar(unit="img", desc="evaluate")

    def update(images: int, total: int) -> None:
        bar.total = total
        bar.update(images)

    return bar, update


def setting_options(cls, skip: tuple[str, ...] = (), kinds: dict | None = None, config: bool = True):
    """Click options built from a settings dataclass's fields (flag, default, choices, range,
    help: see :mod:`jigsawdata.settings`), except ``skip``; ``kinds`` gives a field its own
    click type; with ``config``, also ``--config FILE``."""

    def decorate(fn):
        types = field_types(cls)
        for field in reversed(dataclasses.fields(cls)):
            spec = spec_of(field)
            if field.name in skip:
                continue
            base, _ = types[field.name]
            required = field.default is dataclasses.MISSING
            default = None if required else field.default
            shown = default is not None
            help_text = spec.help + ("  [required]" if required else "")
            if base is bool:
                fn = click.option(
                    f"{flag(field.name)}/--no-{flag(field.name)[2:]}",
                    field.name,
                    default=default,
                    show_default=shown,
                    help=help_text,
                )(fn)
                continue
            if field.name in (kinds or {}):
                kind = kinds[field.name]
            elif spec.choices is not None:
                kind = click.Choice(spec.choices)
            elif base in (int, float) and (spec.min is not None or spec.max is not None):
                kind = (click.IntRange if base is int else click.FloatRange)(spec.min, spec.max, min_open=spec.min_open)
            else:
                kind = base
            fn = click.option(
                flag(field.name),
                *spec.aliases,
                field.name,
                type=kind,
                default=default,
                show_default=shown,
                help=help_text,
            )(fn)
        if not config:
            return fn
        return click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="YAML or JSON file of these settings (a run's config.json works); flags given here override it.",
        )(fn)

    return decorate


def resumed_config(resume: bool, config_file: Path | None, options: dict) -> Path | None:
    """``--config``, or when resuming without one the run's own ``config.json``: ``--out RUN
    --resume`` alone continues a run with its settings (flags given still override them)."""
    if resume and config_file is None and options.get("out"):
        saved = Path(options["out"]) / CONFIG_NAME
        if saved.is_file():
            return saved
    return config_file


def _given(options: dict) -> dict:
    """The options given on the command line (not left at their defaults): they override ``--config``."""
    ctx = click.get_current_context()
    return {
        k: v
        for k, v in options.items()
        if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    }


def settings_from(cls, config_file: Path | None, options: dict):
    """The settings dataclass from its defaults, then ``--config``, then the flags given."""
    values = read_config_file(config_file, cls) if config_file else {}
    values.update(_given(options))
    missing = [
        flag(f.name) for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and values.get(f.name) is None
    ]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (give the flag, or the setting in --config)")
    return cls(**values)


@main.command("make-synthetic")
@click.argument("root", type=LocalPath(file_okay=False, path_type=Path))
@click.option("--images", default=48, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the drawn scenes.")
@click.option(
    "--split",
    default="train",
    show_default=True,
    help="Split name: writes annotations/instances_<split>.json and <split>/.",
)
def make_synthetic(root: Path, images: int, seed: int, split: str) -> None:
    """Write a small synthetic COCO-format detection set (the embedded demo data)."""
    from jigsawdata.synthetic.shapes import make_synthetic_coco

    ann = make_synthetic_coco(root, images=images, seed=seed, split=split)
    click.echo(f"wrote {images} images and {ann}")


def _resolve_source(coco_root: Path | None, split: str | None, ann: Path | None, images: Path | None):
    from jigsawdata.coco.reader import resolve_coco_root

    if ann or images:
        if not (ann and images):
            raise click.UsageError("--ann and --image-dir go together")
        if coco_root is not None or split is not None:
            raise click.UsageError("give COCO_ROOT (with --split), or --ann FILE --image-dir DIR, not both")
        return ann, images
    if coco_root is None:
        raise click.UsageError("give COCO_ROOT, or --ann FILE --image-dir DIR")
    if split is None:
        found = sorted((coco_root / "annotations").glob(ANNOTATION_GLOB))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise InputError(f"cannot pick a split under {coco_root / 'annotations'} (found: {names}); use --split")
        split = found[0].stem.removeprefix("instances_")
    return resolve_coco_root(coco_root, split)


def _build_config(config_file: Path | None, options: dict) -> BuildConfig:
    """The build settings from their defaults, then ``--config``, then the flags given."""
    values = read_config_file(config_file, BuildConfig, SamplingConfig) if config_file else {}
    if isinstance(values.get("shard_size"), str):
        try:
            values["shard_size"] = parse_size(values["shard_size"])
        except click.BadParameter as exc:
            raise InputError(f"--config {config_file}: shard_size: {exc.message}") from exc
    values.update(_given(options))
    sampling = {f.name for f in dataclasses.fields(SamplingConfig)}
    return BuildConfig(
        sampling=SamplingConfig(**{k: v for k, v in values.items() if k in sampling}),
        **{k: v for k, v in values.items() if k not in sampling},
    )


@main.command("build-shards")
@click.argument("coco_root", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=LocalPath(file_okay=False, path_type=Path), help="Output directory.")
@click.option(
    "--split", help="Split name: reads annotations/instances_<split>.json and <split>/ (default: the only one)."
)
@click.option("--ann", type=click.Path(dir_okay=False, path_type=Path), help="Annotation file (with --image-dir).")
@click.option(
    "--image-dir", "images", type=click.Path(file_okay=False, path_type=Path), help="Image folder (with --ann)."
)
@setting_options(BuildConfig, skip=("sampling",), kinds={"shard_size": SIZE}, config=False)
@setting_options(SamplingConfig, config=False)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML (.yaml/.yml) or JSON file of the build and sampling settings: --seed, --jpeg-quality, "
    "--shard-size, --shard-samples, --chunk-images, --max-pixels and --max-enlarge to --negatives-avoid "
    "(flat, e.g. `seed: 3`, `max_enlarge: 1.5`); not the source, output or run options. Flags given here "
    "override it.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Processes that decode and encode (0 or 1: in this process).",
)
@click.option(
    "--part", "part_spec", default="0/1", show_default=True, help="Build only part K of N (K/N), e.g. in a Slurm array."
)
@click.option(
    "--strict/--no-strict",
    default=False,
    show_default=True,
    help="A bad box or a file_name outside --image-dir is an error instead of a counted skip.",
)
@click.option(
    "--keep-staging/--no-keep-staging",
    default=False,
    show_default=True,
    help="Keep the per-chunk staging files after a successful build (for inspection).",
)
@click.option(
    "--license",
    "license_",
    help="Licence of the source set, for the dataset card "
    "(default: COCO's terms for a COCO-derived set, else 'unknown').",
)
def build_shards_cmd(
    coco_root, out, split, ann, images, workers, part_spec, strict, keep_staging, license_, config_file, **settings
) -> None:
    """Extract positive and negative crops from a COCO set into grouped WebDataset shards.

    Rerunning the same command resumes an interrupted build.
    """
    from jigsawdata.build.run import build_shards
    from jigsawdata.coco.reader import load_coco

    part, parts = parse_part(part_spec)
    cfg = _build_config(config_file, settings)
    ann_file, image_dir = _resolve_source(coco_root, split, ann, images)
    source = load_coco(ann_file, image_dir, strict=strict)
    n_images = len(source.images[part::parts])  # the images of this part, as build_shards takes them
    bars: dict = {}

    def progress(stage: str, items: int, crops: int) -> None:
        if stage not in bars:
            total = n_images if stage == "extract" else None
            unit = "img" if stage == "extract" else "shard"
            bars[stage] = progress_bar(total=total, desc=stage, unit=unit)
            bars[stage].crops = 0
        bar = bars[stage]
        bar.crops += crops
        bar.set_postfix(crops=bar.crops, refresh=False)
        bar.update(items)

    try:
        manifest = build_shards(
            source,
            out,
            cfg,
            workers=workers,
            part=part,
            parts=parts,
            keep_staging=keep_staging,
            progress=progress,
            license=license_,
        )
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


@main.command("split")
@click.argument("ann", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=LocalPath(file_okay=False, path_type=Path),
    help="Folder for instances_<train>.json and instances_<val>.json.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    help="Share of the images held out (rounded, at least one).",
)
@click.option("--val-images", type=click.IntRange(min=1), help="Number of images held out.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the draw.")
@click.option("--names", default="train,val", show_default=True, help="Names of the two splits.")
def split_cmd(ann: Path, out: Path, val_fraction: float | None, val_images: int | None, seed: int, names: str) -> None:
    """Cut a seeded held-out split from one COCO-format annotation file (by image), for
    `finetune --ann` / `--val-ann` and for validation shards."""
    from jigsawdata.coco.split import split_annotations

    parts = _comma_list("--names", names)
    if len(parts) != 2:
        raise click.BadParameter(f"two names, e.g. train,val; got {names!r}", param_hint="--names")
    train, val = split_annotations(ann, out, val_fraction=val_fraction, val_images=val_images, seed=seed, names=parts)
    click.echo(f"wrote {train} and {val} (seed {seed}); images stay where they are: use --image-dir with both")


@main.command("merge-manifests")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
def merge_manifests(root: Path) -> None:
    """Join the partial manifests of a build made with --part into one shard set."""
    from jigsawdata.build.merge import merge_parts

    manifest = merge_parts(root)
    click.echo(f"merged {manifest.parts} parts: " + ", ".join(f"{g}: {v.samples}" for g, v in manifest.groups.items()))


_VERIFY_OPTION = click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every shard against the manifest first, JPEGs decoded (cached: free on later runs).",
)
_CACHE_OPTION = click.option(
    "--cache-dir", help="Where a URL is fetched to (default: $JIGSAWDATA_CACHE or ~/.cache/jigsawdata)."
)


@main.command()
@click.argument("root")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--padding",
    is_flag=True,
    help="Also the share of jigsaw canvas pixels that are zero padding "
    "(the paper's setting: pad_crop, resize 0.8-1.5, 224 canvas cut at 64).",
)
def info(root: str, as_json: bool, padding: bool) -> None:
    """Summarise a shard set, a directory or a URL: samples per group and class, sizes, skips
    (reads the manifest and index; does not verify)."""
    from jigsawdata.shardset.check import summarize

    summary = summarize(root)
    if padding:
        from jigsawdata.pipelines.config import JigsawConfig
        from jigsawdata.pipelines.utilisation import crop_sizes, padding_share

        summary["padding"] = padding_share(crop_sizes(root), JigsawConfig())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"source: {summary['source']['annotation_file']} (sha256 {summary['source']['sha256'][:12]}…), "
        f"seed {summary['seed']}"
    )
    click.echo(f"{'group':<6}{'shards':>8}{'samples':>10}{'MB':>10}")
    for g, v in summary["groups"].items():
        click.echo(f"{g:<6}{v['shards']:>8}{v['samples']:>10}{v['bytes'] / 1e6:>10.1f}")
    click.echo("samples per class: " + ", ".join(f"{k} {v}" for k, v in summary["classes"].items()))
    click.echo("counts: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()))
    click.echo(f"skipped images: {summary['skipped_images']}")
    if padding:
        p = summary["padding"]
        click.echo(
            f"zero padding: {100 * p['padding_share']:.1f}% of canvas pixels over {p['images']} drawn "
            "images (" + ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["per_region"].items()) + ")"
        )
    click.echo(f"(read from the manifest and index, not checked: run `jigsawdata verify {root}` for that)")


@main.command()
@click.argument("location")
@click.option("--all", "show_all", is_flag=True, help=f"Print every problem, not the first {SHOWN_PROBLEMS}.")
@_CACHE_OPTION
def verify(location: str, show_all: bool, cache_dir: str | None) -> None:
    """Re-hash every shard, decode every sample and check it against the manifest, the index and
    the card. A URL is fetched into the cache first (each file against the manifest)."""
    from jigsawdata.shardset.check import verify_shard_set
    from jigsawdata.shardset.manifest import read_manifest
    from jigsawdata.shardset.open import local_copy

    root = local_copy(location, verify=False, cache_dir=cache_dir)
    total = len(read_manifest(root).shards)
    with progress_bar(total=total, unit="shard", desc="verify") as bar:
        problems = verify_shard_set(root, on_shard=lambda _: bar.update(1))
    if problems:
        shown = problems if show_all else problems[:SHOWN_PROBLEMS]
        for problem in shown:
            click.echo(f"FAIL {problem}", err=True)
        if len(shown) < len(problems):
            click.echo(
                f"FAIL ... and {len(problems) - len(shown)} more problems ({len(problems)} in all; "
                "--all prints every one)",
                err=True,
            )
        sys.exit(1)
    click.echo(f"OK: {total} shards match the manifest and the index")


def _cuda(device: str) -> bool:
    from jigsawdata.trainer.runtime import use_cuda

    return use_cuda(device)


@main.command()
@click.argument("shards")
@click.option("--out", required=True, type=LocalPath(dir_okay=False, path_type=Path), help="PNG to write.")
@click.option("--count", default=8, show_default=True, type=click.IntRange(min=1), help="Assembled images to draw.")
@click.option("--columns", default=4, show_default=True, type=click.IntRange(min=1), help="Images per row.")
@click.option(
    "--pipeline",
    type=click.Choice(PIPELINES),
    default="dali",
    show_default=True,
    help="Input pipeline: NVIDIA DALI, or the plain PyTorch reference.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where DALI assembles (auto: the GPU if torch sees one); the reference pipeline runs on the CPU.",
)
@setting_options(JigsawSettings, config=False)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the augmentation.")
@_VERIFY_OPTION
@_CACHE_OPTION
def preview(
    shards: str,
    out: Path,
    count: int,
    columns: int,
    pipeline: str,
    device: str,
    seed: int,
    verify: bool,
    cache_dir: str | None,
    **jigsaw,
) -> None:
    """Draw assembled jigsaw images of a shard set (a directory or a URL) with region borders
    and class names, assembled as `pretrain` with the same jigsaw settings assembles them."""
    from jigsawdata.pipelines.preview import render_grid
    from jigsawdata.shardset.open import open_shard_set

    cfg = settings_from(JigsawSettings, None, jigsaw).jigsaw_config(seed, initial_fill=256)
    shards = open_shard_set(shards, verify=verify, cache_dir=cache_dir)
    if pipeline == "dali":
        from jigsawdata.pipelines.dali import DaliJigsawLoader

        gpu = _cuda(device)
        loader = DaliJigsawLoader(
            shards, count, cfg, device="gpu" if gpu else "cpu", device_id=0 if gpu else None, rank=0, world_size=1
        )
    else:
        from jigsawdata.pipelines.reference import reference_loader

        loader = reference_loader(shards, count, cfg, workers=0, rank=0, world_size=1)
    images, labels = next(iter(loader))
    render_grid(images, labels, shards.class_names, cfg.template, columns).save(out)
    click.echo(f"wrote {out} ({count} images, {pipeline} pipeline)")


@main.command()
@setting_options(PretrainConfig)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
def pretrain(resume: bool, config_file: Path | None, **options) -> None:
    """ERF-adaptive dense classification pre-training on jigsaw batches (torchrun for many GPUs)."""
    from jigsawdata.layout import CHECKPOINT_NAME
    from jigsawdata.trainer.pretrain import Trainer
    from jigsawdata.trainer.validate import format_validation

    cfg = settings_from(PretrainConfig, resumed_config(resume, config_file, options), options)
    bar = None
    shown: dict = {}

    def on_log(m: dict) -> None:
        val = {"val": f"{100 * shown['val_accuracy']:.1f}%/{100 * shown['val_majority']:.1f}%"} if shown else {}
        figures = {
            "loss": f"{m['loss']:.3f}",
            "lr": f"{m['lr']:.4f}",
            "ips": f"{m['images_per_s']:.0f}",
            "wait": f"{100 * m['data_wait_fraction']:.1f}%",
            **val,
        }
        if bar.disable:  # no terminal (a batch job, a pipe): a line per --log-every, as finetune prints
            if not _quiet():
                click.echo(f"it {m['iteration']}/{cfg.iterations} " + " ".join(f"{k} {v}" for k, v in figures.items()))
            return
        bar.n = m["iteration"]
        bar.set_postfix(**figures, refresh=False)
        bar.refresh()

    trainer = Trainer(cfg, resume=resume, on_log=on_log, on_validate=shown.update)
    bar = progress_bar(total=cfg.iterations, initial=trainer.iteration, unit="it", desc="pretrain")
    if not trainer.dist.main:
        bar.disable = True
    try:
        metrics = trainer.train()
    finally:
        bar.close()
    if trainer.dist.main and not metrics:
        click.echo(
            f"nothing to do: {cfg.out} is at iteration {trainer.iteration} of {cfg.iterations} (a longer "
            "run: --resume --iterations N)"
        )
    elif trainer.dist.main:
        click.echo(
            f"done: {trainer.iteration} iterations, last loss {metrics['loss']:.4f}; "
            f"checkpoint {Path(cfg.out) / CHECKPOINT_NAME}"
        )
        if trainer.last_validation:
            click.echo(f"region accuracy on {cfg.val_shards} (majority-class rate beside it):")
            click.echo(format_validation(trainer.last_validation))


@main.command("evaluate-pretrain")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--shards",
    required=True,
    help="Shards of a held-out split, with the run's classes: a directory or "
    "a URL (fetched and verified into the cache first).",
)
@click.option(
    "--images", default=256, show_default=True, type=click.IntRange(min=1), help="Fixed jigsaw images to measure on."
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where to run (auto: a CUDA GPU if torch sees one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@_VERIFY_OPTION
@_CACHE_OPTION
def evaluate_pretrain(
    run: Path, shards: str, images: int, device: str, as_json: bool, verify: bool, cache_dir: str | None
) -> None:
    """Region top-1 accuracy of a pre-training checkpoint on fixed jigsaw images, with the
    majority-class rate beside it (the same figure pretrain --val-shards logs)."""
    from jigsawdata.trainer.evaluate import evaluate_checkpoint
    from jigsawdata.trainer.validate import format_validation

    metrics = evaluate_checkpoint(run, shards, images, device, verify=verify, cache_dir=cache_dir)
    click.echo(json.dumps(metrics, indent=2) if as_json else format_validation(metrics))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torchvision", "detectron2", "mmdet"]),
    default="torchvision",
    show_default=True,
    help="Key names and file layout of the framework that will load the backbone.",
)
@click.option(
    "--out",
    required=True,
    type=LocalPath(dir_okay=False, path_type=Path),
    help="File to write: .pth, .pt or .safetensors (torchvision), .pkl (Detectron2's own format, read "
    "with pickle.load) or .pth (detectron2), .pth or .pt (mmdet).",
)
@click.option(
    "--backbone-only",
    is_flag=True,
    help="Of a --neck fpn run, write the backbone alone, named as a "
    "backbone-only run's export (e.g. for resnet50().load_state_dict).",
)
@click.option(
    "--load-from",
    is_flag=True,
    help="mmdet: name a lone backbone's keys backbone.* for MMDetection's "
    "load_from (default: bare ResNet keys, for the backbone's init_cfg).",
)
def export(checkpoint: Path, fmt: str, out: Path, backbone_only: bool, load_from: bool) -> None:
    """Write a pre-trained backbone (and FPN, of a --neck fpn run) for torchvision (.pth, .pt or .safetensors),
    Detectron2 (.pkl or .pth) or MMDetection (.pth or .pt)."""
    import yaml

    from jigsawdata.trainer.export import detectron2_config
    from jigsawdata.trainer.export import export as export_backbone

    done = export_backbone(checkpoint, fmt, out, backbone_only, load_from)
    click.echo(f"wrote {out}: {done.tensors} tensors ({'backbone and FPN' if done.neck else 'backbone'}), {fmt} naming")
    if fmt == "detectron2":
        click.echo(
            "Detectron2 config these weights need (without it they load into a different network without a warning):"
        )
        config = detectron2_config(done.arch, out, done.fpn_channels)
        click.echo(yaml.safe_dump(config, sort_keys=False, default_flow_style=False).rstrip())


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=LocalPath(dir_okay=False, path_type=Path), help="PNG to write.")
@click.option(
    "--region",
    type=click.Choice(REGION_NAMES),
    default="TL",
    show_default=True,
    help="Template region whose cells' fields are drawn.",
)
@click.option(
    "--images", default=16, show_default=True, type=click.IntRange(min=1), help="Jigsaw images to average over."
)
@click.option("--shards", help="Shard set, a directory or a URL (default: the run's).")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where to run (auto: a CUDA GPU if torch sees one).",
)
@_VERIFY_OPTION
def erf(run_dir: Path, out: Path, region: str, images: int, shards: str | None, device: str, verify: bool) -> None:
    """Draw the effective receptive field of a region's cells for a run's checkpoint (of a
    --neck fpn run: its P5 level, the pyramid's stride-32 map)."""

    from jigsawdata.pipelines.reference import reference_loader
    from jigsawdata.shardset.open import open_shard_set
    from jigsawdata.trainer.erf import level_receptive_fields, level_weights
    from jigsawdata.trainer.erfviz import render_erf
    from jigsawdata.trainer.model import load_pretrained
    from jigsawdata.trainer.runtime import pick_device

    where = pick_device(device)
    ckpt, cfg, model = load_pretrained(run_dir)
    level = next(reversed(model.strides))  # the stride-32 level: every cell's own ERF
    shard_set = open_shard_set(shards or cfg.shards, verify=verify, cache_dir=cfg.cache_dir)
    # The images the run's ERF weights were measured on: its own fit, resize and flip.
    batch, _ = next(
        iter(reference_loader(shard_set, images, cfg.jigsaw_config(cfg.seed), workers=0, rank=0, world_size=1))
    )
    maps = {level: level_receptive_fields(model.to(where), batch.to(where), cfg.template, only=level)[level].cpu()}
    weights = level_weights(maps, cfg.template, model.strides, cfg.tau)[level]
    render_erf(maps[level], weights, cfg.template, REGION_NAMES.index(region)).save(out)
    click.echo(f"wrote {out} (iteration {ckpt['iteration']}, {images} images)")


@main.command()
@setting_options(FinetuneConfig)
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
def finetune(resume: bool, config_file: Path | None, **options) -> None:
    """Fine-tune a torchvision detector from jigsaw (or other) weights, then evaluate it."""
    from jigsawdata.trainer.evaluate import format_table
    from jigsawdata.trainer.finetune import Finetuner, evaluate_run

    cfg = settings_from(FinetuneConfig, resumed_config(resume, config_file, options), options)
    trainer = Finetuner(
        cfg,
        resume=resume,
        on_log=lambda m: click.echo(f"epoch {m['epoch']} it {m['iteration']} lr {m['lr']:.5f} loss {m['loss']:.4f}"),
    )
    trainer.train()
    if trainer.dist.main:
        bar, update = _evaluation_bar()
        with bar:
            metrics = evaluate_run(cfg.out, max_images=cfg.max_images, device=cfg.device, progress=update)
        click.echo(format_table(metrics))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--coco", type=click.Path(exists=True, file_okay=False), help="COCO root (default: the run's).")
@click.option("--split", help="Split to evaluate (default: the run's --val-split, else its --split).")
@click.option(
    "--ann",
    type=click.Path(exists=True, dir_okay=False),
    help="Annotation file of any COCO-format set to evaluate on, instead of --coco/--split.",
)
@click.option(
    "--image-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Image folder of --ann (default: the run's evaluation images).",
)
@click.option("--max-images", type=click.IntRange(min=1), help="Evaluate only the first N images.")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where to run (auto: a CUDA GPU if torch sees one).",
)
def evaluate(
    run_dir: Path,
    coco: str | None,
    split: str | None,
    ann: str | None,
    image_dir: str | None,
    max_images: int | None,
    device: str,
) -> None:
    """COCO AP of a fine-tuned detector. Its own evaluation (the run's split and image count) is
    eval.json; another split, set or subset is eval-<name>[-first<N>].json, with predictions_*
    beside it; each file says what was evaluated."""
    from jigsawdata.trainer.evaluate import format_table
    from jigsawdata.trainer.finetune import evaluate_run

    if image_dir and not ann:
        raise click.UsageError("--image-dir goes with --ann")
    bar, update = _evaluation_bar()
    with bar:
        metrics = evaluate_run(run_dir, coco, split, max_images, device, progress=update, ann=ann, image_dir=image_dir)
    click.echo(format_table(metrics))


def _comma_list(option: str, text: str, convert=str) -> tuple:
    try:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(f"{option} takes a comma-separated list, got {text!r}") from None


def _multiple(text: str) -> float:
    """``2x`` (or ``2``) -> 2.0."""
    return float(text.removesuffix("x"))


@main.command()
@click.option(
    "--out",
    required=True,
    type=LocalPath(file_okay=False),
    help="Experiment folder: new or empty, or this grid's own (continued where it stopped).",
)
@click.option(
    "--preset",
    type=click.Choice(["tiny", "gpu", "paper"]),
    default="tiny",
    show_default=True,
    help="tiny: a cluttered synthetic set, ResNet-18, a 2-core CPU; gpu: a larger one on one H100/H200; "
    "paper: COCO, ResNet-50, the paper's settings (GPUs, torchrun).",
)
@click.option(
    "--coco",
    type=click.Path(exists=True, file_okay=False),
    help="COCO root: the paper preset's data (required there); with tiny or gpu it replaces their synthetic set.",
)
@click.option("--split", help="Training split of --coco (default train2017); only with --coco.")
@click.option(
    "--val-split",
    help="Held-out split of --coco: pre-training validation and detection evaluation "
    "(default val2017); only with --coco.",
)
@click.option(
    "--losses",
    default="erf",
    show_default=True,
    help="Jigsaw arms, one per pre-training loss: erf, blockwise, global (Table 2).",
)
@click.option("--taus", default="", help="Extra ERF arms at these tau, e.g. 0.5,0.6,0.8,1 (Fig. 7a).")
@click.option(
    "--pretrain-iterations",
    "lengths",
    default="",
    help="Extra ERF arms pre-trained for these multiples of a quarter of the preset's iterations, e.g. "
    "1x,2x (Fig. 7b: 16k units; the preset's length is 4x).",
)
@click.option(
    "--fits",
    default="",
    help="Extra block-wise arms with these fit modes, e.g. warp,resize (Table 1, "
    "run with the block-wise loss; the block-wise arm is their pad & crop row).",
)
@click.option(
    "--no-context",
    is_flag=True,
    help="An ERF arm pre-trained on positives that are not enlarged (the paper's context ablation).",
)
@click.option(
    "--fpn-neck",
    is_flag=True,
    help="An ERF arm pre-trained with the detector's FPN (pretrain --neck fpn) "
    "and fine-tuned from backbone + FPN (fpn and mask detectors).",
)
@click.option(
    "--imagenet",
    type=click.Path(exists=True, dir_okay=False),
    help="A torchvision ResNet state dict: an arm fine-tuned from ImageNet weights.",
)
@click.option(
    "--random/--no-random",
    default=True,
    show_default=True,
    help="The control: random weights, fine-tuned with the same detector, head and schedule.",
)
@click.option(
    "--scratch/--no-scratch",
    default=True,
    show_default=True,
    help="The from-scratch arm (GN in backbone, FPN and a 4conv1fc head: Table 5), given the --match "
    "arm's measured total cost.",
)
@click.option("--match", default="erf", show_default=True, help="The jigsaw arm whose cost scratch is given.")
@click.option("--baseline", help="The arm AP differences are taken against (default: random, else the first).")
@click.option(
    "--detector", type=click.Choice(DETECTORS), help="Detector of every arm (Table 3; default: the preset's)."
)
@click.option("--arch", type=click.Choice(ARCHS), help="Backbone of every arm (Table 4; default: the preset's).")
@click.option(
    "--schedules",
    default="1x",
    show_default=True,
    help="Fine-tuning schedules, each a multiple of the preset's 1x, e.g. 1x,2x (Table 5).",
)
@click.option(
    "--epochs-1x",
    type=click.IntRange(min=1),
    help="Epochs of the 1x schedule (default: the preset's; the paper's is 13).",
)
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds per arm (default: the preset's).")
@click.option("--seed", type=click.IntRange(min=0), help="The first seed (seed k is --seed + k); also the data's.")
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    help="Pre-training iterations of a full-length arm (default: the preset's).",
)
@click.option("--device", type=click.Choice(DEVICES), help="Default: the preset's.")
@click.option(
    "--smoke",
    is_flag=True,
    help="Checks that the grid runs: replaces the preset's sizes (12 synthetic "
    "images, 2 pre-training iterations, 1-epoch 1x on 2 images, tiny probes); its results mean nothing, "
    "and a smoke grid's folder is continued only with --smoke.",
)
def experiment(
    out: str,
    preset: str,
    coco: str | None,
    split: str | None,
    val_split: str | None,
    losses: str,
    taus: str,
    lengths: str,
    fits: str,
    no_context: bool,
    fpn_neck: bool,
    imagenet: str | None,
    random: bool,
    scratch: bool,
    match: str,
    baseline: str | None,
    detector: str | None,
    arch: str | None,
    schedules: str,
    epochs_1x: int | None,
    seeds: int | None,
    seed: int | None,
    iterations: int | None,
    device: str | None,
    smoke: bool,
) -> None:
    """The paper's comparisons end to end, under one protocol: every initialisation arm
    fine-tuned with the same detector, head and schedule, a cost-matched scratch arm, N seeds.
    Writes table.md, experiment.json and experiment.png; finished runs are not redone."""
    from jigsawdata.experiments.config import preset as make_preset
    from jigsawdata.experiments.grid import run_experiment

    pretrain: dict = {"iterations": iterations}
    finetune: dict = {}
    sizes: dict = {}
    if smoke:
        sizes = dict(knn_train=16, knn_val=8, probe_iterations=2)
        if preset != "paper":  # the paper preset reads --coco, smoke or not
            sizes.update(synthetic_images=12, synthetic_val_images=6)
        epochs_1x = epochs_1x or 1
        pretrain = dict(
            iterations=iterations or 2,
            batch=2,
            warmup=1,
            erf_every=2,
            erf_images=2,
            val_every=2,
            val_images=2,
            pipeline="reference",
            workers=0,
            log_every=1,
        )
        finetune = dict(max_images=2, batch=2, warmup=1, min_size=64, max_size=96, rois_per_image=8, workers=0)
    cfg = make_preset(
        preset,
        out,
        pretrain=pretrain,
        finetune=finetune,
        coco=coco,
        split=split,
        val_split=val_split,
        losses=_comma_list("--losses", losses),
        taus=_comma_list("--taus", taus, float),
        lengths=_comma_list("--pretrain-iterations", lengths, _multiple),
        fits=_comma_list("--fits", fits),
        no_context=no_context,
        fpn_neck=fpn_neck,
        imagenet=imagenet,
        random=random,
        scratch=scratch,
        match=match,
        baseline=baseline,
        detector=detector,
        arch=arch,
        schedules=_comma_list("--schedules", schedules),
        epochs_1x=epochs_1x,
        seeds=seeds,
        seed=seed,
        device=device,
        **sizes,
    )

    def on_result(row: dict) -> None:
        click.echo(f"{row['arm']}, seed {row['seed']}, {row['schedule']}: AP {100 * row['eval']['bbox']['AP']:.1f}")

    report = run_experiment(cfg, on_result=on_result, on_progress=lambda line: click.echo(line, err=True))
    if report:
        click.echo((Path(out) / "table.md").read_text().rstrip())
        click.echo(f"wrote {out}/table.md, experiment.json and experiment.png ({len(report['results'])} runs)")


@main.command()
@click.argument("which", type=click.Choice(["all", "build", "pipeline", "loss", "cost"]))
@click.option(
    "--out",
    default="bench-report",
    show_default=True,
    type=LocalPath(file_okay=False, path_type=Path),
    help="Report directory (report.json, report.md, charts).",
)
@click.option(
    "--coco",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="COCO root with real photographs (default: ../shared/data/coco-train288).",
)
@click.option("--split", default="train2017", show_default=True, help="Split of --coco the benchmarks read.")
@click.option("--quick", is_flag=True, help="A couple of steps each: checks that everything runs.")
def bench(which: str, out: Path, coco: Path | None, split: str, quick: bool) -> None:
    """Throughput and cost benchmarks; `all` runs every one that fits the machine."""
    from jigsawdata.benchmarks.common import DEFAULT_COCO
    from jigsawdata.benchmarks.report import BENCHMARKS, NEED_DALI, run_all
    from jigsawdata.pipelines.dali import INSTALL_DALI, dali_missing, require_dali

    only = BENCHMARKS if which == "all" else (which,)
    if coco is None and not DEFAULT_COCO.is_dir() and set(only) != {"loss"}:
        raise InputError(
            f"bench {which} reads real photographs: give --coco DIR, a COCO-format set "
            f"(the default, {DEFAULT_COCO}, exists only beside a source checkout)"
        )
    others, skipped = tuple(b for b in BENCHMARKS if b not in NEED_DALI), {}
    missing = dali_missing() if which == "all" else None
    if missing:  # "all" is every benchmark that fits the machine
        why = f"NVIDIA DALI cannot be imported ({missing}); {INSTALL_DALI} to run it."
        click.echo(f"skipping {', '.join(NEED_DALI)}: {why}", err=True)
        only, skipped = others, dict.fromkeys(NEED_DALI, why)
    elif which in NEED_DALI:
        require_dali(f"run the benchmarks that do not need it: {', '.join(others)}")
    run_all(out, coco or DEFAULT_COCO, split, only, quick, log=click.echo, skipped=skipped)
    click.echo(f"wrote {out}/report.json and {out}/report.md")


@main.command()
@click.argument("url")
@click.option(
    "--out",
    required=True,
    type=LocalPath(file_okay=False, path_type=Path),
    help="Folder to download into (new, empty, or holding this same set).",
)
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=1), help="Parallel downloads.")
@click.option(
    "--retries",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Attempts per file (each resumes the last where the server allows it).",
)
@click.option("--force", is_flag=True, help="Replace another shard set in --out (only once the new one is complete).")
def fetch(url: str, out: Path, workers: int, retries: int, force: bool) -> None:
    """Download a published shard set (https://, s3://, gs://, file://...) and verify every file."""
    from jigsawdata.shardset.fetch import fetch as fetch_shards

    with progress_bar(unit="B", unit_scale=True, unit_divisor=1024, desc="fetch") as bar:

        def on_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        manifest = fetch_shards(
            url, out, workers=workers, retries=retries, progress=bar.update, on_total=on_total, force=force
        )
    click.echo(f"{out}: {len(manifest.shards)} shards fetched and verified")


if __name__ == "__main__":
    main()
