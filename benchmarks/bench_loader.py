"""Benchmark the loader's CPU side: images/s per core from a prepared phantom set (256x256).

Reads (or first writes) a phantom set under --data (default benchmarks/out/loader_data: the phantom
PNGs, then `prepare nih` as jpg .beton, raw .beton and .npy); writes
benchmarks/out/bench_loader.{csv,json,md} and prints the markdown table. Target (issue 4): >= 1,000
two-view samples/s per core on the CPU side.

What is timed is the CPU side only: decoding and batching in FFCV's worker threads (or the .npy
memory map), up to the uint8 batch the GPU kernel takes; batches stay on the CPU. Configurations:

  jpg  crop=gpu   one JPEG decode at the stored size per image; the crop happens in the GPU kernel
  jpg  crop=cpu   FFCV's RandomResizedCrop decoder, once per view (two decodes + resizes per image)
  raw  crop=gpu   uncompressed .beton (a copy per image), crop in the GPU kernel
  npy  crop=gpu   no FFCV: memory-mapped .npy, fancy-indexed batches (single thread)

A two-view sample is one image's pair of views: with crop=gpu one decode serves both views.

Examples:
  python benchmarks/bench_loader.py --quick        # 512 images, 1 worker, one timed epoch
  python benchmarks/bench_loader.py --workers 1 2  # per-core numbers from 1 and 2 workers
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from common import OUT_DIR, meta, write_results  # noqa: E402

from mlvicx_fast.data.loader import _ffcv_loader, _NpyBatches, ffcv_available, read_meta  # noqa: E402
from mlvicx_fast.data.prepare import prepare  # noqa: E402
from mlvicx_fast.ops.augment import VICREG  # noqa: E402

COLUMNS = ["format", "crop", "workers", "batch", "images", "seconds", "img_per_s", "img_per_s_per_core",
           "two_view_samples_per_s_per_core"]


def ensure_data(data: Path, n: int, size: int):
    """Phantom PNGs and the three prepared variants, written once and reused."""
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent))
    raw = data / "raw"
    if not (raw / "Data_Entry_2017_v2020.csv").is_file() or len(list((raw / "images_001" / "images").glob("*.png"))) != n:
        from mlvicx_fast.data.phantom import write_phantom
        t0 = time.perf_counter()
        write_phantom(raw, n=n, seed=0, size=size)
        print(f"phantom: {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
    for fmt in ("jpg", "raw") if ffcv_available() else ():
        out = data / f"nih_{fmt}"
        if not (out / "meta.json").is_file() or read_meta(out)["splits"]["train"]["n"] == 0:
            # a subprocess: FFCV's writer forks workers, which must not happen beside loader threads
            subprocess.run([sys.executable, "-m", "mlvicx_fast.data.prepare", "nih", "--root", str(raw), "--out",
                            str(out), "--format", fmt, "--size", str(size), "--val-fraction", "0", "--quiet"],
                           check=True, env=env)
    if not (data / "nih_npy" / "meta.json").is_file():
        prepare("nih", raw, data / "nih_npy", size=size, fmt="npy", progress=False, val_fraction=0.0)


def time_epochs(make_iter, epochs: int):
    it = make_iter()
    for _ in it:  # warm-up epoch: numba compilation, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in it:
            n += batch[0].shape[0]
    return n, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=OUT_DIR / "loader_data")
    p.add_argument("--n", type=int, default=2048, help="phantom images (default 2048; 80 %% are the train split)")
    p.add_argument("--size", type=int, default=256, help="stored side (default 256)")
    p.add_argument("--view", type=int, default=224, help="view side for crop=cpu (default 224)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    p.add_argument("--quick", action="store_true", help="512 images, 1 worker, 1 timed epoch")
    p.add_argument("--name", default="bench_loader")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.workers, args.epochs = 512, [1], 1
        if args.data == OUT_DIR / "loader_data":
            args.data = OUT_DIR / "loader_data_quick"
    ensure_data(args.data, args.n, args.size)
    rows = []
    configs = [("jpg", "gpu"), ("jpg", "cpu"), ("raw", "gpu")] if ffcv_available() else []
    for fmt, crop in configs:
        d = args.data / f"nih_{fmt}"
        fields = read_meta(d)["fields"]
        for w in args.workers:
            torch.set_num_threads(w)
            make = lambda: _ffcv_loader(d / "train.beton", fields, args.batch, w, None, True, True, 0,  # noqa: E731
                                        torch.device("cpu"), crop == "cpu", args.view, VICREG, fmt)
            n, sec = time_epochs(make, args.epochs)
            rows.append({"format": fmt, "crop": crop, "workers": w, "batch": args.batch, "images": n,
                         "seconds": sec, "img_per_s": n / sec, "img_per_s_per_core": n / sec / w,
                         "two_view_samples_per_s_per_core": n / sec / w})
            print(rows[-1], flush=True)
    make = lambda: _NpyBatches(args.data / "nih_npy", "train", args.batch, None, True, True, 0, False)  # noqa: E731
    n, sec = time_epochs(make, args.epochs)
    rows.append({"format": "npy", "crop": "gpu", "workers": 1, "batch": args.batch, "images": n, "seconds": sec,
                 "img_per_s": n / sec, "img_per_s_per_core": n / sec, "two_view_samples_per_s_per_core": n / sec})
    info = meta("cpu", n=args.n, size=args.size, batch=args.batch, load_average=os.getloadavg(),
                cores=os.cpu_count(), ffcv=ffcv_available())
    print(write_results(args.name, rows, COLUMNS, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
