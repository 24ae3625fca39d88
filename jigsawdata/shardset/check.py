"""Check a shard set against its manifest: a fast cached mode before training, a full one for people.

:func:`check_shard_set` (fast) runs before a pipeline reads a set: DALI and the reference
pipeline trust their input, and a truncated shard, an unsafe member or a label past the class
list would surface as a reader traceback, or worse, as a shard silently read short. Every shard
and DALI index is checked once (sha256 against the manifest; for a shard its member names,
sample count, labels and that every JPEG decodes) and the result is cached per file by (path,
size, mtime, ctime, inode): the next run costs a ``stat`` per file. Any problem is one
:class:`InputError` naming the file.

:func:`verify_shard_set` (full, ``jigsawdata verify``) trusts nothing it can recompute: every
name in the manifest must stay inside the set, every shard is re-hashed, its members are read
(and their names checked: shards from strangers are data, never paths or code), every JPEG is
decoded, every label must name a class or the background, each sample count is compared with the
manifest, its DALI index and ``index.parquet``, the manifest's totals with its shards, and the
card with the manifest; it lists every problem. ``summarize`` (``info``) only reads, it checks
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable

from jigsawdata.errors import InputError
from jigsawdata.files import sha256_file, write_json_atomic
from jigsawdata.layout import CARD_NAME, VERIFIED_NAME

from .card import recorded_blocks
from .index import read_index
from .location import ShardLocation, default_cache_dir
from .manifest import Manifest, ManifestError, read_manifest
from .shards import header_problem, index_path, iter_samples, jpeg_problem, mapped, read_dali_index, walk_members

log = logging.getLogger(__name__)

CACHE_NAME = VERIFIED_NAME
CHECKS = 2
"""What a cache entry vouches for: 2 adds that every JPEG decodes. Entries of fewer checks are
made again."""


def _scan_shard(path: Path) -> dict:
    """sha256, sample count and label range of a shard, read once; raises ValueError on an
    unsafe member, an unreadable header, an unparsable label or a JPEG that does not decode."""
    keys, low, high = set(), 0, -1
    with open(path, "rb") as fh, mapped(fh) as data:
        digest = hashlib.sha256(data).hexdigest()
        for name, typeflag, offset, size in walk_members(data):
            problem = header_problem(name, typeflag)
            if problem:
                raise ValueError(problem)
            stem, ext = name.split(".", 1)
            keys.add(stem)
            if ext == "jpg":
                jpeg = jpeg_problem(bytes(data[offset : offset + size]))
                if jpeg:
                    raise ValueError(f"sample {stem}: its .jpg {jpeg}")
            elif ext == "cls":
                text = bytes(data[offset : offset + size])
                try:
                    label = int(text)
                except ValueError:
                    raise ValueError(f"sample {stem} has label {text[:20].decode(errors='replace')!r}") from None
                low, high = min(low, label), max(high, label)
    return {"sha256": digest, "samples": len(keys), "min_label": low, "max_label": high, "checks": CHECKS}


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: Path, cache: dict) -> None:
    """Best effort: a read-only or shared cache folder only costs the next run a re-check."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache, shared=True)  # ranks and runs may share the cache folder
    except OSError as exc:
        log.debug("cannot write the verification cache %s: %s", path, exc)


def check_shard_set(root: Path, cache_dir: Path | str | None = None, manifest: Manifest | None = None) -> int:
    """Check every file of the shard set at ``root`` against its manifest (``manifest``, when
    the caller read it already); returns how many files had to be read (0 when the cache
    vouched for all). Raises :class:`InputError`."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    shards = {s.name: s for s in manifest.shards}
    labels = manifest.num_labels
    cache_path = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    cache = _load_cache(cache_path)
    read = 0
    hint = f"run `jigsawdata verify {root}`, or fetch or build it again (--no-verify skips this check)"
    for item in manifest.files():
        if item.name.endswith(".parquet"):
            continue  # the sample index is for people and verify; pipelines never read it
        path = root / item.name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise InputError(f"{item.name} of {root} is missing: {hint}") from None
        if item.size is not None and stat.st_size != item.size:
            raise InputError(
                f"{item.name} of {root} is damaged: {stat.st_size} bytes, the manifest says {item.size}; {hint}"
            )
        key = str(path.resolve())
        entry = cache.get(key)
        tar = item.name.endswith(".tar")
        if not (
            isinstance(entry, dict)
            and entry.get("size") == stat.st_size
            and (not tar or entry.get("checks") == CHECKS)
            and entry.get("mtime_ns") == stat.st_mtime_ns
            and entry.get("ctime_ns") == stat.st_ctime_ns
            and entry.get("inode") == stat.st_ino
        ):
            try:
                scanned = _scan_shard(path) if tar else {"sha256": sha256_file(path)}
            except (ValueError, OSError) as exc:
                raise InputError(f"{item.name} of {root} is damaged or unsafe ({exc}): {hint}") from exc
            entry = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "ctime_ns": stat.st_ctime_ns,
                "inode": stat.st_ino,
                **scanned,
            }
            read += 1
        if entry["sha256"] != item.sha256:
            raise InputError(f"{item.name} of {root} is damaged: its sha256 differs from the manifest's; {hint}")
        shard = shards.get(item.name)
        if shard is not None:
            if entry["samples"] != shard.samples:
                raise InputError(
                    f"{item.name} of {root} is damaged: it holds {entry['samples']} samples, the "
                    f"manifest says {shard.samples}; {hint}"
                )
            if entry["max_label"] >= labels or entry["min_label"] < 0:
                bad = entry["max_label"] if entry["max_label"] >= labels else entry["min_label"]
                raise InputError(
                    f"{item.name} of {root} is damaged: label {bad} is outside 0..{labels - 1} (the "
                    f"classes + background of its manifest); {hint}"
                )
        cache[key] = entry
    if read:
        _save_cache(cache_path, cache)
        log.info("checked %d files of %s against its manifest", read, root)
    return read


def _totals_problems(manifest: Manifest) -> list[str]:
    """The manifest's own sums: per group, and positives + negatives against the samples."""
    problems = []
    for group, info in manifest.groups.items():
        for key in ("samples", "bytes"):
            stated, listed = getattr(info, key), sum(getattr(s, key) for s in info.shards)
            if stated != listed:
                problems.append(f"group {group}: manifest says {stated} {key}, its shards add up to {listed}")
    total = sum(s.samples for s in manifest.shards)
    counts = manifest.counts or {}
    if "positives" in counts and counts["positives"] + counts.get("negatives", 0) != total:
        problems.append(
            f"counts: {counts['positives']} positives + {counts.get('negatives', 0)} negatives, "
            f"but the shards hold {total} samples"
        )
    return problems


def _sample_problems(
    name: str, samples, categories: dict[int, int], indexed: dict[str, int], seen: Counter
) -> tuple[int, list[str]]:
    """Count a shard's samples and check each: its three parts, a label of the manifest that
    its ``.json`` and the index (``indexed``: key -> label, empty without an index) agree on,
    the category id the manifest gives that label in its ``.json``, and a JPEG that decodes.
    Each label read is counted in ``seen``."""
    count, problems = 0, []
    labels = range(len(categories))
    for key, parts in samples:
        count += 1
        if set(parts) != {"jpg", "cls", "json"}:
            problems.append(f"{name}: sample {key} has parts {sorted(parts)}, not jpg, cls and json")
            continue
        try:
            label = int(parts["cls"])
        except ValueError:
            label = None
        if label not in labels:
            shown = parts["cls"][:20].decode(errors="replace")
            problems.append(
                f"{name}: sample {key} has label {shown!r}, outside 0..{labels[-1]} "
                f"({len(labels) - 1} classes + background)"
            )
            continue
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = None
        seen[label] += 1
        if not isinstance(meta, dict) or meta.get("label") != label:
            problems.append(f"{name}: sample {key} has a .json that does not give its label {label}")
        elif meta.get("category_id") != categories[label]:
            problems.append(
                f"{name}: sample {key} has category_id {meta.get('category_id')!r} in its .json, the "
                f"manifest gives label {label} category_id {categories[label]}"
            )
        if indexed and indexed.get(key) != label:
            problems.append(f"{name}: sample {key} has label {label}, the index says {indexed.get(key)}")
        jpeg = jpeg_problem(parts["jpg"])
        if jpeg:
            problems.append(f"{name}: sample {key}: its .jpg {jpeg}")
    return count, problems


def verify_shard_set(root: Path, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Problems found under ``root``, one sentence each naming the shard; empty when sound."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:  # names that leave the set are not opened at all
        return [str(exc)]
    problems: list[str] = []
    labels = range(manifest.num_labels)
    categories = {c.label: c.category_id for c in (*manifest.classes, manifest.background)}
    seen: Counter = Counter()
    index_counts: Counter = Counter()
    index_labels: dict[str, dict[str, int]] = {}
    index_file = root / manifest.index_name
    try:
        table = read_index(index_file) if index_file.is_file() else None
    except InputError as exc:  # the shards are still checked: the index is one file among them
        problems.append(f"index {index_file.name}: {exc}")
        table = None
    if table is not None:
        shard_col, label_col = table.column("shard").to_pylist(), table.column("label").to_pylist()
        index_counts = Counter(shard_col)
        for shard_name, key, label in zip(shard_col, table.column("key").to_pylist(), label_col):
            index_labels.setdefault(shard_name, {})[key] = label
        bad = sorted({v for v in label_col if v not in labels})
        if bad:
            problems.append(f"index {index_file.name}: labels {bad[:10]} outside 0..{labels[-1]}")
        if manifest.index_sha256 and sha256_file(index_file) != manifest.index_sha256:
            problems.append(f"index {index_file.name}: sha256 differs from the manifest")
    elif not index_file.is_file():
        problems.append(f"index {index_file.name} is missing")
    if manifest.card_sha256:
        card = root / CARD_NAME
        if not card.is_file():
            problems.append(f"{CARD_NAME}: missing")
        elif sha256_file(card) != manifest.card_sha256:
            problems.append(f"{CARD_NAME}: sha256 differs from the manifest")
    problems += _totals_problems(manifest)
    for shard in manifest.shards:
        name = shard.name
        path = root / name
        if on_shard:
            on_shard(name)
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != shard.bytes:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {shard.bytes}")
        if sha256_file(path) != shard.sha256:
            problems.append(f"{name}: sha256 differs from the manifest")
        try:
            samples, sample_problems = _sample_problems(
                name, iter_samples(path), categories, index_labels.get(name, {}), seen
            )
        except (ValueError, tarfile.TarError, OSError) as exc:
            problems.append(f"{name}: unreadable: {exc}")
            continue
        problems += sample_problems
        if samples != shard.samples:
            problems.append(f"{name}: {samples} samples, manifest says {shard.samples}")
        idx = index_path(path)
        try:
            if len(read_dali_index(idx)) != shard.samples:
                problems.append(f"{name}: DALI index {idx.name} disagrees on the sample count")
            elif shard.idx_sha256 and sha256_file(idx) != shard.idx_sha256:
                problems.append(f"{name}: DALI index {idx.name} sha256 differs from the manifest")
        except (ValueError, OSError) as exc:
            problems.append(f"{name}: DALI index: {exc}")
        if table is not None and index_counts[name] != shard.samples:
            problems.append(f"{name}: {index_counts[name]} rows in {index_file.name}, manifest says {shard.samples}")
    if not problems:  # the per-label counts below are only meaningful over every sample read
        problems += _label_count_problems(manifest, seen, root)
    return problems


def _label_count_problems(manifest: Manifest, seen: Counter, root: Path) -> list[str]:
    """The manifest's positives and negatives against the labels the shards hold, and its
    class names against the card's class table (which the build rendered from the same
    classes and the shards' labels): a manifest edited after the build, with every sha256
    still matching, disagrees with one of them."""
    problems = []
    negatives = seen[manifest.background.label]
    counts = manifest.counts or {}
    if "positives" in counts and (counts["positives"], counts.get("negatives", 0)) != (
        sum(seen.values()) - negatives,
        negatives,
    ):
        problems.append(
            f"counts: the manifest gives {counts['positives']} positives and {counts.get('negatives', 0)} "
            f"negatives, the shards' labels {sum(seen.values()) - negatives} and {negatives}"
        )
    card = root / CARD_NAME
    if not (manifest.card_sha256 and card.is_file()):
        return problems
    text = card.read_text(encoding="utf-8", errors="replace")
    lines = set(text.splitlines())
    for block in recorded_blocks(manifest, seen):
        if "\n".join(block) not in text:
            said = next((line for line in block if line not in lines), block[0])
            problems.append(
                f"{CARD_NAME}: does not say {said!r} as the manifest with the shards' labels does (the "
                "manifest or the card was changed after the build)"
            )
    return problems


def summarize(location: Path | str) -> dict:
    """Counts per group and class, sizes and skips, for ``jigsawdata info``: of a local set or
    of one at a URL (its manifest and index only are read)."""
    where = ShardLocation.of(location)
    manifest = where.manifest()
    table = where.index(manifest)
    names = manifest.label_names
    per_class = Counter(table.column("label").to_pylist())
    return {
        "groups": {
            g: {"shards": len(v.shards), "samples": v.samples, "bytes": v.bytes} for g, v in manifest.groups.items()
        },
        "classes": {names[label]: n for label, n in sorted(per_class.items())},
        "counts": manifest.counts,
        "skipped_images": len(manifest.skipped_images),
        "source": manifest.source.to_json(),
        "seed": manifest.params["seed"],
    }
