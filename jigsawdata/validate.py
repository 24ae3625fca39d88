"""Check every field of a COCO-format annotation file that the builder reads, once, before
any work, so that bad input is an error naming its record or a counted skip, never a crash
half-way through a build and never wrong data.

- *Structural* defects make the whole file unusable and are an :class:`InputError` naming the
  record and field: a top-level list that is not a list, a record that is not an object,
  an image id, size or file name of the wrong type, two images (or categories, or
  annotations) with one id, a category without a name. Building anyway would cut one
  image's boxes from another image's pixels, or silently pick one of two class names.
- A single *bad box* (not four numbers, NaN or Inf) is a counted skip of that annotation
  (``malformed_boxes``, ``nonfinite_boxes``), or an error with ``strict``.
- An image whose ``file_name`` leaves the image folder (``../x.jpg``, an absolute path
  elsewhere) is a named skip (``path_outside_images``), or an error with ``strict``. The check
  is lexical, so symlinks *inside* the folder (a ``train2017`` that links to other storage)
  are followed.

Known COCO-format variants need no flags: LVIS v1 (no ``file_name``; taken from
``coco_url``, no ``iscrowd``), Objects365 and custom sets (``file_name`` with sub-folders).
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import InputError

log = logging.getLogger(__name__)

OUTSIDE_IMAGES = "path_outside_images"
MALFORMED_BOX = "malformed_boxes"
NONFINITE_BOX = "nonfinite_boxes"


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class Image:
    id: int
    file_name: str
    """Relative to the image folder, normalised (``a/./b.jpg`` -> ``a/b.jpg``)."""
    width: int
    height: int
    skip: str | None = None
    """Why this image cannot be used although the file is well-formed (its path)."""


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float] | None
    """``None`` when the box was unusable; ``problem`` says why."""
    iscrowd: bool
    problem: str | None = None


@dataclass(frozen=True)
class CheckedSet:
    categories: tuple[Category, ...]
    images: tuple[Image, ...]
    annotations: tuple[Annotation, ...]
    from_coco: bool
    """The images carry COCO's ``coco_url``/``flickr_url``: a COCO-derived set (COCO, LVIS)."""


def _where(kind: str, index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{kind}[{index}]" + (f" (id {rid!r})" if rid is not None else "")


def _int(value: Any, where: str, field: str, *, minimum: int | None = None) -> int:
    """An integer field; integral floats (``640.0``, written by some tools) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: '{field}' must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(f"{where}: '{field}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{where}: '{field}' must be >= {minimum}, got {value!r}")
    return int(value)


def _records(raw: dict, key: str) -> list[dict]:
    value = raw.get(key)
    if not isinstance(value, list):
        raise InputError(f"'{key}' must be a list, got {type(value).__name__}")
    for i, record in enumerate(value):
        if not isinstance(record, dict):
            raise InputError(f"{key}[{i}] must be an object, got {type(record).__name__}")
    return value


def _categories(raw: dict) -> tuple[Category, ...]:
    seen: dict[int, str] = {}
    for i, cat in enumerate(_records(raw, "categories")):
        where = _where("categories", i, cat)
        cid = _int(cat.get("id"), where, "id", minimum=1)  # 0 is the background's category_id in the shards
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        if cid in seen:
            raise InputError(f"{where}: category id {cid} is used twice ({seen[cid]!r} and {name!r})")
        seen[cid] = name
    return tuple(Category(cid, seen[cid]) for cid in sorted(seen))


def _name_from_url(url: str, images_dir: Path) -> str:
    """LVIS names an image by its COCO URL (``.../train2017/000000391895.jpg``): the image is
    ``train2017/<name>`` when ``--images`` is the COCO root, else ``<name>``."""
    parts = posixpath.normpath(urlparse(url).path).split("/")
    if len(parts) >= 2 and (images_dir / parts[-2]).is_dir():
        return f"{parts[-2]}/{parts[-1]}"
    return parts[-1]


def inside_name(file_name: str, images_dir: Path) -> str | None:
    """``file_name`` relative to ``images_dir`` and normalised, or ``None`` when it leaves the
    folder. Lexical on purpose: symlinks inside the folder are followed, not judged."""
    if "\0" in file_name:
        return None
    if posixpath.isabs(file_name) or os.path.isabs(file_name):
        for base in {os.path.abspath(images_dir), os.path.realpath(images_dir)}:
            rel = os.path.relpath(os.path.normpath(file_name), base)
            if not rel.startswith(".."):
                return Path(rel).as_posix()
        return None
    name = posixpath.normpath(file_name)
    if name in (".", "") or name == ".." or name.startswith("../"):
        return None
    return name


def _images(raw: dict, images_dir: Path, strict: bool) -> tuple[Image, ...]:
    first_of: dict[int, int] = {}
    images = []
    for i, im in enumerate(_records(raw, "images")):
        where = _where("images", i, im)
        image_id = _int(im.get("id"), where, "id")
        if image_id in first_of:
            raise InputError(f"{where}: image id {image_id} is used twice (images[{first_of[image_id]}] too); "
                             "boxes of one would be cut from the other's pixels")
        first_of[image_id] = i
        width = _int(im.get("width"), where, "width", minimum=1)
        height = _int(im.get("height"), where, "height", minimum=1)
        file_name = im.get("file_name")
        if file_name is None and isinstance(im.get("coco_url"), str):
            file_name = _name_from_url(im["coco_url"], images_dir)
        if not isinstance(file_name, str) or not file_name:
            raise InputError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
        name = inside_name(file_name, images_dir)
        skip = None
        if name is None:
            if strict:
                raise InputError(f"{where}: 'file_name' {file_name!r} is outside the image folder {images_dir}")
            log.warning("%s: file_name %r is outside the image folder; skipped", where, file_name)
            name, skip = file_name, OUTSIDE_IMAGES
        images.append(Image(image_id, name, width, height, skip))
    return tuple(images)


def _bbox(value: Any) -> tuple[tuple[float, float, float, float] | None, str | None]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        return None, MALFORMED_BOX
    box = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in box):
        return None, NONFINITE_BOX
    return box, None  # type: ignore[return-value]


def _annotations(raw: dict, strict: bool) -> tuple[Annotation, ...]:
    first_of: dict[int, int] = {}
    out = []
    for i, ann in enumerate(_records(raw, "annotations")):
        where = _where("annotations", i, ann)
        ann_id = _int(ann.get("id"), where, "id")
        if ann_id in first_of:
            raise InputError(f"{where}: annotation id {ann_id} is used twice (annotations[{first_of[ann_id]}] too)")
        first_of[ann_id] = i
        image_id = _int(ann.get("image_id"), where, "image_id")
        category_id = _int(ann.get("category_id"), where, "category_id")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise InputError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        box, problem = _bbox(ann.get("bbox"))
        if problem:
            if strict:
                raise InputError(f"{where}: 'bbox' must be four finite numbers [x, y, w, h], got {ann.get('bbox')!r}")
            log.warning("%s: bbox %r is not four finite numbers; skipped (%s)", where, ann.get("bbox"), problem)
        out.append(Annotation(ann_id, image_id, category_id, box, bool(crowd), problem))
    return tuple(out)


def check_coco(raw: Any, images_dir: Path, *, strict: bool = False) -> CheckedSet:
    """Every field the builder reads, type- and range-checked. Raises :class:`InputError`."""
    if not isinstance(raw, dict):
        raise InputError(f"not a COCO instances file: the top level is a {type(raw).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise InputError(f"not a COCO instances file: no '{key}' list")
    categories = _categories(raw)
    images = _images(raw, Path(images_dir), strict)
    annotations = _annotations(raw, strict)
    head = raw["images"][:100]
    from_coco = any("coco_url" in im or "flickr_url" in im for im in head)
    return CheckedSet(categories, images, annotations, from_coco)
