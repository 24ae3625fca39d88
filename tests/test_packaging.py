"""The wheel installs one top-level name, ``jigsawdata``, with every folder of the repository inside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "pyproject.toml",
    "setup.py",
    "README.md",
    "cli.py",
    "jigsawdata",
    "pipelines",
    "trainer",
    "experiments",
    "benchmarks",
]


@pytest.mark.slow
def test_wheel_installs_only_the_jigsawdata_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    stale = src / "build" / "lib" / "pipelines"  # left by a build of an older layout
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("jigsawdata-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"jigsawdata"}
    for module in [
        "cli.py",
        "__main__.py",
        "pipelines/dali.py",
        "trainer/pretrain.py",
        "benchmarks/gpu_check.py",
        "experiments/grid.py",
        "shardset/check.py",
        "coco/reader.py",
        "build/run.py",
        "synthetic/shapes.py",
    ]:
        assert f"jigsawdata/{module}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jigsawdata = jigsawdata.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
def test_installed_layout_runs_as_a_module(tmp_path):
    """The wheel's layout (cli inside the package) imports without the checkout on the path."""
    site = tmp_path / "site" / "jigsawdata"
    shutil.copytree(ROOT / "jigsawdata", site, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "cli.py", site / "cli.py")
    for name in ["pipelines", "trainer", "experiments", "benchmarks"]:
        shutil.copytree(ROOT / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys; sys.path[:0] = [sys.argv[1]] + sys.argv[2:];"
            "import jigsawdata, jigsawdata.trainer.pretrain as p; print(jigsawdata.__path__, p.__file__)",
            str(site.parent),
            *[p for p in sys.path if p.endswith("site-packages")],
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(ROOT) not in done.stdout and str(site) in done.stdout


_WITHOUT_DALI = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError("No module named " + repr(name))

sys.meta_path.insert(0, Blocked())
from jigsawdata.cli import main
main(prog_name="jigsawdata")
"""


@pytest.mark.slow
def test_the_core_works_without_dali(tmp_path):
    """pip install jigsawdata without [dali]: build, verify, info, preview and pre-training on
    the reference pipeline work; what needs DALI says in one line how to get it."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _WITHOUT_DALI, *args], capture_output=True, text=True, timeout=600, cwd=ROOT
        )

    coco, shards = tmp_path / "coco", tmp_path / "shards"
    for args in (
        ["make-synthetic", str(coco), "--images", "12"],
        ["build-shards", str(coco), "--out", str(shards), "-q"],
        ["verify", str(shards), "-q"],
        ["info", str(shards)],
        ["preview", str(shards), "--pipeline", "reference", "--out", str(tmp_path / "p.png"), "--count", "2"],
        [
            "pretrain",
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "run"),
            "--pipeline",
            "reference",
            "--arch",
            "resnet18",
            "--iterations",
            "2",
            "--batch",
            "2",
            "--canvas",
            "64",
            "--template-split",
            "32",
            "--erf-images",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "-q",
        ],
    ):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    refused = run("pretrain", "--shards", str(shards), "--out", str(tmp_path / "r2"), "--device", "cpu")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "pip install 'jigsawdata[dali]'" in refused.stderr and "--pipeline reference" in refused.stderr
