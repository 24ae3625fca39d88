"""The jigsaw pipeline on NVIDIA DALI: GPU (nvJPEG + CUDA kernels) or DALI's CPU backend.

Four webdataset readers — two over the S shards with different seeds, one over T, one
over W — feed one graph (all readers of a DALI pipeline share a batch size, which is how two
S crops per image are drawn). Per sample, from the JPEG header alone: draw the random resize
(aspect kept) and the region window, and order the two S crops by resized area; then decode
only the source pixels that reach the window, resample them into it with a random
horizontal flip, and zero-pad the axes smaller than the region. The four pieces are
concatenated into the canvas and normalised. ``device`` selects where this runs; the graph
is the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from jigsawdata.errors import InputError
from jigsawdata.location import is_url

from .config import IMAGENET_MEAN, IMAGENET_STD, JigsawConfig
from .ranks import process_info
from .shardset import GroupShards, check_enough_samples, open_shard_set
from .template import READER_GROUPS

log = logging.getLogger(__name__)

READERS: tuple[tuple[str, str], ...] = tuple(zip(("S0", "S1", "T", "W"), READER_GROUPS))
_MAX_LABEL_DIGITS = 9
_ROI_MARGIN = 4.0
"""Source pixels decoded around a window's ROI: more than the bilinear filter's support at
the smallest resize (1 / 0.8 px) plus the reach of 2x chroma upsampling."""


def reader_seed(seed: int, reader: int) -> int:
    """A distinct, positive 31-bit seed per reader, derived from the pipeline seed."""
    return int(np.random.SeedSequence([seed, reader]).generate_state(1)[0] & 0x7FFFFFFF)


def _label_bytes(cls):
    """The ``.cls`` component (ASCII decimal) zero-padded to a fixed width, so a batch of
    them is one dense tensor; :func:`parse_labels` turns it into integers on the torch side,
    which costs nothing there and saves a dozen graph operators per reader here."""
    from nvidia.dali import fn

    return fn.pad(cls, shape=[_MAX_LABEL_DIGITS], fill_value=0)


def parse_labels(digits: torch.Tensor) -> torch.Tensor:
    """(..., D) uint8 ASCII digits, zero-padded at the end -> (...) int64."""
    d = digits.to(torch.int64)
    valid = d >= 48
    value = torch.zeros(d.shape[:-1], dtype=torch.int64, device=d.device)
    for i in range(d.shape[-1]):
        value = torch.where(valid[..., i], value * 10 + d[..., i] - 48, value)
    return value


def _read(group: GroupShards, name: str, seed: int, cfg: JigsawConfig, shard_id: int, num_shards: int,
          pad_last_batch: bool):
    from nvidia.dali import fn

    jpg, cls = fn.readers.webdataset(
        paths=list(group.tars), index_paths=list(group.indexes), ext=["jpg", "cls"],
        missing_component_behavior="error", random_shuffle=cfg.shuffle, initial_fill=cfg.initial_fill,
        seed=seed, shard_id=shard_id, num_shards=num_shards, pad_last_batch=pad_last_batch, name=name)
    return jpg, _label_bytes(cls)


def _resized_size(jpg, cfg: JigsawConfig):
    """``(source, resized)`` float ``[height, width]`` of each sample, from its JPEG header
    alone: the random resize is drawn before anything is decoded. Sizes travel as one
    2-vector: every graph operator costs per batch, so fewer is faster."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    source = fn.cast(fn.peek_image_shape(jpg), dtype=types.FLOAT)[0:2]
    lo, hi = cfg.scale
    if cfg.fit != "pad_crop" or (lo, hi) == (1.0, 1.0):
        return source, source
    scale = fn.random.uniform(range=[lo, hi]) if hi > lo else lo
    return source, dmath.max(dmath.floor(source * scale + 0.5), 1.0)


def _hw(values: tuple[float, float]):
    from nvidia.dali import types

    return types.Constant(np.array(values, dtype=np.float32))


def _positions(cfg: JigsawConfig):
    """Window positions ``[y, x]`` as fractions of the slack (see :func:`jigsawdata.pipelines.fit.window_anchor`)."""
    from nvidia.dali import fn

    if cfg.crop_pos is not None:
        return _hw((cfg.crop_pos, cfg.crop_pos))
    return fn.random.uniform(range=[0.0, 1.0], shape=[2])


def _pad(piece, region: tuple[int, int], pos):
    """Zero-pad the axes smaller than the region, placed by ``pos`` (a no-op on the others)."""
    from nvidia.dali import fn

    rw, rh = region
    return fn.crop(piece, crop_w=rw, crop_h=rh, crop_pos_x=pos[1], crop_pos_y=pos[0],
                   out_of_bounds_policy="pad", fill_values=0)


def _fit_window(jpg, source, resized, region: tuple[int, int], cfg: JigsawConfig, decoder: str):
    """pad_crop: resample only the source pixels that can reach the region.

    The resized sample's region-sized window ``[anchor, anchor + window)`` (per axis,
    ``anchor = round(pos * slack)``, the window clamped to the resized size) maps back to
    ``[anchor, anchor + window) * source / resized`` in the source crop: the ROI that
    ``resize_crop_mirror`` resamples into the window. On the CPU only that ROI, plus a
    margin of ``_ROI_MARGIN`` pixels for the resampling filter's support and the JPEG
    decoder's chroma upsampling, is decoded (``decoders.image_slice``: libjpeg-turbo skips
    the rest), and the pixels equal those of a whole decode. nvJPEG decodes whole crops
    faster than it decodes regions with fancy upsampling (measured on an H200: 5,273 vs 3,933
    images/s), so the GPU decodes them whole.
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    rw, rh = region
    pos = _positions(cfg)
    mirror = fn.random.coin_flip(probability=cfg.flip_p) if cfg.flip_p > 0 else 0
    window = dmath.min(resized, _hw((rh, rw)))
    anchor = dmath.floor(pos * (resized - window) + 0.5)
    lo = anchor * source / resized
    hi = (anchor + window) * source / resized
    if decoder == "mixed":
        image = fn.decoders.image(jpg, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True)
    else:
        start = dmath.max(dmath.floor(lo) - _ROI_MARGIN, 0.0)
        end = dmath.min(dmath.ceil(hi) + _ROI_MARGIN, source)
        image = fn.decoders.image_slice(jpg, start=fn.cast(start, dtype=types.INT32),
                                        end=fn.cast(end, dtype=types.INT32), axis_names="HW", device=decoder,
                                        output_type=types.RGB)
        lo, hi = lo - start, hi - start
    piece = fn.resize_crop_mirror(image, size=window, roi_start=lo, roi_end=hi, mirror=mirror,
                                  interp_type=types.INTERP_LINEAR, antialias=True)
    return _pad(piece, region, pos)


def _fit_whole(jpg, region: tuple[int, int], cfg: JigsawConfig, decoder: str):
    """The warp / resize ablations: the whole sample is resized to (or into) the region."""
    from nvidia.dali import fn, types

    rw, rh = region
    pos = _positions(cfg)
    # nvJPEG upsamples chroma like libjpeg-turbo only when asked: the shards are 4:2:0.
    image = fn.decoders.image(jpg, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True)
    mode = "not_larger" if cfg.fit == "resize" else "default"
    piece = fn.resize(image, resize_x=float(rw), resize_y=float(rh), mode=mode, interp_type=types.INTERP_LINEAR)
    if cfg.flip_p > 0:
        piece = fn.flip(piece, horizontal=fn.random.coin_flip(probability=cfg.flip_p))
    return _pad(piece, region, pos)


def jigsaw_pipeline(root: Path, batch_size: int, cfg: JigsawConfig, *, device: str = "cpu",
                    num_threads: int = 4, device_id: int | None = None, shard_id: int = 0,
                    num_shards: int = 1, fp16: bool = False, prefetch_queue_depth: int = 2,
                    checkpoint: str | None = None, pad_last_batch: bool = False):
    """Build (not yet started) the DALI pipeline over the shard set at ``root``.

    Outputs ``images`` (N, canvas, canvas, 3) float (fp16 on request) and ``labels``
    (N, 4) uint8 ASCII digits in region order TL, TR, BL, BR (see :func:`parse_labels`).
    ``pad_last_batch`` evens out the ranks' shares, so that every rank's epoch has the same
    number of batches (DistributedDataParallel would otherwise wait for the shortest).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id")
    if is_url(str(root)):
        raise InputError(f"DALI reads local shards only: `jigsawdata fetch {root} --out DIR` first "
                         "(pretrain --shards URL does this into a cache)")
    shards = open_shard_set(root)
    sizes = cfg.template.sizes

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                  seed=reader_seed(cfg.seed, len(READERS)), enable_conditionals=True,
                  prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True, enable_checkpointing=True)
    def pipe():
        decoder = "mixed" if device == "gpu" else "cpu"
        samples = []
        for i, (name, group) in enumerate(READERS):
            jpg, label = _read(shards.groups[group], name, reader_seed(cfg.seed, i), cfg, shard_id, num_shards,
                               pad_last_batch)
            samples.append((jpg, *_resized_size(jpg, cfg), label))
        a, b, tall, wide = samples
        # The smaller S crop goes top-left, the larger bottom-right (ties keep reader order);
        # decided from the JPEG headers, before anything is decoded.
        if a[2][0] * a[2][1] > b[2][0] * b[2][1]:
            small, large = b, a
        else:
            small, large = a, b
        placed = (small, wide, tall, large)  # region order
        if cfg.fit == "pad_crop":
            tl, tr, bl, br = (_fit_window(p[0], p[1], p[2], region, cfg, decoder) for p, region in zip(placed, sizes))
        else:
            tl, tr, bl, br = (_fit_whole(p[0], region, cfg, decoder) for p, region in zip(placed, sizes))
        canvas = fn.cat(fn.cat(tl, tr, axis=1), fn.cat(bl, br, axis=1), axis=0)
        # HWC out, permuted to NCHW on the torch side: channels_last memory without a copy.
        images = fn.crop_mirror_normalize(
            canvas, dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC",
            mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
        labels = fn.stack(*(p[3] for p in placed))  # (4, digits) uint8: see parse_labels
        return images, labels

    return pipe(checkpoint=checkpoint)


def require_dali() -> None:
    """Fail with one line that says what to install, or to use the reference pipeline, when
    DALI (a separate, CUDA-versioned wheel) cannot be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise InputError(f"NVIDIA DALI cannot be imported ({exc}): pip install nvidia-dali-cuda130 (or "
                         "nvidia-dali-cuda120 for a CUDA 12 driver), or use --pipeline reference") from exc


class DaliJigsawLoader:
    """Batches of ``(images, labels)`` torch tensors from the DALI pipeline.

    Iteration never ends (training is iteration-based) unless ``epoch=True``, in which case
    one pass over this rank's share of the S shards (first S reader) is one epoch.
    In a torchrun job each rank reads its own 1/world share of every group. :meth:`state`
    returns DALI's checkpoint of the readers and random generators; passing it back as
    ``checkpoint`` continues exactly where that state was taken.
    """

    def __init__(self, root: Path, batch_size: int, cfg: JigsawConfig | None = None, *, device: str = "cpu",
                 num_threads: int = 4, device_id: int | None = None, rank: int | None = None,
                 world_size: int | None = None, fp16: bool = False, epoch: bool = False,
                 checkpoint: str | None = None) -> None:
        require_dali()
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg = cfg or JigsawConfig()
        if rank is None or world_size is None:
            here = process_info()
            rank, world_size = here.rank, here.world
        check_enough_samples(open_shard_set(root), world_size)
        self.batch_size = batch_size
        self.pipeline = jigsaw_pipeline(root, batch_size, cfg, device=device, num_threads=num_threads,
                                        device_id=device_id, shard_id=rank, num_shards=world_size, fp16=fp16,
                                        checkpoint=checkpoint, pad_last_batch=epoch)
        self.pipeline.build()
        self._iterator = DALIGenericIterator(
            [self.pipeline], ["images", "labels"], reader_name="S0" if epoch else None,
            last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        log.info("DALI jigsaw loader: device=%s rank %d/%d batch %d", device, rank, world_size, batch_size)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)[0]
        return batch["images"].permute(0, 3, 1, 2), parse_labels(batch["labels"])

    def reset(self) -> None:
        self._iterator.reset()

    def state(self) -> str:
        return self._iterator.checkpoints()[0]
