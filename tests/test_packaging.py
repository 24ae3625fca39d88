"""The wheel installs one top-level name, ``jigsawdata``, with every folder of the repository inside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "cli.py", "jigsawdata", "pipelines", "trainer", "benchmarks"]


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
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("jigsawdata-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"jigsawdata"}
    for module in ["cli.py", "__main__.py", "pipelines/dali.py", "trainer/pretrain.py", "benchmarks/gpu_check.py"]:
        assert f"jigsawdata/{module}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jigsawdata = jigsawdata.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_layout_runs_as_a_module(tmp_path):
    """The wheel's layout (cli inside the package) imports without the checkout on the path."""
    site = tmp_path / "site" / "jigsawdata"
    shutil.copytree(ROOT / "jigsawdata", site, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "cli.py", site / "cli.py")
    for name in ["pipelines", "trainer", "benchmarks"]:
        shutil.copytree(ROOT / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[:0] = [sys.argv[1]] + sys.argv[2:];"
                           "import jigsawdata, jigsawdata.trainer.pretrain as p; print(jigsawdata.__path__, p.__file__)",
                           str(site.parent), *[p for p in sys.path if p.endswith("site-packages")]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(ROOT) not in done.stdout and str(site) in done.stdout
