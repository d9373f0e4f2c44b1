"""Benchmark the MLVICX network, forward + backward of one view, fused against reference.

Reads nothing (synthetic images); writes benchmarks/out/bench_network.{csv,json,md} and prints
the markdown table.

Providers (same random weights, bf16 autocast and channels_last unless told otherwise):
  reference        context blocks in plain torch, official 64x64 aggregation (the authors' form)
  reference-exact  context blocks in plain torch, exact pool-first aggregation
  fused            Triton context blocks, exact aggregation
  resnet18-g       bare ResNet18 + global expander only: no context blocks, no second head
                   (the yardstick of the "at most 1.2x bare ResNet18" target)
A step is z, m = model(x), then backward of sum(z * gz) + sum(m * gm) with fixed random probes;
the VICReg loss is benchmarked separately (bench_loss.py). --compile wraps each model in
torch.compile. Reported: median ms per step, images/s, peak extra CUDA memory.

Examples:
  python benchmarks/bench_network.py                         # GPU: batches 64 and 256, 224x224
  python benchmarks/bench_network.py --compile               # the same under torch.compile
  python benchmarks/bench_network.py --quick                 # CPU: batch 2, 64x64, interpreted
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels only run interpreted on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench, meta as common_meta, peak_extra_mib, write_results  # noqa: E402

from mlvicx_fast import MLVICX  # noqa: E402

PROVIDERS = ("reference", "reference-exact", "fused", "resnet18-g")
COLUMNS = ["provider", "batch", "size", "compiled", "ms", "ms_p20", "ms_p80", "images/s",
           "speedup_vs_reference", "ratio_to_resnet18-g", "peak_extra_MiB"]


class GlobalOnly(torch.nn.Module):
    """Bare ResNet18 + global expander, sharing the MLVICX model's modules."""

    def __init__(self, model: MLVICX):
        super().__init__()
        self.backbone, self.global_expander = model.backbone, model.global_expander

    def forward(self, x):
        return self.global_expander(self.backbone(x)), None


def build(provider: str, preset: str, device: str, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if provider == "fused":
        model = MLVICX(preset, backend="triton", aggregation="exact")
    else:
        model = MLVICX(preset, backend="torch", aggregation="official" if provider == "reference" else "exact")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return GlobalOnly(model) if provider == "resnet18-g" else model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="small CPU-sized run: batch 2, 64x64 images")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 64,256; 2 with --quick)")
    p.add_argument("--size", type=int, default=None, help="image side (default 224; 64 with --quick)")
    p.add_argument("--preset", default="official", choices=["official", "paper"])
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--rep-ms", type=float, default=3000.0,
                   help="timing budget per provider in ms (default 3000; the memory columns do not depend on it)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--name", default=None, help="output file stem under benchmarks/out/")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [int(b) for b in (args.batches or ("2" if args.quick else "64,256")).split(",")]
    size = args.size or (64 if args.quick else 224)
    providers = args.providers.split(",")
    for name in providers:
        if name not in PROVIDERS:
            p.error(f"unknown provider {name!r}; expected some of {', '.join(PROVIDERS)}")
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=not args.fp32)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True

    meta = common_meta(device, preset=args.preset,
                autocast_bf16=not args.fp32, channels_last=not args.nchw, compiled=args.compile,
                interpreted=os.environ.get("TRITON_INTERPRET", "0") == "1",
                step="one view: forward, then backward of sum(z*gz) + sum(m*gm); no loss, no optimizer")
    name = args.name or ("bench_network_compiled" if args.compile else "bench_network")
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        times = {}
        for provider in providers:
            model = build(provider, args.preset, device, not args.nchw).train()
            run = torch.compile(model) if args.compile else model
            with amp:
                z, m = run(x)
            gz = torch.randn_like(z)
            gm = None if m is None else torch.randn_like(m)

            def step():
                with amp:
                    z, m = run(x)
                loss = (z * gz).sum() if m is None else (z * gz).sum() + (m * gm).sum()
                loss.backward()

            step()  # warm-up (and compilation)
            t = bench(step, device, warmup=1, reps=3, warmup_ms=500, rep_ms=args.rep_ms)
            row = dict(provider=provider, batch=batch, size=size, compiled=args.compile, **t)
            row["images/s"] = batch / (t["ms"] * 1e-3)
            row["peak_extra_MiB"] = peak_extra_mib(step, device)
            times[provider] = t["ms"]
            rows.append(row)
            print(f"batch {batch:4d} {provider:>16}: {t['ms']:9.2f} ms  {row['images/s']:8.0f} img/s  "
                  f"peak {row['peak_extra_MiB']} MiB", flush=True)
            write_results(name, rows, COLUMNS, meta)  # after every row: a stage cut short keeps them
            del model, run, z, m
            if device == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            if row["batch"] != batch:
                continue
            if "reference" in times:
                row["speedup_vs_reference"] = times["reference"] / row["ms"]
            if "resnet18-g" in times:
                row["ratio_to_resnet18-g"] = row["ms"] / times["resnet18-g"]
        write_results(name, rows, COLUMNS, meta)
    print(write_results(name, rows, COLUMNS, meta))


if __name__ == "__main__":
    main()
