"""benchmarks/run_all.py: gathering benchmark output into RESULTS.md with tables and plots.

The synthetic results are written by common.write_results with each benchmark script's own
COLUMNS, as the benchmarks write them, so a renamed column shows up here. Numbers are fresh
random draws (the conftest seeds each test anew).
"""
import importlib
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import run_all  # noqa: E402


def _columns(script):
    return importlib.import_module(script).COLUMNS


def _ms():
    return random.uniform(0.05, 500.0)


def _rows_loss():
    rows = []
    for shape in ("64x2048", "2048x8192"):
        for prov in ("official", "official-compile", "ours"):
            rows.append({"shape": shape, "dtype": "fp32", "provider": prov, "ms": _ms(), "ms_p20": _ms(),
                         "ms_p80": _ms(), "peak_extra_MiB": random.uniform(1, 9), "inputs_MiB": random.uniform(1, 9)})
    return rows


def _rows_context():
    return [{"shape": f"64x{c}x{h}x{h}", "provider": prov, "mode": mode, "ms": _ms(), "floor_ms": _ms() / 10,
             "GB/s": _ms(), "saved_MiB": _ms()}
            for c, h in ((64, 112), (512, 7)) for prov in ("eager", "compiled", "fused")
            for mode in ("forward", "forward+backward")]


def _rows_step():
    return [{"provider": prov, "batch": b, "size": 224, "ms": _ms(), "pairs_per_s": random.uniform(10, 9000)}
            for b in (64, 256) for prov in ("official", "bare", "ours", "ours+aug")]


def _rows_other(kind):
    if kind == "bench_augment":
        return [{"batch": b, "source": 256, "size": 224, "provider": p, "ms": _ms(),
                 "two_view_samples_per_s": random.uniform(100, 30000)}
                for b in (64, 256) for p in ("fused", "torch-batched")]
    if kind == "bench_network":
        return [{"provider": p, "batch": 64, "size": 224, "compiled": False, "ms": _ms(),
                 "images/s": random.uniform(100, 9000), "peak_extra_MiB": random.uniform(100, 3000)}
                for p in ("reference", "reference-exact", "fused", "resnet18-g")]
    if kind == "bench_loader":
        return [{"format": f, "crop": "gpu", "workers": 1, "batch": 64, "images": 384, "seconds": random.random(),
                 "two_view_samples_per_s_per_core": random.uniform(500, 5000)} for f in ("jpg", "npy")]
    return [{"kind": k, "files": 16, "side": 1024, "size": 256, "ms_per_image": _ms(),
             "img_per_s_per_core": random.uniform(10, 900)} for k in ("png 8-bit", "dicom 16-bit")]


def _write(out, name, rows, script=None, **meta):
    cols = _columns(script or name)
    for row in rows:  # the keys run_all reads must still be the benchmark's columns
        assert set(row) <= set(cols), f"{name}: {set(row) - set(cols)} not in its COLUMNS {cols}"
    common.write_results(name, rows, cols, common.meta("cpu", **meta), out_dir=out)
    return rows, cols


def _gather(tmp_path, out, results=None, extra=()):
    results = results or tmp_path / "RESULTS.md"
    plots = tmp_path / "plots"
    rc = run_all.main(["--dir", str(out), "--results", str(results), "--plots", str(plots), *extra])
    return rc, results.read_text() if results.exists() else None, plots


def _row_line(row, cols):
    return common.markdown_table([row], cols).splitlines()[2]


def test_gather_writes_tables_plots_speedups_and_targets(tmp_path):
    out = tmp_path / "out"
    written = {"bench_loss": _write(out, "bench_loss", _rows_loss()),
               "bench_context": _write(out, "bench_context", _rows_context(), batch=64),
               "bench_step": _write(out, "bench_step", _rows_step(), preset="official")}
    for kind in ("bench_augment", "bench_network", "bench_loader", "bench_prepare"):
        written[kind] = _write(out, kind, _rows_other(kind))
    written["bench_network_compiled"] = _write(out, "bench_network_compiled", _rows_other("bench_network"),
                                               script="bench_network")
    rc, text, plots = _gather(tmp_path, out)
    assert rc == 0
    for name, (rows, cols) in written.items():
        assert f"### {name}:" in text
        for row in rows:  # every row, formatted as the benchmark's own markdown
            assert _row_line(row, cols) in text
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"](plots/{name}.png)" in text  # relative to RESULTS.md
    assert "commit " + common.commit() in text and "Missing" not in text
    # the speed-up of ours: the reference's time over ours, per shape
    rows = written["bench_loss"][0]
    t = {(r["shape"], r["provider"]): r["ms"] for r in rows}
    sp = run_all.speedups(rows, ("shape", "dtype"), "ours")
    for shape in ("64x2048", "2048x8192"):
        for ref in ("official", "official-compile"):
            want = t[(shape, ref)] / t[(shape, "ours")]
            assert sp[(shape, "fp32")][ref] == pytest.approx(want)
            assert f"{want:.3g}x" in text
    # the target table of targets.py, for the same folder
    for _, _, vrows in run_all.targets.verdicts(out):
        for what, shown, wanted, verdict in vrows:
            assert f"| {what} | {shown} | {wanted} | {verdict} |" in text


def test_second_run_replaces_between_markers_and_keeps_hand_written_text(tmp_path):
    out = tmp_path / "out"
    results = tmp_path / "RESULTS.md"
    hand = "# Measured results\n\nHand-written: H200, 2026-11-28, commit abc1234.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    results.write_text(hand)
    first, cols = _write(out, "bench_step", _rows_step())
    assert _gather(tmp_path, out, results)[0] == 0
    once = results.read_text()
    assert once.startswith(hand) and once.count(run_all.BEGIN) == 1 and once.count(run_all.END) == 1
    tail = "\nMore hand-written text below the generated part.\n"
    results.write_text(once + tail)
    second, _ = _write(out, "bench_step", _rows_step())
    rc, text, _ = _gather(tmp_path, out, results)
    assert rc == 0
    assert text.startswith(hand) and text.endswith(tail)
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1
    assert all(_row_line(r, cols) in text for r in second)
    assert not any(_row_line(r, cols) in text for r in first)


def test_broken_markers_leave_results_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    _write(out, "bench_step", _rows_step())
    results = tmp_path / "RESULTS.md"
    broken = f"# R\n\n{run_all.BEGIN}\nold\n"  # an end marker lost by hand
    results.write_text(broken)
    rc, text, _ = _gather(tmp_path, out, results)
    assert rc == 2 and text == broken
    assert "markers" in capsys.readouterr().err
    # a marker quoted inside a line of prose is not a marker
    results.write_text(f"# R\n\nThe part after `{run_all.BEGIN}` is generated.\n")
    assert _gather(tmp_path, out, results)[0] == 0


def test_unknown_files_get_a_plain_table_and_missing_ones_are_named(tmp_path):
    out = tmp_path / "out"
    mystery = [{"thing": f"t{i}", "value": random.random()} for i in range(3)]
    common.write_results("bench_mystery", mystery, ["thing", "value"], common.meta("cpu"), out_dir=out)
    (out / "by_hand.csv").write_text("x,y\nalpha,1.5\nbeta,\n")  # a CSV with no JSON beside it
    (out / "notes.json").write_text('{"hello": 1}')  # JSON that is not a result
    _write(out, "bench_step", _rows_step())
    rc, text, plots = _gather(tmp_path, out, tmp_path / "new" / "RESULTS.md")
    assert rc == 0
    assert text.startswith("# Benchmark results")  # a new file
    assert "### bench_mystery:" in text and all(_row_line(r, ["thing", "value"]) in text for r in mystery)
    assert "### by_hand:" in text and "| alpha | 1.5 |" in text and "| beta | — |" in text
    assert "machine, date and commit are not known" in text
    assert "notes.json (not a benchmark result" in text
    assert not (plots / "bench_mystery.png").exists()
    missing = text.split("Missing", 1)[1].split("\n", 1)[0]
    for kind in run_all.KINDS:
        assert (f"`{kind}`" in missing) == (kind != "bench_step")
    assert "](../plots/bench_step.png)" in text


def test_csv_alone_or_json_alone_is_enough(tmp_path):
    """A CSV without its JSON (copied by hand) and a JSON without its CSV (older gpu_check archives)."""
    out = tmp_path / "out"
    loss, loss_cols = _write(out, "bench_loss", _rows_loss())
    step, _ = _write(out, "bench_step", _rows_step())
    (out / "bench_loss.json").unlink()
    (out / "bench_step.csv").unlink()
    rc, text, plots = _gather(tmp_path, out)
    assert rc == 0
    assert all(_row_line(r, loss_cols) in text for r in loss)  # CSV cells read back as numbers
    json_cols = list(dict.fromkeys(k for r in step for k in r))
    assert all(_row_line(r, json_cols) in text for r in step)
    assert (plots / "bench_loss.png").is_file() and (plots / "bench_step.png").is_file()
    assert "Rows from `bench_loss.csv`; no JSON beside it" in text


def test_no_matplotlib_or_a_failing_plot_keeps_the_tables(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows, cols = _write(out, "bench_step", _rows_step())

    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(run_all, "_pyplot", no_matplotlib)
    rc, text, plots = _gather(tmp_path, out)
    assert rc == 0 and "No plot: matplotlib is not installed" in text
    assert all(_row_line(r, cols) in text for r in rows) and not plots.exists()
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(run_all, "plot_lines", broken)
    rc, text, _ = _gather(tmp_path, out)
    assert rc == 1 and "Plot failed: RuntimeError: drawing failed" in text
    assert all(_row_line(r, cols) in text for r in rows)


def test_missing_dir_is_a_clear_error(tmp_path, capsys):
    rc, text, _ = _gather(tmp_path, tmp_path / "nowhere")
    assert rc == 2 and text is None
    err = capsys.readouterr().err
    assert "nowhere" in err and "nothing to gather" in err


def test_run_needs_the_default_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_all.main(["--run", "cpu", "--dir", str(tmp_path)])
    assert e.value.code == 2 and "--run writes to" in capsys.readouterr().err


def test_run_stages_logs_and_goes_on_after_a_failure(tmp_path, capsys, monkeypatch):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "ok.py").write_text("import sys; print('fine', sys.argv[1:])\n")
    (scripts / "bad.py").write_text("raise SystemExit('broken on purpose')\n")
    monkeypatch.setattr(run_all, "ROOT", scripts)
    stages = [("bad", 30, ["bad.py"]), ("ok", 30, ["ok.py", "--quick"])]
    assert run_all.run_stages(stages, tmp_path / "logs", dict(__import__("os").environ)) == 1
    assert "broken on purpose" in (tmp_path / "logs" / "run_all_bad.log").read_text()
    assert "fine ['--quick']" in (tmp_path / "logs" / "run_all_ok.log").read_text()
    assert "!! bad ended with 1" in capsys.readouterr().out


def test_cpu_stages_name_real_scripts_and_flags():
    for name, limit, args in run_all.CPU_STAGES:
        script = run_all.ROOT / args[0]
        assert script.is_file() and args[0] == f"{name}.py" and name in run_all.KINDS
        for flag in (a for a in args[1:] if a.startswith("--")):
            assert f'"{flag}"' in script.read_text(), (name, flag)


def test_help_says_what_it_reads_and_writes(capsys):
    with pytest.raises(SystemExit) as e:
        run_all.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("Reads", "Writes", "RESULTS.md", "run_all:begin", "Examples:", "--run"):
        assert word in out
