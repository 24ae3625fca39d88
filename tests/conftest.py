"""Shared fixtures: synthetic COCO sets made on the fly, and the real COCO subset."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.coco.reader import load_coco
from jigsawdata.synthetic.shapes import make_synthetic_coco

REAL_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-train288"


def _large_allocations_outside_the_heap() -> None:
    """The suite trains many models in one process. With glibc's sliding mmap threshold, every
    large buffer freed raises the threshold, later ones land in the brk heap, and the heap only
    grows (tens of GB of address space, a few GB resident); a fork of such a process (DataLoader
    workers) is then refused with ENOMEM by the kernel's overcommit heuristic. A fixed threshold
    keeps buffers of 1 MiB and more in mappings of their own, returned when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_large_allocations_outside_the_heap()


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Every test that reads the real COCO subset (through :func:`real_coco`) is marked
    ``real_data``; ``gpu`` tests are skipped, with the reason, where torch sees no GPU."""
    skip = None if _has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "real_coco" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
        if skip and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (fetched shards, verified shards) go to a temporary folder, never the user's home."""
    previous = os.environ.get("JIGSAWDATA_CACHE")
    os.environ["JIGSAWDATA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("JIGSAWDATA_CACHE", None)
    else:
        os.environ["JIGSAWDATA_CACHE"] = previous


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_coco(root, images=24, seed=3)
    return root


@pytest.fixture(scope="session")
def synthetic_source(synthetic_root):
    return load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")


@pytest.fixture(scope="session")
def small_cfg() -> BuildConfig:
    """Several chunks and several shards per group even on 24 images."""
    return BuildConfig(seed=11, chunk_images=5, shard_samples=16)


@pytest.fixture(scope="session")
def built_synthetic(tmp_path_factory, synthetic_source, small_cfg) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_shards(synthetic_source, out, small_cfg)
    return out


@pytest.fixture(scope="session")
def real_coco() -> Path:
    """The real COCO subset; missing it fails under CI instead of silently skipping."""
    if not (REAL_COCO / "annotations" / "instances_train2017.json").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the real COCO subset is missing at {REAL_COCO}")
        pytest.skip(f"real COCO subset not found at {REAL_COCO}")
    return REAL_COCO


@pytest.fixture(scope="session")
def real_source(real_coco):
    return load_coco(real_coco / "annotations" / "instances_train2017.json", real_coco / "train2017")


@pytest.fixture(scope="session")
def built_real(tmp_path_factory, real_source) -> Path:
    out = tmp_path_factory.mktemp("real_shards")
    build_shards(real_source, out, BuildConfig(seed=0), workers=2)
    return out
