"""Benchmark one LARS step over the MLVICX network's parameters: foreach ops against the fused kernels.

Reads nothing; writes benchmarks/out/bench_optim.{csv,json,md} and prints the markdown table.
The parameter set is the network's (official preset: about 115 M float32 values; the bare
ResNet18 + global head for comparison), gradients random. Providers:

  foreach   mlvicx_fast.optim.LARS(fused=False): torch._foreach_* ops, ~17 passes over the parameters
  fused     LARS(fused=True): the Triton kernels of mlvicx_fast.ops.lars, 7 passes (CUDA only)

The bandwidth floor is 7 passes of 4 bytes per parameter at the copy bandwidth measured in the same run.

Examples:
  python benchmarks/bench_optim.py                 # GPU: both presets' parameter sets
  python benchmarks/bench_optim.py --quick         # CPU: foreach only, the paper preset
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from common import bench, copy_bandwidth_gbs, meta, write_results  # noqa: E402

from mlvicx_fast.models.mlvicx import MLVICX, PRESETS  # noqa: E402
from mlvicx_fast.optim import LARS  # noqa: E402

COLUMNS = ["params", "n_tensors", "n_values_M", "provider", "ms", "ms_p20", "ms_p80", "floor_ms", "vs_floor",
           "speedup_vs_foreach"]


def parameter_set(which: str, preset: str, device: str):
    """The parameters of the MLVICX network or of the bare step's network, in training layout."""
    from bench_step import Bare

    net = MLVICX(preset=preset) if which == "mlvicx" else Bare(**PRESETS[preset])
    net = net.to(device)
    if device == "cuda":
        net = net.to(memory_format=torch.channels_last)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="official", choices=["official", "paper"])
    p.add_argument("--quick", action="store_true", help="CPU smoke run (paper preset, foreach only)")
    p.add_argument("--name", default="bench_optim")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = "paper" if args.quick else args.preset
    providers = ["foreach", "fused"] if device == "cuda" else ["foreach"]
    bw = copy_bandwidth_gbs(device) if device == "cuda" else None
    info = meta(device, preset=preset, copy_GBps=bw, note="floor = 7 passes x 4 bytes per parameter at copy bandwidth")
    rows = []
    for which in ("mlvicx", "bare"):
        params = parameter_set(which, preset, device)
        n = sum(q.numel() for q in params)
        floor = 7 * 4 * n / (bw * 1e9) * 1e3 if bw else None
        base = None
        for provider in providers:
            lr = torch.full((), 0.05, device=device)
            opt = LARS(params, lr=lr, fused=provider == "fused")
            opt.step()  # momentum buffers, pointer tables, compilation
            t = bench(opt.step, device, warmup=1, reps=5, warmup_ms=100, rep_ms=500)
            base = t["ms"] if provider == "foreach" else base
            rows.append(dict(params=f"{which} ({preset})", n_tensors=len(params), n_values_M=n / 1e6, provider=provider,
                             **t, floor_ms=floor, vs_floor=t["ms"] / floor if floor else None,
                             speedup_vs_foreach=base / t["ms"] if base else None))
            print(f"  {which:6s} {provider:8s} {t['ms']:8.3f} ms", flush=True)
            write_results(args.name, rows, COLUMNS, info)  # after every row: a stage cut short keeps them
            del opt
        del params
        if device == "cuda":
            torch.cuda.empty_cache()
    print(write_results(args.name, rows, COLUMNS, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
