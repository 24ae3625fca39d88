"""How close build-shards comes to its bound: decode each source image once, encode each crop once.

Both are measured in the same run, with the same library (PIL) and crop boxes, one worker
process, medians over repeats. Usage:

    python -m jigsawdata.benchmarks.build_shards [--coco ../shared/data/coco-train288] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from jigsawdata.build.run import BuildConfig, _encode_jpeg, build_shards
from jigsawdata.coco.reader import load_coco, load_rgb, resolve_coco_root
from jigsawdata.shardset.index import read_index

from .common import DEFAULT_COCO, environment, report, stats


def _bound(source, boxes_by_image: dict[int, list], quality: int) -> float:
    start = time.perf_counter()
    for image in source.images:
        pixels, _ = load_rgb(source.images_dir / image.file_name, image.width, image.height)
        for box in boxes_by_image.get(image.image_id, []):
            _encode_jpeg(pixels.crop(tuple(box)), quality)
    return time.perf_counter() - start


def run(coco: Path, split: str = "train2017", repeats: int = 3, workers: int = 1) -> dict:
    source = load_coco(*resolve_coco_root(coco, split))
    cfg = BuildConfig()
    build_s, bound_s, crops = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            out = Path(tmp) / f"run{r}"
            start = time.perf_counter()
            build_shards(source, out, cfg, workers=workers)
            build_s.append(time.perf_counter() - start)
            rows = read_index(out / "index.parquet").to_pylist()
            crops = len(rows)
            boxes = defaultdict(list)
            for row in rows:
                boxes[row["image_id"]].append(row["crop_box"])
            bound_s.append(_bound(source, boxes, cfg.jpeg_quality))
    n = len(source.images)
    b, lim = stats(build_s), stats(bound_s)
    return {
        "benchmark": "build_shards",
        "coco": str(coco),
        "images": n,
        "crops": crops,
        "workers": workers,
        "build_seconds": b,
        "bound_seconds": lim,
        "build_images_per_s": n / b["median"],
        "build_crops_per_s": crops / b["median"],
        "bound_images_per_s": n / lim["median"],
        "bound_crops_per_s": crops / lim["median"],
        "ratio": lim["median"] / b["median"],
        "environment": environment(),
    }


def format_table(result: dict) -> str:
    lines = [
        f"build-shards on {result['images']} images -> {result['crops']} crops, {result['workers']} worker(s)",
        f"{'':<34}{'images/s':>10}{'crops/s':>10}{'median s':>10}",
        f"{'build-shards':<34}{result['build_images_per_s']:>10.1f}{result['build_crops_per_s']:>10.1f}"
        f"{result['build_seconds']['median']:>10.2f}",
        f"{'bound: decode once + encode once':<34}{result['bound_images_per_s']:>10.1f}"
        f"{result['bound_crops_per_s']:>10.1f}{result['bound_seconds']['median']:>10.2f}",
        f"ratio build / bound: {result['ratio']:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO)
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args(argv)
    result = run(args.coco, args.split, args.repeats, args.workers)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
