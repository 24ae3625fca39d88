"""Read a COCO-format detection set once, clean it at the edge, and load its images.

Cleaning follows torchvision's ``references/detection/coco_utils.py``: boxes are clamped to
the image, zero-size boxes dropped, crowd boxes kept apart. Every dropped or altered box is
counted on its image so that the counts can travel with the crops into the manifest.

The annotation file is streamed, checked (:mod:`jigsawdata.coco.validate`) and hashed in one read,
and the set is held as two numpy tables (:class:`ImageTable`): the images in id order, each
image's annotations one id-ordered run of box rows, 46 bytes per box and 49 plus the file
name per image. ``source.images[i]`` makes that image's :class:`ImageRecord` when asked, so the
builder holds Python objects for one chunk of images at a time, whatever the set's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jigsawdata.columns import empty
from jigsawdata.errors import InputError
from jigsawdata.layout import ANNOTATION_GLOB, annotation_name
from jigsawdata.shardset.manifest import ClassInfo

from .jsonstream import InvalidJson, open_document
from .validate import BOX_PROBLEMS, OUTSIDE_IMAGES, AnnotationColumns, ImageColumns, check_coco

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


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


BOX_REASONS = (None, "clipped_boxes", "degenerate_boxes", "outside_boxes") + BOX_PROBLEMS[1:]
"""What a box row's ``reason`` code stands for; codes up to ``clipped_boxes`` are kept boxes."""
_CLIPPED = 1
_PROBLEM_SHIFT = BOX_REASONS.index(BOX_PROBLEMS[1]) - 1
"""validate's BOX_PROBLEMS code + this = the BOX_REASONS code."""


_IMAGE_ROW = np.dtype(
    [
        ("image_id", "<i8"),
        ("width", "<i8"),
        ("height", "<i8"),
        ("name_start", "<i8"),
        ("name_end", "<i8"),
        ("box_end", "<i8"),
        ("outside", "?"),
    ]
)
"""An image: its file name is ``names[name_start:name_end]``, its box rows end at ``box_end``
(and start where the previous image's end), ``outside`` is the OUTSIDE_IMAGES skip."""
_BOX_ROW = np.dtype([("ann_id", "<i8"), ("bbox", "<f8", (4,)), ("label", "<i4"), ("iscrowd", "?"), ("reason", "i1")])
"""An annotation: ``bbox`` is COCO x, y, w, h clamped to the image (NaN when the box was
unusable), ``reason`` indexes BOX_REASONS. Rows rather than a column per field: an image's
annotations are one contiguous slice."""


@dataclass(frozen=True)
class _Columns:
    """A set's images in id order, and their annotations, each image's in annotation-id order."""

    images: np.ndarray  # _IMAGE_ROW
    names: np.ndarray  # uint8: the file names (UTF-8) in file order
    boxes: np.ndarray  # _BOX_ROW
    category_ids: tuple[int, ...]  # by label

    def record(self, i: int) -> ImageRecord:
        image = self.images[i]
        rows = self.boxes[(int(self.images["box_end"][i - 1]) if i else 0) : int(image["box_end"])]
        boxes, dropped = [], {}
        for ann_id, bbox, label, crowd, reason in zip(
            rows["ann_id"].tolist(),
            rows["bbox"].tolist(),
            rows["label"].tolist(),
            rows["iscrowd"].tolist(),
            rows["reason"].tolist(),
        ):
            if reason:
                dropped[BOX_REASONS[reason]] = dropped.get(BOX_REASONS[reason], 0) + 1
            if reason <= _CLIPPED:
                boxes.append(GtBox(ann_id, self.category_ids[label], label, tuple(bbox), crowd))
        name = self.names[int(image["name_start"]) : int(image["name_end"])].tobytes().decode("utf-8", "surrogatepass")
        return ImageRecord(
            int(image["image_id"]),
            name,
            int(image["width"]),
            int(image["height"]),
            tuple(boxes),
            dropped,
            OUTSIDE_IMAGES if image["outside"] else None,
        )


class ImageTable(Sequence[ImageRecord]):
    """The images of a set in id order: an item is its :class:`ImageRecord`, made when asked;
    a slice is a view on the same columns (``images[part::parts]``), never a copy."""

    def __init__(self, columns: _Columns, rows: range | None = None) -> None:
        self._columns = columns
        self._rows = range(len(columns.images)) if rows is None else rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return ImageTable(self._columns, self._rows[index])
        return self._columns.record(self._rows[index])

    def __iter__(self) -> Iterator[ImageRecord]:
        return map(self._columns.record, self._rows)


@dataclass(frozen=True)
class CocoSource:
    ann_file: Path
    images_dir: Path
    ann_sha256: str
    classes: tuple[ClassInfo, ...]
    images: ImageTable
    orphan_annotations: int
    """Annotations whose ``image_id`` names no image; they cannot be used."""
    from_coco: bool = False
    """The images carry COCO's ``coco_url``/``flickr_url`` fields: a COCO-derived set."""

    @property
    def background_label(self) -> int:
        return len(self.classes)


def resolve_coco_root(root: Path, split: str, option: str = "--split") -> tuple[Path, Path]:
    """Map a COCO root to ``(annotations/instances_<split>.json, <split>/)``; ``option`` is
    the flag that names ``split``, for the hint when it is missing."""
    ann = root / "annotations" / annotation_name(split)
    if not ann.is_file():
        found = sorted(p.name for p in (root / "annotations").glob(ANNOTATION_GLOB))
        hint = f"; found {', '.join(found)} (use {option})" if found else ""
        raise InputError(f"annotation file not found: {ann}{hint}")
    return ann, root / split


def _clean_boxes(bbox: np.ndarray, width: np.ndarray, height: np.ndarray, problem: np.ndarray) -> np.ndarray:
    """Clamp COCO boxes to their images, in place; returns each box's BOX_REASONS code. The
    float operations are those of one box at a time in Python, so the boxes are the same bits."""
    x, y, w, h = bbox.T
    # NaN rows were unusable already (``problem``); x + w of huge finite numbers overflows to
    # inf, which the clamp to the image then handles.
    with np.errstate(invalid="ignore", over="ignore"):
        x0, y0 = np.maximum(0.0, x), np.maximum(0.0, y)
        x1, y1 = np.minimum(width, x + w), np.minimum(height, y + h)
        reason = np.select(
            [
                problem > 0,
                ~((w > 0) & (h > 0)),
                (x1 <= x0) | (y1 <= y0),
                (x0 != x) | (y0 != y) | (x1 != x + w) | (y1 != y + h),
            ],
            [
                problem + _PROBLEM_SHIFT,
                BOX_REASONS.index("degenerate_boxes"),
                BOX_REASONS.index("outside_boxes"),
                _CLIPPED,
            ],
            0,
        ).astype(np.int8)
        bbox[:, 0], bbox[:, 1], bbox[:, 2], bbox[:, 3] = x0, y0, x1 - x0, y1 - y0
    return reason


_BLOCK = 1 << 16
"""Box rows filled at a time: the temporaries of cleaning stay small whatever the set's size."""


def _columns(
    images: ImageColumns, anns: AnnotationColumns, labels: np.ndarray, classes: tuple[ClassInfo, ...]
) -> tuple[_Columns, int]:
    """The checked columns in id order, boxes cleaned; also the number of orphan annotations.
    The tables live in memory of their own (:mod:`jigsawdata.columns`) and the boxes are filled a block
    at a time, so that the temporaries freed afterwards leave few holes in the heap."""
    by_id = np.argsort(images.id, kind="stable")
    table = empty((len(by_id),), _IMAGE_ROW)
    table["image_id"], table["width"], table["height"] = images.id[by_id], images.width[by_id], images.height[by_id]
    table["name_start"] = np.concatenate([[0], images.name_end[:-1]])[by_id]
    table["name_end"], table["outside"] = images.name_end[by_id], images.outside[by_id]
    image_id = table["image_id"]
    row = np.searchsorted(image_id, anns.image_id)
    kept = np.flatnonzero(image_id[np.minimum(row, len(image_id) - 1)] == anns.image_id)
    kept = kept[np.lexsort((anns.id[kept], row[kept]))]
    row = row[kept]
    table["box_end"] = np.cumsum(np.bincount(row, minlength=len(table)))
    boxes = empty((len(kept),), _BOX_ROW)
    for start in range(0, len(kept), _BLOCK):
        ann, image, part = kept[start : start + _BLOCK], row[start : start + _BLOCK], boxes[start : start + _BLOCK]
        part["ann_id"], part["label"], part["iscrowd"] = anns.id[ann], labels[ann], anns.iscrowd[ann]
        part["bbox"] = anns.bbox[ann]
        part["reason"] = _clean_boxes(
            part["bbox"],
            table["width"][image].astype(np.float64),
            table["height"][image].astype(np.float64),
            anns.problem[ann],
        )
    return _Columns(table, images.names, boxes, tuple(c.category_id for c in classes)), len(anns) - len(kept)


def load_coco(ann_file: Path, images_dir: Path, *, strict: bool = False) -> CocoSource:
    """Read, check (:mod:`jigsawdata.coco.validate`) and clean a COCO-format instances file.

    Raises :class:`InputError` on unusable input; ``strict`` also turns a bad box or a
    ``file_name`` outside ``images_dir`` into an error instead of a counted skip.
    """
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    if not ann_file.is_file():
        raise InputError(f"annotation file not found: {ann_file}")
    if not images_dir.is_dir():
        raise InputError(f"image folder not found: {images_dir}")
    digest = hashlib.sha256()
    with open(ann_file, "rb") as fh:  # read to its end (trailing data is an error): the digest is the file's
        try:
            checked = check_coco(open_document(fh, digest), images_dir, strict=strict)
        except InvalidJson as exc:  # undecodable bytes too (jsonstream words them as json.loads does)
            raise InputError(f"{ann_file} is not valid JSON: {exc}") from exc
        except InputError as exc:
            raise InputError(f"{ann_file}: {exc}") from exc

    classes = tuple(ClassInfo(i, c.id, c.name) for i, c in enumerate(checked.categories))
    category_ids = np.array([c.category_id for c in classes], dtype=np.int64)
    anns = checked.annotations
    labels = np.searchsorted(category_ids, anns.category_id)
    known = category_ids[np.minimum(labels, len(classes) - 1)] == anns.category_id if classes else labels < 0
    if not known.all():
        unknown = np.unique(anns.category_id[~known]).tolist()
        first = int(np.flatnonzero(~known)[0])
        raise InputError(
            f"{ann_file}: annotations use category ids missing from 'categories': {unknown} "
            f"(first: the annotation with id {int(anns.id[first])})"
        )
    if not len(checked.images):
        raise InputError(f"{ann_file} lists no images")
    if not classes:
        raise InputError(f"{ann_file} lists no categories: there is nothing to pre-train on")
    columns, orphans = _columns(checked.images, anns, labels, classes)
    if orphans:
        log.warning("%d annotations name an image id that is not in 'images'; ignored", orphans)
    return CocoSource(
        ann_file, images_dir, digest.hexdigest(), classes, ImageTable(columns), orphans, checked.from_coco
    )


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
    try:
        present = path.is_file()
    except OSError:  # a name longer than the filesystem allows: no such file can exist
        present = False
    if not present:
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


def load_rgb(
    path: Path, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image | None, str | None]:
    """:func:`decode_image` as ``(image, None)`` or ``(None, skip_reason)``."""
    decoded = decode_image(path, width, height, max_pixels)
    return decoded.image, decoded.skip
