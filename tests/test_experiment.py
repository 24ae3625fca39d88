"""The experiment grid: arms and the run settings each option reaches, cost matching, the
output folder's rules, the table's statistics, and smoke runs of the whole grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.experiments.config import FORMAT, arms, preset
from jigsawdata.experiments.grid import Data, claim_experiment_dir, finetune_config, pretrain_config, scratch_epochs
from jigsawdata.experiments.report import format_markdown, table_rows
from jigsawdata.trainer.config import PretrainConfig

DATA = Data("coco", "train", "val", "shards", "val-shards", "shards-nocontext")


def _full(out="x", **overrides):
    return preset(
        "tiny",
        out,
        losses=("erf", "global"),
        taus=(0.5,),
        lengths=(1.0, 2.0),
        fits=("warp",),
        no_context=True,
        imagenet="r18.pth",
        schedules=("1x", "2x"),
        **overrides,
    )


def test_arms_of_the_whole_grid():
    got = [(a.name, a.init, a.loss, a.tau, a.fit, a.length, a.context) for a in arms(_full())]
    assert got == [
        ("erf", "jigsaw", "erf", None, "pad_crop", 4.0, True),
        ("global", "jigsaw", "global", None, "pad_crop", 4.0, True),
        ("erf-tau0.5", "jigsaw", "erf", 0.5, "pad_crop", 4.0, True),
        ("erf-1x", "jigsaw", "erf", None, "pad_crop", 1.0, True),
        ("erf-2x", "jigsaw", "erf", None, "pad_crop", 2.0, True),
        ("erf-nocontext", "jigsaw", "erf", None, "pad_crop", 4.0, False),
        ("blockwise", "jigsaw", "blockwise", None, "pad_crop", 4.0, True),  # Table 1's pad & crop row
        ("blockwise-warp", "jigsaw", "blockwise", None, "warp", 4.0, True),
        ("imagenet", "imagenet", None, None, "pad_crop", 4.0, True),
        ("random", "random", None, None, "pad_crop", 4.0, True),
        ("scratch", "scratch", None, None, "pad_crop", 4.0, True),
    ]


def test_every_option_reaches_the_runs_of_its_arm():
    cfg = _full(detector="c4", arch="resnet50", epochs_1x=5)
    by_name = {a.name: a for a in arms(cfg)}

    def pre(name: str, seed: int = 3) -> PretrainConfig:
        arm = by_name[name]
        return pretrain_config(
            cfg, arm, seed, DATA.shards if arm.context else DATA.shards_no_context, DATA.val_shards, Path("run")
        )

    full = cfg.pretrain["iterations"]
    assert (pre("erf").loss, pre("erf").tau, pre("erf").iterations, pre("erf").seed) == ("erf", 0.7, full, 3)
    assert pre("erf-tau0.5").tau == 0.5
    assert pre("erf-1x").iterations == round(full / 4) and pre("erf-2x").iterations == round(full / 2)
    assert pre("erf-nocontext").shards == "shards-nocontext" and pre("erf").shards == "shards"
    assert (pre("blockwise-warp").loss, pre("blockwise-warp").fit) == ("blockwise", "warp")
    assert (pre("global").loss, pre("global").arch, pre("global").val_shards) == ("global", "resnet50", "val-shards")

    def fine(name: str, epochs: int = 5):
        return finetune_config(cfg, by_name[name], 4, DATA, Path("run"), "init", epochs)

    for name in ("erf", "imagenet", "blockwise-warp"):  # one recipe for every init arm
        assert (fine(name).norm, fine(name).box_head, fine(name).detector, fine(name).arch) == (
            None,
            None,
            "c4",
            "resnet50",
        )
    assert (fine("random").norm, fine("random").box_head, fine("random").detector) == ("gn", None, "c4")
    # Scratch is He et al.'s FPN recipe whatever the grid's detector (Table 5 set it against C4).
    assert (fine("scratch").norm, fine("scratch").box_head, fine("scratch").detector) == ("gn", "4conv1fc", "fpn")
    assert (fine("scratch").epochs, fine("scratch").seed) == (5, 4)
    fpn = {a.name: a for a in arms(_full(detector="fpn"))}
    random = finetune_config(_full(detector="fpn"), fpn["random"], 0, DATA, Path("r"), "scratch", 3)
    assert (random.norm, random.box_head) == ("gn", "2fc")  # the head the jigsaw arms get
    mask = {a.name: a for a in arms(_full(detector="mask"))}
    scratch = finetune_config(_full(detector="mask"), mask["scratch"], 0, DATA, Path("r"), "scratch", 3)
    assert (scratch.norm, scratch.box_head, scratch.detector) == ("gn", "4conv1fc", "mask")


def test_options_are_checked_before_anything_runs():
    with pytest.raises(InputError, match="--match blockwise"):
        preset("tiny", "x", match="blockwise")
    with pytest.raises(InputError, match="--baseline imagenet is not an arm"):
        preset("tiny", "x", baseline="imagenet")
    with pytest.raises(InputError, match="--taus"):
        preset("tiny", "x", taus=(1.5,))
    with pytest.raises(InputError, match="--schedules must look like"):
        preset("tiny", "x", schedules=("long",))
    with pytest.raises(InputError, match="--fits"):
        preset("tiny", "x", fits=("pad_crop",))
    with pytest.raises(InputError, match="arms given twice: erf-tau0.5"):
        preset("tiny", "x", taus=(0.5, 0.5))
    for twice in (("1x", "1x"), ("1x", "1.0x")):
        with pytest.raises(InputError, match="names one schedule twice"):
            preset("tiny", "x", schedules=twice)
    # Values that would repeat the erf arm under another name.
    with pytest.raises(InputError, match="--taus 0.7 is the erf arm's own tau"):
        preset("tiny", "x", taus=(0.5, 0.7))
    with pytest.raises(InputError, match="--pretrain-iterations 4x is the full length"):
        preset("tiny", "x", lengths=(2.0, 4.0))
    with pytest.raises(InputError, match="--split and --val-split name splits of --coco"):
        preset("tiny", "x", split="train2017")
    with pytest.raises(InputError, match="--preset"):
        preset("huge", "x")
    with pytest.raises(InputError, match="PretrainConfig has no settings ft_lr"):
        preset("tiny", "x", pretrain={"ft_lr": 0.1})
    with pytest.raises(InputError, match="--lr must be > 0"):
        preset("tiny", "x", finetune={"lr": 0})
    assert preset("tiny", "x", losses=(), scratch=False).baseline_arm == "random"


def test_presets_set_only_what_differs_from_the_run_settings():
    paper = preset("paper", "x")
    assert paper.pretrain_config(shards="s", out="o") == PretrainConfig(shards="s", out="o", arch="resnet50")
    assert (paper.detector, paper.epochs_1x) == ("c4", 13)
    tiny = preset("tiny", "x", pretrain={"iterations": 7, "warmup": None})
    run = tiny.pretrain_config(shards="s", out="o", loss="global")
    assert (run.iterations, run.warmup, run.canvas, run.arch, run.loss, run.device) == (
        7,
        8,
        128,
        "resnet18",
        "global",
        "cpu",
    )
    gpu = preset("gpu", "x")
    assert (gpu.device, gpu.seeds, gpu.pretrain["pipeline"], gpu.pretrain["iterations"] >= 1000) == (
        "cuda",
        2,
        "dali",
        True,
    )
    assert gpu.synthetic_images >= 1500 and gpu.synthetic_val_images >= 1000


def test_scratch_gets_at_least_the_matched_cost_and_not_an_epoch_more():
    probe = {"device_seconds_per_iteration": 1.0, "iterations_per_epoch": 30}  # 30 device-seconds an epoch
    for budget_s in (1.0, 29.0, 30.0, 31.0, 600.0, 6001.0):
        epochs = scratch_epochs(budget_s / 3600, probe)
        assert epochs * 30 >= budget_s and (epochs - 1) * 30 < max(budget_s, 30)


def _result(arm, seed, ap, schedule="1x", **extra):
    bbox = {"AP": ap / 100, "AP50": 2 * ap / 100, "AP75": ap / 200, "APs": -1.0, "APm": ap / 100, "APl": ap / 100}
    return {
        "arm": arm,
        "seed": seed,
        "schedule": schedule,
        "description": arm,
        "epochs": 3,
        "full_lr_iterations": 100,
        "pretrain_device_hours": 0.1 if arm == "erf" else 0.0,
        "finetune_device_hours": 0.2,
        "device": "cpu",
        "eval": {"bbox": bbox},
        **extra,
    }


def test_table_shows_mean_and_spread_and_marks_only_differences_beyond_twice_the_spread():
    results = [
        _result("erf", 0, 10.0),
        _result("erf", 1, 12.0),
        _result("random", 0, 5.0),
        _result("random", 1, 5.5),
        _result("global", 0, 6.0),
        _result("global", 1, 4.0),
    ]
    rows = {r["arm"]: r for r in table_rows(results, "random")}
    erf = rows["erf"]
    assert erf["AP"] == pytest.approx(11.0) and erf["AP_std"] == pytest.approx(2**0.5)
    assert erf["AP_by_seed"] == {0: 10.0, 1: 12.0} and erf["total_device_hours"] == pytest.approx(0.3)
    assert erf["delta_AP"] == pytest.approx(5.75) and erf["significant"]  # 5.75 > 2 x 1.41
    assert rows["global"]["delta_AP"] == pytest.approx(-0.25) and not rows["global"]["significant"]
    assert "delta_AP" not in rows["random"] and rows["random"]["APs"] is None  # COCOeval's -1: no small objects
    text = format_markdown(list(rows.values()), "CPU", "random")
    assert "| 11.0 ± 1.4 |" in text and "+5.8 *" in text and "| -0.2 |" in text and "| – |" in text
    one_seed = table_rows([_result("erf", 0, 30.0), _result("random", 0, 1.0)], "random")
    assert one_seed[0]["delta_AP"] == pytest.approx(29.0) and not one_seed[0]["significant"]


def test_a_partial_grid_compares_only_the_seeds_both_rows_have():
    rows = table_rows([_result("erf", 0, 10.0), _result("random", 0, 4.0), _result("erf", 1, 30.0)], "random")
    erf = rows[0]
    assert erf["AP"] == pytest.approx(20.0) and erf["delta_AP"] == pytest.approx(6.0)  # seed 0 against seed 0
    assert erf["delta_seeds"] == [0] and not erf["significant"]


def test_imagenet_cost_is_external_and_scratch_shows_its_budget():
    results = [
        _result("imagenet", 0, 9.0, pretrain_device_hours=None),
        _result("random", 0, 2.0),
        _result("scratch", 0, 3.0, matched_to="erf", budget_device_hours=0.5, planned_device_hours=0.55),
    ]
    rows = {r["arm"]: r for r in table_rows(results, "random")}
    assert rows["imagenet"]["pretrain_device_hours"] is None and rows["imagenet"]["total_device_hours"] == 0.2
    assert rows["scratch"]["budget_ratio"] == pytest.approx(0.4)  # 0.2 h measured against 0.5 h given
    text = format_markdown(list(rows.values()), "CPU", "random")
    assert "| external | 0.200 |" in text and "given erf's 0.500 h (measured below it: 0.40x)" in text
    # Above the budget by the rounding to whole epochs is the plan; a run the timing probe
    # misjudged (the machine's speed changed) is flagged as not matched.
    over = table_rows(
        [
            _result("scratch", s, 3.0, matched_to="erf", budget_device_hours=0.15, planned_device_hours=p)
            for s, p in ((0, 0.19), (1, 0.1))
        ],
        "scratch",
    )
    assert over[0]["plan_ratio"] == pytest.approx(2.0) and over[0]["budget_ratio"] == pytest.approx(0.2 / 0.15)
    text = format_markdown(over, "CPU", "scratch")
    assert "(measured 2.00x the whole epochs planned for it: not matched)" in text and "measured below" not in text
    planned = table_rows(
        [_result("scratch", 0, 3.0, matched_to="erf", budget_device_hours=0.15, planned_device_hours=0.19)], "scratch"
    )
    assert "(measured" not in format_markdown(planned, "CPU", "scratch")  # 0.2 h against 0.19 planned: matched


def test_costs_too_small_to_show_are_not_shown_as_none():
    rows = table_rows([_result("erf", 0, 5.0, finetune_device_hours=0.0002), _result("random", 0, 5.02)], "random")
    text = format_markdown(rows, "CPU", "random")
    assert "| 0.100 | <0.001 | 0.100 |" in text  # pre-training 0.1 h, fine-tuning 0.72 s
    assert "| 0.0 | 0.100 |" in text and "-0.0" not in text  # ΔAP -0.02 rounds to nothing
    assert "| – | 0 | 0.200 | 0.200 |" in text  # the control pre-trains nothing: no cost, shown as 0


def test_the_output_folder_is_new_empty_or_this_grids_own(tmp_path):
    cfg = preset("tiny", str(tmp_path / "grid"))
    claim_experiment_dir(tmp_path / "grid", cfg)  # new: fine, and nothing is created
    assert not (tmp_path / "grid").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("a user's own table")
    with pytest.raises(InputError, match="is not empty"):
        claim_experiment_dir(mine, preset("tiny", str(mine)))
    assert (mine / "table.md").read_text() == "a user's own table" and sorted(p.name for p in mine.iterdir()) == [
        "table.md"
    ]
    grid = tmp_path / "grid"
    grid.mkdir()
    saved = json.loads(json.dumps(preset("tiny", str(grid)).__dict__, default=list))
    (grid / "config.json").write_text(json.dumps({"format": FORMAT, "config": saved}))
    claim_experiment_dir(grid, preset("tiny", str(grid), seeds=3, schedules=("1x", "2x"), taus=(0.6,)))
    with pytest.raises(InputError, match="other settings \\(arch, detector;"):
        claim_experiment_dir(grid, preset("tiny", str(grid), arch="resnet50", detector="c4"))
    (grid / "config.json").write_text('{"format": "jigsawdata-exp')
    with pytest.raises(InputError, match="config.json is damaged \\(Unterminated string"):
        claim_experiment_dir(grid, cfg)
    (grid / "config.json").write_text('{"format": "jigsawdata-experiment-1", "config": {}}')
    with pytest.raises(InputError, match="not a grid of this version of jigsawdata \\(jigsawdata-experiment-1;"):
        claim_experiment_dir(grid, cfg)
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        with pytest.raises(InputError, match="afile is a file, not a folder"):
            claim_experiment_dir(out, preset("tiny", str(out)))


def test_a_refused_grid_leaves_nothing_behind(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["experiment", "--out", str(out), "--smoke"])
    assert result.exit_code == 1 and "is not empty (notes.txt)" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    bad = CliRunner().invoke(main, ["experiment", "--out", str(tmp_path / "new"), "--smoke", "--match", "global"])
    assert bad.exit_code != 0 and "--match global" in bad.output and not (tmp_path / "new").exists()


def test_a_grid_refused_for_its_data_leaves_nothing_behind(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    args = ["experiment", "--preset", "paper", "--coco", str(coco), "--smoke", "--out"]
    # The held-out split is missing: refused before anything is built or written.
    result = CliRunner().invoke(main, [*args, str(tmp_path / "new")])
    assert result.exit_code == 1 and "instances_val2017.json" in result.output and "Traceback" not in result.output
    assert "found instances_train2017.json (use --val-split)" in result.output
    assert not (tmp_path / "new").exists()
    # Both exist but cannot be read: found while preparing the data, and what was written goes.
    (coco / "annotations" / "instances_val2017.json").write_text("{")
    for split in ("train2017", "val2017"):
        (coco / split).mkdir()
    (tmp_path / "empty").mkdir()
    for out in ("new", "empty"):
        result = CliRunner().invoke(main, [*args, str(tmp_path / out)])
        assert result.exit_code == 1 and "instances_" in result.output, result.output
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


def test_one_grid_at_a_time_in_a_folder(tmp_path):
    from jigsawdata.build.outdir import BuildLock
    from jigsawdata.experiments.grid import LOCK_NAME

    out = tmp_path / "grid"
    out.mkdir()
    with BuildLock(out / LOCK_NAME, "experiment"):  # a grid running there
        result = CliRunner().invoke(main, ["experiment", "--out", str(out), "--smoke"])
        assert result.exit_code == 1 and f"another experiment is writing to {out}" in result.output
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing of the refused grid


def _runs(out: Path, arm: str) -> dict[str, dict]:
    """Each run's config.json under an arm, by its path below the arm."""
    return {
        str(p.parent.relative_to(out / "arms" / arm)): json.loads(p.read_text())
        for p in (out / "arms" / arm).rglob("config.json")
    }


@pytest.mark.slow
def test_smoke_grid_with_seeds_compares_every_arm_at_matched_cost(tmp_path):
    out = tmp_path / "grid"
    args = ["experiment", "--out", str(out), "--smoke", "--seeds", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "experiment.json").read_text())
    assert [(r["arm"], r["seed"]) for r in report["results"]] == [
        ("erf", 0),
        ("random", 0),
        ("scratch", 0),
        ("erf", 1),
        ("random", 1),
        ("scratch", 1),
    ]
    by = {(r["arm"], r["seed"]): r for r in report["results"]}
    for seed in (0, 1):
        erf, scratch = by[("erf", seed)], by[("scratch", seed)]
        cost = erf["pretrain_device_hours"] + erf["finetune_device_hours"]
        assert erf["pretrain_device_hours"] > 0 and scratch["budget_device_hours"] == pytest.approx(cost)
        assert scratch["planned_device_hours"] >= cost and scratch["finetune_device_hours"] > 0
        assert scratch["epochs"] == _runs(out, "scratch")[f"seed-{seed}/finetune-1x"]["epochs"]
        assert erf["validation"]["val_images"] == 2 and 0 <= erf["knn"]["knn_top1"] <= 1
        assert "knn" in by[("random", seed)] and "knn" not in scratch
    assert _runs(out, "random")["seed-1/finetune-1x"]["norm"] == "gn"
    assert _runs(out, "scratch")["seed-0/finetune-1x"]["box_head"] == "4conv1fc"
    table = (out / "table.md").read_text()
    assert "| erf | Jigsaw, erf | fpn | 1x (1, " in table and " ± " in table and "ΔAP vs random" in table
    assert "CPU-h" in table and (out / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (out / "arms" / "erf" / "seed-0" / "1x.json").stat().st_mtime_ns
    # A run stopped before its first checkpoint (its folder holds only config.json): started anew.
    (out / "arms" / "random" / "seed-1" / "1x.json").unlink()
    (out / "arms" / "random" / "seed-1" / "finetune-1x" / "checkpoint.pt").unlink()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (out / "arms" / "erf" / "seed-0" / "1x.json").stat().st_mtime_ns == stamp  # finished: not redone
    assert (out / "arms" / "random" / "seed-1" / "1x.json").is_file()
    # A damaged or edited result is refused, naming the file and the way out.
    result_file = out / "arms" / "erf" / "seed-0" / "1x.json"
    kept = result_file.read_text()
    edited = json.loads(kept)
    edited["eval"]["bbox"]["AP"] = 0.9
    for damage, problem in (
        (kept[:40], ""),
        ("[]", "not a JSON object"),  # "": JSON's own words
        (json.dumps({k: v for k, v in edited.items() if k != "eval"}), "no eval"),
        (json.dumps(edited), "its metrics differ from"),
        (json.dumps({k: v for k, v in json.loads(kept).items() if k != "knn"}), "its knn differ from"),
    ):
        result_file.write_text(damage)
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 1 and f"{result_file} is damaged ({problem}" in refused.output, refused.output
        assert "delete it and rerun" in refused.output
    result_file.unlink()  # the way out: the run is evaluated again from its checkpoint
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and json.loads(result_file.read_text())["eval"] == json.loads(kept)["eval"]


@pytest.mark.slow
def test_smoke_grid_runs_every_option(tmp_path):
    out = tmp_path / "grid"
    result = CliRunner().invoke(
        main,
        [
            "experiment",
            "--out",
            str(out),
            "--smoke",
            "--losses",
            "erf",
            "--taus",
            "0.5",
            "--pretrain-iterations",
            "2x",
            "--no-context",
            "--fits",
            "warp",
            "--no-random",
            "--no-scratch",
            "--schedules",
            "2x",
            "--detector",
            "c4",
            "--baseline",
            "erf",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    pre = {
        arm: _runs(out, arm)["seed-5/pretrain"]
        for arm in ("erf", "erf-tau0.5", "erf-2x", "erf-nocontext", "blockwise", "blockwise-warp")
    }
    assert pre["erf-tau0.5"]["tau"] == 0.5 and pre["erf"]["tau"] == 0.7
    assert pre["erf-2x"]["iterations"] == 1 and pre["erf"]["iterations"] == 2
    assert pre["erf-nocontext"]["shards"].endswith("shards-nocontext")
    nocontext = json.loads((out / "shards-nocontext" / "manifest.json").read_text())
    assert nocontext["params"]["sampling"]["max_enlarge"] == 1.0
    assert (pre["blockwise-warp"]["fit"], pre["blockwise-warp"]["loss"]) == ("warp", "blockwise")
    fine = _runs(out, "blockwise-warp")["seed-5/finetune-2x"]
    assert (fine["detector"], fine["epochs"], fine["seed"]) == ("c4", 2, 5)
    assert "| blockwise-warp |" in (out / "table.md").read_text()
