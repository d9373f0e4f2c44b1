"""Timing, memory and output helpers shared by the benchmark scripts.

Times are medians: on CUDA of back-to-back calls between CUDA events (steady-state time per call,
host launch overhead included where it dominates; p20/p80 over the trials), optionally of a CUDA-graph
replay (bench_graph); on the CPU from a perf_counter loop after warm-up.
count_host_ops counts Triton launches and torch ops per call with torch.profiler. Results go to
benchmarks/out/<name>.{csv,json,md}.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    """The checkout's commit; MLVICX_COMMIT names it where the copy has no git metadata (device runs)."""
    if os.environ.get("MLVICX_COMMIT"):
        return os.environ["MLVICX_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], None], device: str, warmup: int = 3, reps: int = 10,
          max_seconds: float = 5.0, warmup_ms: int = 25, rep_ms: int = 100) -> Dict[str, float]:
    """Median / p20 / p80 time of fn() in milliseconds. On CUDA, warmup_ms and rep_ms are
    the warm-up and measuring windows (raise them for calls of tens of ms)."""
    if device == "cuda":
        return _bench_cuda(fn, warmup_ms, rep_ms)
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 2 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def _bench_cuda(fn: Callable[[], None], warmup_ms: float, rep_ms: float, trials: int = 10) -> Dict[str, float]:
    """Steady-state ms per call: `trials` runs of n back-to-back calls, each between two CUDA events
    recorded from an idle GPU, so a call whose host work (launches, Python) outlasts its GPU work is
    timed by the host, as a training loop sees it. (triton's do_bench clears a 256 MB buffer before
    every call and starts its clock after that clear, which lets the host run ~60 us ahead and hides
    that much launch overhead: the small loss and context shapes are launch-bound.) n is chosen so
    the trials fill about rep_ms; the same L2 state for every provider (inputs stay cached)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    est = max(run(1), run(2), 1e-3)  # the first calls may still compile or tune
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        est = run(max(1, int(warmup_ms / 4 / est)))
    n = max(1, min(10_000, int(rep_ms / trials / max(est, 1e-3))))
    times = sorted(run(n) for _ in range(trials))
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def bench_graph(fn: Callable[[], None], device: str, warmup: int = 3, **kwargs) -> Optional[Dict[str, float]]:
    """Median / p20 / p80 ms of one replay of fn() captured in a CUDA graph (after warm-up on a
    side stream, as capture requires), timed like bench(): GPU work without the host's launch
    overhead. None on the CPU, or when fn cannot be captured (the reason is printed)."""
    if device != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - report and go on with the plain timing
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:200]})", flush=True)
        torch.cuda.synchronize()
        return None
    try:
        return bench(graph.replay, device, **kwargs)
    finally:
        del graph


def peak_extra_mib(fn: Callable[[], None], device: str) -> Optional[float]:
    """Peak CUDA memory allocated during fn() above what was allocated before (MiB); None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(device: str, mib: int = 512) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second, in GB/s."""
    n = mib * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)["ms"]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def saved_for_backward_bytes(fn: Callable[[], object], exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs, leaving out
    the storages of the tensors in exclude (parameters: saved by reference, no extra memory)."""
    storages: Dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def write_results(name: str, rows: List[dict], columns: List[str], meta: dict, out_dir: Path = OUT_DIR) -> str:
    """Write rows as CSV, JSON (with meta) and a markdown table; return the markdown."""
    # each file replaced whole (written aside, then renamed): the scripts write after every row,
    # and a stage's time limit may stop one mid-write, which left a JSON that targets.py could not read
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _replace(out_dir / f"{name}.csv", text.getvalue())
    _replace(out_dir / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    md = markdown_table(rows, columns)
    header = (f"<!-- {name}: {meta.get('device')}, {meta.get('date')}, commit {meta.get('commit')}, "
              f"torch {meta.get('torch')} -->\n")
    _replace(out_dir / f"{name}.md", header + md)
    return md


def _replace(path: Path, text: str) -> None:
    part = path.with_name(f".{path.name}.part")
    with open(part, "w", newline="") as f:
        f.write(text)
    os.replace(part, path)


def markdown_table(rows: List[dict], columns: List[str]) -> str:
    def fmt(v):
        if v is None or v == "":
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def meta(device: str, **extra) -> dict:
    return {"device": device_name(device), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(), "torch": torch.__version__, "host": platform.node(),
            "threads": torch.get_num_threads(), "env_TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""), **extra}


def count_host_ops(fn: Callable[[], object]) -> Dict[str, object]:
    """What fn() asks of the host: Triton kernel launches, torch (aten) operators called outside
    them, and calls of our torch.library custom ops, counted with torch.profiler on whatever
    device runs. Each launch is wrapped in a ``triton::<kernel>`` record_function while fn runs;
    an aten operator counts when no aten or triton event encloses it (ops that other ops call
    internally, whatever Triton's CPU interpreter does inside a launch, and autograd's own
    AccumulateGrad bookkeeping are left out); the ops a custom op runs inside it are counted
    too. Returns {'triton': n, 'torch': n, 'custom_op': n, 'names': Counter of what was counted}."""
    from collections import Counter

    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def recorded(self, grid):
        launch = original(self, grid)
        name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")

        def run(*args, **kwargs):
            with torch.profiler.record_function(f"triton::{name}"):
                return launch(*args, **kwargs)
        return run

    KernelInterface.__getitem__ = recorded
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        KernelInterface.__getitem__ = original
    enclosing = ("aten::", "triton::")

    def enclosed(ev) -> bool:
        parent = ev.cpu_parent
        while parent is not None:
            if parent.name.startswith(enclosing) or "AccumulateGrad" in parent.name:
                return True
            parent = parent.cpu_parent
        return False

    names: Counter = Counter()
    for ev in prof.events():
        if ev.name.startswith("mlvicx_fast::") or (ev.name.startswith(enclosing) and not enclosed(ev)):
            names[ev.name] += 1
    count = lambda prefix: sum(v for k, v in names.items() if k.startswith(prefix))  # noqa: E731
    return {"triton": count("triton::"), "torch": count("aten::"), "custom_op": count("mlvicx_fast::"),
            "names": names}
