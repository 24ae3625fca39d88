"""jigsawdata: cheap object-detection pre-training from the detection set itself.

The library turns a COCO-format detection set into aspect-ratio-grouped WebDataset shards of
object and background crops (``build``), which ``pipelines`` stitch into 2S+1T+1W jigsaw
images for ERF-adaptive dense classification pre-training (``trainer``).
"""

__version__ = "0.1.0"


def _checkout_root() -> list[str]:
    """The repository root when this is a source checkout, else nothing.

    The repository keeps ``pipelines/``, ``trainer/``, ``experiments/``, ``benchmarks/`` and ``cli.py`` beside this
    folder; the wheel installs them inside it (see ``setup.py``). Adding the checkout root to this
    package's path makes ``jigsawdata.pipelines`` and the rest resolve the same way in a checkout
    (tests, editable installs) as installed. An installed package has ``cli.py`` beside this file
    and is left alone, so it never reaches into site-packages' other top-level names.
    """
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "cli.py").exists() or not ((root / "cli.py").is_file() and (root / "pyproject.toml").is_file()):
        return []
    return [str(root)]


__path__ += _checkout_root()
