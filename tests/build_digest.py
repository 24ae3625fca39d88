"""A digest of a shard set's content that does not depend on the JPEG encoder: member
order (the shuffle and the shard split), every ``.cls`` and ``.json`` member, and the index
rows. Two builds with equal digests wrote the same samples to the same places."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from jigsawdata.shardset.index import read_index


def content_digest(out: Path) -> dict:
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    shards = {}
    for info in manifest["groups"].values():
        for shard in info["shards"]:
            digest, names = hashlib.sha256(), []
            with tarfile.open(Path(out) / shard["name"]) as tar:
                for member in tar.getmembers():
                    names.append(member.name)
                    if not member.name.endswith(".jpg"):
                        digest.update(member.name.encode() + b"\0" + tar.extractfile(member).read())
            shards[shard["name"]] = {"samples": shard["samples"], "members": names, "sha256": digest.hexdigest()}
    rows = read_index(Path(out) / "index.parquet").to_pylist()
    return {
        "shards": shards,
        "index_rows": len(rows),
        "index_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
    }
