"""Check the speed targets of ../shared/docs/BASELINES.md against benchmark output in one run.

Reads benchmarks/out/<bench>.json (or --dir), prints one markdown row per target: measured
value, target, PASS / FAIL / not measured. Exit status 0 whatever the outcome: this reports.

  python benchmarks/targets.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"


def _rows(data, **match):
    return [r for r in data["rows"] if all(r.get(k) == v for k, v in match.items())]


def _ms(data, **match):
    rows = _rows(data, **match)
    return rows[0]["ms"] if rows else None


def loss_targets(data):
    """Fused loss targets (issue 2)."""
    out = []
    for shape, other, factor in (("64x2048", "official", 20), ("64x2048", "official-compile", 5),
                                 ("2048x8192", "official", 30)):
        ours, base = _ms(data, shape=shape, dtype="fp32", provider="ours"), _ms(data, shape=shape, dtype="fp32", provider=other)
        ratio = base / ours if ours and base else None
        out.append((f"loss fwd+bwd {shape} fp32: ours vs {other}", ratio, f">= {factor}x",
                    None if ratio is None else ratio >= factor))
    for r in _rows(data, provider="ours"):
        if r.get("peak_extra_MiB") is not None:
            ratio = r["peak_extra_MiB"] / r["inputs_MiB"]
            out.append((f"loss peak extra memory {r['shape']} {r['dtype']} / inputs", ratio, "< 2x", ratio < 2))
    return out


CHECKS = {"bench_loss": loss_targets}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=OUT_DIR, help="where the benchmark JSON files are")
    args = p.parse_args(argv)
    print("| target | measured | wanted | verdict |\n|---|---|---|---|")
    for name, check in CHECKS.items():
        path = args.dir / f"{name}.json"
        if not path.exists():
            print(f"| {name} | — | — | not measured (no {path.name}) |")
            continue
        data = json.loads(path.read_text())
        on_cpu = str(data["meta"].get("device", "")).startswith("CPU")
        for what, value, wanted, ok in check(data):
            shown = "—" if value is None else f"{value:.2f}"
            verdict = "not measured" if ok is None else ("PASS" if ok else "FAIL")
            if on_cpu and ok is not None:
                verdict = "CPU run: GPU target not judged"
            print(f"| {what} | {shown} | {wanted} | {verdict} |")
        print(f"<!-- {name}: {data['meta'].get('device')}, {data['meta'].get('date')}, commit {data['meta'].get('commit')} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
