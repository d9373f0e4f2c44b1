"""Benchmark the multi-level aggregation alone: exact pool-first form against the official one.

Reads nothing; writes benchmarks/out/bench_aggregate.{csv,json,md} and prints the markdown table.

The five tap tensors of a --size input (at 224: 64x112x112, 64x56x56, 128x28x28, 256x14x14,
512x7x7; random, channels_last unless --nchw) go through MLVICX's MultiLevelAggregation
(Conv1x1(C_p, 512) with bias per tap, 64x64 resize, 4x4 pool: 8192 features), forward and then
backward of sum(out * probe), in two forms (mlvicx_fast/ops/aggregate.py):
  official  resize every tap to 64x64 (bilinear), project, sum, pool (the authors' form)
  exact     pool each tap to 4x4 first with the exact resize-then-pool matrices, then project
for fp32 (no autocast) and bf16 (bf16 taps, fp32 weights, bf16 autocast, as in the network).
The taps require gradients, as they do inside the network; their gradients are dropped before
every step, so each step allocates them anew (the same for both forms).

Reported: median ms per step; on CUDA the peak memory allocated during a step above what was
allocated before it (the taps, weights and probe: peak_extra_MiB) and its difference from the
official form (saved_vs_official_GiB, the "at least 2 GiB at batch 64" target, judged on fp32 by
benchmarks/targets.py); on every device the bytes autograd saves for backward beyond the taps
and the parameters (saved_MiB). CPU runs default to batch 2.

Examples:
  python benchmarks/bench_aggregate.py                 # GPU: batch 64, fp32 and bf16
  python benchmarks/bench_aggregate.py --batch 256 --dtypes bf16
  python benchmarks/bench_aggregate.py                 # CPU: batch 2, saved-for-backward bytes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench, meta as common_meta, peak_extra_mib, saved_for_backward_bytes, write_results  # noqa: E402

from mlvicx_fast.models.resnet import STAGE_CHANNELS  # noqa: E402
from mlvicx_fast.nn.aggregate import MultiLevelAggregation  # noqa: E402

STRIDES = (2, 4, 8, 16, 32)  # tap p is size / STRIDES[p] on a side
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMS = ("official", "exact")
COLUMNS = ["form", "dtype", "batch", "size", "ms", "ms_p20", "ms_p80", "speedup_vs_official", "inputs_MiB",
           "saved_MiB", "peak_extra_MiB", "saved_vs_official_GiB"]


def run_dtype(dname: str, batch: int, size: int, fmt: torch.memory_format, device: str):
    """Rows of the official and the exact form for one dtype."""
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    module = MultiLevelAggregation(STAGE_CHANNELS).to(device)
    taps = [torch.randn(batch, c, size // s, size // s, device=device, dtype=dtype)
            .contiguous(memory_format=fmt).requires_grad_() for c, s in zip(STAGE_CHANNELS, STRIDES)]
    inputs_mib = sum(t.numel() * t.element_size() for t in taps) / 2**20
    probe = torch.randn(batch, module.out_features, device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward():
        with amp:
            return module(taps)

    def step():
        for t in taps:
            t.grad = None
        module.zero_grad(set_to_none=True)
        (forward().float() * probe).sum().backward()

    rows = []
    for form in FORMS:
        module.mode = form
        step()  # warm-up (and the cached pooling matrices)
        t = bench(step, device, warmup=1, reps=5, warmup_ms=100, rep_ms=1000)
        for tap in taps:  # the peak is measured from no gradients at all
            tap.grad = None
        module.zero_grad(set_to_none=True)
        saved = saved_for_backward_bytes(forward, exclude=list(module.parameters()) + taps)
        row = dict(form=form, dtype=dname, batch=batch, size=size, **t, inputs_MiB=inputs_mib,
                   saved_MiB=saved / 2**20, peak_extra_MiB=peak_extra_mib(step, device))
        if rows:  # the official form ran first
            official = rows[0]
            row["speedup_vs_official"] = official["ms"] / t["ms"]
            if official["peak_extra_MiB"] is not None:
                row["saved_vs_official_GiB"] = (official["peak_extra_MiB"] - row["peak_extra_MiB"]) / 1024
        rows.append(row)
        peak = "—" if row["peak_extra_MiB"] is None else f"{row['peak_extra_MiB']:.0f} MiB"
        print(f"{dname} batch {batch} {form:>8}: {t['ms']:9.2f} ms  peak extra {peak}  "
              f"saved for backward {row['saved_MiB']:.1f} MiB", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CUDA, 2 on the CPU)")
    p.add_argument("--size", type=int, default=224, help="input side the taps come from (default 224)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--nchw", action="store_true", help="NCHW taps instead of channels_last")
    p.add_argument("--name", default="bench_aggregate", help="output file stem under benchmarks/out/")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (64 if device == "cuda" else 2)
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; expected some of {', '.join(DTYPES)}")

    meta = common_meta(device, batch=batch, size=args.size, channels_last=not args.nchw,
                       step="aggregation forward, backward of sum(out * probe); tap gradients allocated anew "
                            "every step; peak_extra_MiB above the taps, weights and probe")
    rows = []
    for dname in dtypes:
        rows += run_dtype(dname, batch, args.size, fmt, device)
        write_results(args.name, rows, COLUMNS, meta)  # after every dtype: a cut-short run keeps it
        if device == "cuda":
            torch.cuda.empty_cache()
    print(write_results(args.name, rows, COLUMNS, meta))


if __name__ == "__main__":
    main()
