"""The loader over a prepared phantom set: shapes, dtypes, labels and masks by row, label fractions,
determinism by seed, and the .beton and .npy paths giving the same batches."""
import csv
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from mlvicx_fast.data.loader import drop_numba_finalizer_errors, ffcv_available, fraction_indices, make_loader
from mlvicx_fast.data.prepare import prepare
from mlvicx_fast.ops.augment import eval_transform

HAS_FFCV = ffcv_available()  # a bare `import ffcv` left torch on one thread for the whole session

ROOT = Path(__file__).resolve().parents[1]
needs_ffcv = pytest.mark.skipif(not HAS_FFCV, reason="ffcv is not installed (scripts/setup.sh --dev installs it)")


@pytest.fixture(scope="module", autouse=True)
def no_threads_left():
    """FFCV prefetches in daemon threads; let them end before pytest's own teardown imports
    (CPython 3.11.7 can raise 'AST constructor recursion depth mismatch' when code is compiled
    in two threads at once). Not tqdm's monitor thread: it lives for the whole session in 10 s
    sleeps, and joining it added 10 s to every run."""
    yield
    import gc
    import threading
    gc.collect()
    for t in threading.enumerate():
        if t is not threading.main_thread() and t.daemon and type(t).__name__ != "TMonitor":
            t.join(timeout=10)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 96-image phantom: raw .beton via the CLI (a subprocess: FFCV's writer forks), the same
    images as .npy in-process, and a jpg .beton of the NIH part."""
    out = tmp_path_factory.mktemp("phantom")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    fmt = "raw" if HAS_FFCV else "npy"
    r = subprocess.run([sys.executable, "-m", "mlvicx_fast.data.prepare", "phantom", "--out", str(out), "--n", "96",
                        "--size", "48", "--format", fmt, "--workers", "1", "--seed", "5", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    prepare("nih", out / "raw", out / "nih_npy", size=48, fmt="npy", workers=1, progress=False, seed=5)
    prepare("siim", out / "raw", out / "siim_npy", size=48, fmt="npy", workers=1, progress=False, seed=5)
    if HAS_FFCV:
        r = subprocess.run([sys.executable, "-m", "mlvicx_fast.data.prepare", "nih", "--root", str(out / "raw"),
                            "--out", str(out / "nih_jpg"), "--size", "48", "--format", "jpg", "--workers", "1",
                            "--quiet"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
    return out


def index_labels(d, split):
    with open(Path(d) / f"{split}_index.csv") as f:
        rows = list(csv.reader(f))
    return np.array([[int(v) for v in r[2:16]] for r in rows[1:]], dtype=np.float32)


@pytest.mark.parametrize("kind", ["nih", "nih_npy"])
def test_pretrain_two_views(prepared, kind):
    if kind == "nih" and not HAS_FFCV:
        pytest.skip("ffcv is not installed")
    L = make_loader(prepared / kind, mode="pretrain", batch_size=8, size=32, workers=1, seed=3)
    n = 0
    for v1, v2 in L:
        n += 1
        for v in (v1, v2):
            assert v.shape == (8, 3, 32, 32) and v.dtype == torch.bfloat16
            assert v.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(v.float()).all()
        assert not torch.equal(v1, v2)
    meta_n = L.meta["splits"]["train"]["n"]
    assert n == len(L) == meta_n // 8  # drop_last for pretraining
    # same seed: the same first batch; another seed: another one
    a = next(iter(make_loader(prepared / kind, mode="pretrain", batch_size=8, size=32, workers=1, seed=3)))
    b = next(iter(make_loader(prepared / kind, mode="pretrain", batch_size=8, size=32, workers=1, seed=3)))
    c = next(iter(make_loader(prepared / kind, mode="pretrain", batch_size=8, size=32, workers=1, seed=4)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kind", ["nih", "nih_npy"])
def test_seeds_do_not_share_orders_an_epoch_apart(prepared, kind):
    """FFCV orders epoch e by seed + e, so seed 4's first epoch was seed 3's second: two seeds of
    one experiment saw the same sequence of orders, shifted by one epoch."""
    if kind == "nih" and not HAS_FFCV:
        pytest.skip("ffcv is not installed")

    def order(seed, epoch):
        L = make_loader(prepared / kind, mode="classify", batch_size=8, size=24, workers=1, seed=seed, with_index=True)
        L.set_epoch(epoch)
        return np.concatenate([i.numpy() for _, _, i in L])

    first = order(3, 1)
    assert np.array_equal(first, order(3, 1)) and not np.array_equal(first, order(4, 0))


@needs_ffcv
def test_ffcv_leaves_torch_threads_alone(prepared):
    """FFCV sets torch's thread count on import, on Loader() and on iter(Loader); training on a CPU
    then ran on one core. Building and iterating our loader (one worker) keeps the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        L = make_loader(prepared / "nih", mode="pretrain", batch_size=8, size=32, workers=1, seed=3)
        assert torch.get_num_threads() == 3
        v1, _ = next(iter(L))
        assert torch.get_num_threads() == 3 and v1.shape[0] == 8
        for _ in L:
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    # importing FFCV (only the first import in a process sets the count to 1)
    code = ("import torch; torch.set_num_threads(3); from mlvicx_fast.data.loader import ffcv_available; "
            "assert ffcv_available(); print(torch.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.split()[-1] == "3", (r.stdout, r.stderr[-2000:])


@needs_ffcv
@pytest.mark.parametrize("split", ["train", "test"])
def test_beton_and_npy_agree_row_by_row(prepared, split):
    """Labels against <split>_index.csv by row; images identical between the raw .beton and .npy."""
    kw = dict(mode="classify", split=split, batch_size=4, size=40, workers=1, shuffle=False, with_index=True)
    expect = index_labels(prepared / "nih", split)
    npy_images = np.load(prepared / "nih_npy" / f"{split}_images.npy")
    seen = []
    for x, y, idx in make_loader(prepared / "nih", **kw):
        assert x.shape[1:] == (3, 40, 40) and y.dtype == torch.float32 and y.shape[1] == 14
        assert torch.equal(y.cpu(), torch.from_numpy(expect[idx.numpy()]))
        if split == "test":
            ref = eval_transform(torch.from_numpy(npy_images[idx.numpy()]).to(x.device), 40)
            assert torch.equal(x, ref)
        seen.append(idx)  # kept as yielded: a tensor FFCV reuses for later batches would change here
    assert sorted(torch.cat(seen).tolist()) == list(range(len(expect)))
    for x, y, idx in make_loader(prepared / "nih_npy", **kw):
        assert torch.equal(y.cpu(), torch.from_numpy(expect[idx.numpy()]))


def test_label_fractions_seeded_and_nested(prepared):
    a = fraction_indices(1000, 0.1, seed=7)
    assert len(a) == 100 and np.array_equal(a, fraction_indices(1000, 0.1, seed=7))
    assert not np.array_equal(a, fraction_indices(1000, 0.1, seed=8))
    assert set(fraction_indices(1000, 0.01, 7)) <= set(a) <= set(fraction_indices(1000, 0.3, 7))
    assert len(fraction_indices(50, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\], got 0"):
        fraction_indices(10, 0, 0)
    d = prepared / "nih_npy"
    n = len(index_labels(d, "train"))
    L = make_loader(d, mode="classify", fraction=0.3, fraction_seed=2, batch_size=64, size=24, with_index=True)
    got = np.sort(np.concatenate([i.numpy() for _, _, i in L]))
    assert np.array_equal(got, fraction_indices(n, 0.3, 2))


@pytest.mark.parametrize("kind", ["siim", "siim_npy"])
def test_segment_masks_follow_their_rows(prepared, kind):
    if kind == "siim" and not HAS_FFCV:
        pytest.skip("ffcv is not installed")
    masks = np.load(prepared / "siim_npy" / "val_masks.npy")
    for x, m, idx in make_loader(prepared / kind, split="val", mode="segment", batch_size=8, size=48, workers=1,
                                 with_index=True):
        assert x.shape == (len(idx), 3, 48, 48) and m.shape == (len(idx), 1, 48, 48) and m.dtype == torch.float32
        assert torch.equal(m[:, 0].cpu(), torch.from_numpy(masks[idx.numpy()]).float())


@needs_ffcv
def test_jpg_with_crop_on_the_cpu(prepared):
    L = make_loader(prepared / "nih_jpg", mode="pretrain", batch_size=8, size=32, workers=1, crop="cpu")
    v1, v2 = next(iter(L))
    assert v1.shape == v2.shape == (8, 3, 32, 32) and v1.dtype == torch.bfloat16
    x, y = next(iter(make_loader(prepared / "nih_jpg", split="test", mode="classify", batch_size=8, size=32,
                                 workers=1)))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 14)


def test_a_bare_cuda_device_gets_its_index(monkeypatch):
    """'cuda' becomes cuda:<current device>: FFCV hands out tensors on cuda:N, and a bare 'cuda'
    compared unequal to them, so every batch was sent to pin_memory, which fails on CUDA tensors."""
    from mlvicx_fast.data.loader import resolve_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda", 2)


def test_loader_errors_name_the_problem(prepared, tmp_path):
    with pytest.raises(ValueError, match="mode='segment' needs masks"):
        make_loader(prepared / "nih_npy", mode="segment")
    with pytest.raises(ValueError, match="split 'holdout' is empty or absent; available: \\['train', 'val', 'test'\\]"):
        make_loader(prepared / "siim_npy", split="holdout", mode="segment")
    with pytest.raises(FileNotFoundError, match=f"no meta.json.*--out {tmp_path}\\)"):
        make_loader(tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_loader(prepared / "nih_npy", mode="train")
    for kw in ({"batch_size": 0}, {"channels": 4}, {"size": 12}, {"seed": -1}):
        with pytest.raises(ValueError, match="batch_size must be >= 1, channels 1 to 3, size > 12"):
            make_loader(prepared / "nih_npy", **kw)
    if HAS_FFCV:  # FFCV takes the shard from torch.distributed: without a process group, a clear error
        with pytest.raises(ValueError, match="needs the matching torch.distributed process group"):
            make_loader(prepared / "nih", rank=1, world_size=2)


def test_views_far_below_the_stored_size_warn_of_aliasing(prepared):
    with pytest.warns(UserWarning, match="images stored at 48 px for 16 px views.*does not antialias"):
        make_loader(prepared / "nih_npy", mode="pretrain", batch_size=8, size=16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_loader(prepared / "nih_npy", mode="pretrain", batch_size=8, size=32)  # 1.5x: no warning
        make_loader(prepared / "nih_npy", split="test", mode="classify", batch_size=8, size=16)  # no random crops


def test_default_decode_threads_share_the_cores_between_local_processes(monkeypatch):
    """Not torch's thread count: torchrun sets OMP_NUM_THREADS=1, which left one thread per GPU."""
    from mlvicx_fast.data.loader import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert default_workers() == 1


def test_segment_masks_resized_at_pixel_centres_as_their_images(tmp_path):
    """A vertical edge at column k in both image and mask, 96 -> 84 px: after the resize the mask's
    edge sits where the image's does (nearest at pixel centres); 'nearest' (floor(i * scale)) put it
    a column off for about half of the k."""
    n, side, size = 90, 96, 84
    ks = np.arange(3, 3 + n)
    cols = np.arange(side)[None, None, :] >= ks[:, None, None]
    masks = np.broadcast_to(cols, (n, side, side)).astype(np.uint8)
    images = masks * np.uint8(255)
    for name, arr in (("val_images", images), ("val_masks", masks), ("val_labels", masks[:, 0, :1])):
        np.save(tmp_path / f"{name}.npy", np.ascontiguousarray(arr))
    (tmp_path / "meta.json").write_text(json.dumps({
        "dataset": "siim", "task": "segmentation", "classes": ["Pneumothorax"], "size": side, "format": "npy",
        "fields": ["image", "labels", "index", "mask"], "splits": {"val": {"n": n}}}))
    off = 0
    for x, m, idx in make_loader(tmp_path, split="val", mode="segment", batch_size=30, size=size, with_index=True):
        img_edge = (x[:, 0, size // 2] > 0).float().argmax(dim=1)  # normalised: black < 0 < white
        mask_edge = m[:, 0, size // 2].argmax(dim=1)
        off += int((img_edge - mask_edge).abs().gt(0).sum())
    assert off <= n // 10, off


def test_only_numbas_finalizer_key_error_is_dropped(monkeypatch, tmp_path):
    """The CLIs' unraisable hook drops a KeyError raised in the `finalizer` of numba/core/dispatcher.py
    (what numba's dispatcher finalizer does now and then under FFCV) and passes on everything else:
    another exception from that finalizer, a KeyError from any other function or file."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append((type(u.exc_value), *_last_frame(u.exc_traceback))))
    drop_numba_finalizer_errors()
    hook = sys.unraisablehook
    drop_numba_finalizer_errors()
    assert sys.unraisablehook is hook, "a second call wrapped the hook again"

    def load(path, src):
        ns = {}
        exec(compile(src, str(path), "exec"), ns)
        return ns

    numba_like = load(tmp_path / "numba" / "core" / "dispatcher.py",
                      "def finalizer():\n    raise KeyError(('array(uint8, 1d, C)', 'array(uint8, 1d, C)'))\n"
                      "def other():\n    raise KeyError('k')\n"
                      "def finalizer_value():\n    raise ValueError('v')\n")
    numba_like["finalizer_value"].__code__ = numba_like["finalizer_value"].__code__.replace(co_name="finalizer")
    ours = load(tmp_path / "numba" / "core" / "ours.py", "def finalizer():\n    raise KeyError('k')\n")

    class Obj:
        pass

    for func in (numba_like["finalizer"], numba_like["other"], numba_like["finalizer_value"], ours["finalizer"]):
        obj = Obj()
        weakref.finalize(obj, func)
        del obj  # the finalizer runs here and its exception reaches sys.unraisablehook
    assert seen == [(KeyError, "dispatcher.py", "other"), (ValueError, "dispatcher.py", "finalizer"),
                    (KeyError, "ours.py", "finalizer")]


def _last_frame(tb):
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).name, tb.tb_frame.f_code.co_name
