"""Packages of the ``test`` extra that some tests need: without one a test skips with the
reason on a developer's machine, and fails under CI=true, where the extra is installed."""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed (pip install -e '.[test]'): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
