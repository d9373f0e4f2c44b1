"""Gather every benchmark's output into benchmarks/RESULTS.md, with tables and plots.

Reads   DIR/<name>.json (rows + meta: device, date, commit, torch, host, settings) and
        DIR/<name>.csv (column order; the rows when there is no JSON) of every benchmark found
        there (default DIR: benchmarks/out, where the bench_*.py scripts write).
Writes  RESULTS (default benchmarks/RESULTS.md): the generated part goes between the lines
        <!-- run_all:begin --> and <!-- run_all:end -->, appended at the end the first time and
        replaced on later runs; everything outside the markers (the hand-written measurements)
        is left as it is. A RESULTS file that does not exist yet is created.
        PLOTS/<name>.png (default benchmarks/plots), linked from RESULTS by relative paths.

Per benchmark file: where and when its rows were measured, a plot, and the table of its rows.
  bench_step*     pairs/s vs batch, one line per provider
  bench_loss*     speed-up of ours over each reference provider, per shape and dtype (+ table)
  bench_context*  speed-up of fused over eager and compiled, per tap shape and mode (+ table)
  bench_augment*  two-view samples/s per provider and batch
  bench_network*  images/s per provider and batch
  bench_loader*   two-view samples/s per core, per loader configuration
  bench_prepare*  images/s per core, per input kind
(* also the variants written with --name, e.g. bench_network_compiled.) Files of any other name
get a plain table, never dropped; benchmarks with no file are listed as missing. Last comes the
speed-target table of benchmarks/targets.py. Without matplotlib the plots are skipped (said so).

--run cpu  first runs the CPU-capable benchmarks at their small settings (--quick; bench_step at
           batches 2 and 4), with the GPU hidden: about 5 minutes on 2 cores. Logs:
           benchmarks/out/run_all_<name>.log. The fused Triton ops run in the interpreter there,
           so their times are not speed measurements.
--run gpu  first runs `bash benchmarks/gpu_check.sh` (its stages, limits and archive; it gathers
           into benchmarks/out/gpu_check/RESULTS.md itself), then gathers benchmarks/out here.
--run needs the default --dir (the scripts always write to benchmarks/out).
Exit status: 0; 1 when a stage, a plot or the target table failed (the rest is still written);
2 when there is nothing to gather or RESULTS has broken markers (then it is left untouched).

Examples:
  python benchmarks/run_all.py                     # gather benchmarks/out into benchmarks/RESULTS.md
  python benchmarks/run_all.py --run cpu           # run the small CPU benchmarks, then gather
  python benchmarks/run_all.py --dir /tmp/gpu_check --results /tmp/gpu_check/RESULTS.md \\
      --plots /tmp/gpu_check/plots                 # an unpacked gpu_check.tgz
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
import targets  # noqa: E402
from common import OUT_DIR, commit, markdown_table  # noqa: E402

BEGIN = "<!-- run_all:begin -->"
END = "<!-- run_all:end -->"
RESULTS = ROOT / "RESULTS.md"
PLOTS = ROOT / "plots"

# the benchmarks run_all knows: name -> (what it measures, the script that writes it)
KINDS = {
    "bench_loss": "VICReg loss, forward + backward",
    "bench_context": "context-bottleneck block",
    "bench_step": "whole pretraining step",
    "bench_augment": "two-view augmentation",
    "bench_network": "MLVICX network, one view forward + backward",
    "bench_loader": "loader, CPU side",
    "bench_prepare": "prepare, per-image CPU work",
}

# --run cpu: (name, time limit in s, arguments of the script); all at their small settings
CPU_STAGES = [
    ("bench_loss", 180, ["bench_loss.py", "--quick"]),
    ("bench_augment", 120, ["bench_augment.py", "--quick"]),
    ("bench_prepare", 180, ["bench_prepare.py", "--quick"]),
    ("bench_network", 180, ["bench_network.py", "--quick"]),
    ("bench_context", 240, ["bench_context.py", "--quick"]),
    ("bench_loader", 240, ["bench_loader.py", "--quick"]),
    ("bench_step", 420, ["bench_step.py", "--quick", "--batches", "2", "4"]),
]


class NothingToPlot(Exception):
    """The rows hold nothing this benchmark's plot can show (the message says why)."""


@dataclass
class Result:
    name: str
    kind: Optional[str]  # a key of KINDS, None for a file run_all does not know
    columns: List[str]
    rows: List[dict]
    meta: Optional[dict]
    files: List[str] = field(default_factory=list)


def kind_of(name: str) -> Optional[str]:
    for kind in sorted(KINDS, key=len, reverse=True):
        if name == kind or name.startswith(kind + "_"):
            return kind
    return None


def _value(text: str):
    """A CSV cell as the value write_results had: '' was None, then bool, int, float, text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_results(out_dir: Path) -> Tuple[List[Result], List[str]]:
    """Every benchmark result in out_dir (JSON rows + meta, CSV column order), and the files that
    could not be read as one, each with why."""
    results, skipped = [], []
    stems = sorted({p.stem for p in out_dir.glob("*.csv")} | {p.stem for p in out_dir.glob("*.json")})
    for stem in stems:
        jpath, cpath = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
        data, files = None, []
        if jpath.exists():
            try:
                data = json.loads(jpath.read_text())
            except (OSError, ValueError) as e:
                skipped.append(f"{jpath.name} (unreadable: {e})")
            if data is not None and not (isinstance(data, dict) and isinstance(data.get("rows"), list)):
                skipped.append(f"{jpath.name} (not a benchmark result: no rows)")
                data = None
            if data is not None:
                files.append(jpath.name)
        columns, csv_rows = None, None
        if cpath.exists():
            with open(cpath, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                csv_rows = [{k: _value(v or "") for k, v in r.items() if k is not None} for r in reader]
            files.append(cpath.name)
        if data is not None:
            rows = [r for r in data["rows"] if isinstance(r, dict)]
            if not columns:
                columns = list(dict.fromkeys(k for r in rows for k in r))
            meta = data.get("meta") if isinstance(data.get("meta"), dict) else None
        elif csv_rows is not None:
            rows, meta = csv_rows, None
        else:
            continue
        results.append(Result(stem, kind_of(stem), columns, rows, meta, files))
    order = list(KINDS)
    results.sort(key=lambda r: (order.index(r.kind) if r.kind else len(order), r.name))
    return results, skipped


# ---------------------------------------------------------------------------------------- numbers

def _num(v) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def speedups(rows: List[dict], keys: Tuple[str, ...], ours: str, provider: str = "provider",
             value: str = "ms") -> Dict[tuple, Dict[str, float]]:
    """{group: {reference provider: its time / ours' time}} for every group (the values of keys,
    in order of first appearance) that has a row of ours and at least one other provider."""
    times: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        t = _num(r.get(value))
        if t is not None:
            times.setdefault(tuple(r.get(k) for k in keys), {})[str(r.get(provider))] = t
    out = {}
    for group, by in times.items():
        if by.get(ours):
            refs = {p: t / by[ours] for p, t in by.items() if p != ours}
            if refs:
                out[group] = refs
    return out


def speedup_table(sp: Dict[tuple, Dict[str, float]], keys: Tuple[str, ...], ours: str) -> str:
    refs = list(dict.fromkeys(p for by in sp.values() for p in by))
    lines = ["| " + " | ".join(list(keys) + [f"{ours} vs {p}" for p in refs]) + " |",
             "|" + "---|" * (len(keys) + len(refs))]
    for group, by in sp.items():
        cells = [str(g) for g in group] + [f"{by[p]:.3g}x" if p in by else "—" for p in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wide(values) -> bool:
    vals = [v for v in values if v is not None and v > 0]
    return bool(vals) and max(vals) / min(vals) > 30


def _bars(ax, labels, series: Dict[str, list], ylabel: str, log: Optional[bool] = None, one_line=False,
          legend=False):
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        pts = [(j + (i - (n - 1) / 2) * width, v) for j, v in enumerate(vals) if v is not None]
        if pts:
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if max(len(str(x)) for x in labels) > 6 else 0, ha="right")
    if log if log is not None else _wide(v for vals in series.values() for v in vals):
        ax.set_yscale("log")
    if one_line:
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1 or legend:
        ax.legend(fontsize=8)


def _title(res: Result, what: str) -> str:
    m = res.meta or {}
    where = f"{m.get('device', 'device unknown')}, commit {m.get('commit', 'unknown')}"
    return f"{res.name}: {what}\n{where}"


def _save(plt, fig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_speedups(res: Result, path: Path, keys, ours, label_keys, panel_key=None) -> str:
    sp = speedups(res.rows, keys, ours)
    if not sp:
        raise NothingToPlot(f"no group with both a '{ours}' row and a reference row")
    plt = _pyplot()
    panels = list(dict.fromkeys(dict(zip(keys, g)).get(panel_key) for g in sp)) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 4.2 * len(panels)), 3.8), sharey=True, squeeze=False)
    refs = list(dict.fromkeys(p for by in sp.values() for p in by))
    for ax, panel in zip(axes[0], panels):
        groups = [g for g in sp if panel_key is None or dict(zip(keys, g))[panel_key] == panel]
        labels = [" ".join(str(dict(zip(keys, g))[k]) for k in label_keys) for g in groups]
        series = {f"vs {p}": [sp[g].get(p) for g in groups] for p in refs}
        _bars(ax, labels, series, f"speed-up of {ours} (x)" if ax is axes[0][0] else "", log=True, one_line=True,
              legend=True)
        if panel is not None:
            ax.set_title(str(panel), fontsize=9)
    fig.suptitle(_title(res, f"speed-up of {ours} (reference time / {ours} time)"), fontsize=9,
                 y=1.0 + 0.06 * (panel_key is not None))
    _save(plt, fig, path)
    return f"speed-up of {ours} over each reference provider (log scale; 1x dashed)"


def plot_lines(res: Result, path: Path, x: str, y: str, series_key: str, ylabel: str) -> str:
    sizes = {r.get("size") for r in res.rows}
    lines: Dict[str, List[tuple]] = {}
    for r in res.rows:
        xv, yv = _num(r.get(x)), _num(r.get(y))
        if xv is None or yv is None:
            continue
        name = str(r.get(series_key)) + (f" ({r.get('size')} px)" if len(sizes) > 1 else "")
        lines.setdefault(name, []).append((xv, yv))
    if not lines:
        raise NothingToPlot(f"no rows with numbers in both {x} and {y}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    xs = sorted({p[0] for pts in lines.values() for p in pts})
    if len(xs) > 1 and xs[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{v:g}" for v in xs])
    ax.minorticks_off()
    if _wide(p[1] for pts in lines.values() for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(res, f"{ylabel} vs {x}"), fontsize=9)
    _save(plt, fig, path)
    return f"{ylabel} vs {x}, one line per {series_key}"


def plot_throughput(res: Result, path: Path, label_keys, series_key, value: str, ylabel: str) -> str:
    labels: List[str] = []
    cells: Dict[str, Dict[str, float]] = {}
    for r in res.rows:
        v = _num(r.get(value))
        if v is None:
            continue
        label = " ".join(f"{k}={r.get(k)}" if k in ("crop", "workers", "batch") else str(r.get(k)) for k in label_keys)
        if label not in labels:
            labels.append(label)
        cells.setdefault(str(r.get(series_key)) if series_key else ylabel, {})[label] = v
    if not labels:
        raise NothingToPlot(f"no rows with a number in {value}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) * max(1, len(cells)) ** 0.5 + 2), 3.8))
    _bars(ax, labels, {s: [by.get(lab) for lab in labels] for s, by in cells.items()}, ylabel)
    ax.set_title(_title(res, ylabel), fontsize=9)
    _save(plt, fig, path)
    return f"{ylabel}" + (f", per {series_key}" if series_key else "")


def plot(res: Result, path: Path) -> str:
    """Draw res's plot into path; return its caption."""
    k = res.kind
    if k == "bench_step":
        return plot_lines(res, path, "batch", "pairs_per_s", "provider", "pairs/s")
    if k == "bench_loss":
        return plot_speedups(res, path, ("shape", "dtype"), "ours", ("shape", "dtype"))
    if k == "bench_context":
        return plot_speedups(res, path, ("shape", "mode"), "fused", ("shape",), panel_key="mode")
    if k == "bench_augment":
        return plot_throughput(res, path, ("batch",), "provider", "two_view_samples_per_s", "two-view samples/s")
    if k == "bench_network":
        return plot_throughput(res, path, ("batch",), "provider", "images/s", "images/s")
    if k == "bench_loader":
        return plot_throughput(res, path, ("format", "crop", "workers"), None, "two_view_samples_per_s_per_core",
                               "two-view samples/s per core")
    if k == "bench_prepare":
        return plot_throughput(res, path, ("kind",), None, "img_per_s_per_core", "images/s per core")
    raise NothingToPlot("run_all draws no plot for this file")


# --------------------------------------------------------------------------------------- markdown

HEADLINE = ("device", "date", "commit", "torch", "host")


def provenance(res: Result) -> str:
    files = " + ".join(f"`{f}`" for f in res.files)
    if res.meta is None:
        return f"Rows from {files}; no JSON beside it, so the machine, date and commit are not known.\n"
    m = res.meta
    head = ", ".join(f"{k} {m[k]}" if k in ("commit", "torch", "host") else str(m[k]) for k in HEADLINE if k in m)
    settings = "; ".join(f"{k}={v}" for k, v in m.items() if k not in HEADLINE + ("note",) and v not in ("", None))
    text = f"Rows from {files}: {head}."
    if settings:
        text += f" Settings: {settings}."
    if m.get("note"):
        text += f" Note: {m['note']}."
    return text + "\n"


def section(res: Result, plots: Optional[Path], results_path: Path, errors: List[str], no_plots: str) -> str:
    what = KINDS.get(res.kind, "not a benchmark run_all knows: its rows as they are")
    script = f" (`benchmarks/{res.kind}.py`)" if res.kind else ""
    parts = [f"### {res.name}: {what}{script}\n", provenance(res)]
    if res.kind and not res.rows:
        parts.append("No rows.\n")
    elif res.kind:
        if no_plots:
            parts.append(f"No plot: {no_plots}.\n")
        else:
            path = plots / f"{res.name}.png"
            try:
                caption = plot(res, path)
                link = Path(os.path.relpath(path, results_path.resolve().parent)).as_posix()
                parts.append(f"![{res.name}: {caption}]({link})\n")
            except NothingToPlot as e:
                parts.append(f"No plot: {e}.\n")
            except Exception as e:  # noqa: BLE001 - one broken plot must not lose the tables
                errors.append(f"plot of {res.name}: {type(e).__name__}: {e}")
                parts.append(f"Plot failed: {type(e).__name__}: {e}.\n")
    if res.kind == "bench_loss":
        sp = speedups(res.rows, ("shape", "dtype"), "ours")
        if sp:
            parts.append("Speed-up of ours (reference time / our time):\n\n" + speedup_table(sp, ("shape", "dtype"), "ours"))
    if res.kind == "bench_context":
        sp = speedups(res.rows, ("shape", "mode"), "fused")
        if sp:
            parts.append("Speed-up of fused (reference time / fused time):\n\n" + speedup_table(sp, ("shape", "mode"), "fused"))
    parts.append(markdown_table(res.rows, res.columns) if res.columns else "No columns.\n")
    return "\n".join(parts)


def target_section(out_dir: Path, errors: List[str]) -> str:
    head = "### Speed targets (`benchmarks/targets.py`)\n\n"
    try:
        verdicts = targets.verdicts(out_dir)
    except Exception as e:  # noqa: BLE001 - report it, keep the rest of the page
        errors.append(f"target table: {type(e).__name__}: {e}")
        return head + f"The target table failed: {type(e).__name__}: {e}.\n"
    lines = ["| target | measured | wanted | verdict |", "|---|---|---|---|"]
    lines += [f"| {w} | {s} | {want} | {v} |" for _, _, rows in verdicts for w, s, want, v in rows]
    where = [f"- {name}: {m.get('device')}, {m.get('date')}, commit {m.get('commit')}"
             for name, m, _ in verdicts if m is not None]
    return head + "\n".join(lines) + "\n" + ("\nMeasured on:\n\n" + "\n".join(where) + "\n" if where else "")


def render(out_dir: Path, shown_dir: str, results_path: Path, plots: Path, errors: List[str]) -> str:
    results, skipped = load_results(out_dir)
    no_plots = ""
    try:
        _pyplot()
    except ImportError:
        no_plots = "matplotlib is not installed (pip install matplotlib)"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    found = {r.kind for r in results}
    missing = [k for k in KINDS if k not in found]
    out = [BEGIN, "", "## Gathered benchmark output (generated)", "",
           f"Written by `python benchmarks/run_all.py` on {now} (checkout at commit {commit()}) from the files "
           f"in `{shown_dir}`. Everything between the `run_all` markers is rewritten on each run; "
           "the sections above them are hand-written and left alone. Each section says the machine, "
           "date and commit its rows were measured on.", ""]
    out.append("Found: " + (", ".join(f"`{r.name}`" for r in results) if results else "nothing") + ".")
    if missing:
        out.append("Missing (no CSV or JSON in that folder): "
                   + ", ".join(f"`{k}` (`benchmarks/{k}.py`)" for k in missing) + ".")
    if skipped:
        out.append("Not read: " + "; ".join(skipped) + ".")
    out.append("")
    for res in results:
        out.append(section(res, plots, results_path, errors, no_plots))
    out.append(target_section(out_dir, errors))
    out.append(END)
    return "\n".join(out) + "\n"


class MarkerError(Exception):
    pass


def splice(old: Optional[str], block: str) -> str:
    """old with its generated part replaced by block (or block appended; a new file when old is None)."""
    if old is None:
        return "# Benchmark results\n\n" + block
    begins = [m.start() for m in re.finditer(rf"^{re.escape(BEGIN)}[ \t]*$", old, re.M)]
    ends = [m.end() for m in re.finditer(rf"^{re.escape(END)}[ \t]*$", old, re.M)]
    if not begins and not ends:
        return old.rstrip("\n") + "\n\n" + block
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        return old[:begins[0]] + block.rstrip("\n") + old[ends[0]:]
    raise MarkerError(f"expected one line {BEGIN} followed by one line {END}, found {len(begins)} and "
                      f"{len(ends)}{' in the wrong order' if begins and ends and begins[0] > ends[0] else ''}")


# ------------------------------------------------------------------------------------------- runs

def run_stages(stages, log_dir: Path, env: dict) -> int:
    """Run each (name, limit, args) stage's script under its time limit, logging to
    log_dir/run_all_<name>.log; go on after a failure. Return 1 if any failed."""
    status = 0
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, limit, args in stages:
        log = log_dir / f"run_all_{name}.log"
        print(f"== {name} (limit {limit} s): {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], stdout=f,
                                    stderr=subprocess.STDOUT, env=env, timeout=limit, cwd=ROOT.parent).returncode
            except subprocess.TimeoutExpired:
                rc = f"a timeout after {limit} s"
        if rc == 0:
            print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        status = 1
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-12:])
        print(f"!! {name} ended with {rc}; last lines of {log}:\n{tail}", flush=True)
    return status


def run_benchmarks(which: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT.parent), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if which == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run even on a GPU machine
        return run_stages(CPU_STAGES, OUT_DIR, env)
    env.setdefault("MLVICX_COMMIT", commit())
    print("== bash benchmarks/gpu_check.sh", flush=True)
    return subprocess.run(["bash", str(ROOT / "gpu_check.sh")], env=env, cwd=ROOT.parent).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=OUT_DIR, help="folder of benchmark CSV/JSON files (default benchmarks/out)")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write into (default benchmarks/RESULTS.md)")
    p.add_argument("--plots", type=Path, default=PLOTS, help="folder for the PNG plots (default benchmarks/plots)")
    p.add_argument("--run", choices=["none", "cpu", "gpu"], default="none",
                   help="run benchmarks first: none (default, only gather), cpu (small CPU runs), gpu (gpu_check.sh)")
    args = p.parse_args(argv)

    run_status = 0
    if args.run != "none":
        if args.dir.resolve() != OUT_DIR.resolve():
            p.error(f"--run writes to {OUT_DIR} (the benchmark scripts' output folder); leave --dir at its default")
        if args.run == "gpu":
            import torch

            if not torch.cuda.is_available():
                p.error("--run gpu needs a CUDA GPU; torch sees none (use --run cpu here)")
        run_status = run_benchmarks(args.run)
    if not args.dir.is_dir():
        print(f"run_all: no folder {args.dir}: nothing to gather. Run the benchmarks first "
              f"(e.g. python benchmarks/run_all.py --run cpu) or point --dir at their output.", file=sys.stderr)
        return 2
    errors: List[str] = []
    old = args.results.read_text() if args.results.exists() else None
    try:  # the folder as the reader of RESULTS knows it: relative to the repository when inside it
        shown = args.dir.resolve().relative_to(ROOT.parent).as_posix()
    except ValueError:
        shown = str(args.dir)
    block = render(args.dir, shown, args.results, args.plots, errors)
    try:
        text = splice(old, block)
    except MarkerError as e:
        print(f"run_all: {args.results}: {e}; left it untouched (fix the markers by hand)", file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_name(args.results.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.results)
    print(f"run_all: gathered {args.dir} into {args.results} (plots in {args.plots})")
    for e in errors:
        print(f"run_all: {e}", file=sys.stderr)
    return 1 if errors or run_status else 0


if __name__ == "__main__":
    raise SystemExit(main())
