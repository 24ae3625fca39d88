"""Join the partial manifests of a build made in parts (``--part K/N``) into one shard set.

Each part wrote its own manifest and index under ``parts/``; the merge checks that they are
the parts of one build, all there and untouched, then writes the joined index, the card and
the manifest, the manifest last, so a shard set exists only once all of it is checked.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

from jigsawdata.errors import InputError, first_line
from jigsawdata.files import atomic_path, sha256_file, write_text_atomic
from jigsawdata.layout import (
    CARD_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    PART_MANIFEST_GLOB,
    PARTS_DIR,
    part_index_path,
    part_manifest_path,
)
from jigsawdata.shardset.card import attach_card, label_counts
from jigsawdata.shardset.manifest import BUILD_FIELDS, GroupInfo, Manifest, ManifestError, ShardInfo, read_manifest

log = logging.getLogger(__name__)


def _shared_extra(records: list, what: str) -> dict:
    """The keys this version does not know (a newer writer's) that every part gives alike:
    kept in the merged manifest; those the parts disagree on are dropped, with a warning."""
    first, *rest = [r.extra for r in records]
    kept = {k: v for k, v in first.items() if all(e.get(k, object()) == v for e in rest)}
    dropped = sorted(set().union(*(r.extra for r in records)) - set(kept))
    if dropped:
        log.warning("the parts' %s keys %s differ: left out of the merged manifest", what, ", ".join(dropped))
    return kept


def merge_parts(root: Path) -> Manifest:
    """Join the partial manifests under ``root/parts`` into ``root/manifest.json``."""
    import pyarrow as pa

    from jigsawdata.shardset.index import merge_index_files, read_index

    root = Path(root)
    paths = sorted((root / PARTS_DIR).glob(PART_MANIFEST_GLOB))
    if not paths:
        raise InputError(f"no partial manifests under {root / PARTS_DIR}")
    manifests = []
    for p in paths:
        try:
            manifests.append(read_manifest(p))
        except ManifestError as exc:  # its messages speak of "the manifest": say which one
            raise InputError(f"{p}: {exc}") from exc
    for p, m in zip(paths, manifests):
        if m.part is None or not m.parts or part_manifest_path(root, m.part, m.parts).name != p.name:
            held = "no part number" if m.part is None or not m.parts else f"part {m.part} of {m.parts}"
            raise InputError(f"{p} holds {held}, not the part its name says: restore it from its build")
    first = manifests[0].build_fields()
    for p, m in zip(paths, manifests):
        shared = m.build_fields()
        for key in BUILD_FIELDS:
            if shared.get(key) != first.get(key):
                raise InputError(f"{p.name} disagrees with {paths[0].name} on '{key}': parts of different builds")
    n_parts = manifests[0].parts
    found = sorted(m.part for m in manifests)
    if found != list(range(n_parts)):
        missing = sorted(set(range(n_parts)) - set(found))
        raise InputError(f"cannot merge: parts {missing} of {n_parts} are not built yet")
    shards: dict[str, list[ShardInfo]] = {}
    group_parts: dict[str, list[GroupInfo]] = {}
    counts, skipped, exif = Counter(), [], []
    for m in manifests:
        for g, info in m.groups.items():
            shards.setdefault(g, []).extend(info.shards)
            group_parts.setdefault(g, []).append(info)
        counts.update(m.counts or {})
        skipped.extend(m.skipped_images or [])
        exif.extend(m.exif_orientation or [])
    by_part = sorted(manifests, key=lambda m: m.part)
    indexes = [part_index_path(root, m.part, n_parts) for m in by_part]
    for m, index in zip(by_part, indexes):
        again = (
            f"delete {part_manifest_path(root, m.part, n_parts)} and rerun build-shards with "
            f"--part {m.part}/{n_parts} to make it again"
        )
        if not index.is_file():
            raise InputError(f"{index} is missing: {again}")
        if sha256_file(index) != m.index_sha256:
            raise InputError(f"{index} is not the index its part manifest records (sha256 differs): {again}")
    groups = {
        g: replace(GroupInfo.of(s), extra=_shared_extra(group_parts[g], f"group {g}"))
        for g, s in sorted(shards.items())
    }
    merged = replace(
        manifests[0],
        part=None,
        groups=groups,
        counts=dict(sorted(counts.items())),
        skipped_images=sorted(skipped, key=lambda s: s["image_id"]),
        exif_orientation=sorted(exif, key=lambda e: e["image_id"]) if exif else None,
        index=INDEX_NAME,
        card_sha256=None,
        extra=_shared_extra(manifests, "manifest"),
    )
    try:  # every check a reader makes, before anything is written
        Manifest.from_json(merged.to_json(), "the merged manifest")
    except InputError as exc:
        raise InputError(f"the parts do not merge into a valid shard set: {exc}") from exc
    with atomic_path(root / INDEX_NAME) as index:  # takes its name only once all of it is checked
        try:
            merge_index_files(indexes, index)
            labels = read_index(index).column("label").to_numpy()
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise InputError(f"the part indexes cannot be merged ({first_line(exc)}): rebuild the parts") from exc
        outside = labels[(labels < 0) | (labels >= merged.num_labels)]
        if len(outside):
            raise InputError(
                f"the part indexes hold label {int(outside[0])}, outside the manifest's "
                f"{merged.num_labels} labels: rebuild the parts"
            )
        merged, card = attach_card(replace(merged, index_sha256=sha256_file(index)), label_counts(labels))
    write_text_atomic(root / CARD_NAME, card)
    merged.write(root / MANIFEST_NAME)
    return merged
