"""Benchmark the whole pretraining step: two views forward, loss, backward, LARS update.

Reads nothing; writes benchmarks/out/bench_step.{csv,json,md} and prints the table.

Providers (same run, same synthetic data; views of size x size):
  official   the official recipe: eager fp32 NCHW, official 64x64 aggregation, reference context
             blocks, the official r x r loss
  bare       ResNet18 + global expander only (no context blocks, no second head), bf16 autocast,
             channels_last, fused loss, CUDA graph on GPU: the floor ours is compared with
  ours       the training command's own step (mlvicx_fast.train.build_training): MLVICX with the
             fused context blocks, exact aggregation, fused loss, bf16 autocast, channels_last,
             whole step in one CUDA graph on GPU (+ torch.compile with --compile)
  ours+aug   ours fed from uint8 (N, 256, 256) batches on the device through the fused two-view
             augmentation kernel each step (the loader's GPU side), outside the graph

Examples:
  python benchmarks/bench_step.py --quick                   # CPU: batch 4, 64 px, eager
  python benchmarks/bench_step.py --batches 64 256          # GPU, the issue's targets
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from common import bench, meta, write_results  # noqa: E402

from mlvicx_fast import MLVICXLoss, VICRegLoss, train  # noqa: E402
from mlvicx_fast.cuda_graph import GraphedStep  # noqa: E402
from mlvicx_fast.models.mlvicx import MLVICX, expander  # noqa: E402
from mlvicx_fast.models.resnet import ResNet18  # noqa: E402
from mlvicx_fast.optim import LARS  # noqa: E402

COLUMNS = ["provider", "batch", "size", "ms", "ms_p20", "ms_p80", "pairs_per_s", "peak_GiB", "vs_bare", "vs_official"]


class Bare(torch.nn.Module):
    """ResNet18 + the global expander: what a plain VICReg step costs."""

    def __init__(self, dim: int, final_bn: bool):
        super().__init__()
        self.backbone = ResNet18(in_chans=3)
        self.head = expander(512, dim, final_bn)

    def forward(self, x):
        return self.head(self.backbone(x))


def build(provider: str, preset: str, device: str, compile_: bool, graph: bool = True):
    """The step of one provider; on CUDA, ours and bare run in one CUDA graph unless graph=False."""
    cuda = device == "cuda"
    if provider in ("ours", "ours+aug"):  # exactly the training command's step
        cfg = train.resolve(train.Config(data="synthetic", preset=preset, compile=compile_, cuda_graph=cuda,
                                         channels_last=cuda, precision="bf16" if cuda else "fp32", device=device))
        parts = train.build_training(cfg, torch.device(device))
        parts.lr.fill_(0.05)
        return GraphedStep(parts.step, parts.model, parts.opt) if cuda and graph else parts.step
    fast = provider == "bare"
    if provider == "bare":
        from mlvicx_fast.models.mlvicx import PRESETS

        net = Bare(**PRESETS[preset])
        loss_fn = VICRegLoss()
    else:  # the official recipe
        net = MLVICX(preset=preset, backend="torch", aggregation="official")
        loss_fn = MLVICXLoss(backend="reference")
    net = net.to(device).train()
    if fast and cuda:
        net = net.to(memory_format=torch.channels_last)
    lr = torch.full((), 0.05, device=device)
    opt = LARS(net.parameters(), lr=lr, fused=None if fast else False)  # the official recipe: foreach LARS
    run = torch.compile(net) if compile_ and fast else net
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=fast and cuda)

    def step(x1, x2):
        with amp:
            o1, o2 = run(x1), run(x2)
        if provider == "bare":
            loss = loss_fn(o1.float(), o2.float())
        else:
            loss = loss_fn(o1[0].float(), o2[0].float(), o1[1].float(), o2[1].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.detach()

    return GraphedStep(step, net, opt) if fast and cuda and graph else step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", nargs="+", type=int, default=None, help="images per view (default 64 256; 4 with --quick)")
    p.add_argument("--size", type=int, default=None, help="view side (default 224; 64 with --quick)")
    p.add_argument("--preset", default="official", choices=["official", "paper"])
    p.add_argument("--providers", nargs="+", default=["official", "bare", "ours", "ours+aug"],
                   choices=["official", "bare", "ours", "ours+aug"])
    p.add_argument("--compile", action="store_true", help="torch.compile ours and bare")
    p.add_argument("--quick", action="store_true", help="CPU smoke run")
    p.add_argument("--name", default="bench_step")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = args.batches or ([4] if args.quick or device == "cpu" else [64, 256])
    size = args.size or (64 if args.quick or device == "cpu" else 224)

    info = meta(device, preset=args.preset, compile=args.compile,
                note="vs_bare = time / bare time (target <= 1.2); vs_official = official time / time (target >= 9)")
    rows = []
    for batch in batches:
        base = {}
        for provider in args.providers:
            torch.manual_seed(0)
            if args.compile:
                # a fresh compile per batch: the code cached for the batch before would make dynamo
                # recompile with a dynamic batch dimension, not the static one training runs
                torch._dynamo.reset()
            step = build(provider, args.preset, device, args.compile)
            fmt = torch.channels_last if provider != "official" and device == "cuda" else torch.contiguous_format
            dtype = torch.bfloat16 if provider != "official" and device == "cuda" else torch.float32
            x1 = torch.randn(batch, 3, size, size, device=device).to(dtype).contiguous(memory_format=fmt)
            x2 = torch.randn_like(x1)
            if provider == "ours+aug":
                from mlvicx_fast.ops.augment import two_view_augment

                raw = torch.randint(0, 256, (batch, 256, 256), dtype=torch.uint8, device=device)
                gen = torch.Generator().manual_seed(0)

                def fn():
                    v1, v2 = two_view_augment(raw, size=size, generator=gen, out_dtype=x1.dtype)
                    step(v1, v2)
            else:
                def fn():
                    step(x1, x2)
            fn()  # warm-up, graph capture, compilation
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = bench(fn, device, warmup=1, reps=3, warmup_ms=300, rep_ms=2000)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            base[provider] = t["ms"]
            rows.append(dict(provider=provider, batch=batch, size=size, **t, pairs_per_s=batch / (t["ms"] * 1e-3),
                             peak_GiB=peak))
            write_results(args.name, rows, COLUMNS, info)  # after every row: a cut-short run keeps them
            print(f"  batch {batch:4d} {provider:9s} {t['ms']:9.2f} ms  {batch / (t['ms'] * 1e-3):8.0f} pairs/s", flush=True)
            del step, x1, x2
            if device == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            if row["batch"] == batch:
                row["vs_bare"] = row["ms"] / base["bare"] if "bare" in base else None
                row["vs_official"] = base["official"] / row["ms"] if "official" in base else None
        write_results(args.name, rows, COLUMNS, info)
    print(write_results(args.name, rows, COLUMNS, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
