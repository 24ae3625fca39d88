"""Helpers shared by the benchmarks: timing statistics and the environment of a figure."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

from jigsawdata.environment import installed

DEFAULT_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-train288"


def stats(values: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def timed(body, cuda: bool) -> float:
    """Wall seconds of ``body()``, with the GPU's queued work finished on both sides."""
    import time

    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    body()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cpu_seconds() -> float | None:
    """CPU seconds used so far by this process (all its threads) and its live child processes
    (DataLoader workers, read from Linux's /proc in clock ticks); ``None`` without /proc.
    Unlike wall time, it hardly depends on what else the machine is running."""
    import os
    import time

    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return None
    me, ticks, children = os.getpid(), os.sysconf("SC_CLK_TCK"), 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # fields[1]: the parent's pid; 11 and 12: user and system time
            children += int(fields[11]) + int(fields[12])
    return time.process_time() + children / ticks


def interleaved(cases: dict, repeats: int) -> dict:
    """Run ``cases`` (name -> callable doing one measured repeat and returning its figures)
    in turn, ``repeats`` times: A B A B ... rather than A A A B B B, so that a machine
    getting slower or faster during the run biases neither side of a comparison."""
    runs: dict = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            runs[name].append(case())
    return runs


def environment(packages: tuple[str, ...] = ("pillow", "numpy", "torch", "nvidia-dali-cuda130", "webdataset")) -> dict:
    versions = {name: installed(name) for name in packages}
    return {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": _cpus(),
        "packages": versions,
        "command": command(),
    }


def command() -> str:
    """The command line as it was typed: ``python -m jigsawdata.benchmarks.X ...`` rather than
    the module's file path, which names the machine's checkout and cannot be rerun elsewhere."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec is not None else "__main__"
    head = f"python -m {module}" if module != "__main__" else Path(sys.argv[0]).name
    return " ".join([head, *sys.argv[1:]])


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def report(result: dict, table: str, json_path: Path | None) -> dict:
    """Print a benchmark's table and, on request, write its full result as JSON."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
