"""Benchmark the two-view augmentation (DESIGN.md section 4) on uint8 batches already on the device.

Reads nothing; writes benchmarks/out/bench_augment.{csv,json,md} and prints the markdown table.
Target (issue 4): >= 20,000 two-view samples/s on one H100/H200 (256x256 uint8 -> 2 x 224x224x3 bf16).

Providers:
  fused          mlvicx_fast.ops.augment, the Triton kernel (CUDA only)
  torch-batched  what one would write in batched torch: grid_sample (bicubic) crops, vectorised
                 jitter, grouped-conv blur, solarize, normalise (close to the op, not bit-equal)
  torch-loop     the op's reference (one sample at a time; the CPU fallback)

Examples:
  python benchmarks/bench_augment.py --quick                 # CPU, batch 8, a few seconds
  python benchmarks/bench_augment.py --device cuda           # batches 64 and 256
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from common import bench, meta, write_results  # noqa: E402

from mlvicx_fast.ops import augment as A  # noqa: E402

COLUMNS = ["batch", "source", "size", "provider", "ms", "ms_p20", "ms_p80", "two_view_samples_per_s", "speedup_vs_batched"]


def torch_batched(x, params, size, mean=A.IMAGENET_MEAN, std=A.IMAGENET_STD):
    """Batched torch version of the recipe (the baseline a fused kernel has to beat)."""
    N, H, W = x.shape
    outs = []
    xf = x.float()[:, None] / 255.0
    dev = x.device
    lin = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
    for v in range(2):
        p = params[v].to(dev)
        y0, x0, h, w = p[:, A.P_Y0], p[:, A.P_X0], p[:, A.P_H], p[:, A.P_W]
        # pixel-centre coordinates of the crop in [-1, 1] (align_corners=False)
        ys = ((y0[:, None] + lin[None] * h[:, None]) / H) * 2 - 1
        xs = ((x0[:, None] + lin[None] * w[:, None]) / W) * 2 - 1
        xs = torch.where(p[:, A.P_FLIP, None] > 0, xs.flip(1), xs)
        grid = torch.stack([xs[:, None, :].expand(N, size, size), ys[:, :, None].expand(N, size, size)], -1)
        r = F.grid_sample(xf, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
        b, c, mu = p[:, A.P_B, None, None, None], p[:, A.P_C, None, None, None], p[:, A.P_MEAN, None, None, None]
        cf = p[:, A.P_CFIRST, None, None, None] > 0
        r1 = torch.where(cf, ((r - mu) * c + mu).clamp(0, 1), (r * b).clamp(0, 1))
        piv = torch.where(cf, mu, mu * b)
        r = torch.where(cf, (r1 * b).clamp(0, 1), ((r1 - piv) * c + piv).clamp(0, 1))
        sig = p[:, A.P_SIGMA].clamp(min=1e-3)
        d = torch.arange(-11, 12, device=dev, dtype=torch.float32)
        k = torch.exp(-d[None] ** 2 / (2 * sig[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)
        k = torch.where(p[:, A.P_SIGMA, None] > 0, k, (d[None] == 0).float())
        rb = F.pad(r.view(1, N, size, size), (11, 11, 11, 11), mode="reflect")
        rb = F.conv2d(rb, k.view(N, 1, 23, 1), groups=N)
        rb = F.conv2d(rb, k.view(N, 1, 1, 23), groups=N).view(N, 1, size, size)
        rb = torch.where((p[:, A.P_SOLAR, None, None, None] > 0) & (rb >= 128 / 255), 1 - rb, rb)
        m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        out = ((rb - m) / s).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        outs.append(out)
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batches", nargs="+", type=int, help="default: 64 256 on CUDA, 8 on the CPU")
    p.add_argument("--source", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--size", type=int, default=224, help="view side (default 224)")
    p.add_argument("--providers", nargs="+", choices=["fused", "torch-batched", "torch-loop"])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: batch 8")
    p.add_argument("--name", default="bench_augment")
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    batches = args.batches or ([64, 256] if device == "cuda" else [8])
    providers = args.providers or (["fused", "torch-batched", "torch-loop"] if device == "cuda"
                                   else ["torch-batched", "torch-loop"])
    info = meta(device, batches=batches, source=args.source, size=args.size)
    rows = []
    for n in batches:
        x = torch.randint(0, 256, (n, args.source, args.source), dtype=torch.uint8, device=device)
        params = A.crop_means(x, A.sample_params(n, args.source, args.source, A.VICREG, torch.Generator().manual_seed(0)))
        fns = {
            "fused": lambda: A._augment_triton(x, params, args.size, 3, A.IMAGENET_MEAN, A.IMAGENET_STD, torch.bfloat16),
            "torch-batched": lambda: torch_batched(x, params, args.size),
            "torch-loop": lambda: A.augment_reference(x, params, args.size),
        }
        base = None
        for prov in providers:
            if prov == "fused" and device != "cuda":
                continue
            if prov == "torch-loop" and device == "cuda" and n > 64:
                continue  # one kernel launch chain per sample: minutes at large batches
            t = bench(fns[prov], device, warmup=1 if device == "cpu" else 3, reps=5)
            row = {"batch": n, "source": args.source, "size": args.size, "provider": prov, **t,
                   "two_view_samples_per_s": n / (t["ms"] / 1e3)}
            if prov == "torch-batched":
                base = t["ms"]
            rows.append(row)
            write_results(args.name, rows, COLUMNS, info)  # after every row: a stage cut short keeps them
        for row in rows:
            if row["batch"] == n and base:
                row["speedup_vs_batched"] = base / row["ms"]
    print(write_results(args.name, rows, COLUMNS, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
