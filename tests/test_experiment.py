"""The ablation grid: cells, cost matching, and a smoke run of the whole thing through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.trainer.config import PretrainConfig
from jigsawdata.trainer.experiment import _scratch_epochs, cells, preset


def test_cells_of_a_grid():
    cfg = preset("tiny", "x", fits=("warp", "resize"), imagenet="r18.pth")
    assert [(c.name, c.init, c.loss, c.fit) for c in cells(cfg)] == [
        ("erf", "jigsaw", "erf", "pad_crop"), ("blockwise", "jigsaw", "blockwise", "pad_crop"),
        ("global", "jigsaw", "global", "pad_crop"), ("erf-warp", "jigsaw", "erf", "warp"),
        ("erf-resize", "jigsaw", "erf", "resize"), ("scratch", "scratch", None, "pad_crop"),
        ("imagenet", "imagenet", None, "pad_crop")]
    with pytest.raises(InputError, match="--preset"):
        preset("huge", "x")


def test_scratch_is_trained_as_long_as_jigsaw_costs():
    cfg = preset("tiny", "x", finetune={"epochs": 4})
    erf = {"init": "jigsaw", "pretrain_device_hours": 1.0, "finetune_device_hours": 2.0, "finetune_epochs": 4}
    assert _scratch_epochs(cfg, {"erf": erf}) == 6  # 0.5 h per epoch, 3 h in all
    assert _scratch_epochs(cfg, {"erf": dict(erf, pretrain_device_hours=0.0)}) == 4  # never shorter
    assert _scratch_epochs(cfg, {}) == 4


def test_smoke_grid_writes_the_table_and_does_not_rerun_finished_cells(tmp_path):
    out = tmp_path / "grid"
    args = ["experiment", "--out", str(out), "--preset", "tiny", "--smoke", "--losses", "erf"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = (out / "table.md").read_text()
    assert "| erf |" in table and "| scratch |" in table and "AP50" in table and "CPU-h" in table
    report = json.loads((out / "experiment.json").read_text())
    assert list(report["cells"]) == ["erf", "scratch"]
    erf, scratch = report["cells"]["erf"], report["cells"]["scratch"]
    assert erf["pretrain_device_hours"] > 0 and erf["validation"]["val_images"] == 2
    assert scratch["matched_to"] == "erf" and scratch["pretrain_device_hours"] == 0.0
    assert json.loads((out / "cells" / "scratch" / "finetune" / "config.json").read_text())["norm"] == "gn"
    assert (out / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (out / "cells" / "erf" / "cell.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (out / "cells" / "erf" / "cell.json").stat().st_mtime_ns == stamp


def test_presets_set_only_what_differs_from_the_run_settings():
    paper = preset("paper", "x")
    assert paper.pretrain_config(shards="s", out="o") == PretrainConfig(shards="s", out="o", arch="resnet50")
    tiny = preset("tiny", "x", pretrain={"iterations": 7, "warmup": None})
    run = tiny.pretrain_config(shards="s", out="o", loss="global")
    assert (run.iterations, run.warmup, run.canvas, run.arch, run.loss, run.device) == (7, 16, 128, "resnet18",
                                                                                          "global", "cpu")
    with pytest.raises(InputError, match="PretrainConfig has no settings ft_lr"):
        preset("tiny", "x", pretrain={"ft_lr": 0.1})
    with pytest.raises(InputError, match="--lr must be > 0"):
        preset("tiny", "x", finetune={"lr": 0})
