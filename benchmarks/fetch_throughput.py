"""How close ``jigsawdata fetch`` comes to a plain download of the same files.

A shard set of incompressible crop-sized samples is served by ``python -m http.server`` on 127.0.0.1
(the README's way to publish, no range support) in its own process; in one run, interleaved,
the set is fetched with ``jigsawdata.shardset.fetch.fetch`` (verifying every sha256 while streaming)
and downloaded file by file with ``urllib`` into a fresh folder (no checks). Medians over
repeats, one warm-up of each excluded. Usage:

    python -m jigsawdata.benchmarks.fetch_throughput [--megabytes 128] [--shards 8] [--workers 8] \\
        [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from jigsawdata.files import sha256_file
from jigsawdata.shardset.fetch import fetch
from jigsawdata.shardset.manifest import FORMAT_VERSION, ClassInfo, GroupInfo, Manifest, ShardInfo, read_manifest
from jigsawdata.shardset.shards import index_path, write_shard

from .common import environment, interleaved, report, stats


def make_set(root: Path, megabytes: int, shards: int, sample_kb: int = 24) -> int:
    """A shard set of random (incompressible) samples of about the size of a crop (24 kB: the
    member count, which the safety check walks, matters as much as the bytes); returns its bytes."""
    per_shard = max(1, megabytes * 1024 // sample_kb // shards)
    infos = []
    (root / "S").mkdir(parents=True)
    for s in range(shards):
        name = f"S/S-{s:06d}.tar"
        samples = (
            (f"{s:03d}{i:06d}", [("jpg", os.urandom(sample_kb * 1024)), ("cls", b"0"), ("json", b"{}")])
            for i in range(per_shard)
        )
        n, nbytes, digest = write_shard(root / name, samples)
        infos.append(ShardInfo(name, n, nbytes, digest, sha256_file(index_path(root / name))))
    Manifest(
        FORMAT_VERSION,
        {"S": GroupInfo.of(infos)},
        classes=(ClassInfo(0, 1, "thing"),),
        background=ClassInfo(1, 0, "background"),
    ).write(root / "manifest.json")
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(directory: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):  # bounded wait for the server to listen
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("http.server did not start")


def _urllib_copy(url: str, names: list[str], out: Path) -> None:
    for name in names + ["manifest.json"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{url}/{name}") as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def run(megabytes: int = 128, shards: int = 8, workers: int = 8, repeats: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = make_set(tmp / "www", megabytes, shards)
        names = [f.name for f in read_manifest(tmp / "www").files()]
        server, url = _serve(tmp / "www")
        counter = iter(range(10**6))

        def fresh() -> Path:
            return tmp / f"out{next(counter)}"

        def timed(body) -> float:
            out = fresh()
            start = time.perf_counter()
            body(out)
            seconds = time.perf_counter() - start
            shutil.rmtree(out)
            return seconds

        cases = {
            "fetch": lambda: timed(lambda out: fetch(url, out, workers=workers)),
            "urllib": lambda: timed(lambda out: _urllib_copy(url, names, out)),
        }
        try:
            interleaved(cases, 1)  # warm-up, excluded
            runs = interleaved(cases, repeats)
        finally:
            server.terminate()
            server.wait(10)
    f, u = stats(runs["fetch"]), stats(runs["urllib"])
    return {
        "benchmark": "fetch_throughput",
        "bytes": total,
        "shards": shards,
        "workers": workers,
        "server": "python -m http.server (no range support), 127.0.0.1",
        "fetch_seconds": f,
        "urllib_seconds": u,
        "fetch_mb_per_s": total / 1e6 / f["median"],
        "urllib_mb_per_s": total / 1e6 / u["median"],
        "ratio": u["median"] / f["median"],
        "environment": environment(("fsspec", "aiohttp")),
    }


def format_table(result: dict) -> str:
    return "\n".join(
        [
            f"fetch throughput: {result['bytes'] / 1e6:.0f} MB in {result['shards']} shards from {result['server']}",
            f"{'':<24}{'median s':>10}{'MB/s':>10}",
            f"{'jigsawdata fetch':<24}{result['fetch_seconds']['median']:>10.3f}{result['fetch_mb_per_s']:>10.1f}"
            f"   ({result['workers']} workers, sha256 checked)",
            f"{'urllib, one by one':<24}{result['urllib_seconds']['median']:>10.3f}{result['urllib_mb_per_s']:>10.1f}"
            "   (no checks)",
            f"fetch / urllib throughput: {result['ratio']:.2f}x",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=128)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.megabytes, args.shards, args.workers, args.repeats)
    report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
