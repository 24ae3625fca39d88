"""The jigsaw pipelines: DALI (CPU backend here, GPU where present) against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jigsawdata.errors import InputError
from jigsawdata.pipelines.config import IMAGENET_MEAN, IMAGENET_STD, JigsawConfig, fixed
from jigsawdata.pipelines.dali import DaliJigsawLoader
from jigsawdata.pipelines.fit import place, window, window_anchor
from jigsawdata.pipelines.reference import reference_loader
from jigsawdata.pipelines.template import Template
from jigsawdata.tests.crafted import crop, write_crafted

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
PAD = (-MEAN / STD).view(3)  # what a zero pixel becomes after normalisation
RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (N, 3, H, W) float in 0..255 units."""
    return (images.float() * STD + MEAN) * 255


def take(loader, batches: int):
    it = iter(loader)
    out = [next(it) for _ in range(batches)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def dali(root, cfg, batch=8, batches=1, **kw):
    return take(DaliJigsawLoader(root, batch, cfg, num_threads=2, **kw), batches)


def ref(root, cfg, batch=8, batches=1):
    return take(reference_loader(root, batch, cfg, workers=0), batches)


def is_pad(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) mask of zero-padding pixels. The tolerance covers float rounding of the
    normalisation only: one grey level is 0.017 after it."""
    return ((images.float() - PAD.view(1, 3, 1, 1)).abs() < 1e-4).all(1)


# ------------------------------------------------------------------ template


def test_template_default_geometry():
    t = Template()
    assert t.boxes == ((0, 0, 64, 64), (64, 0, 224, 64), (0, 64, 64, 224), (64, 64, 224, 224))
    assert t.sizes == ((64, 64), (160, 64), (64, 160), (160, 160))
    fmap = t.feature_region_map()
    assert fmap.shape == (7, 7) and t.exact_on_grid
    expected = np.array([[0] * 2 + [1] * 5] * 2 + [[2] * 2 + [3] * 5] * 5)
    np.testing.assert_array_equal(fmap, expected)
    assert t.masks().sum(axis=(1, 2)).tolist() == [64 * 64, 160 * 64, 64 * 160, 160 * 160]


def test_template_is_configurable_and_validated():
    t = Template(canvas=256, split=96)
    assert t.sizes[3] == (160, 160) and t.grid == 8 and t.exact_on_grid
    assert not Template(split=70).exact_on_grid
    with pytest.raises(ValueError, match="split must be inside"):
        Template(split=224)


# ------------------------------------------------------------------ pure geometry


@pytest.mark.parametrize(
    "size,region,pos,anchor",
    [(100, 64, 0.0, 0), (100, 64, 1.0, 36), (100, 64, 0.5, 18), (53, 64, 0.5, -6), (59, 64, 0.7, -3), (64, 64, 0.3, 0)],
)
def test_window_anchor(size, region, pos, anchor):
    assert window_anchor(size, region, pos) == anchor


def test_window_and_place_pad_or_crop_per_axis():
    img = np.arange(40 * 200).reshape(200, 40, 1).astype(np.int32) + 1  # 40 wide, 200 tall
    xs, xe, xo = window(40, 64, 0.0)  # pad x (40 < 64)
    ys, ye, yo = window(200, 160, 1.0)  # crop y (200 > 160) from the bottom
    assert (xs, xe, xo, ys, ye, yo) == (0, 40, 0, 40, 200, 0)
    out = place(img[ys:ye, xs:xe], 64, 160, xo, yo)
    assert out.shape == (160, 64, 1)
    np.testing.assert_array_equal(out[:, :40], img[40:200])
    assert (out[:, 40:] == 0).all()


# ------------------------------------------------------------------ DALI versus reference


def _assert_same(a_img, a_lab, b_img, b_lab):
    assert torch.equal(a_lab, b_lab)
    # Both decode with libjpeg-turbo; allow one grey level for a different IDCT or rounding.
    assert (pixels(a_img) - pixels(b_img)).abs().max().item() <= 1.0


@pytest.mark.parametrize("pos", [0.0, 0.5, 1.0])
@pytest.mark.slow
def test_dali_cpu_equals_reference_with_augmentation_off_real(built_real, pos):
    cfg = fixed(crop_pos=pos)
    _assert_same(*dali(built_real, cfg, batch=8, batches=2), *ref(built_real, cfg, batch=8, batches=2))


def test_dali_cpu_equals_reference_on_synthetic(built_synthetic):
    cfg = fixed(crop_pos=0.25)
    _assert_same(*dali(built_synthetic, cfg, batch=6, batches=2), *ref(built_synthetic, cfg, batch=6, batches=2))


# ------------------------------------------------------------------ placement on crafted crops


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """S: a small red (label 1) and a large green (label 2) crop; T: blue (3); W: yellow (4)."""
    root = tmp_path_factory.mktemp("crafted")
    return write_crafted(
        root,
        {
            "S": [(crop(30, 30, RED), 1), (crop(120, 110, GREEN), 2)] * 4,
            "T": [(crop(40, 200, BLUE, bottom_color=RED), 3)] * 4,
            "W": [(crop(200, 40, YELLOW, right_color=GREEN), 4)] * 4,
        },
    )


def _region(images, r, template=Template()):
    x0, y0, x1, y1 = template.boxes[r]
    return images[:, :, y0:y1, x0:x1]


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_small_s_top_left_large_bottom_right_and_label_order(crafted, backend):
    cfg = JigsawConfig(scale=(1.0, 1.0), flip_p=0.0, crop_pos=0.0, initial_fill=4, seed=5)
    images, labels = (dali if backend == "dali" else ref)(crafted, cfg, batch=8, batches=4)
    for i in range(len(labels)):
        tl, tr, bl, br = labels[i].tolist()
        assert (tr, bl) == (4, 3)
        assert sorted((tl, br)) in ([1, 2], [1, 1], [2, 2])
    mixed = [(lab[0].item(), lab[3].item()) for lab in labels if lab[0] != lab[3]]
    assert mixed and all(pair == (1, 2) for pair in mixed), "the smaller S crop goes top-left"
    # Colours follow the labels: the centre of each region shows its label's crop.
    colour = {1: RED, 2: GREEN, 3: BLUE, 4: YELLOW}
    px = pixels(images)
    for i in range(len(labels)):
        for r, (y, x) in enumerate([(10, 10), (10, 64 + 20), (64 + 10, 10), (64 + 10, 64 + 10)]):
            np.testing.assert_allclose(px[i, :, y, x].numpy(), colour[labels[i, r].item()], atol=12)


@pytest.mark.parametrize("backend", ["dali", "reference"])
@pytest.mark.parametrize("pos", [0.0, 1.0])
def test_pad_versus_crop_per_axis(crafted, backend, pos):
    """T crop 40x200 in the 64x160 region: padded in x, cropped in y. W crop 200x40 in the
    160x64 region: cropped in x, padded in y. Small S 30x30 in 64x64: padded both ways."""
    cfg = fixed(crop_pos=pos)
    images, labels = (dali if backend == "dali" else ref)(crafted, cfg, batch=4)
    pad = is_pad(images)
    bl, tr, tl = _region(pad[:, None], 2)[:, 0], _region(pad[:, None], 1)[:, 0], _region(pad[:, None], 0)[:, 0]
    # x of the T region: exactly 64 - 40 = 24 padded columns, on the right for pos 0, left for pos 1.
    pad_cols = bl.all(dim=1)
    assert pad_cols.sum(dim=1).tolist() == [24] * 4
    assert pad_cols[:, 40:].all() if pos == 0.0 else pad_cols[:, :24].all()
    # y of the T region: 200 rows cropped to 160, none padded. The window starts at row
    # 0 (pos 0) or 40 (pos 1), so the crop's blue/red edge (its row 100) lands on row 100 or 60.
    assert not bl.all(dim=2).any()
    t_px = _region(pixels(images), 2).mean(0)
    edge, col = (100, 5) if pos == 0.0 else (60, 24 + 5)
    np.testing.assert_allclose(t_px[:, edge - 2, col].numpy(), BLUE, atol=12)
    np.testing.assert_allclose(t_px[:, edge + 2, col].numpy(), RED, atol=12)
    # W region: 40 rows in 64 -> 24 padded rows; 200 columns cropped to 160 -> none padded.
    assert tr.all(dim=2).sum(dim=1).tolist() == [24] * 4 and not tr.all(dim=1).any()
    # Small S: a 30x30 crop in 64x64 -> 34 padded rows and 34 padded columns.
    small = labels[:, 0] == 1
    assert tl[small].all(dim=2).sum(dim=1).tolist() == [34] * int(small.sum())
    assert tl[small].all(dim=1).sum(dim=1).tolist() == [34] * int(small.sum())


def test_padding_normalises_to_exactly_minus_mean_over_std(crafted):
    images, labels = dali(crafted, fixed(crop_pos=0.0), batch=4)
    corner = images[labels[:, 0] == 1, :, 63, 63]  # the small S crop (30x30) never reaches here
    expected = torch.tensor([(0 - m * 255) / (s * 255) for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert len(corner) and torch.allclose(corner, expected.expand_as(corner), atol=1e-5)
    # A flat crop of known colour normalises to (c/255 - mean) / std.
    centre = images[:, :, 64 + 10, 10]  # T region, blue top half
    np.testing.assert_allclose(
        centre.mean(0).numpy(), ((np.array(BLUE) / 255) - IMAGENET_MEAN) / IMAGENET_STD, atol=12 / 255 / 0.224
    )


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """Crops whose left half is red and right half green, to see flips; S 40x40 for scale."""
    root = tmp_path_factory.mktemp("halves")
    s = [(crop(40, 40, RED, right_color=GREEN), i % 10) for i in range(64)]
    return write_crafted(
        root,
        {
            "S": s,
            "T": [(crop(20, 60, RED, right_color=GREEN), 3)] * 16,
            "W": [(crop(60, 20, RED, right_color=GREEN), 4)] * 16,
        },
    )


@pytest.mark.parametrize("backend", ["dali", "reference"])
@pytest.mark.slow
def test_flip_rate_and_resize_range(halves, backend):
    cfg = JigsawConfig(crop_pos=0.0, seed=3, initial_fill=16)
    images, _ = (dali if backend == "dali" else ref)(halves, cfg, batch=32, batches=4)
    px = pixels(images)
    tl = _region(px, 0)  # a 40x40 S crop scaled by [0.8, 1.5] -> 32..60 px, padded to 64
    content = ~is_pad(_region(images, 0))
    widths = content.any(dim=1).sum(dim=1).float()
    heights = content.any(dim=2).sum(dim=1).float()
    assert torch.equal(widths, heights), "the aspect ratio is kept"
    assert widths.min() >= 32 and widths.max() <= 60
    assert widths.min() <= 36 and widths.max() >= 56, "the whole scale range is drawn"
    assert 40 <= widths.mean() <= 49  # uniform [32, 60] has mean 46
    flipped = (tl[:, 0, 2, 2] < tl[:, 1, 2, 2]).float()  # green (not red) in the top-left pixel
    n = len(flipped)
    assert abs(flipped.mean().item() - 0.5) < 3 * (0.25 / n) ** 0.5 + 0.02, flipped.mean()


def test_several_pipelines_draw_their_own_augmentations(halves):
    images, _ = take(
        DaliJigsawLoader(halves, 8, JigsawConfig(initial_fill=16), num_threads=1, pipelines=2, rank=0, world_size=1), 2
    )
    # Every S, T and W crop looks the same: only the random resize, window and flip can differ.
    assert not torch.equal(images[:8], images[8:])


@pytest.mark.parametrize("fit", ["warp", "resize"])
@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_fit_modes(crafted, fit, backend):
    cfg = fixed(fit=fit, crop_pos=0.0)
    images, _ = (dali if backend == "dali" else ref)(crafted, cfg, batch=4)
    pad = is_pad(images)
    if fit == "warp":
        assert not pad.any(), "warp fills every region"
    else:  # the 40x200 T crop fits as 32x160 in the 64x160 region: 32 padded columns
        assert _region(pad[:, None], 2)[:, 0].all(dim=1).sum(dim=1).tolist() == [32] * 4


# ------------------------------------------------------------------ iteration and sharding


def test_epoch_mode_ends_and_endless_mode_does_not(crafted):
    cfg = fixed()
    loader = DaliJigsawLoader(crafted, 4, cfg, num_threads=1, epoch=True)
    assert len(list(loader)) == 8 // 4
    endless = iter(DaliJigsawLoader(crafted, 4, cfg, num_threads=1))
    assert len([next(endless) for _ in range(5)]) == 5


@pytest.mark.slow
def test_several_pipelines_take_turns_each_over_its_own_share(built_real):
    """pipelines=2 gives the batches of two single pipelines over half the samples each (as
    two ranks would read them, each with its own seed), one from each in turn."""
    from jigsawdata.pipelines.dali import part_config

    cfg = JigsawConfig(seed=5, initial_fill=64)
    both = take(DaliJigsawLoader(built_real, 4, cfg, num_threads=1, pipelines=2, rank=0, world_size=1), 4)
    halves = [
        take(DaliJigsawLoader(built_real, 4, part_config(cfg, k), num_threads=1, rank=k, world_size=2), 2)
        for k in range(2)
    ]
    for i in range(4):
        images, labels = halves[i % 2]
        batch = slice(4 * (i // 2), 4 * (i // 2 + 1))
        assert torch.equal(both[0][4 * i : 4 * i + 4], images[batch]) and torch.equal(
            both[1][4 * i : 4 * i + 4], labels[batch]
        )
    assert not torch.equal(halves[0][0][:4], halves[1][0][:4])


@pytest.mark.slow
def test_several_pipelines_resume_where_their_state_was_taken(built_real):
    cfg = JigsawConfig(seed=2, initial_fill=64)
    first = DaliJigsawLoader(built_real, 4, cfg, num_threads=1, pipelines=2, rank=0, world_size=1)
    take(first, 3)  # the next batch is the second pipeline's
    state = first.state()
    expected = take(first, 3)
    resumed = DaliJigsawLoader(built_real, 4, cfg, num_threads=1, pipelines=2, rank=0, world_size=1, checkpoint=state)
    got = take(resumed, 3)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(InputError, match=r"2 DALI pipeline\(s\), not 1"):
        DaliJigsawLoader(built_real, 4, cfg, num_threads=1, rank=0, world_size=1, checkpoint=state)


def test_several_pipelines_end_an_epoch_together(crafted):
    loader = DaliJigsawLoader(crafted, 2, fixed(), num_threads=1, pipelines=2, epoch=True)
    assert len(list(loader)) == 8 // 2  # two pipelines, 4 S samples and 2 batches each
    loader.reset()
    assert len(list(loader)) == 8 // 2


def test_too_few_samples_for_the_ranks_is_a_clear_error(crafted):
    with pytest.raises(InputError, match=r"group T .* 4 samples, fewer than the 5 readers"):
        DaliJigsawLoader(crafted, 4, fixed(), rank=0, world_size=5)


def test_ranks_read_disjoint_samples(tmp_path):
    root = write_crafted(
        tmp_path,
        {
            "S": [(crop(30, 30), i) for i in range(8)],
            "T": [(crop(20, 60), i) for i in range(8)],
            "W": [(crop(60, 20), i) for i in range(8)],
        },
        num_classes=8,
    )
    seen = []
    for rank in range(2):
        _, labels = take(DaliJigsawLoader(root, 4, fixed(), num_threads=1, rank=rank, world_size=2), 1)
        seen.append(set(labels[:, 1].tolist()))  # W labels
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))
    seen = []
    for rank in range(2):
        _, labels = take(reference_loader(root, 4, fixed(), workers=0, rank=rank, world_size=2), 1)
        seen.append(set(labels[:, 1].tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))


def test_missing_group_is_a_clear_error(tmp_path):
    root = write_crafted(tmp_path, {"S": [(crop(30, 30), 1)] * 4, "T": [(crop(20, 60), 1)] * 4})
    with pytest.raises(InputError, match="no W samples"):
        DaliJigsawLoader(root, 2, fixed())


@pytest.mark.gpu
def test_dali_gpu_matches_cpu(built_real):
    cfg = fixed(crop_pos=0.5)
    gpu_img, gpu_lab = take(DaliJigsawLoader(built_real, 8, cfg, device="gpu", device_id=0), 2)
    cpu_img, cpu_lab = dali(built_real, cfg, batch=8, batches=2)
    assert gpu_img.is_cuda and torch.equal(gpu_lab.cpu(), cpu_lab)
    # nvJPEG and libjpeg-turbo may differ by a few levels (different IDCT and upsampling).
    assert (pixels(gpu_img.cpu()) - pixels(cpu_img)).abs().mean().item() < 2.0
    fp16, _ = take(DaliJigsawLoader(built_real, 8, cfg, device="gpu", device_id=0, fp16=True), 1)
    assert fp16.dtype == torch.float16


@pytest.mark.parametrize("scale", [0.8, 1.5])
def test_dali_cpu_and_reference_resize_alike(built_real, scale):
    """With a fixed resize factor both resample the same window: PIL's and DALI's bilinear
    filters differ by rounding only (seen: mean 0.1, max 4 levels)."""
    cfg = JigsawConfig(scale=(scale, scale), flip_p=0.0, crop_pos=0.3, shuffle=False)
    a, la = dali(built_real, cfg)
    b, lb = ref(built_real, cfg)
    diff = (pixels(a) - pixels(b)).abs()
    assert torch.equal(la, lb) and diff.mean() < 0.5 and diff.max() <= 6


@pytest.mark.parametrize("pipeline", ["dali", "reference"])
def test_preview_writes_a_grid(built_synthetic, tmp_path, pipeline):
    from click.testing import CliRunner
    from PIL import Image

    from jigsawdata.cli import main

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        main,
        ["preview", str(built_synthetic), "--out", str(out), "--count", "6", "--columns", "3", "--pipeline", pipeline],
    )
    assert result.exit_code == 0, result.output
    grid = Image.open(out)
    assert grid.size == (3 * (224 + 4) + 4, 2 * (224 + 4) + 4)
    # Region borders are drawn in white at the split (x = 64 on the first tile).
    assert grid.getpixel((4 + 64, 4 + 100)) == (255, 255, 255)


def test_parse_labels():
    from jigsawdata.pipelines.dali import parse_labels

    raw = [b"0", b"7", b"80", b"1203", b"999999999"]
    digits = torch.tensor([list(r.ljust(9, b"\0")) for r in raw], dtype=torch.uint8)
    assert parse_labels(digits).tolist() == [0, 7, 80, 1203, 999999999]


def test_epoch_mode_gives_every_rank_the_same_number_of_batches(tmp_path):
    root = write_crafted(
        tmp_path,
        {"S": [(crop(30, 30), i % 8) for i in range(7)], "T": [(crop(20, 60), 1)] * 4, "W": [(crop(60, 20), 2)] * 4},
        num_classes=8,
    )
    counts = [
        len(list(DaliJigsawLoader(root, 2, fixed(), num_threads=1, rank=r, world_size=2, epoch=True))) for r in range(2)
    ]
    # 7 S samples: shares of 4 and 3; unpadded, DALI gives the ranks different epoch lengths.
    assert counts[0] == counts[1] >= 1


@pytest.mark.parametrize("fit, decoders", [("pad_crop", {"decoders__ImageSlice"}), ("warp", {"decoders__Image"})])
def test_pad_crop_decodes_only_the_window(built_synthetic, fit, decoders):
    """pad_crop draws the resize and the window from the JPEG header and decodes only that
    region of each crop (the parity tests above show the pixels are those of a whole decode);
    the warp ablation needs the whole crop."""
    import re

    from jigsawdata.pipelines.dali import jigsaw_pipeline

    graph = jigsaw_pipeline(built_synthetic, 2, JigsawConfig(fit=fit)).serialize()
    assert {name.decode() for name in re.findall(rb"decoders__\w+", graph)} == decoders


def test_gpu_stitch_equals_cpu_stitch():
    """The GPU assembles the canvas by padding each piece and concatenating the regions, the
    CPU by one multi_paste; run both on the CPU over random pieces, placements and swaps."""
    from nvidia.dali import fn, pipeline_def

    from jigsawdata.pipelines import dali as dali_pipeline

    rng = np.random.default_rng(0)
    template, batch = Template(), 16
    swaps = rng.random(batch) < 0.5
    pos = rng.random((batch, 4, 2)).astype(np.float32)
    pieces, offsets = [[] for _ in dali_pipeline.READERS], np.zeros((batch, 4, 2), dtype=np.float32)
    for n in range(batch):
        order = dali_pipeline._PLACEMENTS[int(swaps[n])]
        for i, (name, _) in enumerate(dali_pipeline.READERS):
            region_w, region_h = template.sizes[order.index(name)]
            h, w = rng.integers(1, region_h + 1), rng.integers(1, region_w + 1)
            pieces[i].append(rng.integers(1, 256, (h, w, 3), dtype=np.uint8))
            offsets[n, i] = [-window_anchor(h, region_h, pos[n, i, 0]), -window_anchor(w, region_w, pos[n, i, 1])]

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, enable_conditionals=True)
    def stitch():
        inputs = [fn.external_source(source=[p], cycle=True, layout="HWC") for p in pieces]
        swap, where, offset = (fn.external_source(source=[list(a)], cycle=True) for a in (swaps, pos, offsets))
        size, origin = dali_pipeline._regions(template, swap)
        return (
            dali_pipeline._paste(inputs, origin, offset, template),
            dali_pipeline._pad_and_cat(inputs, size, where, swap),
        )

    pipe = stitch()
    pipe.build()
    pasted, concatenated = (np.stack([np.array(out[n]) for n in range(batch)]) for out in pipe.run())
    assert pasted.shape == (batch, template.canvas, template.canvas, 3)
    assert (pasted == 0).any() and (pasted > 0).mean() > 0.2, "padding and pieces both present"
    np.testing.assert_array_equal(pasted, concatenated)
