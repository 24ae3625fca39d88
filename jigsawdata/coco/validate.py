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

The file is read one record at a time (:mod:`jigsawdata.coco.jsonstream`) and each record is
checked as it is read and packed straight into numpy columns (:class:`ImageColumns`,
:class:`AnnotationColumns`: about 60 bytes per annotation, 35 plus the file name per image),
so a set of millions of boxes is checked without a Python object per record. Defects are
reported once the whole file is read, in a fixed order whatever the order of the file's
lists: categories, then images, then annotations, each in record order, the checks of a
record in the order its fields are listed above. Duplicate ids are found by sorting the id
column at the end, and reported as if found while reading.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import unicodedata
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from jigsawdata.columns import Column
from jigsawdata.errors import InputError
from jigsawdata.shardset.manifest import BACKGROUND_NAME

from .jsonstream import ArrayStream, ObjectStream

log = logging.getLogger(__name__)

OUTSIDE_IMAGES = "path_outside_images"
MALFORMED_BOX = "malformed_boxes"
NONFINITE_BOX = "nonfinite_boxes"
BOX_PROBLEMS = (None, MALFORMED_BOX, NONFINITE_BOX)
"""What :attr:`AnnotationColumns.problem` codes stand for."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class ImageColumns:
    """The images, in file order."""

    id: np.ndarray  # int64
    width: np.ndarray  # int64
    height: np.ndarray  # int64
    names: np.ndarray  # uint8
    """Every file name (UTF-8), one after another: relative to the image folder and normalised
    (``a/./b.jpg`` -> ``a/b.jpg``), or as written when it is ``outside``."""
    name_end: np.ndarray  # int64: where each name ends in ``names``
    outside: np.ndarray  # bool: the file name leaves the image folder (a skip, OUTSIDE_IMAGES)

    def __len__(self) -> int:
        return len(self.id)


@dataclass(frozen=True)
class AnnotationColumns:
    """The annotations, in file order."""

    id: np.ndarray  # int64
    image_id: np.ndarray  # int64
    category_id: np.ndarray  # int64
    bbox: np.ndarray  # (N, 4) float64, COCO x, y, w, h; NaN where ``problem`` says it is unusable
    iscrowd: np.ndarray  # bool
    problem: np.ndarray  # int8, index into BOX_PROBLEMS

    def __len__(self) -> int:
        return len(self.id)


@dataclass(frozen=True)
class CheckedSet:
    categories: tuple[Category, ...]
    images: ImageColumns
    annotations: AnnotationColumns
    from_coco: bool
    """The images carry COCO's ``coco_url``/``flickr_url``: a COCO-derived set (COCO, LVIS)."""


_At = tuple[str, int, Any]
"""A record's place: (list, index, record); worded by :func:`_where` only for a message."""


def _where(kind: str, index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{kind}[{index}]" + (f" (id {rid!r})" if rid is not None else "")


def _int(value: Any, at: _At, field: str, *, minimum: int | None = None) -> int:
    """An integer field; integral floats (``640.0``, written by some tools) are accepted. The
    columns are 64-bit, so larger integers are refused here rather than overflowing later."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{_where(*at)}: '{field}' must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(f"{_where(*at)}: '{field}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{_where(*at)}: '{field}' must be >= {minimum}, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise InputError(f"{_where(*at)}: '{field}' must fit in 64 bits, got {value!r}")
    return int(value)


_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})
"""Unicode categories a class name may not hold: control characters (newlines, tabs), lone
surrogates (which no UTF-8 file can hold) and line or paragraph separators. Joiners and
other format characters (Persian, Hindi, emoji) and every space are fine."""


def _name_from_url(url: str, images_dir: Path) -> str:
    """LVIS names an image by its COCO URL (``.../train2017/000000391895.jpg``): the image is
    ``train2017/<name>`` when ``--image-dir`` is the COCO root, else ``<name>``."""
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
            rel = Path(os.path.relpath(os.path.normpath(file_name), base))
            if rel.parts and rel.parts[0] != "..":  # "..x.jpg" is a file inside, not a way out
                return rel.as_posix()
        return None
    name = posixpath.normpath(file_name)
    if name in (".", "") or name == ".." or name.startswith("../"):
        return None
    return name


def _bbox(value: Any) -> tuple[tuple[float, float, float, float] | None, str | None]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
    ):
        return None, MALFORMED_BOX
    try:
        box = tuple(float(v) for v in value)
    except OverflowError:  # an integer beyond any float
        return None, NONFINITE_BOX
    if not all(math.isfinite(v) for v in box):
        return None, NONFINITE_BOX
    return box, None  # type: ignore[return-value]


class _List:
    """One top-level list, its records checked and packed as they are read. The first defect
    is kept, not raised, so that :func:`check_coco` reports the file's defects in a fixed order."""

    key = ""

    def __init__(self) -> None:
        self.defect: InputError | None = None
        """Not a list, or a record that is not an object: these come before any field's."""
        self.record_defect: tuple[int, InputError] | None = None
        """The first record with a bad field, and the error."""

    def read(self, value: Any) -> None:
        if not isinstance(value, (list, ArrayStream)):
            self.defect = InputError(f"'{self.key}' must be a list, got {type(value).__name__}")
            return
        for i, record in enumerate(value):
            if not isinstance(record, dict):
                if self.defect is None:
                    self.defect = InputError(f"{self.key}[{i}] must be an object, got {type(record).__name__}")
            elif self.defect is None and self.record_defect is None:
                try:
                    self.check(i, record)
                except InputError as exc:
                    self.record_defect = (i, exc)
                if (i + 1) % _PENDING == 0:
                    self.flush()

    def check(self, index: int, record: dict) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Move the packed records to the columns."""

    def first_defect(self) -> InputError | None:
        return self.defect or (self.record_defect[1] if self.record_defect else None)


class _Categories(_List):
    key = "categories"

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[int, str] = {}

    def check(self, index: int, cat: dict) -> None:
        at = ("categories", index, cat)
        cid = _int(cat.get("id"), at, "id", minimum=1)  # 0 is the background's category_id in the shards
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{_where(*at)}: 'name' must be a non-empty string, got {name!r}")
        if any(unicodedata.category(ch) in _UNPRINTABLE for ch in name):
            raise InputError(
                f"{_where(*at)}: 'name' must be printable text (it names the class in the "
                f"manifest and the dataset card), got {name!r}"
            )
        if cid in self.names:
            raise InputError(f"{_where(*at)}: category id {cid} is used twice ({self.names[cid]!r} and {name!r})")
        self.names[cid] = name

    def categories(self) -> tuple[Category, ...]:
        ids_of: dict[str, list[int]] = {}
        for cid in sorted(self.names):
            ids_of.setdefault(self.names[cid], []).append(cid)
        shared = {name: ids for name, ids in ids_of.items() if len(ids) > 1}
        if BACKGROUND_NAME in ids_of:
            log.warning(
                "category %s is named %r, as the shards' background class is; each keeps its own label, "
                "and the dataset card adds the category id to both names",
                ids_of[BACKGROUND_NAME][0],
                BACKGROUND_NAME,
            )
        if shared:  # legal, and each keeps its own label, but the names no longer tell the classes apart
            log.warning(
                "categories share a name: %s; each keeps its own label, and the dataset card "
                "adds the category id to those names",
                "; ".join(f"{name!r} (ids {', '.join(map(str, ids))})" for name, ids in shared.items()),
            )
        return tuple(Category(cid, self.names[cid]) for cid in sorted(self.names))


_PENDING = 1 << 16
"""Records packed into ``array.array`` fields (fast to append to) before they move to their
columns (:mod:`jigsawdata.columns`), so that the heap holds a few of these at a time."""


class _IdList(_List):
    """A list whose records have unique ids: checked by sorting the id column at the end, as
    one Python set of ids would cost more than all the columns together. ``FIELDS`` are the
    packed fields (``array.array`` typecodes), each appended to once per record."""

    FIELDS = {"ids": "q", "float_ids": "B"}  # float_ids: the id was written as a float (2.0), as messages quote it

    def __init__(self) -> None:
        super().__init__()
        self._columns = {name: Column() for name in self.FIELDS}
        self._pack()

    def _pack(self) -> None:
        for name, code in self.FIELDS.items():
            setattr(self, name, array(code))

    def flush(self) -> None:
        for name, code in self.FIELDS.items():
            self._columns[name].add(np.frombuffer(getattr(self, name), dtype=code))
        self._pack()

    def column(self, name: str) -> np.ndarray:
        """A field's column; the list takes no more records."""
        self.flush()
        return self._columns[name].array()

    def add_id(self, record: dict, at: _At) -> None:
        value = record.get("id")
        # >= 0: an image id seeds that image's random generator, and a negative annotation id
        # marks a background crop in the index.
        self.ids.append(_int(value, at, "id", minimum=0))
        self.float_ids.append(isinstance(value, float))

    def duplicate(self, index: int, first: int, rid: int) -> InputError:
        raise NotImplementedError

    def first_defect(self) -> InputError | None:
        if self.defect:
            return self.defect
        ids = self.column("ids")
        order = np.argsort(ids, kind="stable")  # equal ids keep file order
        ordered = ids[order]
        again = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
        if again.size:
            k = int(again[np.argmin(order[again])])
            index, rid = int(order[k]), int(ordered[k])
            first = int(order[np.searchsorted(ordered, rid)])
            if self.record_defect is None or index <= self.record_defect[0]:  # the id is checked first
                return self.duplicate(index, first, rid)
        return self.record_defect[1] if self.record_defect else None

    def where(self, index: int) -> str:
        """A record as :func:`_where` words it, its id as written (``2`` or ``2.0``)."""
        rid = int(self.column("ids")[index])
        return f"{self.key}[{index}] (id {float(rid) if self.column('float_ids')[index] else rid})"


class _Images(_IdList):
    key = "images"
    FIELDS = {**_IdList.FIELDS, "width": "q", "height": "q", "name_end": "q", "names": "B", "outside": "B"}

    def __init__(self, images_dir: Path, strict: bool) -> None:
        super().__init__()
        self.images_dir, self.strict = images_dir, strict
        self.from_coco = False
        self._names_before = 0  # name bytes already moved to the column

    def flush(self) -> None:
        self._names_before += len(self.names)
        super().flush()

    def check(self, index: int, im: dict) -> None:
        at = ("images", index, im)
        self.add_id(im, at)
        width = _int(im.get("width"), at, "width", minimum=1)
        height = _int(im.get("height"), at, "height", minimum=1)
        file_name = im.get("file_name")
        if file_name is None and isinstance(im.get("coco_url"), str):
            file_name = _name_from_url(im["coco_url"], self.images_dir)
        if not isinstance(file_name, str) or not file_name:
            raise InputError(f"{_where(*at)}: 'file_name' must be a non-empty string, got {file_name!r}")
        name = inside_name(file_name, self.images_dir)
        outside = name is None
        if outside:
            if self.strict:
                raise InputError(
                    f"{_where(*at)}: 'file_name' {file_name!r} is outside the image folder {self.images_dir}"
                )
            log.warning("%s: file_name %r is outside the image folder; skipped", _where(*at), file_name)
            name = file_name
        self.width.append(width)
        self.height.append(height)
        self.names.frombytes(name.encode("utf-8", "surrogatepass"))
        self.name_end.append(self._names_before + len(self.names))
        self.outside.append(outside)
        if index < 100 and ("coco_url" in im or "flickr_url" in im):
            self.from_coco = True

    def duplicate(self, index: int, first: int, rid: int) -> InputError:
        return InputError(
            f"{self.where(index)}: image id {rid} is used twice (images[{first}] too); "
            "boxes of one would be cut from the other's pixels"
        )

    def columns(self) -> ImageColumns:
        return ImageColumns(
            self.column("ids"),
            self.column("width"),
            self.column("height"),
            self.column("names"),
            self.column("name_end"),
            self.column("outside").view(bool),
        )


_NO_BOX = (math.nan,) * 4


class _Annotations(_IdList):
    key = "annotations"
    FIELDS = {**_IdList.FIELDS, "image_id": "q", "category_id": "q", "bbox": "d", "iscrowd": "B", "problem": "b"}

    def __init__(self, strict: bool) -> None:
        super().__init__()
        self.strict = strict

    def check(self, index: int, ann: dict) -> None:
        at = ("annotations", index, ann)
        self.add_id(ann, at)
        image_id = _int(ann.get("image_id"), at, "image_id")
        category_id = _int(ann.get("category_id"), at, "category_id")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise InputError(f"{_where(*at)}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        box, problem = _bbox(ann.get("bbox"))
        if problem:
            if self.strict:
                raise InputError(
                    f"{_where(*at)}: 'bbox' must be four finite numbers [x, y, w, h], got {ann.get('bbox')!r}"
                )
            log.warning("%s: bbox %r is not four finite numbers; skipped (%s)", _where(*at), ann.get("bbox"), problem)
        self.image_id.append(image_id)
        self.category_id.append(category_id)
        self.bbox.extend(box or _NO_BOX)
        self.iscrowd.append(bool(crowd))
        self.problem.append(BOX_PROBLEMS.index(problem))

    def duplicate(self, index: int, first: int, rid: int) -> InputError:
        return InputError(f"{self.where(index)}: annotation id {rid} is used twice (annotations[{first}] too)")

    def columns(self) -> AnnotationColumns:
        return AnnotationColumns(
            self.column("ids"),
            self.column("image_id"),
            self.column("category_id"),
            self.column("bbox").reshape(-1, 4),
            self.column("iscrowd").view(bool),
            self.column("problem"),
        )


def check_coco(raw: Any, images_dir: Path, *, strict: bool = False) -> CheckedSet:
    """Every field the builder reads, type- and range-checked. Raises :class:`InputError`.

    ``raw`` is the file read whole (a dict) or streamed (a :class:`~.jsonstream.ObjectStream`,
    read here to its end; a list given twice counts once, the last time, as with ``json``).
    """
    if isinstance(raw, dict):
        members = raw.items()
    elif isinstance(raw, ObjectStream):
        members = raw
    else:
        raise InputError(f"not a COCO instances file: the top level is a {type(raw).__name__}, not an object")
    images_dir = Path(images_dir)
    make = {
        "categories": _Categories,
        "images": lambda: _Images(images_dir, strict),
        "annotations": lambda: _Annotations(strict),
    }
    lists: dict[str, Any] = {}
    for key, value in members:
        if key in make:
            lists[key] = make[key]()
            lists[key].read(value)
    for key in ("images", "annotations", "categories"):
        if key not in lists:
            raise InputError(f"not a COCO instances file: no '{key}' list")
    for key in ("categories", "images", "annotations"):
        defect = lists[key].first_defect()
        if defect:
            raise defect
    images = lists["images"]
    return CheckedSet(
        lists["categories"].categories(), images.columns(), lists["annotations"].columns(), images.from_coco
    )
