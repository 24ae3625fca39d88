"""Zero-padding share of jigsaw canvases: exact on crafted sizes, and what the pipeline makes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jigsawdata.pipelines.config import JigsawConfig
from jigsawdata.pipelines.reference import assemble
from jigsawdata.pipelines.utilisation import crop_sizes, padding_share

SIZES = {"S": np.array([[32, 32]]), "T": np.array([[16, 100]]), "W": np.array([[200, 20]])}


def _pipeline_padding(cfg: JigsawConfig) -> float:
    """Share of canvas pixels the reference pipeline leaves zero, for all-white crops."""
    white = {g: Image.new("RGB", tuple(int(v) for v in s[0]), (255, 255, 255)) for g, s in SIZES.items()}
    samples = [(white[g], *white[g].size, 0) for g in ("S", "S", "T", "W")]
    canvas, _ = assemble(samples, cfg, np.random.default_rng(0))
    return float((canvas.max(axis=2) == 0).mean())


def test_padding_of_crafted_sizes_is_exact_and_matches_the_pipeline():
    cfg = JigsawConfig(scale=(1.0, 1.0), flip_p=0.0)
    result = padding_share(SIZES, cfg, images=50)
    region = result["per_region"]
    assert region["TL"] == pytest.approx(1 - 32 * 32 / (64 * 64))
    assert region["TR"] == pytest.approx(1 - 160 * 20 / (160 * 64))  # the W crop is cut to 160 wide
    assert region["BL"] == pytest.approx(1 - 16 * 100 / (64 * 160))
    assert region["BR"] == pytest.approx(1 - 32 * 32 / (160 * 160))
    expected = 1 - (32 * 32 + 160 * 20 + 16 * 100 + 32 * 32) / 224**2
    assert result["padding_share"] == pytest.approx(expected)
    assert _pipeline_padding(cfg) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("fit", ["warp", "resize"])
def test_other_fit_modes_match_the_pipeline(fit):
    cfg = JigsawConfig(scale=(1.0, 1.0), flip_p=0.0, fit=fit)
    assert padding_share(SIZES, cfg, images=10)["padding_share"] == pytest.approx(_pipeline_padding(cfg), abs=1e-9)
    if fit == "warp":
        assert padding_share(SIZES, cfg, images=10)["padding_share"] == 0.0


def test_random_resize_fills_more_and_smaller_s_goes_top_left():
    sizes = {"S": np.array([[40, 40], [150, 150]]), "T": SIZES["T"], "W": SIZES["W"]}
    still = padding_share(sizes, JigsawConfig(scale=(1.0, 1.0)), images=4000)
    grown = padding_share(sizes, JigsawConfig(scale=(1.5, 1.5)), images=4000)
    assert grown["padding_share"] < still["padding_share"]
    # TL holds the 40x40 crop unless both draws are the 150x150 one (1 in 4).
    assert still["per_region"]["TL"] == pytest.approx(0.75 * (1 - 1600 / 4096), abs=0.02)
    assert padding_share(sizes, JigsawConfig(), images=500, seed=3) == padding_share(
        sizes, JigsawConfig(), images=500, seed=3
    )


def test_sizes_come_from_the_index(built_synthetic):
    sizes = crop_sizes(built_synthetic)
    assert all(len(sizes[g]) > 0 for g in ("S", "T", "W"))
    ratio = sizes["W"][:, 0] / sizes["W"][:, 1]
    assert (ratio > 1.5).all()
    share = padding_share(sizes, JigsawConfig(), images=200)["padding_share"]
    assert 0.0 < share < 1.0


def test_info_reports_the_padding_share(built_synthetic):
    from click.testing import CliRunner

    from jigsawdata.cli import main

    result = CliRunner().invoke(main, ["info", str(built_synthetic), "--padding"])
    assert result.exit_code == 0, result.output
    assert "zero padding:" in result.output and "% of canvas pixels" in result.output
