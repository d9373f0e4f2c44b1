"""Benchmark the VICReg loss, forward + backward: official formula (eager, compiled) vs ours.

Reads nothing; writes benchmarks/out/bench_loss.{csv,json,md} and prints the markdown table.

Providers:
  official         the official formula (r x r covariance), eager
  official-compile the same under torch.compile
  ours             mlvicx_fast.ops.vicreg_loss, backend 'auto' (Triton on CUDA, torch Gram on CPU);
                   on a GPU the large shapes' products pick 'tf32x3' or 'fp16x3' by timing
  ours-tf32x3      ours with the products fixed to 'tf32x3' (CUDA only): what that choice adds

Examples:
  python benchmarks/bench_loss.py --quick          # CPU, two shapes, a few seconds
  python benchmarks/bench_loss.py                  # all shapes the device can run in reasonable time
  python benchmarks/bench_loss.py --device cuda --shapes 64x2048 2048x8192 --dtypes fp32
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]  # this checkout's package, even when another is installed
from common import bench, meta, peak_extra_mib, write_results  # noqa: E402

from mlvicx_fast.ops.vicreg import vicreg_loss, vicreg_loss_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALL_SHAPES = [(64, 2048), (2048, 8192), (256, 8192), (4096, 512)]  # the two with speed targets first
# the official r x r covariance at 2048 x 8192 is ~1.6 TFLOP per step: minutes on a laptop CPU
CPU_SHAPES = [(64, 2048), (256, 8192), (4096, 512)]
COLUMNS = ["shape", "dtype", "provider", "ms", "ms_p20", "ms_p80", "speedup_vs_official", "peak_extra_MiB",
           "inputs_MiB"]


def parse_shape(text: str):
    try:
        b, r = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x2048 (batch x features), got {text!r}")
    return b, r


def tf32x3_only(z1, z2):
    """Ours with the products fixed to 'tf32x3' (tiles still tuned): what the precision choice adds."""
    old = os.environ.get("MLVICX_FP32_DOT")
    os.environ["MLVICX_FP32_DOT"] = "tf32x3"
    try:
        return vicreg_loss(z1, z2)
    finally:
        if old is None:
            del os.environ["MLVICX_FP32_DOT"]
        else:
            os.environ["MLVICX_FP32_DOT"] = old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: cuda when available)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="b x r shapes, e.g. 64x2048 (default: per device)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 bf16 on CUDA, fp32 on CPU")
    p.add_argument("--providers", nargs="+", choices=["official", "official-compile", "ours", "ours-tf32x3"],
                   help="default: all (on the CPU: official, official-compile, ours; --quick: official, ours)")
    p.add_argument("--compile-shapes", nargs="+", type=parse_shape,
                   help="run official-compile only at these shapes (default: every shape; compiling takes time)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 64x2048 and 256x8192, fp32, no compile")
    p.add_argument("--name", default="bench_loss", help="output file stem under benchmarks/out/")
    args = p.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    if args.quick:
        shapes, dtypes, providers = [(64, 2048), (256, 8192)], ["fp32"], ["official", "ours"]
    else:
        shapes = ALL_SHAPES if device == "cuda" else CPU_SHAPES
        dtypes = ["fp32", "bf16"] if device == "cuda" else ["fp32"]
        providers = ["official", "official-compile", "ours"] + (["ours-tf32x3"] if device == "cuda" else [])
    shapes = args.shapes or shapes
    dtypes = args.dtypes or dtypes
    providers = args.providers or providers

    compiled_ref = torch.compile(vicreg_loss_reference) if "official-compile" in providers else None
    fns = {
        "official": vicreg_loss_reference,
        "official-compile": compiled_ref,
        "ours": vicreg_loss,
        "ours-tf32x3": tf32x3_only,
    }

    info = meta(device, shapes=[f"{b}x{r}" for b, r in shapes], dtypes=dtypes)
    rows, md = [], ""
    # dtype outer, so the float32 rows (the targets') come first; the results are written after
    # every row, so a run cut short by a time limit keeps what it measured
    for dname in dtypes:
        for (b, r) in shapes:
            dtype = DTYPES[dname]
            z1 = torch.randn(b, r, device=device, dtype=dtype, requires_grad=True)
            z2 = torch.randn(b, r, device=device, dtype=dtype, requires_grad=True)
            base = None
            for prov in providers:
                if prov == "official-compile" and args.compile_shapes and (b, r) not in args.compile_shapes:
                    continue
                fn = fns[prov]

                def step(fn=fn):
                    z1.grad = z2.grad = None
                    fn(z1, z2).backward()

                if prov == "official-compile":  # compile, then let any lazily compiled backward settle
                    for _ in range(10):
                        step()
                t = bench(step, device)
                z1.grad = z2.grad = None  # else the baseline counts the last call's gradients, which step frees
                mem = peak_extra_mib(step, device)
                base = t["ms"] if prov == "official" else base
                row = {"shape": f"{b}x{r}", "dtype": dname, "provider": prov, **t,
                       "speedup_vs_official": (base / t["ms"]) if base else None,
                       "peak_extra_MiB": mem, "inputs_MiB": 2 * z1.numel() * z1.element_size() / 2**20}
                rows.append(row)
                md = write_results(args.name, rows, COLUMNS, info)
                print(f"  {b}x{r} {dname} {prov:17s} {t['ms']:9.3f} ms", flush=True)
            del z1, z2

    print(f"\nVICReg loss, forward + backward on {info['device']} ({info['date']}, commit {info['commit']})\n")
    print(md)
    ours = {(row["shape"], row["dtype"]): row["speedup_vs_official"] for row in rows if row["provider"] == "ours"}
    for (shape, dname), sp in ours.items():
        if sp:
            print(f"ours vs official eager at {shape} {dname}: {sp:.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
