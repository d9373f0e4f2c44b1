"""Benchmark the context-bottleneck block: fused Triton op against the official block.

Reads nothing; writes benchmarks/out/bench_context.{csv,json,md} and prints the markdown table.

For the five MLVICX tap shapes (at 224x224 input: 64x112x112, 64x56x56, 128x28x28, 256x14x14,
512x7x7) at --batch, times forward, backward and forward+backward of
  eager     the official block in plain torch (autograd)
  compiled  the same under torch.compile
  fused     mlvicx_fast's Triton op
and reports the median time, the bandwidth achieved on the ideal traffic of the block (forward
4 passes over the tensor, backward 5, see mlvicx_fast/ops/context_bottleneck.py) as GB/s and as a
share of the device-to-device copy bandwidth measured in the same run, the time that traffic
would take at copy speed (floor_ms), and the bytes autograd saves for backward (the input x
included, the parameters left out).

Host work: on CUDA each forward and forward+backward is also captured in a CUDA graph and its
replay timed (ms_graph): the GPU work alone, so ms - ms_graph is about what the host's launches
and Python cost (no graph column on the CPU, nor with --no-graph). On any device, the Triton
launches and torch operators of each call are counted with torch.profiler (triton_launches,
torch_ops; see common.count_host_ops: ops called inside other ops, inside a launch, and autograd's
AccumulateGrad are not counted; compiled code is not counted).

Examples:
  python benchmarks/bench_context.py                      # GPU: batch 64, bf16, channels_last
  python benchmarks/bench_context.py --quick              # CPU: batch 2, fused op interpreted
  python benchmarks/bench_context.py --dtype fp32 --layout nchw --providers eager,fused
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

from common import (bench, bench_graph, meta as common_meta, copy_bandwidth_gbs, count_host_ops,  # noqa: E402
                    device_name, peak_extra_mib, saved_for_backward_bytes, write_results)

from mlvicx_fast import ContextBottleneck  # noqa: E402

TAPS = [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = {"forward": 4, "backward": 5, "forward+backward": 9}
COLUMNS = ["shape", "provider", "mode", "ms", "ms_p20", "ms_p80", "GB/s", "pct_copy_bw", "floor_ms",
           "speedup_vs_compiled", "speedup_vs_eager", "triton_launches", "torch_ops", "saved_MiB", "input_MiB",
           "peak_extra_MiB"]
GRAPH_COLUMNS = ["ms_graph", "graph_speedup_vs_compiled"]  # CUDA only


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="small CPU-sized run: batch 2, eager and fused only")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64, or 2 with --quick)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["cl", "nchw"], default="cl", help="channels_last or NCHW")
    p.add_argument("--providers", default=None,
                   help="comma list of eager,compiled,fused (default all on CUDA, eager,fused on CPU)")
    p.add_argument("--taps", default=None, help="comma list of tap indices 0-4 (default all)")
    p.add_argument("--name", default="bench_context", help="output file stem under benchmarks/out/")
    p.add_argument("--no-graph", action="store_true", help="no CUDA-graph timing (ms_graph)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (2 if args.quick else 64)
    dtype = DTYPES[args.dtype]
    default_providers = "eager,compiled,fused" if device == "cuda" and not args.quick else "eager,fused"
    providers = (args.providers or default_providers).split(",")
    taps = [TAPS[int(i)] for i in args.taps.split(",")] if args.taps else TAPS
    fmt = torch.channels_last if args.layout == "cl" else torch.contiguous_format

    copy_gbs = copy_bandwidth_gbs(device, mib=512 if device == "cuda" else 64)
    print(f"# {device_name(device)}: copy bandwidth {copy_gbs:.1f} GB/s (read + write)")
    meta = common_meta(device, batch=batch,
                dtype=args.dtype, layout=args.layout, copy_GBps=round(copy_gbs, 1),
                interpreted=os.environ.get("TRITON_INTERPRET", "0") == "1",
                graphs=device == "cuda" and not args.no_graph,
                note="GB/s counts the ideal traffic (fwd 4, bwd 5 passes over x); speedups are per mode; "
                     "ms_graph: one CUDA-graph replay; triton_launches/torch_ops: host calls per call")
    columns = COLUMNS + (GRAPH_COLUMNS if meta["graphs"] else [])
    rows = []
    for c, h, w in taps:
        torch.manual_seed(0)
        if "compiled" in providers:
            # each tap compiles afresh: the blocks share ContextBottleneck.forward's code cache, whose
            # recompile limit (8) the 5 taps x (grad, no grad) would pass, leaving the last tap eager
            torch._dynamo.reset()
        x = torch.randn(batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
        grad = torch.randn_like(x)
        x_bytes = x.numel() * x.element_size()
        shape = f"{batch}x{c}x{h}x{w}"
        base, base_graph = {}, {}
        for provider in providers:
            block = ContextBottleneck(c, backend="triton" if provider == "fused" else "torch").to(device)
            block = block.to(memory_format=fmt)
            fn = torch.compile(block, dynamic=False) if provider == "compiled" else block
            xg = x.detach().requires_grad_()

            def forward():
                with torch.no_grad():
                    fn(x)

            def forward_backward():
                xg.grad = None  # in a network dL/dx flows on; accumulating it would add 3 passes over x
                fn(xg).backward(grad)

            out = fn(xg)  # graph kept for the backward-only timing (also compiles)

            def backward():
                xg.grad = None
                out.backward(grad, retain_graph=True)

            saved = saved_for_backward_bytes(lambda: fn(xg), exclude=list(block.parameters()))
            for mode, f in (("forward", forward), ("backward", backward), ("forward+backward", forward_backward)):
                t = bench(f, device)
                traffic = PASSES[mode] * x_bytes
                row = dict(shape=shape, provider=provider, mode=mode, **t,
                           input_MiB=x_bytes / 2**20, saved_MiB=saved / 2**20)
                row["GB/s"] = traffic / (t["ms"] * 1e-3) / 1e9
                row["pct_copy_bw"] = 100.0 * row["GB/s"] / copy_gbs
                row["floor_ms"] = traffic / (copy_gbs * 1e9) * 1e3
                if provider != "compiled":  # inductor's launches do not go through Triton's launcher
                    counts = count_host_ops(f)
                    row["triton_launches"], row["torch_ops"] = counts["triton"], counts["torch"] + counts["custom_op"]
                # the backward-only call replays a graph recorded outside the capture: not captured
                graphed = None if args.no_graph or mode == "backward" else bench_graph(f, device)
                if graphed is not None:
                    row["ms_graph"] = graphed["ms"]
                    base_graph[(provider, mode)] = graphed["ms"]
                    if ("compiled", mode) in base_graph:
                        row["graph_speedup_vs_compiled"] = base_graph[("compiled", mode)] / graphed["ms"]
                if mode == "forward+backward":
                    row["peak_extra_MiB"] = peak_extra_mib(f, device)
                base[(provider, mode)] = t["ms"]
                for ref in ("compiled", "eager"):
                    if (ref, mode) in base:
                        row[f"speedup_vs_{ref}"] = base[(ref, mode)] / t["ms"]
                rows.append(row)
                write_results(args.name, rows, columns, meta)  # after every row: a cut-short run keeps them
                graph_note = f"  graph {row['ms_graph']:8.3f} ms" if "ms_graph" in row else ""
                count_note = (f"  {row['triton_launches']} launches + {row['torch_ops']} torch ops"
                              if "torch_ops" in row else "")
                print(f"{shape:>16} {provider:>9} {mode:>17}: {t['ms']:8.3f} ms{graph_note}  {row['GB/s']:8.1f} GB/s "
                      f"({row['pct_copy_bw']:.0f}% of copy){count_note}  saved {row['saved_MiB']:.1f} MiB", flush=True)
            del out
    print(write_results(args.name, rows, columns, meta))


if __name__ == "__main__":
    main()
