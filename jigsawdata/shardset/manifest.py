"""The shard set's manifest: what was built, from what, how, and how to check it.

Written last, atomically, so its presence means the shard set is complete. :class:`Manifest`
is its one reading. :meth:`Manifest.from_json` checks everything before any file it names
is opened: the format version (a newer major version is refused rather than misread), every
name a safe relative path of the right kind and none listed twice, every sha256 well formed,
every count a count. :meth:`Manifest.to_json` gives back the JSON it was read from: keys
this version does not know ride along unchanged (at the top level, in groups, shards, the
source and the tool), so a set fetched and written back is the set that was published.

A multi-machine build writes one partial manifest per part; :func:`jigsawdata.build.merge.merge_parts` joins them
and refuses parts that were built from different inputs or settings.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from jigsawdata.errors import InputError
from jigsawdata.files import write_json_atomic
from jigsawdata.layout import CARD_NAME, INDEX_NAME, MANIFEST_NAME

from .grouping import GROUPS

log = logging.getLogger(__name__)

FORMAT_VERSION = "1.0"
_SHA256 = re.compile(r"[0-9a-f]{64}")

BUILD_FIELDS = ("format_version", "tool", "source", "params", "classes", "background", "parts")
"""What identifies a build: the parts of one build agree on all of these."""


class ManifestError(InputError):
    """The manifest is malformed or names files unsafely: the shard set is refused unread."""


@dataclass(frozen=True)
class ListedFile:
    """A file of a shard set that the manifest vouches for."""

    name: str
    """Relative to the shard-set root, checked to stay inside it."""
    sha256: str
    size: int | None
    """Known for shards; ``None`` for their DALI indexes and the sample index."""
    limit: int = 0
    """Most bytes the file can hold: its ``size`` when known, else a bound from its sample
    count (a download never reads past it: a server streaming without end fills no disk)."""


def _checked_name(name, suffix: str) -> str:
    if not isinstance(name, str) or not name:
        raise ManifestError(f"manifest names a file {name!r}: not a path, refusing the shard set")
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\0" in name
        or any(p in ("", ".", "..") for p in parts)
        or PurePosixPath(name).is_absolute()
    ):
        raise ManifestError(f"manifest names an unsafe path {name!r}: refusing the shard set")
    if not name.endswith(suffix) or parts[-1] == suffix:
        raise ManifestError(f"manifest names {name!r} where a {suffix} file belongs: refusing the shard set")
    return name


def _checked_sha(value, name: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ManifestError(f"manifest gives no valid sha256 for {name!r} (got {value!r}): refusing the shard set")
    return value


def _checked_count(value, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"manifest gives no {what} for {name!r} (got {value!r}): refusing the shard set")
    return value


def _checked(value, kind: type, what: str, optional: bool = False):
    """``value`` when it is a ``kind`` (never a bool posing as an int), or ``None`` when
    ``optional`` and absent; else the manifest is refused."""
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ManifestError(f"manifest gives no valid {what} (got {value!r:.80}): refusing the shard set")
    return value


def _object(value, what: str) -> dict:
    return _checked(value, dict, what)


def _counts(value) -> dict | None:
    counts = _checked(value, dict, "'counts'", optional=True)
    if counts is not None:
        for key, n in counts.items():
            _checked(n, int, f"count {key!r}")
    return _plain(counts)


def _image_list(value, what: str) -> list | None:
    """``skipped_images`` or ``exif_orientation``: objects that each name an ``image_id``."""
    records = _checked(value, list, what, optional=True)
    for i, record in enumerate(records or ()):
        _checked(_object(record, f"{what}[{i}]").get("image_id"), int, f"{what}[{i}].image_id")
    return _plain(records)


def _plain(value):
    """JSON data of ``value``: records through their ``to_json``, containers copied."""
    if isinstance(value, _Record):
        return value.to_json()
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unknown(data: dict, cls) -> dict:
    """The keys of ``data`` that ``cls`` has no field for, kept to be written back."""
    known = {f.name for f in fields(cls)} - {"extra"}
    return {k: _plain(v) for k, v in data.items() if k not in known}


class _Record:
    """``to_json`` of a frozen dataclass read by its ``from_json``: its fields (an optional
    field that is ``None`` was absent, and stays absent), then its ``extra`` keys as read."""

    extra: dict

    def to_json(self) -> dict:
        data = _plain(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.default is None):
                data[f.name] = _plain(value)
        return data


@dataclass(frozen=True)
class ShardInfo(_Record):
    name: str
    """Path relative to the shard-set root, e.g. ``S/S-000000.tar``."""
    samples: int
    bytes: int
    sha256: str
    idx_sha256: str | None = None
    """Of the DALI index beside the shard, so a downloaded copy can be verified too
    (``None`` in sets made before it was recorded)."""
    extra: dict = field(default_factory=dict)

    @property
    def idx_name(self) -> str:
        return self.name[:-4] + ".idx"

    @classmethod
    def from_json(cls, data) -> ShardInfo:
        data = _object(data, "shard entry")
        name = _checked_name(data.get("name"), ".tar")
        size = _checked_count(data.get("bytes"), "byte count", name)
        samples = _checked_count(data.get("samples"), "sample count", name)
        digest = _checked_sha(data.get("sha256"), name)
        idx = _checked_sha(data["idx_sha256"], name[:-4] + ".idx") if "idx_sha256" in data else None
        return cls(name, samples, size, digest, idx, _unknown(data, cls))


@dataclass(frozen=True)
class GroupInfo(_Record):
    shards: tuple[ShardInfo, ...]
    samples: int
    bytes: int
    """The totals as the manifest states them (``verify`` checks them against the shards)."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, shards: Iterable[ShardInfo]) -> GroupInfo:
        shards = tuple(shards)
        return cls(shards, sum(s.samples for s in shards), sum(s.bytes for s in shards))

    @classmethod
    def from_json(cls, group: str, data) -> GroupInfo:
        shards = data.get("shards") if isinstance(data, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ManifestError(f"manifest group {group!r} has no list of shards: refusing the shard set")
        parsed = tuple(ShardInfo.from_json(s) for s in shards)
        return cls(
            parsed,
            _checked_count(data.get("samples"), "sample count", f"group {group}"),
            _checked_count(data.get("bytes"), "byte count", f"group {group}"),
            _unknown(data, cls),
        )


def _check_groups(manifest: Manifest) -> None:
    """Only the S, T and W groups, each listing shards of its own folder: a swapped or
    invented group would put crops of one shape in another's slots."""
    unknown = sorted(set(manifest.groups) - set(GROUPS))
    if unknown:
        raise ManifestError(
            f"manifest has groups {', '.join(map(repr, unknown))}; a shard set has only "
            f"{', '.join(GROUPS)}: refusing the shard set"
        )
    for group, info in manifest.groups.items():
        for shard in info.shards:
            if shard.name.split("/")[0] != group:
                raise ManifestError(f"manifest lists {shard.name!r} in group {group}: refusing the shard set")
    if manifest.part is None and not any(info.shards for info in manifest.groups.values()):
        raise ManifestError("manifest lists no shards: an empty shard set, nothing to train on or fetch")


def _check_labels(manifest: Manifest) -> None:
    """Class labels 0..C-1, each once, and background C: what the trainer's heads assume."""
    labels = sorted(c.label for c in manifest.classes)
    if labels != list(range(len(labels))) or manifest.background.label != len(labels):
        raise ManifestError(
            f"manifest's class labels are {labels} with background {manifest.background.label}; "
            f"they must be 0..C-1 once each and background C: refusing the shard set"
        )


@dataclass(frozen=True)
class ToolInfo(_Record):
    name: str
    version: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data) -> ToolInfo:
        data = _object(data, "'tool'")
        return cls(
            _checked(data.get("name"), str, "tool.name"),
            _checked(data.get("version"), str, "tool.version"),
            _unknown(data, cls),
        )


@dataclass(frozen=True)
class SourceInfo(_Record):
    """The annotation file a set was cut from, and its terms."""

    annotation_file: str
    sha256: str
    images: int
    orphan_annotations: int
    license: str | None = None
    license_given: bool | None = None
    """Both recorded since sets carry a dataset card; ``None`` in earlier ones."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data) -> SourceInfo:
        data = _object(data, "'source'")
        return cls(
            _checked(data.get("annotation_file"), str, "source.annotation_file"),
            _checked(data.get("sha256"), str, "source.sha256"),
            _checked(data.get("images"), int, "source.images"),
            _checked(data.get("orphan_annotations"), int, "source.orphan_annotations"),
            _checked(data.get("license"), str, "source.license", optional=True),
            _checked(data.get("license_given"), bool, "source.license_given", optional=True),
            _unknown(data, cls),
        )


BACKGROUND_NAME = "background"
"""The name of the shards' background class (label C, category id 0)."""


@dataclass(frozen=True)
class ClassInfo(_Record):
    """A class: its label in the shards, the source's category id and name."""

    label: int
    category_id: int
    name: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def _class_info(data, what: str) -> ClassInfo:
    data = _object(data, what)
    return ClassInfo(
        _checked(data.get("label"), int, f"{what}.label"),
        _checked(data.get("category_id"), int, f"{what}.category_id"),
        _checked(data.get("name"), str, f"{what}.name"),
        _unknown(data, ClassInfo),
    )


def major(version) -> int:
    return int(str(version).split(".", 1)[0])


def _check_version(data: dict, where: Path | str) -> None:
    version = data.get("format_version")
    if version is None:
        raise InputError(f"{where} has no format_version: not a jigsawdata manifest")
    try:
        newer = major(version) > major(FORMAT_VERSION)
    except ValueError:
        raise InputError(f"{where} has format version {version!r}: not a jigsawdata manifest") from None
    if newer:
        raise InputError(
            f"{where} has format version {version}; this jigsawdata understands format "
            f"{FORMAT_VERSION} (major {major(FORMAT_VERSION)}): upgrade jigsawdata to read it"
        )


@dataclass(frozen=True)
class Manifest(_Record):
    format_version: str
    groups: dict[str, GroupInfo]
    """By group name, in name order."""
    classes: tuple[ClassInfo, ...]
    background: ClassInfo
    tool: ToolInfo | None = None
    source: SourceInfo | None = None
    params: dict | None = None
    """The :class:`~jigsawdata.build.BuildConfig` of the build, as JSON."""
    parts: int | None = None
    part: int | None = None
    """The part a partial manifest describes; ``None`` (written as null beside ``parts``)
    in a whole set's."""
    counts: dict | None = None
    """Images and crops counted while building: used, skipped per reason, positives, negatives."""
    skipped_images: list | None = None
    exif_orientation: list | None = None
    index: str | None = None
    """The sample index, relative to the root (:data:`INDEX_NAME` when absent)."""
    index_sha256: str | None = None
    card_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data, where: Path | str = MANIFEST_NAME) -> Manifest:
        """Read and check a manifest's JSON (``where`` names it in messages). Raises
        :class:`InputError` when it is not one this version can read, :class:`ManifestError`
        when it is malformed or names a file unsafely."""
        if not isinstance(data, dict):
            raise InputError(f"{where} is not a JSON object: not a jigsawdata manifest")
        _check_version(data, where)
        groups = data.get("groups")
        if not isinstance(groups, dict):
            raise ManifestError("manifest has no 'groups' object: refusing the shard set")
        parsed = {group: GroupInfo.from_json(group, info) for group, info in sorted(groups.items())}
        index = _checked_name(data["index"], ".parquet") if "index" in data else None
        index_sha = _checked_sha(data["index_sha256"], index or INDEX_NAME) if "index_sha256" in data else None
        classes = _checked(data.get("classes"), list, "'classes' list")
        tool, source = data.get("tool"), data.get("source")
        manifest = cls(
            format_version=data["format_version"],
            groups=parsed,
            classes=tuple(_class_info(c, f"classes[{i}]") for i, c in enumerate(classes)),
            background=_class_info(data.get("background"), "background"),
            tool=None if tool is None else ToolInfo.from_json(tool),
            source=None if source is None else SourceInfo.from_json(source),
            params=_plain(_checked(data.get("params"), dict, "'params'", optional=True)),
            parts=_checked(data.get("parts"), int, "'parts'", optional=True),
            part=_checked(data.get("part"), int, "'part'", optional=True),
            counts=_counts(data.get("counts")),
            skipped_images=_image_list(data.get("skipped_images"), "'skipped_images'"),
            exif_orientation=_image_list(data.get("exif_orientation"), "'exif_orientation'"),
            index=index,
            index_sha256=index_sha,
            card_sha256=(_checked_sha(data["card_sha256"], CARD_NAME) if "card_sha256" in data else None),
            extra=_unknown(data, cls),
        )
        if manifest.parts is not None and not (
            manifest.parts >= 1 and (manifest.part is None or 0 <= manifest.part < manifest.parts)
        ):
            raise ManifestError(f"manifest gives part {manifest.part} of {manifest.parts}: refusing the shard set")
        seen: set[str] = set()
        for f in manifest.files():
            if f.name in seen:
                raise ManifestError(f"manifest lists {f.name!r} twice: refusing the shard set")
            seen.add(f.name)
        _check_groups(manifest)
        _check_labels(manifest)
        return manifest

    def to_json(self) -> dict:
        data = super().to_json()
        if self.parts is not None:
            data["part"] = self.part
        return data

    @property
    def shards(self) -> list[ShardInfo]:
        """Every shard, group by group."""
        return [s for g in self.groups.values() for s in g.shards]

    @property
    def index_name(self) -> str:
        return self.index or INDEX_NAME

    @property
    def num_labels(self) -> int:
        """Labels run ``0..num_labels-1``: one per class, then the background."""
        return len(self.classes) + 1

    @property
    def label_names(self) -> dict[int, str]:
        """Every label's name, unique as tables, counts and a ``ClassLabel`` need them: a name
        that several classes share (the background's too) gets each one's category id, and
        the label as well while the names still repeat."""
        records = [*self.classes, self.background]
        names = _suffix_repeated([c.name for c in records], [f" (category {c.category_id})" for c in records])
        while len(set(names)) < len(names):  # labels differ: more than once only for a class named like a suffix
            names = _suffix_repeated(names, [f" (label {c.label})" for c in records])
        return dict(sorted((c.label, n) for c, n in zip(records, names)))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Name of every label, in label order, the background last."""
        return tuple(c.name for c in sorted(self.classes, key=lambda c: c.label)) + (self.background.name,)

    def build_fields(self) -> dict:
        """The JSON of :data:`BUILD_FIELDS`: what the parts of one build share."""
        return {k: v for k, v in self.to_json().items() if k in BUILD_FIELDS}

    def files(self) -> list[ListedFile]:
        """Every file the manifest vouches for, with its sha256: the shards, their DALI
        indexes and the sample index (the dataset card is checked on its own)."""
        files: list[ListedFile] = []
        for shard in self.shards:
            files.append(ListedFile(shard.name, shard.sha256, shard.bytes, shard.bytes))
            if shard.idx_sha256 is not None:  # a line of ~70 bytes per sample
                files.append(ListedFile(shard.idx_name, shard.idx_sha256, None, (64 << 10) + 1024 * shard.samples))
        if self.index_sha256 is not None:  # ~30 bytes per sample
            samples = sum(s.samples for s in self.shards)
            files.append(ListedFile(self.index_name, self.index_sha256, None, (1 << 20) + 1024 * samples))
        return files

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())


def read_manifest(path: Path) -> Manifest:
    """Load a manifest from a file or a shard-set directory, checking it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"no manifest at {path}: not a finished shard set (build it, or merge its parts)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_json(data, path)


def _suffix_repeated(names: list[str], suffixes: list[str]) -> list[str]:
    """Each name that occurs more than once gets its suffix; the others stay as they are."""
    uses = Counter(names)
    return [name if uses[name] == 1 else name + suffix for name, suffix in zip(names, suffixes)]
