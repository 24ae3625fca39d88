"""Does build-shards scale? Time per image and peak memory per crop at 10^3, 10^4 and 10^5 images.

Each size is a synthetic COCO set whose N images reuse a pool of distinct generated photos
(``--pool``, default 500; every image id still gets its own random crops), built in a fresh
process with ``--workers`` extraction processes. The build process reports its own peak RSS
(``VmHWM``; ``ru_maxrss`` would start at the RSS of the benchmark process that started it,
which Linux carries across ``exec``, and extraction workers are other processes) and its RSS
after imports and Arrow's one-time set-up, the fixed base; memory that grows with the data shows as bytes per crop above
that base, and as the marginal bytes per extra crop between consecutive sizes. The peak is
split at the end of reading the annotation file (streamed into columns by
:mod:`jigsawdata.coco.validate`, then sorted into the source's): what reading needs, and what the
build adds beyond it. Usage:

    python -m jigsawdata.benchmarks.build_scale [--sizes 1000 10000 100000] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import environment, report


def make_scaled_set(pool_root: Path, images: int, ann_file: Path) -> None:
    """An annotation file of ``images`` images cycling over the pool's files and boxes."""
    pool = json.loads((pool_root / "annotations" / "instances_train.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in pool["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out_images, out_anns = [], []
    for image_id in range(1, images + 1):
        source = pool["images"][(image_id - 1) % len(pool["images"])]
        out_images.append({**source, "id": image_id})
        for ann in by_image.get(source["id"], []):
            out_anns.append({**ann, "id": len(out_anns) + 1, "image_id": image_id})
    ann_file.write_text(json.dumps({"images": out_images, "annotations": out_anns, "categories": pool["categories"]}))


def _child(ann: Path, images: Path, out: Path, workers: int) -> None:
    """Runs in the measured process: build, then print the figures as JSON."""
    import pyarrow as pa

    from jigsawdata.build.run import BuildConfig, build_shards
    from jigsawdata.coco.reader import load_coco

    pa.array([0])  # Arrow's one-time set-up (~50 MB of its code and tables): part of the fixed base
    base = _rss_now()
    start = time.perf_counter()
    source = load_coco(ann, images)
    parsed_peak = _peak_rss()
    manifest = build_shards(source, out, BuildConfig(), workers=workers)
    seconds = time.perf_counter() - start
    crops = sum(g.samples for g in manifest.groups.values())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "crops": crops,
                "images": manifest.source.images,
                "base_rss": base,
                "parse_peak_rss": parsed_peak,
                "peak_rss": _peak_rss(),
            }
        )
    )


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(size: int, pool_root: Path, tmp: Path, workers: int) -> dict:
    ann = tmp / f"instances_{size}.json"
    make_scaled_set(pool_root, size, ann)
    out = tmp / f"shards-{size}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jigsawdata.benchmarks.build_scale",
            "--child",
            str(ann),
            str(pool_root / "train"),
            str(out),
            str(workers),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r.update(
        size=size,
        seconds_per_image=r["seconds"] / r["images"],
        bytes_per_crop_above_base=(r["peak_rss"] - r["base_rss"]) / r["crops"],
        parse_bytes_per_crop=(r["parse_peak_rss"] - r["base_rss"]) / r["crops"],
        build_bytes_per_crop=(r["peak_rss"] - r["parse_peak_rss"]) / r["crops"],
    )
    return r


def run(sizes: tuple[int, ...] = (1000, 10_000, 100_000), workers: int = 2, pool: int = 500) -> dict:
    from jigsawdata.synthetic.shapes import make_synthetic_coco

    with tempfile.TemporaryDirectory() as tmp:
        pool_root = Path(tmp) / "pool"
        make_synthetic_coco(pool_root, images=pool, seed=0)
        rows = [measure(size, pool_root, Path(tmp), workers) for size in sizes]
    for prev, row in zip(rows, rows[1:]):
        row["marginal_bytes_per_crop"] = (row["peak_rss"] - prev["peak_rss"]) / (row["crops"] - prev["crops"])
    return {"benchmark": "build_scale", "workers": workers, "pool": pool, "sizes": rows, "environment": environment()}


def format_table(result: dict) -> str:
    lines = [
        f"build-shards at scale, {result['workers']} extraction workers (synthetic images, pool of {result['pool']})",
        f"{'images':>9}{'crops':>10}{'s/image':>10}{'peak RSS MB':>13}{'base MB':>9}{'B/crop':>9}"
        f"{'parse B/crop':>14}{'build B/crop':>14}{'marginal B/crop':>17}",
    ]
    for r in result["sizes"]:
        marginal = f"{r['marginal_bytes_per_crop']:.0f}" if "marginal_bytes_per_crop" in r else "-"
        lines.append(
            f"{r['images']:>9}{r['crops']:>10}{r['seconds_per_image'] * 1e3:>8.2f}ms"
            f"{r['peak_rss'] / 2**20:>13.1f}{r['base_rss'] / 2**20:>9.1f}"
            f"{r['bytes_per_crop_above_base']:>9.0f}{r['parse_bytes_per_crop']:>14.0f}"
            f"{r['build_bytes_per_crop']:>14.0f}{marginal:>17}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", type=int, default=500, help="Distinct synthetic images the sets cycle over.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("ANN", "IMAGES", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        ann, images, out, workers = args.child
        _child(Path(ann), Path(images), Path(out), int(workers))
        return None
    result = run(tuple(args.sizes), args.workers, args.pool)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
