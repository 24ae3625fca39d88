"""The dataset card (``README.md``) every shard set carries: what it is, where it came from,
under which licence, what is in it, and the exact commands to rebuild it and train from it.

Rendered from the manifest alone, so it is deterministic like the shards themselves. Its YAML
front matter is Hugging Face's dataset-card metadata: the licence, one config per group (S, T,
W) whose ``data_files`` are that group's shards, and the sample features with ``cls`` as a
``class_label``, so ``datasets.load_dataset(SET, "S")`` reads a published set with named labels.
"""

from __future__ import annotations

import hashlib
import shlex
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import yaml

from jigsawdata.layout import annotation_name

from .shards import META_FIELDS

if TYPE_CHECKING:
    from .manifest import Manifest, SourceInfo


COCO_LICENSE = (
    "COCO annotations are licensed CC BY 4.0 (https://cocodataset.org/#termsofuse). The images are "
    "Flickr photographs under their own licences, listed per image in the source annotation file "
    "('license' of each image, 'licenses' table); every crop keeps the licence of its source image "
    "(its 'source' field names the image). Many of those licences are NonCommercial or NoDerivs."
)
UNKNOWN_LICENSE = (
    "Unknown: the source set was not recognised as COCO and no licence was given when building "
    "(build-shards --license). Ask the publisher before using or redistributing it."
)


COCO_TERMS = "https://cocodataset.org/#termsofuse"

# Hugging Face feature types of the members of each sample's ``.json`` (shards.META_FIELDS);
# ``sequence`` is read by old and new ``datasets`` alike (4.0 renamed it ``list``).
_JSON_FEATURES = {
    "ann_id": {"dtype": "int64"},
    "category_id": {"dtype": "int64"},
    "crop_box": {"sequence": "int32"},
    "group": {"dtype": "string"},
    "gt_box": {"sequence": "float64"},
    "height": {"dtype": "int32"},
    "image_id": {"dtype": "int64"},
    "label": {"dtype": "int32"},
    "source": {"dtype": "string"},
    "width": {"dtype": "int32"},
}


def license_text(from_coco: bool, given: str | None) -> str:
    if given:
        return given
    return COCO_LICENSE if from_coco else UNKNOWN_LICENSE


def rebuild_command(manifest: Manifest) -> str:
    """The ``build-shards`` command that rebuilds the set byte for byte: every setting the
    manifest records (``params``, and ``params.sampling``), each as its flag, so a setting
    added to the build can never be left out of its card."""
    from jigsawdata.settings import flag

    ann = manifest.source.annotation_file
    split = ann.removeprefix("instances_").removesuffix(".json")
    source = (
        f"COCO_ROOT --split {shlex.quote(split)}"
        if ann == annotation_name(split)
        else f"--ann {shlex.quote(ann)} --image-dir IMAGES"
    )
    params = {**{k: v for k, v in manifest.params.items() if k != "sampling"}, **manifest.params["sampling"]}
    parts = [
        f"jigsawdata build-shards {source} --out SHARDS",
        *(f"{flag(k)} {shlex.quote(_cli_value(v))}" for k, v in params.items()),
    ]
    if manifest.source.license_given:
        parts.append(f"--license {shlex.quote(manifest.source.license)}")
    return " \\\n    ".join(parts)


def _cli_value(value) -> str:
    """A setting as its flag reads it back exactly (``repr`` of a float round-trips)."""
    return repr(value) if isinstance(value, float) else str(value)


def attach_card(manifest: Manifest, per_class: Mapping[int, int]) -> tuple[Manifest, str]:
    """Render the card of a finished set; returns it with the manifest that records its
    sha256 (written after it), so that ``fetch`` and ``verify`` check the card like every
    other file."""
    text = render_card(manifest, per_class)
    return replace(manifest, card_sha256=hashlib.sha256(text.encode()).hexdigest()), text


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Samples per label, from the label of every sample."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _license_metadata(source: SourceInfo) -> dict:
    """Hugging Face's licence fields: an identifier from its list where one fits, else
    ``other`` with a name and link (COCO's terms) or the given text."""
    if source.license_given:
        return {"license": "other", "license_details": source.license}
    if source.license == COCO_LICENSE:
        return {"license": "other", "license_name": "coco-terms-of-use", "license_link": COCO_TERMS}
    return {"license": "unknown"}


def _features(names: Sequence[str]) -> list[dict]:
    """A sample as Hugging Face's webdataset loader reads it: ``jpg``, ``cls``, ``json``,
    ``__key__`` and ``__url__``. Declaring them all replaces the loader's guess, which would
    leave ``cls`` a bare integer."""
    return [
        {"name": "jpg", "dtype": "image"},
        {"name": "cls", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
        {"name": "json", "struct": [{"name": k, **_JSON_FEATURES[k]} for k in sorted(META_FIELDS)]},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]


def front_matter(manifest: Manifest) -> str:
    """The card's YAML header: Hugging Face dataset-card metadata (no YAML aliases: each
    config spells its features out)."""
    names = list(manifest.label_names.values())
    groups = [(g, v) for g, v in manifest.groups.items() if v.shards]
    meta = {
        **_license_metadata(manifest.source),
        "pretty_name": "Jigsaw pre-training shards",
        "task_categories": ["image-classification"],
        "tags": ["webdataset"],
        "configs": [
            {"config_name": g, "data_files": [{"split": "train", "path": [s.name for s in v.shards]}]}
            for g, v in groups
        ],
        "dataset_info": [{"config_name": g, "features": _features(names)} for g, _ in groups],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def class_table(names: Mapping[int, str], per_class: Mapping[int, int]) -> list[str]:
    """The card's table of samples per label with each label's name: ``verify`` finds it in
    the card to check the manifest's names and the shards' labels against the build's."""
    return [
        "| label | class | samples |",
        "|---:|---|---:|",
        *(f"| {label} | {names[label]} | {n} |" for label, n in sorted(per_class.items())),
    ]


def totals_line(counts: Mapping[str, int]) -> str:
    """The card's positives and negatives, then what the build left out."""
    return (
        f"Positives: {counts.get('positives', 0)}, negatives: {counts.get('negatives', 0)}. Left out: "
        + ", ".join(
            f"{k} {v}" for k, v in counts.items() if k not in ("positives", "negatives", "images", "images_used")
        )
        + "."
    )


def recorded_blocks(manifest: Manifest, per_class: Mapping[int, int]) -> list[list[str]]:
    """The card's passages that state the manifest's fields (source, licence, contents,
    counts, classes, settings), each as its lines: ``verify`` finds each in the card, so a
    manifest field changed after the build, with every sha256 kept, disagrees with the card."""
    src, counts, names = manifest.source, manifest.counts, manifest.label_names
    return [
        [
            f"- Annotation file: `{src.annotation_file}`, sha256 `{src.sha256}`",
            f"- Images listed: {src.images}; used: {counts.get('images_used', 0)}; "
            f"skipped: {len(manifest.skipped_images)} (named in `manifest.json`)",
            f"- Built by jigsawdata {manifest.tool.version} (format {manifest.format_version})",
        ],
        ["## Licence", "", src.license, ""],
        [
            "| group | shards | samples | MB |",
            "|---|---:|---:|---:|",
            *(f"| {g} | {len(v.shards)} | {v.samples} | {v.bytes / 1e6:.1f} |" for g, v in manifest.groups.items()),
            "",
        ],
        [totals_line(counts)],
        class_table(names, Counter(per_class)),
        [
            "## Build parameters",
            "",
            *(f"- `{k}`: {v}" for k, v in sorted(manifest.params.items()) if k != "sampling"),
            *(f"- `sampling.{k}`: {v}" for k, v in sorted(manifest.params["sampling"].items())),
            "",
        ],
    ]


def render_card(manifest: Manifest, per_class: Mapping[int, int]) -> str:
    """Markdown card for a finished shard set; ``per_class`` counts its samples per label."""
    source, licence, contents, totals, classes, settings = recorded_blocks(manifest, per_class)
    lines = [
        front_matter(manifest),
        "# Jigsaw pre-training shards",
        "",
        "Object and background crops cut from a detection set, grouped by aspect ratio (S: 0.5 <= w/h <= 1.5, "
        "T: w/h < 0.5, W: w/h > 1.5) and stored as WebDataset tar shards with DALI index files, for Jigsaw "
        "(Montage) pre-training (Zhou et al., ECCV 2020). Each sample is a `.jpg` crop, its label as `.cls` and "
        "its provenance as `.json`; `manifest.json` lists every shard with its sha256 and `index.parquet` every "
        "sample.",
        "",
        "## Source",
        "",
        *source,
        "",
        *licence,
        "## Contents",
        "",
        *contents,
        *totals,
        "",
        *classes,
        "",
        *settings,
        "## Rebuild",
        "",
        "Byte-identical given the same annotation file (check its sha256 above) and images:",
        "",
        "```bash",
        rebuild_command(manifest),
        "```",
        "",
        "## Check, fetch and train",
        "",
        "```bash",
        "jigsawdata verify SHARDS                      # re-hash every shard against manifest.json",
        "jigsawdata fetch URL_OF_THIS_DIRECTORY --out SHARDS   # download and verify a published copy",
        "jigsawdata pretrain --shards SHARDS --out runs/jigsaw",
        "```",
        "",
    ]
    return "\n".join(lines)
