"""Benchmark prepare's per-image CPU work: images/s on one core for each stage-1 input kind.

Reads (or first writes) 1024x1024 test files under benchmarks/out/prepare_data (phantom pixels as
8-bit PNG, as 16-bit PNG, as 16-bit DICOM, and as 16-bit MONOCHROME1 DICOM with a window);
writes benchmarks/out/bench_prepare.{csv,json,md} and prints the markdown table. The SIIM RLE
decoder is timed on the real rows of tests/data/siim_train-rle.csv.gz (1024x1024 masks).

Each row is one worker process's work per image: read + decode + grayscale uint8 + pad + resize to
--size (and the mask path for SIIM); prepare runs --workers of these in parallel.

Examples:
  python benchmarks/bench_prepare.py --quick      # 16 files per kind
  python benchmarks/bench_prepare.py              # 64 files per kind
"""
from __future__ import annotations

import argparse
import gzip
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent), str(ROOT.parent / "tests")]
from common import OUT_DIR, meta, write_results  # noqa: E402

from mlvicx_fast.data.images import rle_decode  # noqa: E402
from mlvicx_fast.data.prepare import _load_one  # noqa: E402

COLUMNS = ["kind", "files", "side", "size", "ms_per_image", "img_per_s_per_core"]


def ensure_files(d: Path, n: int, side: int):
    from PIL import Image

    from data_layouts import write_dicom
    from mlvicx_fast.data.phantom import render_batch
    d.mkdir(parents=True, exist_ok=True)
    if len(list(d.glob("*.png"))) >= 2 * n and len(list(d.glob("*.dcm"))) >= 2 * n:
        return
    img, _, _ = render_batch(0, 0, n, side)
    for k in range(n):
        a8 = img[k]
        a16 = (a8.astype(np.uint16) * 16 + np.random.default_rng(k).integers(0, 16, a8.shape)).astype(np.uint16)
        Image.fromarray(a8, mode="L").save(d / f"p8_{k}.png")
        Image.fromarray(a16).save(d / f"p16_{k}.png")
        write_dicom(d / f"d16_{k}.dcm", a16, slope=1, intercept=-1024)
        write_dicom(d / f"m1_{k}.dcm", 4095 - a16, photometric="MONOCHROME1", window=(2048, 3000))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default="bench_prepare")
    args = p.parse_args(argv)
    if args.quick:
        args.n = 16
    d = OUT_DIR / "prepare_data"
    ensure_files(d, args.n, args.side)
    rows = []
    for kind, pat, label in (("png 8-bit", "p8_{}.png", None), ("png 16-bit", "p16_{}.png", None),
                             ("dicom 16-bit", "d16_{}.dcm", None), ("dicom MONOCHROME1 + window", "m1_{}.dcm", None)):
        files = [str(d / pat.format(k)) for k in range(args.n)]
        _load_one((0, files[0], args.size, label))  # warm-up
        t0 = time.perf_counter()
        for k, f in enumerate(files):
            _, img, _, why = _load_one((k, f, args.size, label))
            assert img is not None, why
        sec = time.perf_counter() - t0
        rows.append({"kind": kind, "files": args.n, "side": args.side, "size": args.size,
                     "ms_per_image": 1e3 * sec / args.n, "img_per_s_per_core": args.n / sec})
    with gzip.open(ROOT.parent / "tests" / "data" / "siim_train-rle.csv.gz", "rt") as f:
        rles = [r[1] for r in list(csv.reader(f))[1:] if r[1].strip() != "-1"]
    t0 = time.perf_counter()
    for r in rles:
        rle_decode(r, 1024, 1024)
    sec = time.perf_counter() - t0
    rows.append({"kind": "SIIM RLE decode (real rows)", "files": len(rles), "side": 1024, "size": 1024,
                 "ms_per_image": 1e3 * sec / len(rles), "img_per_s_per_core": len(rles) / sec})
    print(write_results(args.name, rows, COLUMNS, meta("cpu", n=args.n, side=args.side, size=args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
