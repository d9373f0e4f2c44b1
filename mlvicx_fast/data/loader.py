"""Batches from a prepared folder (python -m mlvicx_fast.data.prepare): FFCV .beton, or .npy.

    loader = make_loader("data/phantom/nih", split="train", mode="pretrain", batch_size=64)
    for view1, view2 in loader: ...                # two augmented views, (B, 3, 224, 224) bf16
    loader = make_loader(..., mode="classify", fraction=0.1, fraction_seed=0)
    for images, labels in loader: ...              # labels float32 (B, n_classes)
    loader = make_loader(siim_dir, mode="segment")
    for images, masks in loader: ...               # masks float32 (B, 1, size, size), 0/1

The CPU side only decodes (FFCV: JPEG decode or a raw copy, in its worker threads) and moves the
uint8 batch to the GPU; the per-pixel work runs there as one fused kernel
(`mlvicx_fast.ops.augment`), or as its torch version on a CPU-only machine.

Modes:
  pretrain  the two-view VICReg recipe (DESIGN.md section 4)
  classify  train split: random-resized crop + flip; other splits: the whole image resized
  segment   the whole image resized, the mask resized with nearest neighbour at pixel centres, as
            the image (no random geometry)

`crop='gpu'` (default) decodes the stored size and crops inside the kernel; `crop='cpu'` (jpg
.beton only) crops and resizes in FFCV's RandomResizedCrop decoder, once per view. Measured CPU
side (benchmarks/bench_loader.py, 256x256 phantom, batch 64, one worker on a shared 2-core
machine): jpg crop=gpu 4,000 two-view samples/s per core, jpg crop=cpu 1,140 (two decodes and
two resizes per sample), raw .beton ~140,000 (a copy). The GPU side of the crop is a few extra
loads per output pixel inside a kernel that runs anyway, so the crop belongs on the GPU.

Label fractions: `fraction` in (0, 1] keeps the first round(fraction * n) rows (at least 1) of a
permutation drawn from `fraction_seed`, so a seed gives the same subset every time, and the subsets
of one seed are nested (1 % inside 10 % inside 30 %).

Without FFCV (or with a folder prepared with --format npy) a plain iterator over memory-mapped
.npy files takes its place with the same batches' shapes and dtypes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.augment import CROP_FLIP, VICREG, Recipe, augment_with_params, eval_transform, sample_params

MODES = ("pretrain", "classify", "segment")


@contextlib.contextmanager
def keep_torch_threads():
    """Undo what FFCV does to torch's thread count inside the block.

    FFCV calls torch.set_num_threads when it is imported (with 1), when a Loader is built and each
    time one is iterated (with its worker count), so on a CPU the training or evaluation that reads
    a .beton ran its convolutions on one core (seen here, 2026-12-01: 4.2-4.5 s per built-in
    training step on 2 cores, 2.9 s with both cores). Every FFCV import, Loader and iter(Loader)
    of this package runs in this block. FFCV's own decoding threads set their counts in their
    threads and keep them."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def drop_numba_finalizer_errors() -> None:
    """Keep numba's failing dispatcher finalizer from printing a traceback (the CLIs call this).

    FFCV compiles its pipeline functions with numba, fresh for every Loader; when an old one is
    garbage collected, numba's finalizer walks its overloads to unregister them from numba's
    target context, and now and then that walk fails with a KeyError (numba 0.68.1, FFCV 1.0.2: in
    one of two built-in evaluation demos on 2026-12-04, and in the loader tests). Python then
    prints "Exception ignored in: <finalize object ...>" and numba's traceback in the middle of a
    run's output. The dead functions stay registered (a little memory); nothing a run computes
    changes. This wraps sys.unraisablehook so that exactly that report (a KeyError raised in the
    `finalizer` of numba/core/dispatcher.py) is dropped and every other one goes to the hook that
    was installed before. Calling it again does nothing."""
    prev = sys.unraisablehook
    if getattr(prev, "_drops_numba_finalizer_errors", False):
        return

    def hook(unraisable):
        if not _is_numba_finalizer_error(unraisable):
            prev(unraisable)

    hook._drops_numba_finalizer_errors = True
    sys.unraisablehook = hook


def _is_numba_finalizer_error(unraisable) -> bool:
    tb = unraisable.exc_traceback
    if not isinstance(unraisable.exc_value, KeyError) or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return code.co_name == "finalizer" and code.co_filename.replace(os.sep, "/").endswith("numba/core/dispatcher.py")


def ffcv_available() -> bool:
    """Whether FFCV imports (importing it leaves torch's thread count as it was)."""
    try:
        with keep_torch_threads():
            import ffcv  # noqa: F401
        return True
    except ImportError:
        return False


def upload(t: torch.Tensor, device) -> torch.Tensor:
    """t on device. From the CPU to a GPU through pinned memory, without waiting: a copy from
    pageable memory first waits for the GPU to finish the work queued before it (a host sync)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def default_workers() -> int:
    """FFCV decode threads: this process's share of the cores it may run on, at most 8. (Not
    torch's thread count: torchrun sets OMP_NUM_THREADS=1, which left one decode thread per GPU.)"""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def read_meta(data_dir) -> Dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no meta.json; prepare the folder first "
                                f"(python -m mlvicx_fast.data.prepare ... --out {data_dir})")
    with open(path) as f:
        return json.load(f)


def fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded label fraction (nested across fractions for one seed)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(n)
    k = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


class _NpyBatches:
    """The FFCV-less path: memory-mapped uint8 images, batches of (images, labels, index[, masks])."""

    def __init__(self, data_dir, split, batch_size, indices, shuffle, drop_last, seed, with_mask, rank=0, world_size=1):
        d = Path(data_dir)
        self.images = np.load(d / f"{split}_images.npy", mmap_mode="r")
        self.labels = np.load(d / f"{split}_labels.npy")
        self.masks = np.load(d / f"{split}_masks.npy", mmap_mode="r") if with_mask else None
        self.indices = np.arange(len(self.images)) if indices is None else np.asarray(indices)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self):
        n = len(self.indices) // self.world_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self.indices
        if self.shuffle:
            idx = idx[np.random.default_rng((self.seed, self.epoch)).permutation(len(idx))]
        if self.world_size > 1:  # interleaved as DistributedSampler, but the last len % world rows are
            # left out rather than padded by repeating rows: every rank the same number of rows
            idx = idx[:len(idx) - len(idx) % self.world_size][self.rank::self.world_size]
        self.epoch += 1
        for b in range(len(self)):
            sel = np.sort(idx[b * self.batch_size:(b + 1) * self.batch_size])
            out = [torch.from_numpy(self.images[sel]), torch.from_numpy(self.labels[sel]),
                   torch.from_numpy(sel.astype(np.int64))[:, None]]
            if self.masks is not None:
                out.append(torch.from_numpy(self.masks[sel]))
            yield out


def _ffcv_loader(path, fields, batch_size, workers, indices, shuffle, drop_last, seed, device, crop_cpu,
                 size, recipe, fmt, distributed=False):
    with keep_torch_threads():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.decoders import NDArrayDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor

    def tail():
        t = [ToTensor()]
        if device.type == "cuda":
            t.append(ToDevice(device, non_blocking=True))
        return t

    pipelines = {}
    if crop_cpu:
        if fmt != "jpg":
            raise ValueError("crop='cpu' needs a jpg .beton (FFCV's crop decoder reads RGB images); use crop='gpu'")
        dec = lambda: RandomResizedCropRGBImageDecoder((size, size), scale=recipe.scale, ratio=recipe.ratio)  # noqa: E731
        pipelines["image"] = [dec()] + tail()
        pipelines["image_b"] = PipelineSpec("image", decoder=dec(), transforms=tail())
    else:
        pipelines["image"] = [SimpleRGBImageDecoder() if fmt == "jpg" else NDArrayDecoder()] + tail()
    pipelines["labels"] = [NDArrayDecoder()] + tail()
    pipelines["index"] = [IntDecoder(), ToTensor()]
    if "mask" in fields:
        pipelines["mask"] = [NDArrayDecoder()] + tail()
    with keep_torch_threads():
        return Loader(str(path), batch_size=batch_size, num_workers=workers,
                      order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL, drop_last=drop_last,
                      pipelines=pipelines, indices=None if indices is None else list(map(int, indices)),
                      # FFCV orders epoch e by seed + e: spread the seeds, or seed s + 1 would replay
                      # seed s's orders one epoch later (seed 0 keeps its orders)
                      seed=seed * 100_003 % 2**31, os_cache=True, distributed=distributed)


def resolve_device(device=None) -> torch.device:
    """torch.device of `device` (default: the GPU when there is one), with an index on CUDA: FFCV
    returns tensors on cuda:N, and torch.device('cuda:0') != torch.device('cuda'), so a bare 'cuda'
    made every batch look misplaced (and pinning a CUDA tensor fails)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class PreparedLoader:
    """Iterable of batches on `device` (see the module docstring); len() is batches per epoch."""

    def __init__(self, data_dir, split="train", mode="pretrain", batch_size=64, size=224, workers=None,
                 device=None, seed=0, fraction=1.0, fraction_seed=0, shuffle=None, drop_last=None,
                 crop="gpu", recipe: Optional[Recipe] = None, channels=3, backend="auto",
                 out_dtype=torch.bfloat16, use_ffcv: Optional[bool] = None, with_index: bool = False,
                 rank: int = 0, world_size: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if crop not in ("gpu", "cpu"):
            raise ValueError(f"crop must be 'gpu' or 'cpu', got {crop!r}")
        if batch_size < 1 or not 1 <= channels <= 3 or size <= 12 or seed < 0:
            raise ValueError(f"batch_size must be >= 1, channels 1 to 3, size > 12 (the blur reflects at the border) "
                             f"and seed >= 0; got {batch_size}, {channels}, {size} and {seed}")
        self.meta = read_meta(data_dir)
        if split not in self.meta["splits"] or self.meta["splits"][split]["n"] == 0:
            have = [s for s, v in self.meta["splits"].items() if v["n"]]
            raise ValueError(f"{data_dir}: split {split!r} is empty or absent; available: {have}")
        if mode == "segment" and "mask" not in self.meta["fields"]:
            raise ValueError(f"{data_dir}: mode='segment' needs masks; this folder holds {self.meta['dataset']} "
                             "labels (prepare siim or phantom)")
        self.mode, self.size, self.channels, self.backend, self.out_dtype = mode, size, channels, backend, out_dtype
        self.device = resolve_device(device)
        train = split == "train"
        self.shuffle = train if shuffle is None else shuffle
        drop_last = (train and mode == "pretrain") if drop_last is None else drop_last
        self.recipe = recipe or (VICREG if mode == "pretrain" else CROP_FLIP)
        self.random_aug = mode == "pretrain" or (mode == "classify" and train)
        self.crop_cpu = crop == "cpu" and self.random_aug
        stored = int(self.meta["size"])
        if self.random_aug and not self.crop_cpu and stored > 1.5 * size:
            warnings.warn(f"{data_dir}: images stored at {stored} px for {size} px views; the crop-resize (bicubic, "
                          "4 taps, as torch's) does not antialias, so crops more than ~1.5x the view side alias. "
                          f"Prepare with --size near {size} (the default 256 suits 224 px views)", stacklevel=3)
        n = self.meta["splits"][split]["n"]
        self.indices = None if fraction == 1.0 else fraction_indices(n, fraction, fraction_seed)
        self.n = n if self.indices is None else len(self.indices)
        self.seed, self.epoch, self.with_index = seed, 0, with_index
        self.rank, self.world_size = rank, world_size
        fmt = self.meta["format"]
        beton = Path(data_dir) / f"{split}.beton"
        if use_ffcv is None:
            use_ffcv = fmt in ("jpg", "raw") and ffcv_available()
        if use_ffcv:
            if not beton.is_file():
                raise FileNotFoundError(f"{beton} is missing (meta.json says format {fmt})")
            if world_size > 1 and not (dist.is_initialized()
                                       and (dist.get_rank(), dist.get_world_size()) == (rank, world_size)):
                # FFCV shards from torch.distributed's own rank and size, as DistributedSampler does:
                # padded to equal shards by repeating rows (the npy path drops the last n % world rows)
                raise ValueError(f"rank {rank} of world_size {world_size} on a .beton needs the matching "
                                 "torch.distributed process group initialised first (FFCV's distributed loading "
                                 "takes the rank from there)")
            workers = workers or default_workers()
            # distributed: FFCV shards like DistributedSampler, from torch.distributed's rank and size
            self._it = _ffcv_loader(beton, self.meta["fields"], batch_size, workers, self.indices, self.shuffle,
                                    drop_last, seed, self.device, self.crop_cpu, size, self.recipe, fmt,
                                    distributed=world_size > 1)
        else:
            if fmt != "npy":
                raise RuntimeError(f"{data_dir} holds .beton files (format {fmt}) and ffcv is not installed; "
                                   "install it (bash scripts/setup.sh) or prepare with --format npy")
            if crop == "cpu":
                raise ValueError("crop='cpu' needs FFCV's decoder (a jpg .beton)")
            self._it = _NpyBatches(data_dir, split, batch_size, self.indices, self.shuffle, drop_last, seed,
                                   "mask" in self.meta["fields"], rank, world_size)
        self.ffcv = use_ffcv

    def __len__(self):
        return len(self._it)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch`: its order and augmentation draws, as in an
        uninterrupted run (what resuming a training run needs). With crop='cpu' only the order:
        FFCV's crop decoder draws from numba's own, unseeded generator."""
        self.epoch = epoch
        if self.ffcv:
            self._it.next_epoch = epoch
        else:
            self._it.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * self.world_size + self.rank)
        self.epoch += 1
        with keep_torch_threads():
            it = iter(self._it)
        try:
            yield from self._batches(it, gen)
        finally:  # stop FFCV's prefetch thread (an epoch left early) and wait for it, so that no
            # loader thread is still running (numba may be compiling there) when the next one starts
            close = getattr(it, "close", None)
            if close is not None:
                close()
            if isinstance(it, threading.Thread) and it.is_alive() and it is not threading.current_thread():
                it.join(timeout=30)

    def _batches(self, it, gen):
        for batch in it:
            if self.crop_cpu:
                img, labels, index, img_b = batch[0], batch[1], batch[2], batch[-1]
                masks = None
            else:
                img, labels, index = batch[0], batch[1], batch[2]
                masks = batch[3] if len(batch) > 3 else None
            img = upload(img, self.device)
            if self.mode == "pretrain":
                out = self._two_views(img, gen, None if not self.crop_cpu else upload(img_b, self.device))
            elif self.mode == "classify":
                x = self._two_views(img, gen, None, views=1)[0] if self.random_aug else \
                    eval_transform(img, self.size, self.channels, self.recipe.mean, self.recipe.std, self.out_dtype,
                                   self.backend)
                out = (x, upload(labels, self.device).float())
            else:
                x = eval_transform(img, self.size, self.channels, self.recipe.mean, self.recipe.std, self.out_dtype,
                                   self.backend)
                m = upload(masks, self.device)[:, None].float()
                if m.shape[-1] != self.size:
                    # nearest-exact samples at pixel centres, as the image's resize; 'nearest' is half
                    # a source pixel off (floor(i * scale))
                    m = F.interpolate(m, size=(self.size, self.size), mode="nearest-exact")
                out = (x, m)
            # index: the rows of <split>_index.csv in this batch
            # (a copy: FFCV reuses the buffer it decoded the indices into for later batches)
            yield (*out, index.reshape(-1).clone().long()) if self.with_index else out

    def _two_views(self, img, gen, img_b, views=2):
        from ..ops.augment import P_H, P_W, P_X0, P_Y0, as_gray
        g = as_gray(img)
        N, H, W = g.shape
        cropped = self.crop_cpu  # FFCV's decoder already cropped and resized
        p = sample_params(N, H, W, self.recipe, gen, random_crop=not cropped)[:views]
        if not cropped or views == 1:
            return augment_with_params(g, p, self.size, self.channels, self.recipe.mean, self.recipe.std,
                                       self.out_dtype, self.backend)
        # crop done by FFCV's decoder (one decode per view): only the pointwise/blur part here
        p[..., P_Y0] = 0
        p[..., P_X0] = 0
        p[..., P_H] = H
        p[..., P_W] = W
        v1 = augment_with_params(g, p[:1], self.size, self.channels, self.recipe.mean, self.recipe.std,
                                 self.out_dtype, self.backend)[0]
        v2 = augment_with_params(as_gray(img_b), p[1:], self.size, self.channels, self.recipe.mean,
                                 self.recipe.std, self.out_dtype, self.backend)[0]
        return v1, v2


def make_loader(data_dir, **kwargs) -> PreparedLoader:
    """See `PreparedLoader` and the module docstring."""
    return PreparedLoader(data_dir, **kwargs)
