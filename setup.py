"""Installs the repository's top-level folders inside the one ``jigsawdata`` package.

``pyproject.toml`` maps ``pipelines/``, ``trainer/``, ``experiments/`` and ``benchmarks/`` to ``jigsawdata.*``
sub-packages; setuptools cannot map a single module that way, so ``cli.py`` is added here
as ``jigsawdata/cli.py``. Everything else is declared in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        # A build folder left by an older layout (top-level pipelines/, trainer/...) would
        # otherwise ship those names in the wheel beside jigsawdata.
        lib = Path(self.build_lib)
        for entry in lib.iterdir() if lib.is_dir() else ():
            if entry.name != "jigsawdata":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        super().run()

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "jigsawdata":
            modules.append((package, "cli", "cli.py"))
        return modules


setup(cmdclass={"build_py": BuildPy})
