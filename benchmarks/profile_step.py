"""Where the GPU time of one pretraining step goes: ours against the bare ResNet18 step.

bench_step.py says how long a step takes; this says which kernels fill it. Both steps run eagerly
(no CUDA graph, so every kernel shows in the profiler; a graph replays the same kernels) for a few
warm-up steps, then a few profiled ones. Kernel times are summed per step and grouped by what they
belong to (our Triton kernels by name, convolutions, matrix products, batch norm, the LARS update,
the rest; the exact aggregation is torch code, so it shows as convolution/product/reduction), then
the top kernels are listed. The difference between the two columns is what the context blocks,
the aggregation, the second head and the loss add.

Reads nothing; writes benchmarks/out/profile_step.md and prints it.

  python benchmarks/profile_step.py --batch 64           # on a GPU machine
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from bench_step import build  # noqa: E402
from common import OUT_DIR, meta  # noqa: E402

# (group, pattern on the kernel name), first match wins
GROUPS = [
    ("loss (ours)", r"_narrow_|_stats_kernel|_gram|_grad_kernel|_finalize_kernel"),
    ("context block (ours)", r"_spatial_stats|_gate_kernel|_channel_stats|_apply_kernel|_bwd_reduce|_spatial_bwd|"
                             r"_bwd_pooled|_gate_bwd|_bwd_input"),
    ("augmentation (ours)", r"_augment_kernel"),
    ("LARS", r"_lars_|multi_tensor|foreach"),
    ("batch norm", r"batch_norm|bn_|batchnorm|welford"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit|winograd"),
    ("matrix product", r"gemm|cutlass|matmul|xmma|cublas"),
    ("reduction", r"reduce|sum|mean|max|amax"),
    ("elementwise / copy", r"elementwise|vectorized|copy|fill|cat|index|unrolled"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pat in GROUPS:
        if re.search(pat, low):
            return group
    return "other"


def profile(step, x1, x2, steps: int):
    for _ in range(3):
        step(x1, x2)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step(x1, x2)
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])  # name -> [us per step, launches per step]
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name]
            k[0] += ev.time_range.elapsed_us() / steps
            k[1] += 1 / steps
    return kernels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="images per view (default 64)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--preset", default="official", choices=["official", "paper"])
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU (kernel times come from the CUDA profiler)", file=sys.stderr)
        return 2
    results = {}
    for provider in ("bare", "ours"):
        torch.manual_seed(0)
        step = build(provider, args.preset, "cuda", compile_=False, graph=False)
        x1 = torch.randn(args.batch, 3, args.size, args.size, device="cuda").to(torch.bfloat16)
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = torch.randn_like(x1)
        results[provider] = profile(step, x1, x2, args.steps)
        del step
        torch.cuda.empty_cache()

    groups = {prov: defaultdict(lambda: [0.0, 0.0]) for prov in results}
    for prov, kernels in results.items():
        for name, (us, n) in kernels.items():
            g = groups[prov][group_of(name)]
            g[0] += us
            g[1] += n
    names = sorted(set(groups["bare"]) | set(groups["ours"]), key=lambda g: -groups["ours"][g][0])
    info = meta("cuda", batch=args.batch, size=args.size, preset=args.preset)
    lines = [f"# Kernel time per step, batch {args.batch} per view, {args.size} px, eager bf16 channels_last",
             "", f"{info['device']}, torch {info['torch']}, commit {info['commit']}, {info['date']}", "",
             "| group | bare us | bare launches | ours us | ours launches | ours - bare us |",
             "|---|---|---|---|---|---|"]
    for g in names:
        b, o = groups["bare"][g], groups["ours"][g]
        lines.append(f"| {g} | {b[0]:.0f} | {b[1]:.0f} | {o[0]:.0f} | {o[1]:.0f} | {o[0] - b[0]:+.0f} |")
    tb = sum(v[0] for v in groups["bare"].values())
    to = sum(v[0] for v in groups["ours"].values())
    nb = sum(v[1] for v in groups["bare"].values())
    no = sum(v[1] for v in groups["ours"].values())
    lines.append(f"| **total** | {tb:.0f} | {nb:.0f} | {to:.0f} | {no:.0f} | {to - tb:+.0f} |")
    lines += ["", f"Top {args.top} kernels of ours by time per step:", "", "| kernel | group | us | launches |",
              "|---|---|---|---|"]
    top = sorted(results["ours"].items(), key=lambda kv: -kv[1][0])[: args.top]
    for name, (us, n) in top:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {group_of(name)} | {us:.0f} | {n:.0f} |")
    text = "\n".join(lines) + "\n"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "profile_step.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
