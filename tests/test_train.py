"""python -m mlvicx_fast.train: options, run folder, exact resume, NaN stop, Ctrl-C, DDP on gloo."""
import csv
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlvicx_fast import train
from mlvicx_fast.checkpoint import load
from mlvicx_fast.data.prepare import ensure_phantom

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32", "--batch-size", "8", "--dim", "64", "--log-every", "1", "--epochs", "1",
        "--no-compile", "--precision", "fp32"]


@pytest.fixture(scope="session")
def phantom_npy(tmp_path_factory):
    return ensure_phantom(tmp_path_factory.mktemp("phantom_npy"), n=64, seed=3, size=48, fmt="npy") / "nih"


def _rows(run):
    with open(Path(run) / "log.csv") as f:
        return list(csv.DictReader(f))


def test_help_names_every_option_with_default_and_example(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--preset", "--epochs", "--batch-size", "--lr", "--base-lr", "--warmup-epochs", "--lambda",
                 "--global-weight", "--precision", "--compile", "--no-compile", "--cuda-graph", "--channels-last",
                 "--workers", "--out", "--resume", "--seed", "--max-steps", "--in-chans", "--config"):
        assert flag in text, flag
    assert re.search(r"\(default:\s+0\.2\)", text) and "Examples:" in text


def test_config_file_then_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "official"\nbatch-size = 48\nlambda = 0.5\nepochs = 7\n')
    cfg = train.parse_config(["--config", str(toml), "--epochs", "9"])
    assert (cfg.preset, cfg.batch_size, cfg.lambda_, cfg.epochs) == ("official", 48, 0.5, 9)
    bad = tmp_path / "bad.toml"
    bad.write_text("batchsize = 4\n")
    with pytest.raises(SystemExit, match=r"unknown key 'batchsize' in .*bad.toml"):
        train.parse_config(["--config", str(bad)])
    for text, match in (('preset = "Official"\n', r"preset = 'Official' in .*: expected one of paper, official"),
                        ("in-chans = 2\n", r"in-chans = 2 in .*: expected one of 1, 3"),
                        ('cuda-graph = "no"\n', r"cuda-graph = 'no' in .*: expected true or false"),
                        ('epochs = "many"\n', r"epochs = 'many' in .*: expected an integer")):
        bad.write_text(text)
        with pytest.raises(SystemExit, match=match):
            train.parse_config(["--config", str(bad)])
    yaml = pytest.importorskip("yaml")
    y = tmp_path / "lr.yaml"
    y.write_text("lr: 1e-3\nlambda_: 0.25\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = train.parse_config(["--config", str(y)])
    assert (cfg.lr, cfg.lambda_) == (0.001, 0.25)
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"global_weight": 0.0, "seed": 5}))
    cfg = train.parse_config(["--config", str(y)])
    assert (cfg.global_weight, cfg.seed) == (0.0, 5)


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "nowhere", r"--data .*nowhere does not exist"),
    (lambda p: p, r"is not a prepared dataset \(no meta.json"),
])
def test_bad_data_is_a_clear_error_before_any_work(tmp_path, make, match):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match=match):
        train.main(["--data", str(make(tmp_path)), "--out", str(tmp_path / "run"), *TINY])
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "run").exists()


def test_init_starts_the_backbone_from_torchvision_weights(phantom_npy, tmp_path, capsys):
    """--init with a torchvision-named resnet18 state_dict (fc included, as ImageNet files are):
    the run starts from those weights (a 1e-12 lr keeps them through one step)."""
    from mlvicx_fast.models.resnet import ResNet18

    weights = ResNet18(num_classes=1000).state_dict()
    torch.save(weights, tmp_path / "resnet18.pth")
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--init", str(tmp_path / "resnet18.pth"),
                       "--lr", "1e-12", "--max-steps", "1", *TINY]) == 0
    assert "backbone initialised from" in capsys.readouterr().out
    model = load(run / "final.pt")["model"]
    for k in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        torch.testing.assert_close(model[f"backbone.{k}"], weights[k], rtol=0, atol=1e-6)
    # a wrong --init stops before any work, naming the file
    with pytest.raises(SystemExit, match=r"--init .*nowhere.pth"):
        train.main(["--data", str(phantom_npy), "--out", str(tmp_path / "run2"), "--init",
                    str(tmp_path / "nowhere.pth"), *TINY])
    assert not (tmp_path / "run2").exists()


def test_run_folder_and_checkpoint_contract(phantom_npy, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "3", "--ckpt-every", "2",
                       *TINY]) == 0
    for name in ("config.json", "log.csv", "epochs.csv", "final.pt", "loss.png"):
        assert (run / name).is_file(), name
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 and float(r["multi/cov"]) >= 0 for r in rows)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    final = load(run / "final.pt")
    assert final["kind"] == "mlvicx-pretrain" and final["step"] == 3
    assert final["model_args"] == {"preset": "paper", "in_chans": 3, "dim": 64, "final_bn": False}
    from mlvicx_fast.evaluate import load_pretrained_encoder

    enc = load_pretrained_encoder(run)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_resume_continues_exactly(phantom_npy, tmp_path):
    args = ["--data", str(phantom_npy), *TINY]
    assert train.main([*args, "--out", str(tmp_path / "whole"), "--max-steps", "5"]) == 0
    assert train.main([*args, "--out", str(tmp_path / "split"), "--max-steps", "2"]) == 0
    # the continuation in a fresh process, from another directory: nothing but the checkpoint carries over
    subprocess.run([sys.executable, "-m", "mlvicx_fast.train", "--resume", str(tmp_path / "split"), "--max-steps", "5",
                    "--quiet"], cwd=tmp_path, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    whole, split = _rows(tmp_path / "whole"), _rows(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in whole] == ["1", "2", "3", "4", "5"]
    for a, b in zip(whole, split):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a, b)  # bit for bit


def test_resume_options_given_again_win_even_when_zero(phantom_npy, tmp_path):
    """--max-steps 0 on resume lifts the first run's limit: the run goes on to its last epoch."""
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    assert train.main(["--resume", str(run)]) == 0  # not given: the saved limit holds
    assert [r["step"] for r in _rows(run)] == ["1", "2"]
    assert train.main(["--resume", str(run), "--max-steps", "0"]) == 0
    last = load(run / "final.pt")["step"]
    assert last > 2 and [int(r["step"]) for r in _rows(run)] == list(range(1, last + 1))


def test_resume_with_fp16_after_a_run_without_loss_scaling(phantom_npy, tmp_path):
    """A run saved in fp32 or bf16 has an empty (disabled) loss-scaler state; resuming it with
    --precision fp16 starts a fresh scale instead of failing to load the empty one."""
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    assert load(run / "checkpoints" / "ckpt-00000002.pt")["scaler"] == {}
    assert train.main(["--resume", str(run), "--precision", "fp16", "--max-steps", "3"]) == 0
    assert [r["step"] for r in _rows(run)] == ["1", "2", "3"]
    assert load(run / "checkpoints" / "ckpt-00000003.pt")["scaler"]["scale"] > 0


def test_deterministic_fixes_the_loss_kernels_tiles(phantom_npy, tmp_path, monkeypatch):
    for name in ("MLVICX_AUTOTUNE", "CUBLAS_WORKSPACE_CONFIG"):  # unset now, and again after the test
        monkeypatch.setenv(name, "")  # (delenv of an unset variable records nothing to undo)
        monkeypatch.delenv(name)
    try:
        assert train.main(["--data", str(phantom_npy), "--out", str(tmp_path / "run"), "--max-steps", "1",
                           "--deterministic", *TINY]) == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:  # a process-wide switch: the tests after this one run as before
        torch.use_deterministic_algorithms(False)
    assert os.environ["MLVICX_AUTOTUNE"] == "0" and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_pretraining_on_any_split_of_a_beton_drops_the_short_batch(tmp_path):
    """--data folder/test.beton: pretraining shuffles and drops the last short batch on any split
    (a CUDA-graph step takes only full batches; the loader's defaults do so for 'train' only)."""
    from mlvicx_fast.data.loader import ffcv_available

    if not ffcv_available():  # not pytest.importorskip: a bare import leaves torch on one thread
        pytest.skip("ffcv is not installed")
    import json

    data = ensure_phantom(tmp_path / "phantom", n=64, seed=3, size=48, fmt="raw") / "nih"
    n = json.loads((data / "meta.json").read_text())["splits"]["test"]["n"]
    assert n % 8 and n > 8
    run = tmp_path / "run"
    assert train.main(["--data", str(data / "test.beton"), "--out", str(run), *TINY]) == 0
    assert [r["step"] for r in _rows(run)] == [str(i) for i in range(1, n // 8 + 1)]


def test_resume_of_a_gpu_run_on_a_cpu(tmp_path, capsys):
    """A run saved on a GPU (device cuda, CUDA graph, bf16) continues on a CPU with --device cpu;
    the graph is dropped with a message, and the speed settings may be given again."""
    saved = dataclasses.asdict(train.resolve(train.Config(device="cpu")))
    saved.update(device="cuda", cuda_graph=True, precision="bf16", out=str(tmp_path / "elsewhere"))
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000010.pt"
    argv = ["--resume", str(ckpt), "--device", "cpu", "--precision", "fp32", "--epochs", "9"]
    cfg = train.resume_config(train.given_options(argv), ckpt, saved)
    assert (cfg.device, cfg.cuda_graph, cfg.precision, cfg.epochs) == ("cpu", False, "fp32", saved["epochs"])
    assert cfg.out == str(tmp_path / "run")  # the checkpoint's own run folder
    out = capsys.readouterr().out
    assert "continuing without the run's CUDA graph" in out and "ignoring --epochs" in out
    assert train.resolve(cfg).cuda_graph is False


def test_resume_writes_into_the_folder_it_continues(phantom_npy, tmp_path):
    import shutil

    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert train.main(["--resume", str(copy), "--max-steps", "3"]) == 0
    assert [r["step"] for r in _rows(copy)] == ["1", "2", "3"]
    assert [r["step"] for r in _rows(run)] == ["1", "2"]  # the original is untouched
    # a new --out folder starts its own log (with its header) and ends with a plot
    new = tmp_path / "new"
    assert train.main(["--resume", str(copy / "checkpoints" / "ckpt-00000002.pt"), "--out", str(new),
                       "--max-steps", "4"]) == 0
    assert [r["step"] for r in _rows(new)] == ["3", "4"] and (new / "loss.png").is_file()


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(phantom_npy, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "4", "--ckpt-every", "1",
                       "--keep", "2", *TINY]) == 0
    assert train.main(["--resume", str(run / "checkpoints" / "ckpt-00000003.pt"), "--max-steps", "4"]) == 0
    # the abandoned continuation's final.pt goes with its checkpoint: evaluate would take it for the run's
    assert "moved the 2 later checkpoint file(s)" in capsys.readouterr().out
    assert [p.name for p in sorted((run / "checkpoints").glob("ckpt-*.pt"))] == ["ckpt-00000003.pt",
                                                                                "ckpt-00000004.pt"]
    aside = run / "checkpoints" / "abandoned-after-00000003"
    assert (aside / "ckpt-00000004.pt").is_file() and load(aside / "final.pt")["step"] == 4
    assert load(run / "final.pt")["step"] == 4 and [r["step"] for r in _rows(run)] == ["1", "2", "3", "4"]
    # a second continuation set aside from the same step keeps the first one's files
    assert train.main(["--resume", str(run / "checkpoints" / "ckpt-00000003.pt"), "--max-steps", "4"]) == 0
    second = run / "checkpoints" / "abandoned-after-00000003-2"
    assert (aside / "ckpt-00000004.pt").is_file() and (second / "ckpt-00000004.pt").is_file()
    assert load(second / "final.pt")["step"] == 4


def test_a_new_run_never_replaces_another_run(phantom_npy, tmp_path, monkeypatch, capsys):
    """A new run in a folder that holds a run would prune that run's checkpoints as its own and start
    its logs anew: it stops before any work. --out is saved absolute (config.json names the folder
    from any working directory)."""
    monkeypatch.chdir(tmp_path)
    args = ["--data", str(phantom_npy), "--max-steps", "2", *TINY]
    assert train.main([*args, "--out", "run"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["out"] == str(run)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=rf"--out {re.escape(str(run))} already holds a run \(1 checkpoint\(s\), "
                                         rf"final.pt, log.csv with 2 step\(s\)\).*continue it with --resume {re.escape(str(run))},"):
        train.main([*args, "--out", "run", "--seed", "1"])
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    # nor does a continuation written to --out of another run
    assert train.main([*args, "--out", "other"]) == 0
    with pytest.raises(SystemExit, match=r"--out \S*other already holds a run .*give another --out, or remove it"):
        train.main(["--resume", str(run), "--out", "other", "--max-steps", "3"])
    assert [r["step"] for r in _rows(tmp_path / "other")] == ["1", "2"]
    # the run's own folder however spelled (a link, ..) is its own
    (tmp_path / "link").symlink_to(run)
    train.check_run_folder(train.Config(out=str(tmp_path / "link")), own=tmp_path / "x" / ".." / "run")
    # a run stopped before its first checkpoint (a NaN, say) cannot be resumed: not suggested
    (tmp_path / "nan").mkdir()
    (tmp_path / "nan" / "log.csv").write_text("step,loss\n1,nan\n")
    with pytest.raises(SystemExit, match=r"already holds a run \(log.csv with 1 step\(s\)\).*replace them: give another"):
        train.check_run_folder(train.Config(out=str(tmp_path / "nan")), own=None)
    # a folder left by a run that stopped before its first step is no run: it is reused
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.csv").write_text("step,loss\n")
    assert train.run_contents(empty) == [] and train.run_contents(tmp_path / "nowhere") == []
    # default folders: two runs started in the same second get one each
    monkeypatch.setattr(train.time, "strftime", lambda fmt, *a: "20261202-120000")
    cfg = train.Config()
    first, second = train.claim_run_folder(cfg), train.claim_run_folder(cfg)
    assert (first, second) == (tmp_path / "runs" / "20261202-120000", tmp_path / "runs" / "20261202-120000-2")
    assert first.is_dir() and second.is_dir()


def test_resume_of_a_moved_checkpoint_writes_over_no_other_run(phantom_npy, tmp_path, capsys):
    """A checkpoint copied out of its run folder continues in the folder it was saved from, but only
    while that folder holds the same run (or none): another run there since is refused."""
    import shutil

    args = ["--data", str(phantom_npy), *TINY]
    run = tmp_path / "run"
    assert train.main([*args, "--out", str(run), "--max-steps", "2"]) == 0
    copy = tmp_path / "copy.pt"
    shutil.copy(run / "checkpoints" / "ckpt-00000002.pt", copy)
    assert train.main(["--resume", str(copy), "--max-steps", "3"]) == 0  # its own folder, the same run
    assert [r["step"] for r in _rows(run)] == ["1", "2", "3"]
    shutil.rmtree(run)
    assert train.main([*args, "--out", str(run), "--max-steps", "2", "--seed", "5"]) == 0  # another run there now
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=rf"--out {re.escape(str(run))} already holds a run .*give another --out"):
        train.main(["--resume", str(copy), "--max-steps", "3"])
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert train.main(["--resume", str(copy), "--max-steps", "3", "--out", str(tmp_path / "elsewhere")]) == 0
    shutil.rmtree(run)  # an emptied folder is free again
    assert train.main(["--resume", str(copy), "--max-steps", "3"]) == 0 and (run / "final.pt").is_file()


def test_a_folder_being_written_is_refused_naming_the_writer(phantom_npy, tmp_path):
    """Two runs on one folder at once (the same command in two terminals, a resume of a run still
    going) would write one set of checkpoints: the second stops, naming the first's pid."""
    run = tmp_path / "run"
    args = ["--data", str(phantom_npy), "--out", str(run), "--max-steps", "1", *TINY]
    run.mkdir()
    lock = train.lock_run_folder(run)
    assert lock is not None
    try:
        with pytest.raises(SystemExit, match=rf"{re.escape(str(run))} is being written by another run "
                                             rf"\(pid {os.getpid()} on .*\); wait for it to end, or give another --out"):
            train.main(args)
        assert not (run / "config.json").exists()
    finally:
        lock.close()
    assert train.main(args) == 0  # the lock went with its holder
    assert train.main(["--resume", str(run), "--max-steps", "2"]) == 0  # and each run's with it


def test_a_torchrun_restart_continues_from_the_newest_checkpoint(phantom_npy, tmp_path, monkeypatch, capsys):
    """torchrun --max-restarts starts the same command again after a process failed: it continues
    the run from its folder's newest checkpoint (the run's folder: config.json holds the same run),
    or starts it again in place when none was written; a folder of another run is refused as before."""
    args = ["--data", str(phantom_npy), *TINY]
    assert train.main([*args, "--out", str(tmp_path / "whole"), "--max-steps", "4"]) == 0
    run = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert train.main([*args, "--out", str(run), "--max-steps", "2"]) == 0  # the attempt that "failed" after step 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train.main([*args, "--out", str(run), "--max-steps", "4"]) == 0
    assert f"torchrun restart 1: continuing from {run / 'checkpoints' / 'ckpt-00000002.pt'}" in capsys.readouterr().out
    assert [(r["step"], r["loss"]) for r in _rows(run)] == [(r["step"], r["loss"]) for r in _rows(tmp_path / "whole")]
    # a restart of a resumed run takes the newer checkpoint the earlier attempt wrote, not the one resumed from
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    first = str(run / "checkpoints" / "ckpt-00000002.pt")
    assert train.main(["--resume", first, "--max-steps", "5"]) == 0
    assert "continuing from " + str(run / "checkpoints" / "ckpt-00000004.pt") in capsys.readouterr().out
    assert [r["step"] for r in _rows(run)] == ["1", "2", "3", "4", "5"]
    assert not list((run / "checkpoints").glob("abandoned-*"))
    # killed before its first checkpoint: the logged steps are its own, it starts again in place
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_text((run / "config.json").read_text().replace(str(run), str(early)))
    (early / "log.csv").write_text("step,loss\n1,0.5\n")
    assert train.main([*args, "--out", str(early), "--max-steps", "2"]) == 0
    assert "no checkpoint of this run yet; starting it again" in capsys.readouterr().out
    assert [r["step"] for r in _rows(early)] == ["1", "2"]
    # another run's folder stays refused
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main([*args, "--out", str(early), "--max-steps", "2", "--seed", "9"])
    with pytest.raises(SystemExit, match=r"torchrun --max-restarts: give --out \(or --resume\)"):
        train.main(args)


def test_resume_says_what_it_does_differently(tmp_path):
    saved = dataclasses.asdict(train.Config(device="cuda", precision="bf16", channels_last=True,
                                            data=str(tmp_path / "a")))
    same = train.Config(**dict(saved, device="cpu"))
    notes = train.resume_notes(saved, same)
    assert len(notes) == 1 and "the run's bf16 autocast continues on the CPU (--precision fp32" in notes[0]
    changed = train.Config(**dict(saved, precision="fp32", channels_last=False, data=str(tmp_path / "b")))
    notes = "\n".join(train.resume_notes(saved, changed))
    assert "--precision fp32, the run trained in bf16: the steps from here round differently" in notes
    assert "--no-channels-last, unlike the run" in notes and f"reading {tmp_path / 'b'} (the run read " in notes
    assert train.resume_notes(saved, train.Config(**saved)) == []


def test_resume_passes_over_a_damaged_newest_checkpoint(phantom_npy, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "3", "--ckpt-every", "1",
                       *TINY]) == 0
    newest = run / "checkpoints" / "ckpt-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a copy that stopped
    assert train.main(["--resume", str(run), "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "ckpt-00000003.pt does not load" in out and "ckpt-00000002.pt" in out
    assert [r["step"] for r in _rows(run)][-2:] == ["3", "4"]


def test_non_finite_loss_stops_naming_step_and_term(phantom_npy, tmp_path, monkeypatch, capsys):
    class Poisoned(train.MLVICXLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            loss, terms = super().forward(*args, **kwargs)
            Poisoned.calls += 1
            if Poisoned.calls == 3:
                terms["multi/cov"] = terms["multi/cov"] * float("nan")
                loss = loss * float("nan")
            return loss, terms

    monkeypatch.setattr(train, "MLVICXLoss", Poisoned)
    run = tmp_path / "run"
    code = train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "5", "--ckpt-every", "1", *TINY])
    out = capsys.readouterr().out
    assert code == 1
    assert "non-finite loss at step 3 (loss = nan, multi/cov = nan)" in out
    assert "last good checkpoint:" in out and "ckpt-00000002.pt" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "ckpt-00000002.pt"
    assert not (run / "final.pt").exists()

    # losses read five steps at a time: the two finite steps before the bad one are still logged
    Poisoned.calls = 0
    run = tmp_path / "run5"
    code = train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "5", *TINY, "--log-every", "5"])
    assert code == 1 and "non-finite loss at step 3" in capsys.readouterr().out
    assert [r["step"] for r in _rows(run)] == ["1", "2"]


def test_non_finite_weights_after_a_finite_loss_are_never_saved(phantom_npy, tmp_path, monkeypatch, capsys):
    """One inf gradient element at step 2 (the loss of step 2 is finite): LARS's update makes the
    weights NaN. The run stops at that step's checkpoint instead of saving it, and the checkpoint
    it names as the last good one holds finite weights (so it can be resumed)."""
    class Overflow(train.LARS):
        calls = 0

        def step(self, closure=None):
            Overflow.calls += 1
            if Overflow.calls == 2:
                p = next(q for q in self.param_groups[0]["params"] if q.ndim > 1 and q.grad is not None)
                p.grad[(0,) * p.ndim] = float("inf")
            return super().step(closure)

    monkeypatch.setattr(train, "LARS", Overflow)
    run = tmp_path / "run"
    code = train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "4", "--ckpt-every", "1", *TINY])
    out = capsys.readouterr().out
    assert code == 1 and "non-finite parameters or momenta after the update of step 2" in out, out
    assert "last good checkpoint:" in out and "ckpt-00000001.pt" in out
    assert [p.name for p in (run / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000001.pt"]
    state = load(run / "checkpoints" / "ckpt-00000001.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "final.pt").exists()


def test_log_is_on_disk_at_every_checkpoint_and_a_resume_never_logs_a_step_twice(phantom_npy, tmp_path, monkeypatch):
    """log.csv holds every step a checkpoint holds when that checkpoint is written (a kill -9 after
    it loses no rows); resuming from an older checkpoint drops the rows past it, so each step is
    logged once; the epoch row averages the epoch's steps from before and after the resume."""
    seen = []
    save = train.CheckpointManager.save

    def save_and_look(self, step, state):
        seen.append((step, [int(r["step"]) for r in _rows(self.folder.parent)]))
        return save(self, step, state)

    monkeypatch.setattr(train.CheckpointManager, "save", save_and_look)
    run = tmp_path / "run"
    args = ["--data", str(phantom_npy), *TINY, "--ckpt-every", "2"]
    assert train.main([*args, "--out", str(run), "--max-steps", "3"]) == 0
    assert seen == [(2, [1, 2]), (3, [1, 2, 3])]
    assert train.main(["--resume", str(run / "checkpoints" / "ckpt-00000002.pt"), "--max-steps", "0"]) == 0
    rows = _rows(run)
    steps_per_epoch = load(run / "final.pt")["step"]  # TINY: one epoch
    assert [int(r["step"]) for r in rows] == list(range(1, steps_per_epoch + 1))
    with open(run / "epochs.csv") as f:
        (epoch,) = list(csv.DictReader(f))
    assert int(epoch["steps"]) == steps_per_epoch
    assert float(epoch["mean_loss"]) == pytest.approx(sum(float(r["loss"]) for r in rows) / steps_per_epoch, rel=1e-12)
    # an uninterrupted run logs the same losses
    assert train.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert [r["loss"] for r in _rows(tmp_path / "whole")] == [r["loss"] for r in rows]


def test_resume_from_another_directory_and_with_the_dataset_moved(phantom_npy, tmp_path, monkeypatch, capsys):
    """config.json names --data as an absolute path, so --resume works from any working directory;
    --data may be given again for a moved copy of the dataset, not for another dataset."""
    import shutil

    monkeypatch.chdir(phantom_npy.parent)
    run = tmp_path / "run"
    assert train.main(["--data", phantom_npy.name, "--out", str(run), "--max-steps", "2", *TINY]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == str(phantom_npy)
    monkeypatch.chdir(tmp_path)
    assert train.main(["--resume", str(run), "--max-steps", "3"]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(phantom_npy, moved)
    assert train.main(["--resume", str(run), "--max-steps", "4", "--data", str(moved)]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)
    assert [r["step"] for r in _rows(run)] == ["1", "2", "3", "4"]
    other = ensure_phantom(tmp_path / "other", n=160, seed=4, size=48, fmt="npy") / "nih"
    with pytest.raises(SystemExit, match=r"steps per epoch, the run took .*not the dataset the run was started on"):
        train.main(["--resume", str(run), "--max-steps", "5", "--data", str(other)])


def test_resume_of_a_weights_only_file_is_a_clear_error(phantom_npy, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "1", *TINY]) == 0
    with pytest.raises(SystemExit, match=r"not a training checkpoint \(it has no optimizer, rng; final.pt holds "
                                         r"the weights only\)"):
        train.main(["--resume", str(run / "final.pt")])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"--resume .*notes.pt: could not read it as a checkpoint \(UnpicklingError"):
        train.main(["--resume", str(tmp_path / "notes.pt")])
    torch.save({"step": 3, "config": {}, "rng": {}, "optimizer": {}, "model": {"x": Fraction(1, 3)}}, tmp_path / "odd.pt")
    with pytest.raises(SystemExit, match=r"--resume .*odd.pt: .*holds Python objects .*fractions.Fraction"):
        train.main(["--resume", str(tmp_path / "odd.pt")])


def test_values_no_run_can_use_stop_before_the_run_folder(tmp_path, phantom_npy):
    for flags, match in ((["--keep", "0"], r"--keep 0 \(must be >= 1\)"),
                         (["--max-steps", "-1"], r"--max-steps -1 \(must be >= 0\)"),
                         (["--lambda", "0", "--global-weight", "0"], "no loss left to train on"),
                         (["--lambda", "-1"], r"--lambda -1.0 \(must be >= 0\)"),
                         (["--batch-size", "1"], r"--batch-size 1 \(must be >= 2: the variance term and batch norm"),
                         (["--lr", "nan"], r"--lr nan \(must be a finite number\)"),
                         (["--warmup-epochs", "inf", "--lambda", "nan"],
                          r"--warmup-epochs inf \(must be a finite number\); --lambda nan \(must be a finite")):
        out = tmp_path / "never"
        with pytest.raises(SystemExit, match=match):
            train.main(["--data", str(phantom_npy), "--out", str(out), *TINY, *flags])
        assert not out.exists(), flags


def test_the_batch_must_split_into_two_or_more_per_process(monkeypatch):
    """Checked by every process alike (before the process group is made), so all stop together."""
    cfg = train.resolve(train.Config(data="x", batch_size=8, device="cpu"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"--batch-size 8 must be divisible by the 3 processes"):
        train.setup_distributed(cfg)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit, match=r"--batch-size 8 over 8 processes leaves 1 per process; batch norm needs"):
        train.setup_distributed(cfg)


def test_builtin_run_lr_and_phantom_set(monkeypatch, tmp_path):
    """The built-in run's peak lr 1.0 gives way to an explicit --base-lr; its phantom set is the same
    one whatever --seed the run has (the seed varies the run, not its data)."""
    assert train.resolve(train.Config(device="cpu")).lr == 1.0
    assert train.resolve(train.Config(device="cpu", base_lr=0.4, batch_size=64)).lr == pytest.approx(0.1)
    assert train.resolve(train.Config(device="cpu", data=str(tmp_path))).lr == pytest.approx(0.2 * 64 / 256)
    official = train.resolve(train.Config(device="cpu", data=str(tmp_path), preset="official"))
    assert (official.batch_size, official.lr) == (64, pytest.approx(0.05))  # the authors' config: batch_size 64
    import mlvicx_fast.data.prepare as prep

    built = []
    monkeypatch.setattr(prep, "ensure_phantom",
                        lambda root, n, seed, size: built.append((Path(root).name, seed, size)))
    monkeypatch.setenv("MLVICX_CACHE", str(tmp_path))
    for seed in (0, 5):
        train.resolve_data(train.resolve(train.Config(device="cpu", seed=seed)))
    # stored near the CPU run's 128 px views (the crop-resize does not antialias); 224 px views keep 256
    assert built == [("phantom-n2000-seed0-160px", 0, 160)] * 2
    train.resolve_data(train.resolve(train.Config(device="cpu", image_size=224)))
    assert built[-1] == ("phantom-n2000-seed0", 0, 256)


def test_builtin_run_resumes_on_the_phantom_set_it_started_on(tmp_path):
    """The stored size is saved with the run; a built-in run from before it was (always the 256 px
    set) resumes on that set, not on the one its view size would pick now."""
    cfg = train.resolve(train.Config(device="cpu"))
    assert cfg.phantom_size == 160
    saved = dataclasses.asdict(cfg)
    assert train.resume_config({}, tmp_path / "checkpoints" / "ckpt-00000010.pt", saved).phantom_size == 160
    del saved["phantom_size"]
    assert train.resume_config({}, tmp_path / "checkpoints" / "ckpt-00000010.pt", saved).phantom_size == 256
    with pytest.raises(SystemExit, match=r"--phantom-size 20 \(must be 0 or >= 32\)"):
        train.resolve(train.Config(device="cpu", phantom_size=20))


def test_phantom_size_never_asks_for_aliasing_crops():
    for view in range(16, 400):
        size = train.phantom_size(view)
        assert size == 256 if 1.5 * view >= 256 else view <= size <= 1.5 * view, view


def test_quiet_draws_no_bar_and_keeps_the_messages(phantom_npy, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    assert "2/" in capsys.readouterr().err  # the bar, drawn
    assert train.main(["--data", str(phantom_npy), "--out", str(tmp_path / "q"), "--max-steps", "2", "--quiet",
                       *TINY]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "[train] done: 2 steps" in out.out and len(_rows(tmp_path / "q")) == 2


def test_messages_before_the_process_group_are_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert not train.is_main()
    train.say("from rank 1")
    monkeypatch.setenv("RANK", "0")
    train.say("from rank 0")
    assert capsys.readouterr().out == "[train] from rank 0\n"


def test_resume_under_another_process_count_says_what_changes(phantom_npy, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    ckpt = run / "checkpoints" / "ckpt-00000002.pt"
    state = load(ckpt)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as saved by a two-process run
    torch.save(state, ckpt)
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert "1 process(es) now, 2 before" in capsys.readouterr().out


def test_cuda_rng_states_restored_for_the_devices_this_process_has(monkeypatch):
    """A checkpoint of rank 0 under 8 GPUs holds 8 CUDA generator states; a 1-GPU resume sets one."""
    from mlvicx_fast import checkpoint

    state = checkpoint.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) + k for k in range(8)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("all", len(states))))
    checkpoint.set_rng_state(state)
    assert calls == [(0, 0)]


def _env(tmp_path, **extra):
    """A subprocess's environment: this checkout importable, output unbuffered, and temporary files
    (torchrun's torchelastic_* log folders and error files) under the test's own folder, not /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TMPDIR=str(tmp), **extra)


def _start_and_wait(cmd, run, **popen):
    """Start a training command; return once its log has two rows."""
    env = _env(run.parent)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (
            (run / "log.csv").is_file() and len(_rows(run)) >= 2):
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_signal_saves_and_exits(phantom_npy, tmp_path, sig, code):
    """Ctrl-C, and a scheduler's SIGTERM (preemption): finish the step, save, exit 128 + signal."""
    run = tmp_path / "run"
    proc = _start_and_wait([sys.executable, "-m", "mlvicx_fast.train", "--data", str(phantom_npy), "--out", str(run),
                            *TINY, "--epochs", "50"], run)
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, out
    assert f"{sig.name}: finishing this step" in out and "interrupted at step" in out and f"--resume {run}" in out
    assert "Traceback" not in out
    saved = sorted((run / "checkpoints").iterdir())
    assert saved and load(saved[-1])["reason"] == "interrupt"


# ------------------------------------------------------------------------------ DDP on gloo
WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(cfg, world, x1, x2):
    """One training step in float64: summation order then cannot flip a max or a ReLU between the
    two runs (in float32 it sometimes does, and the max routes a whole gradient elsewhere)."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        parts = train.build_training(cfg, torch.device("cpu"), world)
    finally:
        torch.set_default_dtype(torch.float32)
    parts.lr.fill_(0.5)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    parts.step(x1, x2)
    return before, {k: v.detach().clone() for k, v in parts.model.state_dict().items()}


def _ddp_worker(rank, port, cfg, x1, x2, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        n = x1.shape[0] // WORLD
        sl = slice(rank * n, (rank + 1) * n)
        before, after = _one_step(cfg, WORLD, x1[sl], x2[sl])
        if rank == 0:
            torch.save({"before": before, "after": after}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_take_the_single_process_step(tmp_path):
    cfg = train.resolve(train.Config(data="x", preset="paper", dim=64, image_size=32, batch_size=8, compile=False,
                                     cuda_graph=False, channels_last=False, precision="fp32", device="cpu"))
    x1, x2 = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randn(8, 3, 32, 32, dtype=torch.float64)
    mp.spawn(_ddp_worker, args=(_free_port(), cfg, x1, x2, str(tmp_path / "ddp.pt")), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    before, after = _one_step(cfg, 1, x1, x2)
    for k, v in before.items():
        assert torch.equal(got["before"][k], v), k  # same initialisation
    updates = {k: after[k] - before[k] for k in after if after[k].is_floating_point()}
    overall = max(u.abs().max().item() for u in updates.values())  # biases feeding a BN get ~0 updates
    for k in after:
        if k in updates:
            upd, upd_ddp = updates[k], got["after"][k] - before[k]
            bound = 1e-6 * upd.abs().max().item() + 1e-9 * overall
            assert (upd - upd_ddp).abs().max().item() <= bound, k
        else:
            assert torch.equal(after[k], got["after"][k]), k


def _ablation_worker(rank, port, cfgs, x1, x2):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for cfg in cfgs:
            parts = train.build_training(cfg, torch.device("cpu"), WORLD)
            parts.lr.fill_(0.1)
            off = ["global_expander."] if cfg.global_weight == 0 else ["aggregation.", "multilevel_expander."]
            before = {k: v.clone() for k, v in parts.model.state_dict().items() if k.startswith(tuple(off))}
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for _ in range(2):  # DDP's check for parameters without gradients fires on the second step
                    assert torch.isfinite(parts.step(x1, x2)).all()
            # the 1x1 projections' first gradients (channels_last) used to be copied into DDP's buckets
            strides = [str(w.message) for w in seen if "bucket view strides" in str(w.message)]
            assert not strides, strides[0]
            # the head left off is not run: no update (DDP had given it zero gradients, and LARS
            # weight decay), and no BN statistics
            after = parts.model.state_dict()
            changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
            assert before and not changed, changed
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_run_the_ablations(tmp_path):
    """--lambda 0 and --global-weight 0 leave one head off; under DDP that must not stop the second
    step ("Expected to have finished reduction in the prior iteration"), and the head must stay as
    it is, as in one process."""
    base = dict(data="x", preset="paper", dim=64, image_size=32, batch_size=8, compile=False, cuda_graph=False,
                channels_last=True, precision="fp32", device="cpu")
    cfgs = [train.resolve(train.Config(**base, lambda_=0.0)), train.resolve(train.Config(**base, global_weight=0.0))]
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    mp.spawn(_ablation_worker, args=(_free_port(), cfgs, x1, x2), nprocs=WORLD, join=True)


def test_a_torchrun_restart_of_a_resumed_run_whose_checkpoint_was_pruned(phantom_npy, tmp_path, monkeypatch, capsys):
    """torchrun --max-restarts ... --resume RUN/checkpoints/ckpt-2.pt: the first attempt continues
    from it and --keep prunes it; a restarted attempt then stopped ("no checkpoint there that
    loads") although the folder held newer ones. It continues from the newest."""
    run, args = tmp_path / "run", ["--data", str(phantom_npy), *TINY, "--ckpt-every", "2", "--keep", "2"]
    assert train.main([*args, "--out", str(tmp_path / "whole"), "--max-steps", "6"]) == 0
    assert train.main([*args, "--out", str(run), "--max-steps", "2"]) == 0
    first = run / "checkpoints" / "ckpt-00000002.pt"
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert train.main(["--resume", str(first), "--max-steps", "5", "--keep", "2"]) == 0  # then a process "failed"
    assert not first.exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train.main(["--resume", str(first), "--max-steps", "6", "--keep", "2"]) == 0
    assert "torchrun restart 1: continuing from " + str(run / "checkpoints" / "ckpt-00000005.pt") in capsys.readouterr().out
    assert [(r["step"], r["loss"]) for r in _rows(run)] == [(r["step"], r["loss"]) for r in _rows(tmp_path / "whole")]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first attempt still names what is missing
    with pytest.raises(SystemExit, match="no checkpoint there that loads"):
        train.main(["--resume", str(first), "--max-steps", "6"])


@pytest.mark.distributed
def test_torchrun_two_cpu_processes_end_to_end(phantom_npy, tmp_path):
    """The README's torchrun command on two CPU processes: one run folder, written by rank 0 alone."""
    run = tmp_path / "run"
    env = _env(tmp_path)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_free_port()), "-m", "mlvicx_fast.train", "--data", str(phantom_npy), "--out", str(run),
                        "--max-steps", "3", "--ckpt-every", "2", *TINY],
                       capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert out.count("[train] done: 3 steps") == 1, out[-3000:]  # every process used to print it (and plot)
    assert [row["step"] for row in _rows(run)] == ["1", "2", "3"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert load(run / "final.pt")["step"] == 3 and (run / "loss.png").is_file()


def _has_rank(parent: int, rank: int) -> bool:
    try:
        _rank_pid(parent, rank)
        return True
    except AssertionError:
        return False


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank among parent's children."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-rank-1"])
def test_torchrun_stop_is_taken_by_every_process_after_the_same_step(phantom_npy, tmp_path, how):
    """Ctrl-C in a terminal reaches torchrun and its processes at once (one process group), and
    torchrun then sends its processes SIGTERM; a scheduler may signal one process only. Either
    way the processes agree on one step and rank 0 saves it (a signal to rank 1 alone used to stop
    rank 1 and leave rank 0 waiting in the next all-reduce, with nothing saved)."""
    run = tmp_path / "run"
    proc = _start_and_wait([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(_free_port()), "-m", "mlvicx_fast.train", "--data", str(phantom_npy), "--out",
                            str(run), *TINY, "--epochs", "50"], run, start_new_session=True)
    try:
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert out.count("interrupted at step") == 1, out[-3000:]
    step = int(re.search(r"interrupted at step (\d+)", out).group(1))
    saved = sorted((run / "checkpoints").iterdir())
    assert saved and load(saved[-1])["reason"] == "interrupt" and load(saved[-1])["step"] == step
    assert int(_rows(run)[-1]["step"]) == step


def _signal_race_worker(rank, port, how, run, data):
    """train.main on two gloo processes, with a SIGTERM delivered inside stop_agreed's agreement."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    real_all_reduce, real_item = dist.all_reduce, torch.Tensor.item
    state = {"max_calls": 0, "armed": False}

    def all_reduce(t, op=dist.ReduceOp.SUM, **kw):
        out = real_all_reduce(t, op=op, **kw)
        if op == dist.ReduceOp.MAX:  # stop_agreed's
            state["max_calls"] += 1
            if state["max_calls"] == 2:
                if how == "rank-1-during-all-reduce" and rank == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                state["armed"] = how == "both-during-item"
        return out

    def item(self):
        value = real_item(self)
        if state["armed"]:
            state["armed"] = False
            os.kill(os.getpid(), signal.SIGTERM)  # as if it came while .item() waited for the all-reduce
        return value

    dist.all_reduce, torch.Tensor.item = all_reduce, item
    code = train.main(["--data", data, "--out", run, *TINY, "--epochs", "3", "--quiet", "--device", "cpu"])
    if code != 143:
        raise SystemExit(f"rank {rank}: exit status {code}, expected 143 (stopped by SIGTERM)")


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["both-during-item", "rank-1-during-all-reduce"])
def test_a_signal_during_the_stop_agreement_stops_every_process_after_one_step(phantom_npy, tmp_path, how):
    """A SIGTERM that lands while the processes agree whether to stop was lost (both processes went
    on to the end of the run), or stopped only the process that got it (the other then failed in its
    next all-reduce, and nothing was saved)."""
    run = tmp_path / "run"
    mp.spawn(_signal_race_worker, args=(_free_port(), how, str(run), str(phantom_npy)), nprocs=WORLD, join=True)
    saved = sorted((run / "checkpoints").iterdir())
    assert saved and load(saved[-1])["reason"] == "interrupt", saved
    steps = [int(r["step"]) for r in _rows(run)]
    assert steps == list(range(1, load(saved[-1])["step"] + 1)), steps
    assert not (run / "final.pt").exists()  # stopped, not run to its end


@pytest.mark.distributed
def test_torchrun_restarts_a_killed_process_and_the_run_continues(phantom_npy, tmp_path):
    """A process killed outright (no checkpoint on the way out): torchrun --max-restarts starts both
    again and they continue from the newest checkpoint; no step is logged twice."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.2", "--master-port", str(_free_port()), "-m", "mlvicx_fast.train",
           "--data", str(phantom_npy), "--out", str(run), *TINY, "--epochs", "50", "--max-steps", "16",
           "--ckpt-every", "2"]
    proc = _start_and_wait(cmd, run, start_new_session=True)
    workers = []  # torchrun starts each in a session of its own: killed one by one if the test fails
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not list(run.glob("checkpoints/ckpt-*.pt")):
            time.sleep(0.1)
        workers = [_rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)]
        os.kill(workers[1], signal.SIGKILL)
        time.sleep(1)
        workers += [_rank_pid(proc.pid, r) for r in (0, 1) if _has_rank(proc.pid, r)]  # the restarted ones
        out, _ = proc.communicate(timeout=300)
    finally:
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"torchrun restart 1: continuing from \S*ckpt-\d+\.pt", out), out[-3000:]
    assert [int(r["step"]) for r in _rows(run)] == list(range(1, 17))
    assert load(run / "final.pt")["step"] == 16


@pytest.mark.distributed
def test_two_torchrun_nodes_restart_a_killed_process_and_continue_exactly(phantom_npy, tmp_path):
    """The README's cluster command on two "nodes" of this machine (one torchrun agent each, one
    process per node, torchrun's c10d rendezvous): a process killed on the second node makes both
    agents start their processes again, which continue from the newest checkpoint and end on the
    losses of an uninterrupted run (the same two-rank run on one node)."""
    def cmd(run, *torchrun):
        return [sys.executable, "-m", "torch.distributed.run", *torchrun, "--max-restarts", "1", "--monitor-interval",
                "0.2", "-m", "mlvicx_fast.train", "--data", str(phantom_npy), "--out", str(run), *TINY, "--epochs",
                "50", "--max-steps", "12", "--ckpt-every", "2"]

    # one thread each in both runs: torchrun sets OMP_NUM_THREADS=1 only for several processes per
    # node, and another thread count sums the convolutions in another order (losses 1e-6 apart)
    env = _env(tmp_path, OMP_NUM_THREADS="1")
    whole = tmp_path / "whole"
    r = subprocess.run(cmd(whole, "--nproc-per-node", "2", "--master-port", str(_free_port())), capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run, port = tmp_path / "run", _free_port()
    nodes = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "test"]
    agents = [subprocess.Popen(cmd(run, *nodes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True) for _ in range(2)]
    workers = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and all(a.poll() is None for a in agents) and not list(
                run.glob("checkpoints/ckpt-*.pt")):
            time.sleep(0.1)
        # which agent holds global rank 1 is the rendezvous' choice
        victim = next(_rank_pid(a.pid, 1) for a in agents if _has_rank(a.pid, 1))
        workers.append(victim)
        os.kill(victim, signal.SIGKILL)
        time.sleep(1)
        workers += [_rank_pid(a.pid, r) for a in agents for r in (0, 1) if _has_rank(a.pid, r)]
        outs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for pid in [a.pid for a in agents] + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = "\n".join(outs)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(f"--- agent {i}:\n" + o[-2500:] for i, o in enumerate(outs))
    assert out.count("torchrun restart 1: continuing from") == 1, out[-3000:]  # said by rank 0 alone
    assert [r["step"] for r in _rows(run)] == [r["step"] for r in _rows(whole)] == [str(i) for i in range(1, 13)]
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(whole)]


@pytest.mark.distributed
def test_torchrun_stops_every_process_when_rank_0_cannot_take_the_folder(phantom_npy, tmp_path):
    """Rank 0 alone claims the run folder; when it cannot (another run is writing it), every process
    stops with its reason instead of waiting for rank 0's answer."""
    run = tmp_path / "run"
    run.mkdir()
    lock = train.lock_run_folder(run)
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(_free_port()), "-m", "mlvicx_fast.train", "--data", str(phantom_npy), "--out", str(run),
                            "--max-steps", "1", *TINY], capture_output=True, text=True, timeout=300,
                           env=_env(tmp_path))
    finally:
        lock.close()
    out = r.stdout + r.stderr
    assert r.returncode != 0 and out.count("is being written by another run") >= 2, out[-3000:]
    assert not (run / "config.json").exists()


@pytest.mark.parametrize("flag, absent", [("--lambda", "multi"), ("--global-weight", "global")])
def test_ablation_flags_drop_one_loss(phantom_npy, tmp_path, flag, absent):
    run = tmp_path / "run"
    assert train.main(["--data", str(phantom_npy), "--out", str(run), "--max-steps", "2", flag, "0", *TINY]) == 0
    kept = "global" if absent == "multi" else "multi"
    for row in _rows(run):
        assert all(row[f"{absent}/{t}"] == "" for t in ("inv", "var", "cov"))  # not computed, not logged
        assert all(float(row[f"{kept}/{t}"]) >= 0 for t in ("inv", "var", "cov"))
        terms = {t: float(row[f"{kept}/{t}"]) for t in ("inv", "var", "cov")}
        # the loss is the kept VICReg loss alone (weight 1): 25 inv + 25 var + 1 cov
        assert float(row["loss"]) == pytest.approx(25 * terms["inv"] + 25 * terms["var"] + terms["cov"], rel=1e-5)


# ------------------------------------------------------------------------------ --compile
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_compiled_step_traces_the_network_once(monkeypatch, backend):
    """--compile: three training steps with fresh views trace the two-view network once. A
    recompile on the second step (a cache the trace read, say) doubles the first steps' time,
    and inside a CUDA graph's warm-up it is a second full compilation before the capture."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # dynamo's traces, without inductor's code generation
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend=counter, **kw))
    cfg = train.resolve(train.Config(data="x", preset="paper", dim=64, image_size=32, batch_size=4, compile=True,
                                     cuda_graph=False, channels_last=True, precision="fp32", device="cpu",
                                     backend=backend))
    parts = train.build_training(cfg, torch.device("cpu"))
    parts.lr.fill_(0.1)
    for _ in range(3):
        x1, x2 = (torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2))
        values = parts.step(x1, x2)
        assert torch.isfinite(values).all(), values
    assert counter.frame_count == 1, f"the network was traced {counter.frame_count} times in three steps"


def test_resumed_logs_are_on_disk_before_the_first_new_row(tmp_path):
    """A resume keeps log.csv and epochs.csv up to its step: those rows are on disk at once (the
    files replaced atomically), not buffered until the next checkpoint, so a kill -9 before it
    loses no history."""
    from mlvicx_fast.train import RunLog

    first = RunLog(tmp_path, None, steps_per_epoch=4)
    for step in range(1, 13):
        first.step({"step": step, "epoch": (step - 1) // 4, "loss": 1.0 / step})
        if step % 4 == 0:
            first.epoch({"epoch": step // 4 - 1, "steps": 4, "mean_loss": 0.5, "seconds": 1.0})
    first.close()
    resumed = RunLog(tmp_path, 9, steps_per_epoch=4)  # no flush, no close: as if killed right here
    try:
        with open(tmp_path / "log.csv", newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 10))
        with open(tmp_path / "epochs.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
        resumed.step({"step": 10, "epoch": 2, "loss": 0.1})
        resumed.flush()
        with open(tmp_path / "log.csv", newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 11))
        assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.tmp"))  # no temporary left
    finally:
        resumed.close()


@pytest.mark.parametrize("tail", ["1", "5,1,0.2", "\0" * 37, "5,1\0\0", "11,2,0.0"],
                         ids=["step-cut", "row-cut", "nul", "row-nul", "past-the-step"])
def test_a_resume_drops_the_line_a_kill_cut_short(tmp_path, tail):
    """After a kill -9 or a power cut log.csv ends wherever its write buffer did: a row cut to "1"
    (or any row cut short whose step is not past the resumed one) was kept as that step a second
    time, with empty values (the loss plot then failed); NUL bytes made a step of their own."""
    from mlvicx_fast.train import RunLog

    first = RunLog(tmp_path, None, steps_per_epoch=4)
    for step in range(1, 11):
        first.step({"step": step, "epoch": (step - 1) // 4, "loss": 1.0 / step})
    first.close()
    with open(tmp_path / "log.csv", "a", newline="") as f:
        f.write(tail)
    resumed = RunLog(tmp_path, 10, steps_per_epoch=4)
    resumed.step({"step": 11, "epoch": 2, "loss": 0.1})
    resumed.close()
    with open(tmp_path / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 12))


def test_fp32_heads_default_and_resume():
    """--fp32-heads: on by default under bf16/fp16 autocast on a CPU, off in fp32 and when given off;
    a run saved before the option ran its expanders in the autocast dtype, and resuming keeps that
    unless --fp32-heads is given again (then the resume says so)."""
    assert train.resolve(train.Config(device="cpu", precision="bf16")).fp32_heads is True
    assert train.resolve(train.Config(device="cpu", precision="fp16")).fp32_heads is True
    assert train.resolve(train.Config(device="cpu")).fp32_heads is False  # auto: fp32 on a CPU
    assert train.resolve(train.Config(device="cpu", precision="bf16", fp32_heads=False)).fp32_heads is False
    assert train.given_options(["--no-fp32-heads"]) == {"fp32_heads": False}
    old = dataclasses.asdict(train.resolve(train.Config(device="cpu", precision="bf16")))
    del old["fp32_heads"]
    assert train.saved_config(old)["fp32_heads"] is False
    cfg = train.resolve(train.Config(**train.saved_config(old)))
    assert cfg.fp32_heads is False and train.resume_notes(old, cfg) == []
    given = train.Config(**dict(train.saved_config(old), fp32_heads=True))
    assert train.resume_notes(old, given) == ["--fp32-heads, unlike the run: the same steps, rounded slightly differently"]
    assert "fp32_heads" in train.RESUME_OVERRIDES
