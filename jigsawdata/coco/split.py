"""``jigsawdata split``: cut a seeded held-out split from one COCO-format annotation file.

Sets like LVIS subsets, Objects365 exports or a team's own labels often come as one file. A
fine-tuning run needs images it did not train on to be evaluated on, and pre-training's
validation shards need the same; this splits the images (not the annotations) at random
with a seed, so the same command always gives the same two files. Every other key of the
file (``info``, ``licenses``, ``categories``, ...) is copied into both, so both keep the
category list and a detector trained on one reads the other with the same labels.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from jigsawdata.errors import InputError
from jigsawdata.files import write_text_atomic
from jigsawdata.layout import annotation_name

log = logging.getLogger(__name__)


def _load(ann: Path) -> dict:
    try:
        data = json.loads(Path(ann).read_bytes())
    except OSError as exc:
        raise InputError(f"{ann}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InputError(f"{ann} is not valid JSON ({exc})") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations", []), list)
    ):
        raise InputError(f"{ann} is not a COCO-format annotation file (an object with an 'images' list)")
    ids = [image.get("id") if isinstance(image, dict) else None for image in data["images"]]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise InputError(f"{ann}: every image needs an integer 'id'")
    if len(set(ids)) != len(ids):
        raise InputError(f"{ann}: image ids repeat, so annotations could not be told apart by image")
    return data


def held_out_ids(ids: list[int], count: int, seed: int) -> set[int]:
    """``count`` of ``ids`` drawn with ``seed``, independent of the order they are listed in."""
    ordered = np.array(sorted(ids), dtype=np.int64)
    return set(np.random.default_rng(seed).permutation(ordered)[:count].tolist())


def split_annotations(
    ann: Path,
    out: Path,
    *,
    val_fraction: float | None = None,
    val_images: int | None = None,
    seed: int = 0,
    names: tuple[str, str] = ("train", "val"),
) -> tuple[Path, Path]:
    """Write ``out/instances_<names[0]>.json`` and ``out/instances_<names[1]>.json``; returns
    their paths. Exactly one of ``val_fraction`` (of the images, rounded, at least one) and
    ``val_images`` says how many images are held out."""
    if (val_fraction is None) == (val_images is None):
        raise InputError("give one of --val-fraction and --val-images")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if names[0] == names[1]:
        raise InputError(f"the two splits need two names, got {names[0]!r} twice")
    bad = [name for name in names if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name)]
    if bad:
        raise InputError(f"split name {bad[0]!r}: use letters, digits, '_', '-' and '.' (it becomes a file name)")
    paths = tuple(Path(out) / annotation_name(name) for name in names)
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise InputError(f"{', '.join(existing)} exists already: split into another --out, or remove it")
    data = _load(ann)
    ids = [image["id"] for image in data["images"]]
    count = val_images if val_images is not None else max(1, round(val_fraction * len(ids)))
    if not 0 < count < len(ids):
        raise InputError(f"holding out {count} of {len(ids)} images leaves a split empty")
    held = held_out_ids(ids, count, seed)
    kept = set(ids) - held
    anns = [a for a in data.get("annotations", []) if isinstance(a, dict)]
    image_of = [a.get("image_id") if isinstance(a.get("image_id"), int) else None for a in anns]
    orphans = sum(1 for i in image_of if i not in kept and i not in held)
    if orphans:
        log.warning("%d annotations name no image of %s: left out of both splits", orphans, ann)
    Path(out).mkdir(parents=True, exist_ok=True)
    for path, side in zip(paths, (kept, held)):
        part = {
            **data,
            "images": [im for im in data["images"] if im["id"] in side],
            "annotations": [a for a, i in zip(anns, image_of) if i in side],
        }
        write_text_atomic(path, json.dumps(part, separators=(",", ":")))
        log.info("wrote %s: %d images, %d annotations", path, len(part["images"]), len(part["annotations"]))
    return paths
