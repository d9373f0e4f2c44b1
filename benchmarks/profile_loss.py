"""Where the time of one fused-loss forward + backward goes, on the GPU (CPU-side overhead vs kernels).

Prints host time per call for: the raw Triton forward (no autograd), the custom op without
autograd, the full vicreg_loss forward + backward; and the torch profiler's table of CUDA kernel
times for the full call. Used to decide what to fuse next; writes nothing.

  python benchmarks/profile_loss.py --shape 64x2048
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
from mlvicx_fast.ops.vicreg import _forward_triton, vicreg_loss  # noqa: E402


def host_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64x2048")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    b, r = (int(v) for v in args.shape.split("x"))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    z1 = torch.randn(b, r, device="cuda", dtype=dtype, requires_grad=True)
    z2 = torch.randn(b, r, device="cuda", dtype=dtype, requires_grad=True)

    def full():
        z1.grad = z2.grad = None
        vicreg_loss(z1, z2).backward()

    rows = {
        "triton forward+grads, no autograd": lambda: _forward_triton(z1.detach(), z2.detach(), 25.0, 25.0, 1.0, 1e-4, True),
        "triton forward only (no grads)": lambda: _forward_triton(z1.detach(), z2.detach(), 25.0, 25.0, 1.0, 1e-4, False),
        "custom op, no autograd": lambda: torch.ops.mlvicx_fast.vicreg_fwd(z1.detach(), z2.detach(), 25.0, 25.0, 1.0,
                                                                          1e-4, True, "triton"),
        "vicreg_loss forward + backward": full,
    }
    print(f"shape {b}x{r} {args.dtype} on {torch.cuda.get_device_name()}")
    for name, fn in rows.items():
        print(f"  {name:38s} {host_us(fn):9.1f} us/call (host, synchronised)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            full()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    main()
