"""benchmarks/targets.py judges the issue's speed targets from benchmark rows: check its arithmetic
on made-up rows (fresh random times), including the end-to-end rule of issue 5."""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import targets  # noqa: E402


def step_data(batch, official_ms, bare_ms, ours_ms, aug_ms):
    rows = [dict(provider=p, batch=batch, ms=ms, pairs_per_s=batch / (ms * 1e-3))
            for p, ms in (("official", official_ms), ("bare", bare_ms), ("ours", ours_ms), ("ours+aug", aug_ms))]
    return {"rows": rows, "meta": {}}


def test_step_targets_ratios_and_end_to_end():
    official, bare = random.uniform(100, 200), random.uniform(10, 20)
    ours, aug = bare * random.uniform(1.0, 1.6), bare * random.uniform(1.7, 2.0)
    data = step_data(64, official, bare, ours, aug)
    got = {what: (value, ok) for what, value, _, ok in targets.step_targets(data)}
    assert got["step batch 64: ours / bare ResNet18 time"][0] == pytest.approx(ours / bare)
    assert got["step batch 64: ours vs official pairs/s"][0] == pytest.approx(official / ours)
    no_loader = got["step batch 64: ours+aug vs official (no CPU loader run here)"]
    assert no_loader[0] == pytest.approx(official / aug)

    # a slow loader caps the end-to-end rate at 16 x its per-core rate
    per_core = random.uniform(10, 50)
    loader = {"rows": [{"format": "jpg", "crop": "gpu", "two_view_samples_per_s_per_core": per_core},
                       {"format": "jpg", "crop": "cpu", "two_view_samples_per_s_per_core": 10 * per_core}]}
    rows = targets.step_targets(data, loader=loader)
    (what, value, wanted, ok), = [r for r in rows if "end to end" in r[0]]
    assert value == pytest.approx(16 * per_core / (64 / (official * 1e-3)))
    assert ok is (value >= 9) and wanted == ">= 9x"
    # a fast loader leaves the GPU-side rate
    loader["rows"][0]["two_view_samples_per_s_per_core"] = 1e6
    (_, value, _, _), = [r for r in targets.step_targets(data, loader=loader) if "end to end" in r[0]]
    assert value == pytest.approx(official / aug)


def test_loss_target_verdicts():
    eager, ours = random.uniform(2, 3), random.uniform(0.05, 0.2)
    rows = [dict(shape="64x2048", dtype="fp32", provider="official", ms=eager),
            dict(shape="64x2048", dtype="fp32", provider="official-compile", ms=eager / 3),
            dict(shape="64x2048", dtype="fp32", provider="ours", ms=ours, peak_extra_MiB=1.0, inputs_MiB=1.0)]
    out = {what: (value, ok) for what, value, _, ok in targets.loss_targets({"rows": rows})}
    value, ok = out["loss fwd+bwd 64x2048 fp32: ours vs official"]
    assert value == pytest.approx(eager / ours) and ok is (eager / ours >= 20)
    assert out["loss fwd+bwd 2048x8192 fp32: ours vs official"] == (None, None)  # not measured, not a pass
    assert out["loss peak extra memory 64x2048 fp32 / inputs"] == (1.0, True)


def test_targets_a_run_did_not_reach_are_not_measured():
    """A stage cut short leaves some rows out: each target it names is then 'not measured' (None),
    never absent from the table and never a pass."""
    official, bare, ours = random.uniform(100, 200), random.uniform(10, 20), random.uniform(10, 30)
    data = step_data(64, official, bare, ours, ours * 1.1)  # batch 256 never measured
    got = {what: ok for what, _, _, ok in targets.step_targets(data)}
    assert got["step batch 256: ours / bare ResNet18 time"] is None
    assert got["step batch 256: ours vs official pairs/s"] is None
    assert got["step batch 64: ours / bare ResNet18 time"] is (ours / bare <= 1.2)

    fused, comp = random.uniform(0.3, 0.5), random.uniform(0.5, 3.0)
    rows = [dict(shape="64x512x7x7", provider=p, mode="forward+backward", ms=ms, floor_ms=0.01)
            for p, ms in (("fused", fused), ("compiled", comp))]
    got = {what: (value, ok) for what, value, _, ok in targets.context_targets({"rows": rows})}
    assert got["context fwd+bwd 64x512x7x7: fused vs compiled"] == (pytest.approx(comp / fused), comp / fused > 1)
    for tap in ("64x64x112x112", "64x64x56x56", "64x128x28x28", "64x256x14x14"):
        assert got[f"context fwd+bwd {tap}: fused vs compiled"] == (None, None)
    assert got["context fwd+bwd 64x64x112x112: time / bandwidth floor"] == (None, None)
    # a batch other than 64 is not the target's shape
    rows = [dict(r, shape="2x512x7x7") for r in rows]
    assert all(ok is None for _, _, _, ok in targets.context_targets({"rows": rows}))
    assert targets.loss_targets({"rows": []})[-1] == ("loss peak extra memory / inputs", None, "< 2x", None)


def test_a_cut_short_result_file_costs_its_own_rows_only(tmp_path):
    """A stage's time limit can stop a script while it writes its JSON; the table still comes out,
    with that file named, and common.write_results now replaces each file whole."""
    import common

    common.write_results("bench_loss", [dict(shape="64x2048", dtype="fp32", provider="ours", ms=random.uniform(1, 2))],
                         ["shape", "dtype", "provider", "ms"], {"device": "test"}, out_dir=tmp_path)
    assert not list(tmp_path.glob(".*.part"))
    (tmp_path / "bench_step.json").write_text('{"meta": {"device": "NVIDIA H200"}, "rows": [{"provider": "ou')
    table = targets.table(tmp_path)
    assert "unreadable bench_step.json (JSONDecodeError" in table
    assert "not measured (no bench_context.json)" in table
