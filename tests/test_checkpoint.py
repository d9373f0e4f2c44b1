"""Atomic checkpoints: keep-last-k, RNG round trip, and a process killed mid-write."""
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mlvicx_fast.checkpoint import CheckpointManager, atomic_save, load, rng_state, set_rng_state


def test_keep_last_k_and_load_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    weights = {s: torch.randn(4, 4) for s in (10, 20, 30)}
    for s, w in weights.items():
        mgr.save(s, {"step": s, "w": w})
    assert [s for s, _ in mgr.list()] == [20, 30]
    path, state = mgr.load_latest()
    assert path.name == "ckpt-00000030.pt" and torch.equal(state["w"], weights[30])


def test_damaged_newest_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, {"step": 1})
    mgr.path(2).write_bytes(b"not a checkpoint")
    path, state = mgr.load_latest()
    assert state["step"] == 1


def test_empty_folder(tmp_path):
    assert CheckpointManager(tmp_path / "none").load_latest() is None
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        CheckpointManager(tmp_path, keep=0)


def test_rng_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_atomic_save_round_trip(tmp_path):
    obj = {"x": torch.randn(10), "nested": {"k": [1, 2, 3]}}
    p = atomic_save(obj, tmp_path / "sub" / "a.pt")
    back = load(p)
    assert torch.equal(back["x"], obj["x"]) and back["nested"] == obj["nested"]
    assert list(p.parent.glob("*.tmp")) == []


def test_killed_while_writing_leaves_previous_loadable(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    first = torch.randn(8)
    mgr.save(1, {"step": 1, "w": first})
    script = textwrap.dedent(f"""
        import time, torch
        import mlvicx_fast.checkpoint as c
        def slow_save(obj, f):
            f.write(b"partial" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        c.torch.save = slow_save
        c.CheckpointManager({str(tmp_path)!r}).save(2, {{"step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert list(tmp_path.glob(".ckpt-*.tmp")), "the killed writer should have left its temporary file"
    path, state = mgr.load_latest()
    assert state["step"] == 1 and torch.equal(state["w"], first)
    mgr.save(3, {"step": 3})  # the next save clears the leftover
    assert not list(tmp_path.glob(".ckpt-*.tmp"))


def test_stale_temporary_files_of_a_kind_are_removed_after_a_write_of_that_kind(tmp_path):
    """final.pt's leftovers go after the next final.pt, a checkpoint's after the next checkpoint;
    the other kinds' (and other files) stay."""
    from mlvicx_fast.checkpoint import CheckpointManager, remove_stale_temps

    for name in (".ckpt-00000001.pt.k1.tmp", ".final.pt.k2.tmp", ".config.json.k3.tmp", "notes.tmp"):
        (tmp_path / name).write_text("left by a killed writer")
    remove_stale_temps(atomic_save({"w": torch.randn(3)}, tmp_path / "final.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt-00000001.pt.k1.tmp", ".config.json.k3.tmp",
                                                          "final.pt", "notes.tmp"]
    CheckpointManager(tmp_path).save(2, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config.json.k3.tmp", "ckpt-00000002.pt", "final.pt",
                                                          "notes.tmp"]


def test_saved_files_get_the_usual_mode(tmp_path):
    """mkstemp creates 0600 files; a checkpoint is readable as any file the user writes."""
    mask = os.umask(0o022)
    try:
        path = atomic_save({"x": torch.randn(3)}, tmp_path / "a.pt")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


class Gadget:  # an arbitrary Python object: unpickling one can run any code
    def __init__(self):
        self.weights = torch.randn(3)


def test_checkpoints_are_weights_only_and_unsafe_files_are_refused(tmp_path):
    from mlvicx_fast.checkpoint import UnsafeCheckpoint

    ours = atomic_save({"model": {"w": torch.randn(2)}, "rng": rng_state(), "step": 3, "config": {"lr": 0.1}},
                       tmp_path / "ours.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ours) == []  # torch.load(..., weights_only=True) reads it
    torch.save({"model": Gadget()}, tmp_path / "gadget.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"gadget\.pt' holds Python objects .*test_checkpoint\.Gadget.*weights_only=False"):
        load(tmp_path / "gadget.pt")
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, {"w": torch.randn(2)})
    torch.save({"model": Gadget()}, mgr.path(2))
    with pytest.raises(UnsafeCheckpoint):  # refused, not passed over as if damaged
        mgr.load_latest()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(Exception) as e:
        load(tmp_path / "text.pt")
    assert not isinstance(e.value, UnsafeCheckpoint)  # unreadable, not refused


def test_checkpoints_with_numpy_rng_state_still_load_and_restore(tmp_path):
    """Written before 2026-12-02: numpy's own get_state() tuple, an ndarray inside."""
    state = rng_state()
    state["numpy"] = np.random.get_state()
    atomic_save({"rng": state}, tmp_path / "old.pt")
    # the same file as numpy 1.x writes it: _reconstruct under numpy.core, not numpy._core
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "old.pt") as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item.filename, data)
    (tmp_path / "numpy1.pt").write_bytes(buf.getvalue())
    names = ["old.pt", "numpy1.pt"] if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6) \
        else ["old.pt"]  # torch < 2.6 allows a global under its current name only
    set_rng_state(state)
    a = (random.random(), np.random.rand(), torch.rand(3))
    for name in names:
        set_rng_state(load(tmp_path / name)["rng"])
        b = (random.random(), np.random.rand(), torch.rand(3))
        assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]), name
