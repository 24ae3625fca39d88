"""Shard sets of crafted crops with known sizes, colours and labels, for pipeline tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from jigsawdata.files import write_json_atomic
from jigsawdata.shardset.manifest import FORMAT_VERSION
from jigsawdata.shardset.shards import write_shard


def crop(width: int, height: int, color=(200, 40, 40), bottom_color=None, right_color=None) -> np.ndarray:
    """A flat crop; optionally its bottom half or right half in another colour."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = color
    if bottom_color is not None:
        img[height // 2 :] = bottom_color
    if right_color is not None:
        img[:, width // 2 :] = right_color
    return img


def write_crafted(
    root: Path, groups: dict[str, list[tuple[np.ndarray, int]]], num_classes: int = 10, per_shard: int = 1000
) -> Path:
    """Write ``{group: [(HWC uint8, label), ...]}`` as a shard set that pipelines can open."""
    root = Path(root)
    manifest_groups = {}
    for group, samples in groups.items():
        (root / group).mkdir(parents=True, exist_ok=True)
        shards = []
        for si in range(0, len(samples), per_shard):
            chunk = samples[si : si + per_shard]
            name = f"{group}/{group}-{si // per_shard:06d}.tar"
            n, nbytes, digest = write_shard(root / name, _encode(chunk, group, si))
            shards.append({"name": name, "samples": n, "bytes": nbytes, "sha256": digest})
        manifest_groups[group] = {"shards": shards, "samples": len(samples), "bytes": sum(s["bytes"] for s in shards)}
    write_json_atomic(
        root / "manifest.json",
        {
            "format_version": FORMAT_VERSION,
            "groups": manifest_groups,
            "classes": [{"label": i, "category_id": i + 1, "name": f"class{i}"} for i in range(num_classes)],
            "background": {"label": num_classes, "category_id": 0, "name": "background"},
        },
    )
    return root


def _encode(samples, group, start):
    for i, (pixels, label) in enumerate(samples):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=98, subsampling=0)
        meta = {"label": label, "group": group, "width": pixels.shape[1], "height": pixels.shape[0]}
        yield (
            f"{start + i:08d}",
            [("jpg", buf.getvalue()), ("cls", str(label).encode()), ("json", json.dumps(meta).encode())],
        )
