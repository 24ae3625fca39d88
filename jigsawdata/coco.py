"""Read a COCO-format detection set once, clean it at the edge, and load its images.

Cleaning follows torchvision's ``references/detection/coco_utils.py``: boxes are clamped to
the image, zero-size boxes dropped, crowd boxes kept apart. Every dropped or altered box is
counted on its image so that the counts can travel with the crops into the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def load_coco(ann_file: Path, images_dir: Path) -> CocoSource:
    """Read and clean a COCO instances file. Raises :class:`InputError` on unusable input."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    if not ann_file.is_file():
        raise InputError(f"annotation file not found: {ann_file}")
    if not images_dir.is_dir():
        raise InputError(f"image folder not found: {images_dir}")
    try:
        raw = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{ann_file} is not valid JSON: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw, dict) or key not in raw:
            raise InputError(f"{ann_file} is not a COCO instances file: no '{key}' list")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()

    cat_ids = sorted(coco.cats)
    classes = tuple(ClassInfo(i, cid, coco.cats[cid]["name"]) for i, cid in enumerate(cat_ids))
    label_of = {c.category_id: c.label for c in classes}
    unknown = sorted({a["category_id"] for a in raw["annotations"]} - set(label_of))
    if unknown:
        raise InputError(f"annotations use category ids missing from 'categories': {unknown}")
    if not raw["images"]:
        raise InputError(f"{ann_file} lists no images")

    images = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        width, height = int(info["width"]), int(info["height"])
        boxes, dropped = [], Counter()
        for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
            box, reason = _clean_box(ann["bbox"], width, height)
            if reason:
                dropped[reason] += 1
            if box is None:
                continue
            boxes.append(GtBox(int(ann["id"]), int(ann["category_id"]), label_of[ann["category_id"]],
                               box, bool(ann.get("iscrowd", 0))))
        images.append(ImageRecord(int(image_id), info["file_name"], width, height, tuple(boxes), dict(dropped)))
    orphans = sum(1 for a in raw["annotations"] if a["image_id"] not in coco.imgs)
    if orphans:
        log.warning("%d annotations name an image id that is not in 'images'; ignored", orphans)
    from_coco = any("coco_url" in im or "flickr_url" in im for im in raw["images"][:100])
    return CocoSource(ann_file, images_dir, sha256_file(ann_file), classes, tuple(images), orphans, from_coco)


def load_rgb(path: Path, width: int, height: int) -> tuple[Image.Image | None, str | None]:
    """Decode an image to RGB in the orientation whose size matches its annotation.

    COCO annotates the stored pixels for most images but some tools annotate the
    EXIF-rotated view; whichever of the two has the annotated size is the one the boxes
    refer to. Returns ``(image, None)`` or ``(None, skip_reason)``.
    """
    if not path.is_file():
        return None, "image_missing"
    try:
        img = Image.open(path)
        img.load()  # single-frame formats close their file here
        candidates = [img]
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            candidates.insert(0, ImageOps.exif_transpose(img))
        for candidate in candidates:
            if candidate.size == (width, height):
                return (candidate if candidate.mode == "RGB" else candidate.convert("RGB")), None
        return None, "image_size_mismatch"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        log.debug("cannot decode %s: %s", path, exc)
        return None, "image_corrupt"
