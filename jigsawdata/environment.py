"""What a run's and a benchmark's numbers depend on: installed package versions."""

from __future__ import annotations

from importlib import metadata


def installed(*dists: str) -> str | None:
    """The version of the first of ``dists`` that is installed (``None``: none is). DALI, for
    one, is published under a name per CUDA version."""
    for name in dists:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None
