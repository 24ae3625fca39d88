"""Read a COCO-format detection set once, clean it at the edge, and load its images.

Cleaning follows torchvision's ``references/detection/coco_utils.py``: boxes are clamped to
the image, zero-size boxes dropped, crowd boxes kept apart. Every dropped or altered box is
counted on its image so that the counts can travel with the crops into the manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .files import sha256_file
from .validate import check_coco

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ClassInfo:
    label: int
    category_id: int
    name: str


@dataclass(frozen=True)
class GtBox:
    ann_id: int
    category_id: int
    label: int
    bbox: tuple[float, float, float, float]
    """COCO ``x, y, w, h`` after clipping to the image."""
    iscrowd: bool


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: tuple[GtBox, ...]
    """Every usable object of the image, crowd boxes included (they still block negatives)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Annotations of this image that were dropped or altered, by reason."""
    skip: str | None = None
    """Why the image is left out before it is even opened (a path outside the image folder)."""


@dataclass(frozen=True)
class CocoSource:
    ann_file: Path
    images_dir: Path
    ann_sha256: str
    classes: tuple[ClassInfo, ...]
    images: tuple[ImageRecord, ...]
    orphan_annotations: int
    """Annotations whose ``image_id`` names no image; they cannot be used."""
    from_coco: bool = False
    """The images carry COCO's ``coco_url``/``flickr_url`` fields: a COCO-derived set."""

    @property
    def background_label(self) -> int:
        return len(self.classes)


def resolve_coco_root(root: Path, split: str) -> tuple[Path, Path]:
    """Map a COCO root to ``(annotations/instances_<split>.json, <split>/)``."""
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
        hint = f"; found {', '.join(found)} (use --split)" if found else ""
        raise InputError(f"annotation file not found: {ann}{hint}")
    return ann, root / split


def _clean_box(bbox, width: int, height: int) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """Clamp a COCO box to the image; return ``(box or None, reason or None)``."""
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        return None, "degenerate_boxes"
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        return None, "outside_boxes"
    clipped = (x0, y0, x1 - x0, y1 - y0)
    return clipped, ("clipped_boxes" if (x0, y0, x1, y1) != (x, y, x + w, y + h) else None)


def load_coco(ann_file: Path, images_dir: Path, *, strict: bool = False) -> CocoSource:
    """Read, check (:mod:`jigsawdata.validate`) and clean a COCO-format instances file.

    Raises :class:`InputError` on unusable input; ``strict`` also turns a bad box or a
    ``file_name`` outside ``images_dir`` into an error instead of a counted skip.
    """
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    if not ann_file.is_file():
        raise InputError(f"annotation file not found: {ann_file}")
    if not images_dir.is_dir():
        raise InputError(f"image folder not found: {images_dir}")
    try:
        raw = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{ann_file} is not valid JSON: {exc}") from exc
    try:
        checked = check_coco(raw, images_dir, strict=strict)
    except InputError as exc:
        raise InputError(f"{ann_file}: {exc}") from exc

    classes = tuple(ClassInfo(i, c.id, c.name) for i, c in enumerate(checked.categories))
    label_of = {c.category_id: c.label for c in classes}
    unknown = sorted({a.category_id for a in checked.annotations} - set(label_of))
    if unknown:
        raise InputError(f"annotations use category ids missing from 'categories': {unknown}")
    if not checked.images:
        raise InputError(f"{ann_file} lists no images")

    by_image: dict[int, list] = {im.id: [] for im in checked.images}
    orphans = 0
    for ann in checked.annotations:
        if ann.image_id in by_image:
            by_image[ann.image_id].append(ann)
        else:
            orphans += 1
    images = []
    for info in sorted(checked.images, key=lambda im: im.id):
        boxes, dropped = [], Counter()
        for ann in sorted(by_image[info.id], key=lambda a: a.id):
            box, reason = (None, ann.problem) if ann.bbox is None else _clean_box(ann.bbox, info.width, info.height)
            if reason:
                dropped[reason] += 1
            if box is None:
                continue
            boxes.append(GtBox(ann.id, ann.category_id, label_of[ann.category_id], box, ann.iscrowd))
        images.append(ImageRecord(info.id, info.file_name, info.width, info.height, tuple(boxes), dict(dropped),
                                  info.skip))
    if orphans:
        log.warning("%d annotations name an image id that is not in 'images'; ignored", orphans)
    return CocoSource(ann_file, images_dir, sha256_file(ann_file), classes, tuple(images), orphans, checked.from_coco)


DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image (width x height) decoded; larger ones are skipped as ``image_too_large``.
The largest photographs of COCO, LVIS and Objects365 are a few megapixels; a decoded
100-megapixel RGB image already takes 300 MB, and a 69-byte PNG can claim 4 gigapixels."""

_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class Decoded:
    image: Image.Image | None
    skip: str | None = None
    exif_orientation: int | None = None
    """The EXIF orientation applied when both the stored and the rotated view have the
    annotated size (so the choice is a guess worth recording); ``None`` otherwise."""


@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's global bomb check raises above 2 x ``MAX_IMAGE_PIXELS`` whatever the caller
    wants; :func:`decode_image` checks its own limit from the header instead."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit images are scaled (65535 -> 255) and float images stretched from
    [0, 1] (or from their own range when they leave it): Pillow's ``convert`` would clip them,
    turning a 16-bit photograph pure white."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (0.0, 1.0) if values.min() >= 0.0 and values.max() <= 1.0 else (values.min(), values.max())
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def decode_image(path: Path, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode an image to 8-bit RGB in the orientation whose size matches its annotation.

    COCO annotates the stored pixels for most images but some tools annotate the
    EXIF-rotated view; whichever of the two has the annotated size is the one the boxes
    refer to (the rotated view when both have it, recorded in ``exif_orientation``). An
    image larger than ``max_pixels`` is skipped from its header, before any decoding.
    """
    if not path.is_file():
        return Decoded(None, "image_missing")
    try:
        with _own_pixel_limit():
            img = Image.open(path)
            if img.width * img.height > max_pixels:
                img.close()
                return Decoded(None, "image_too_large")
            img.load()  # single-frame formats close their file here
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        candidates = [img]
        if orientation != 1:
            candidates.insert(0, ImageOps.exif_transpose(img))
        for candidate in candidates:
            if candidate.size == (width, height):
                both = len(candidates) == 2 and candidates[1].size == candidates[0].size
                return Decoded(to_rgb(candidate), None, orientation if both and candidate is not img else None)
        return Decoded(None, "image_size_mismatch")
    except MemoryError:
        return Decoded(None, "image_too_large")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        log.debug("cannot decode %s: %s", path, exc)
        return Decoded(None, "image_corrupt")


def load_image(image: ImageRecord, images_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """The pixels of one record of a :class:`CocoSource`, or why it is skipped."""
    if image.skip:
        return Decoded(None, image.skip)
    return decode_image(Path(images_dir) / image.file_name, image.width, image.height, max_pixels)


def load_rgb(path: Path, width: int, height: int,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image | None, str | None]:
    """:func:`decode_image` as ``(image, None)`` or ``(None, skip_reason)``."""
    decoded = decode_image(path, width, height, max_pixels)
    return decoded.image, decoded.skip
