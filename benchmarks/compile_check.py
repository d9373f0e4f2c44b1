"""Compile every Triton kernel of the package for a GPU, on a machine without one, and report
registers and spills per kernel (Hopper sm_90 by default).

The ops' own host code runs on small CPU tensors with their GPU launch settings (tiles, splits,
precisions); each launch is turned into a compile-only call (JITFunction.warmup) for a CUDA
target, so the kernels are compiled exactly as a GPU run would compile them, with the same
argument types and specialisations. The tiled loss path's autotune configs are compiled one by
one. Then `cuobjdump -res-usage` (shipped with Triton) reads each binary's registers and stack:
a non-zero stack means spilled registers.

This catches what the CPU interpreter cannot: code the compiler rejects, and register spills.
It uses Triton internals (a stand-in driver), checked with Triton 3.9; other versions may need
changes. Reads nothing; writes benchmarks/out/compile_check.md and prints it.

  python benchmarks/compile_check.py            # sm_90, about a minute on 2 cores (cached: seconds)
  python benchmarks/compile_check.py --arch 80  # A100
  python benchmarks/compile_check.py --strict   # status 1 when a kernel spills (tests/test_compile.py)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["MLVICX_AUTOTUNE"] = "0"  # the tuned configs are compiled one by one below

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from common import OUT_DIR  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _StandInDriver:
    """Just enough of Triton's CUDA driver for compile-only calls: device 0 of the given arch."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def _meta(kwargs: dict) -> dict:
    """The launch's meta-parameters (constexprs are upper case here) and num_warps / num_stages."""
    return {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}


@contextlib.contextmanager
def compile_only(arch: int, compiled: List):
    """Inside: kernel[grid](...) compiles for `arch` and records (name, kernel, constexprs), launching nothing."""
    own = JITFunction.__dict__.get("__getitem__")  # normally inherited from KernelInterface

    def getitem(self, grid):
        def run(*args, **kwargs):
            kernel = self.warmup(*args, grid=grid, **kwargs)
            compiled.append((self.fn.__name__, kernel, _meta(kwargs)))
        return run

    previous = driver._active  # None until Triton first looks for a real driver (none on a CPU machine)
    driver.set_active(_StandInDriver(arch))
    JITFunction.__getitem__ = getitem
    try:
        yield
    finally:
        if own is None:
            del JITFunction.__getitem__
        else:
            JITFunction.__getitem__ = own
        driver._active = previous


@contextlib.contextmanager
def gpu_settings(sms_count: int = 132):
    """The ops' host code picks GPU tiles: not interpreting, Triton allowed on CPU tensors, an
    H100/H200-sized multiprocessor count."""
    from mlvicx_fast.ops import _triton

    mods = [importlib.import_module(f"mlvicx_fast.ops.{m}") for m in ("vicreg", "context_bottleneck", "lars", "augment")]
    saved = []
    for mod in [_triton, *mods]:
        for name, value in (("interpreting", lambda: False), ("triton_can_run", lambda *t: True),
                            ("require_triton", lambda *a, **k: None), ("_sm_count", lambda *a: sms_count)):
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
    cb = importlib.import_module("mlvicx_fast.ops.context_bottleneck")
    plan_for = cb._plan_for  # CPU tensors would plan no pixel splits; a GPU run splits them
    saved.append((cb, "_plan_for", plan_for))
    cb._plan_for = lambda x, hidden, sms=None, interp=None: plan_for(x, hidden, sms=sms or sms_count, interp=interp)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def autotune_dry_run(compiled: List):
    """Inside (and inside compile_only): the loss's autotuned launches go through Triton's autotuner
    as on a GPU, with every timed run and the final launch compile-only and each config timed as
    1 ms; each launch's grid function is evaluated with the config's meta-parameters. Checks the
    host-side wiring (argument names, reset_to_zero, grids, no meta-parameter given twice)."""
    import triton.testing

    run, bench = JITFunction.run, triton.testing.do_bench

    def compile_run(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            grid(dict(zip(self.arg_names, args), **kwargs))
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__ + " (autotune on)", kernel, _meta(kwargs)))
        return kernel

    def fake_bench(fn, *a, quantiles=None, **k):
        fn()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    JITFunction.run, triton.testing.do_bench = compile_run, fake_bench
    os.environ["MLVICX_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        JITFunction.run, triton.testing.do_bench = run, bench
        os.environ["MLVICX_AUTOTUNE"] = "0"


def resources(kernel) -> Dict[str, int]:
    """Registers, stack (spills) and shared memory of a compiled kernel, from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    regs, stack, _, local = map(int, m.groups()) if m else (None, None, None, None)
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "smem_bytes": getattr(kernel.metadata, "shared", None), "warps": getattr(kernel.metadata, "num_warps", None)}


def run_ops():
    """Every op's host code, GPU settings, small shapes that take each launch path."""
    V = importlib.import_module("mlvicx_fast.ops.vicreg")
    CB = importlib.import_module("mlvicx_fast.ops.context_bottleneck")
    L = importlib.import_module("mlvicx_fast.ops.lars")
    A = importlib.import_module("mlvicx_fast.ops.augment")
    # loss: narrow path, tiled path (split and unsplit Gram), r x r path; fp32 and bf16
    for dtype in (torch.float32, torch.bfloat16):
        for b, r in ((64, 2048), (2, 5), (128, 4096), (256, 1024), (2048, 8192), (600, 64)):
            z1, z2 = torch.randn(b, r, dtype=dtype), torch.randn(b, r, dtype=dtype)
            V._forward_triton(z1, z2, 25.0, 25.0, 1.0, 1e-4, True)
    # the tuned configs of the tiled path, each precision
    z = torch.randn(2048, 8192)
    for tuner, transposed in ((V._gram_tuned[True], False), (V._gram_tuned[True], True)):
        for cfg in tuner.configs:
            V._gram_kernel[(1, 1, 2)](z, z, 8192, 1, z, z, z, z, z, 1, 2048, 8192, 1.0, 8192, 1,
                                      TRANSPOSED=transposed, SPLIT=False, num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages, **cfg.kwargs)
    for cfg in V._grad_tuned[True].configs:
        for transposed in (False, True):
            V._grad_kernel[(1, 1, 2)](z, z, 8192, 1, z, z, z, z, z, z, 1, 2048, 8192, 1e-4, 1.0, 1.0, 1.0,
                                      HAS_INV=True, HAS_VAR=True, HAS_COV=True, TRANSPOSED=transposed,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
    # context block: the five taps of a 224 input at batch 64, bf16 channels_last, forward + backward
    # (and one tap in float32 NCHW, the layout without channels_last)
    taps = [(64, 112, torch.bfloat16, True), (64, 56, torch.bfloat16, True), (128, 28, torch.bfloat16, True),
            (256, 14, torch.bfloat16, True), (512, 7, torch.bfloat16, True), (64, 56, torch.float32, False)]
    for c, hw, dtype, cl in taps:
        x = torch.randn(64, c, hw, hw, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        w1, w2, ws = torch.randn(c // 2, c, 1, 1), torch.randn(c, c // 2, 1, 1), torch.randn(1, 2, 7, 7)
        out, state = CB._forward_triton(x, w1, w2, ws)
        CB._backward_triton(torch.randn_like(x), x, w1, w2, ws, state)
    # LARS: a few parameters, float and tensor lr
    ps = [torch.randn(300, 70), torch.randn(64)]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    L.fused_lars_step(ps, gs, ms, 0.1, 1e-6, 0.9, 1e-3)
    L.fused_lars_step(ps, gs, ms, torch.tensor(0.1), 1e-6, 0.9, 1e-3)
    # augmentation: 256 x 256 uint8 -> two 224 views, 3 channels, bf16
    x = torch.randint(0, 256, (4, 256, 256), dtype=torch.uint8)
    p = A.crop_means(x, A.sample_params(4, 256, 256, A.VICREG, torch.Generator().manual_seed(0)))
    A._augment_triton(x, p, 224, 3, A.IMAGENET_MEAN, A.IMAGENET_STD, torch.bfloat16)
    A._augment_triton(x, p[:1], 224, 1, A.IMAGENET_MEAN, A.IMAGENET_STD, torch.float32)  # eval / one view


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a kernel spills registers")
    args = p.parse_args(argv)
    compiled: List = []
    with gpu_settings(), compile_only(args.arch, compiled):
        run_ops()
        with autotune_dry_run(compiled):  # the tiled loss path through Triton's autotuner
            V = importlib.import_module("mlvicx_fast.ops.vicreg")
            for b, r in ((2048, 8192), (600, 64)):
                for env in (None, "fp16x3"):
                    if env:
                        os.environ["MLVICX_FP32_DOT"] = env
                    V._forward_triton(torch.randn(b, r), torch.randn(b, r), 25.0, 25.0, 1.0, 1e-4, True)
                    os.environ.pop("MLVICX_FP32_DOT", None)
    rows, seen = [], set()
    for name, kernel, consts in compiled:
        key = (name, tuple(sorted((k, str(v)) for k, v in consts.items())))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"kernel": name, "constexprs": ", ".join(f"{k}={v}" for k, v in sorted(consts.items())),
                     **resources(kernel)})
    spilled = [r for r in rows if r["stack_bytes"]]
    lines = [f"# Triton kernels compiled for sm_{args.arch} (no GPU), triton {triton.__version__}", "",
             f"{len(rows)} kernel variants; {len(spilled)} with a non-zero stack (spilled registers).", "",
             "| kernel | constexprs | registers | stack bytes | smem bytes | warps |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['constexprs']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['smem_bytes']} | {r['warps']} |")
    text = "\n".join(lines) + "\n"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "compile_check.md").write_text(text)
    print(text)
    return 1 if args.strict and spilled else 0


if __name__ == "__main__":
    raise SystemExit(main())
