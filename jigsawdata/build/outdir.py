"""What ``build-shards`` may write to: only its own output.

- **Claim**: the output directory must be empty (or new), or hold a build of jigsawdata (a
  ``manifest.json`` it wrote, a partial manifest under ``parts/``, or a staging area with its
  ``build.json``). Anything else is a user's folder, and nothing in it is overwritten or
  adopted. ``--out`` equal to the image folder or to the data set's root is refused outright.
- **Lock**: one build per part at a time; a second concurrent one exits with a message
  (``flock``, released by the kernel even after ``kill -9``, so resumption never meets a
  stale lock).
- **Shard records**: a shard already on disk is reused only when the staging area recorded
  its sha256 when it was written: a file of the same name from anywhere else is rewritten.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from jigsawdata.coco.reader import CocoSource
from jigsawdata.errors import InputError
from jigsawdata.files import sha256_file, write_json_atomic
from jigsawdata.layout import BUILD_RECORD, LOCK_SUFFIX, MANIFEST_NAME, PART_MANIFEST_GLOB, PARTS_DIR, STAGING_GLOB
from jigsawdata.shardset.manifest import ShardInfo
from jigsawdata.shardset.shards import index_path

_WRITTEN = "written"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_out_location(out: Path, source: CocoSource) -> None:
    """Refuse an output that is the image folder, the annotation folder or the set's root
    (a new folder inside the root, e.g. ``coco/jigsaw-shards``, is fine)."""
    inputs = {"the image folder": source.images_dir, "the annotation folder": source.ann_file.parent}
    beside = Path(source.images_dir).resolve().parent  # a folder next to the images, not inside them
    if source.ann_file.parent.name == "annotations":
        inputs["the data set's root"] = beside = source.ann_file.resolve().parent.parent
    for what, path in inputs.items():
        if _same(Path(out), Path(path)):
            raise InputError(f"--out {out} is {what}: choose a new folder, e.g. {beside / 'jigsaw-shards'}")


def _json_from_jigsawdata(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("tool") or {}).get("name") == "jigsawdata"


def holds_a_build(out: Path) -> bool:
    """Whether ``out`` holds a build that jigsawdata wrote (finished, partial or staged)."""
    if _json_from_jigsawdata(out / MANIFEST_NAME):
        return True
    if any(_json_from_jigsawdata(p) for p in (out / PARTS_DIR).glob(PART_MANIFEST_GLOB)):
        return True
    return any(_json_from_jigsawdata(p / BUILD_RECORD) for p in out.glob(STAGING_GLOB))


def claim_output(out: Path) -> None:
    """Create ``out``, or accept it when it is empty or holds a build of jigsawdata."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out.iterdir() if not p.name.endswith(LOCK_SUFFIX)]
    if entries and not holds_a_build(out):
        shown = ", ".join(sorted(p.name for p in entries)[:5])
        raise InputError(
            f"--out {out} is not empty ({shown}{', ...' if len(entries) > 5 else ''}) and holds no "
            "jigsawdata build: build-shards writes only into an empty or new folder, or resumes "
            "its own build there"
        )


class BuildLock:
    """An exclusive, non-blocking lock on ``path`` for as long as the object is held;
    ``what`` names the holder in the refusal (a build, an experiment)."""

    def __init__(self, path: Path, what: str = "build") -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "BuildLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise InputError(
                        f"another {self.what} is writing to {self.path.parent} (it holds "
                        f"{self.path.name}); wait for it to finish, or use another --out"
                    ) from exc
                raise
            try:  # the holder before us may have removed the file it locked: lock the current one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self._fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def lock_path(out: Path, staging: Path) -> Path:
    return Path(out) / (staging.name + LOCK_SUFFIX)


def _record_path(staging: Path, name: str) -> Path:
    return staging / _WRITTEN / (name.replace("/", "__") + ".json")


def forget_written_shards(staging: Path) -> None:
    """Make every shard of this build count as unwritten (its samples changed)."""
    shutil.rmtree(staging / _WRITTEN, ignore_errors=True)


def record_shard(staging: Path, info: ShardInfo) -> None:
    """Note in the staging area that this build wrote this shard and its index."""
    path = _record_path(staging, info.name)
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, info.to_json())


def reusable_shard(staging: Path, name: str, path: Path, samples: int) -> ShardInfo | None:
    """The shard on disk when this build wrote it, with its index, and both are intact;
    ``None`` when it must be (re)written."""
    record = _record_path(staging, name)
    if not (record.is_file() and path.is_file() and index_path(path).is_file()):
        return None
    try:
        noted = ShardInfo.from_json(json.loads(record.read_text()))
    except (OSError, ValueError, InputError):
        return None
    if noted.name != name or noted.samples != samples or noted.bytes != path.stat().st_size:
        return None
    if sha256_file(index_path(path)) != noted.idx_sha256:
        return None  # the tar is rewritten with it: a shard and its index are written together
    return noted if sha256_file(path) == noted.sha256 else None
