"""python -m mlvicx_fast.evaluate: encoder loading and its errors, label subsets, Grad-CAM, and tiny
end-to-end cls / seg / compare / heatmap runs on a phantom set prepared once per session."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ttest_rel

from mlvicx_fast import evaluate as ev
from mlvicx_fast.data.phantom import write_phantom
from mlvicx_fast.data.prepare import prepare
from mlvicx_fast.models.mlvicx import MLVICX
from mlvicx_fast.models.resnet import ResNet18

SIZE = 64
ARGS = {"preset": "paper", "in_chans": 3, "dim": 32, "final_bn": False}


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """A tiny phantom set (NIH layout) prepared as npy: nih/ (14 classes) and siim/ (masks)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root / "raw", n=96, seed=0, size=SIZE, workers=1)
    for name in ("nih", "siim"):
        prepare(name, root / "raw", root / name, size=SIZE, fmt="npy", workers=1, progress=False)
    return root


def pretrain_checkpoint(path, model=None, **extra):
    model = model or MLVICX(**ARGS, backend="torch")
    state = {"kind": "mlvicx-pretrain", "model": model.state_dict(), "model_args": dict(ARGS), "config": {},
             "step": 3, "epoch": 1, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return model


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    pretrain_checkpoint(run / "checkpoints" / "ckpt-00000003.pt")
    torch.manual_seed(1)
    pretrain_checkpoint(run / "final.pt")
    return run


# ------------------------------------------------------------------------------------------------
# load_pretrained_encoder
# ------------------------------------------------------------------------------------------------
def test_encoder_from_pretraining_checkpoint_file_and_run_folder(tmp_path):
    model = pretrain_checkpoint(tmp_path / "a.pt").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    plain = ev.load_pretrained_encoder(tmp_path / "a.pt").eval()
    ctx = ev.load_pretrained_encoder(str(tmp_path / "a.pt"), with_context=True).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), model.encoder(False)(x), atol=1e-6)
        assert torch.allclose(ctx(x), model.encoder(True)(x), atol=1e-6)
        assert len(ctx.forward_taps(x)) == 5
    # a run folder: final.pt first, else the newest step checkpoint
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    pretrain_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt")
    newest = pretrain_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000010.pt")
    assert ev.resolve_checkpoint(tmp_path / "run").name == "ckpt-00000010.pt"
    enc = ev.load_pretrained_encoder(tmp_path / "run")
    assert torch.equal(enc.conv1.weight, newest.backbone.conv1.weight)
    # weights saved from a DDP-wrapped, compiled network
    model2 = MLVICX(**ARGS, backend="torch")
    torch.save({"kind": "mlvicx-pretrain", "model": {f"module._orig_mod.{k}": v for k, v in model2.state_dict().items()},
                "model_args": dict(ARGS)}, tmp_path / "ddp.pt")
    assert torch.equal(ev.load_pretrained_encoder(tmp_path / "ddp.pt").conv1.weight, model2.backbone.conv1.weight)
    final = pretrain_checkpoint(tmp_path / "run" / "final.pt")
    assert torch.equal(ev.load_pretrained_encoder(tmp_path / "run").conv1.weight, final.backbone.conv1.weight)
    # a one-channel stem from a three-channel checkpoint: the same features on a grey image, each
    # stem fed as the package feeds it (to_input), up to the stem's zero-padded border
    images = np.random.default_rng().integers(0, 256, (2, 96, 96), dtype=np.uint8)
    one = ev.load_pretrained_encoder(tmp_path / "a.pt", in_chans=1).eval()
    with torch.no_grad():
        got, want = one(ev.to_input(images, 1, "cpu")), plain(ev.to_input(images, 3, "cpu"))
    assert (got - want).norm() <= 2e-2 * want.norm()


def test_encoder_from_torchvision_named_resnet18(tmp_path):
    ref = ResNet18(num_classes=1000).eval()
    torch.save(ref.state_dict(), tmp_path / "imagenet.pth")
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "dp.pth")
    # saved before torch 0.4.1 (torchvision's first ImageNet weights): no num_batches_tracked
    torch.save({k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "old.pth")
    x = torch.randn(2, 3, SIZE, SIZE)
    for name in ("imagenet.pth", "dp.pth", "old.pth"):
        enc = ev.load_pretrained_encoder(tmp_path / name).eval()
        with torch.no_grad():
            assert torch.allclose(enc(x), ref.forward_features(x), atol=1e-6)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nowhere\.pt' does not exist"):
        ev.load_pretrained_encoder(tmp_path / "nowhere.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="neither final.pt nor checkpoints/ckpt"):
        ev.load_pretrained_encoder(tmp_path / "empty_run")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ev.EvaluationError, match="could not read .*notes.txt.* as a torch checkpoint"):
        ev.load_pretrained_encoder(tmp_path / "notes.txt")
    torch.save({"kind": "mlvicx-classifier", "state_dict": {}}, tmp_path / "clf.pt")
    with pytest.raises(ev.EvaluationError, match="kind 'mlvicx-classifier'; expected 'mlvicx-pretrain'"):
        ev.load_pretrained_encoder(tmp_path / "clf.pt")
    # model_args that do not describe the weights (another width): another architecture
    pretrain_checkpoint(tmp_path / "wide.pt", model=MLVICX(preset="paper", dim=48, backend="torch"))
    with pytest.raises(ev.EvaluationError, match=r"does not fit MLVICX\(.*dim=32.*shape mismatches"):
        ev.load_pretrained_encoder(tmp_path / "wide.pt")
    # a state_dict of another network
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ev.EvaluationError, match=r"does not fit ResNet18 .*missing keys .*unexpected keys"):
        ev.load_pretrained_encoder(tmp_path / "other.pth")
    bad = ResNet18().state_dict()
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ev.EvaluationError,
                       match=r"1 shape mismatches .*layer1.0.conv1.weight: checkpoint \(64, 64, 1, 1\)"):
        ev.load_pretrained_encoder(tmp_path / "bad.pth")
    torch.save(MLVICX(**ARGS, backend="torch").state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ev.EvaluationError, match="bare MLVICX state_dict"):
        ev.load_pretrained_encoder(tmp_path / "bare.pth")
    torch.save(ResNet18().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ev.EvaluationError, match="no context blocks"):
        ev.load_pretrained_encoder(tmp_path / "plain.pth", with_context=True)


def test_cli_errors_name_the_bad_input(tmp_path, phantom, capsys):
    code = ev.main(["cls", "--data", str(phantom / "nih"), "--ckpt", str(tmp_path / "missing.pt"), "--out",
                    str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "missing.pt' does not exist" in capsys.readouterr().err
    code = ev.main(["cls", "--data", str(tmp_path / "nodata"), "--ckpt", "random", "--out", str(tmp_path / "o")])
    assert code == 2 and "data folder" in capsys.readouterr().err
    code = ev.main(["seg", "--data", str(phantom / "nih"), "--ckpt", "random", "--out", str(tmp_path / "o")])
    assert code == 2 and "evaluate seg needs prepared SIIM-ACR masks" in capsys.readouterr().err
    code = ev.main(["cls", "--data", str(phantom / "nih"), "--ckpt", "random", "--fractions", "0", "--out",
                    str(tmp_path / "o")])
    assert code == 2 and "label fraction must be in (0, 100] percent, got 0" in capsys.readouterr().err
    for command, data in (("cls", "nih"), ("seg", "siim")):
        code = ev.main([command, "--data", str(phantom / data), "--ckpt", "random", "--patience", "0", "--out",
                        str(tmp_path / "o")])
        assert code == 2 and "patience must be >= 1 epoch, got 0" in capsys.readouterr().err, command
    # an explicit 0 is an error, not the paper's default; a seed or fraction named twice too
    for flags, match in ((["--lr", "0"], "--lr > 0, got 64 and 0.0"), (["--batch", "1"], "--batch must be >= 2"),
                         (["--seeds", "0", "0"], "--seeds: 0 0 names a seed twice"),
                         (["--fractions", "10", "10%"], "names a fraction twice"),
                         (["--protocol", "frozen", "frozen"], "--protocol: frozen frozen names a protocol twice"),
                         (["--seeds", "-1"], "--seeds: a seed must be an integer >= 0, got -1"),
                         (["--fractions", "0.01"], "--fractions 0.01 keeps 1 of the"),
                         (["--ckpt", str(tmp_path / "runs" / "a=b")], "runs/a=b' does not exist")):
        code = ev.main(["cls", "--data", str(phantom / "nih"), "--ckpt", "random", "--out", str(tmp_path / "o"),
                        "--protocol", "finetune", "--fractions", "100", *flags])
        assert code == 2 and match in capsys.readouterr().err, flags
    # another evaluation's results are not replaced without --overwrite; sizes no model can take
    held = tmp_path / "held"
    held.mkdir()
    (held / "results.json").write_text('{"kind": "mlvicx-eval", "runs": []}')
    code = ev.main(["cls", "--data", str(phantom / "nih"), "--ckpt", "random", "--out", str(held)])
    assert code == 2 and "already holds results.json" in capsys.readouterr().err
    assert (held / "results.json").read_text() == '{"kind": "mlvicx-eval", "runs": []}'
    for command, size, match in (("cls", "8", "--image-size 8: must be >= 32"),
                                 ("seg", "48", "--image-size 48: must be >= 32 and a multiple of 32")):
        code = ev.main([command, "--data", str(phantom / "nih"), "--ckpt", "random", "--out", str(tmp_path / "o"),
                        "--image-size", size])
        assert code == 2 and match in capsys.readouterr().err, command
    code = ev.main(["cls", "--data", str(phantom / "nih"), "--ckpt", "MLVICX (a)=random", "--ckpt", "MLVICX_a=random",
                    "--out", str(tmp_path / "o")])
    assert code == 2 and "they name the saved models' files" in capsys.readouterr().err
    # a one-image subset cannot train BatchNorm: fine-tuning and the U-Net say so before any work
    code = ev.main(["seg", "--data", str(phantom / "siim"), "--ckpt", "random", "--out", str(tmp_path / "o"),
                    "--protocol", "frozen", "--fractions", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and "keeps 1 of the" in err and "the U-Net needs at least 2" in err


def test_data_folder_hint(phantom):
    with pytest.raises(ev.EvaluationError, match=r"has no meta.json.*did you mean one of \['nih', 'siim'\]"):
        ev.PreparedData(phantom)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("cls", "seg", "compare", "table", "heatmap", "demo"):
        assert f"    {command} " in text, command
    assert "10% linear probe" in text


@pytest.mark.parametrize("command", ["cls", "seg", "compare", "table", "heatmap"])
def test_help_says_what_it_reads_writes_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "reads" in text and "writes" in text and "example:" in text and "python -m mlvicx_fast.evaluate" in text


def _fake_results(method, scores, **config):
    """A results dict as cls writes it: one run per (fraction, seed) -> score."""
    base = {"data": "/d/nih", "prepared": {"dataset": "nih", "seed": 0, "size": 64, "splits": {"test": 9}},
            "test_split": "test", "image_size": 64, "epochs": 5, "patience": 10, "with_context": False,
            "in_chans": None, "augment_finetune": False, "settings": {"frozen": {"batch": 16, "lr": 1e-3}}}
    runs = [{"method": method, "protocol": "frozen", "fraction": f, "seed": sd, "score": v}
            for (f, sd), v in scores.items()]
    return {"kind": "mlvicx-eval", "task": "cls", "dataset": "nih", "metric": "mean_auc",
            "config": dict(base, **config), "runs": runs}


def test_compare_pairs_only_runs_on_the_same_data_and_says_what_else_differs():
    """Runs on another test set (other prepare seed) do not pair: an error. A different recipe
    (epochs) pairs with a note; seeds one side lacks or did not score are counted, not dropped silently."""
    a = _fake_results("MLVICX", {(10.0, 0): 0.7, (10.0, 1): 0.72, (10.0, 2): 0.71})
    b = _fake_results("VICReg", {(10.0, 0): 0.65, (10.0, 1): 0.69, (10.0, 2): None}, epochs=3)
    cmp = ev.compare_results(a, b, a_name="a.json", b_name="b.json")
    (row,) = cmp["settings"]
    assert row["seeds"] == [0, 1] and row["unpaired_seeds"] == 1
    assert cmp["notes"] == ["epochs: 5 in a.json, 3 in b.json"]
    text = ev.format_comparison(cmp)
    assert "Seeds left out because one side has no run or no score" in text and "frozen 10% (1)" in text
    assert "evaluated with different settings: epochs: 5 in a.json, 3 in b.json" in text
    other = _fake_results("VICReg", {(10.0, 0): 0.6}, prepared={"dataset": "nih", "seed": 1, "size": 64,
                                                               "splits": {"test": 9}})
    with pytest.raises(ev.EvaluationError, match="evaluated on different data .*do not pair"):
        ev.compare_results(a, other)
    with pytest.raises(ev.EvaluationError, match="evaluated on different data"):
        ev.merge_results([a, other])
    assert ev.merge_results([a, b], ["a", "b"])["notes"] == ["epochs: 5 in a, 3 in b"]
    # a protocol only one side ran is no difference; one both ran with other settings is
    both = {"frozen": {"batch": 16, "lr": 1e-3}, "finetune": {"batch": 8, "lr": 3e-4}}
    c = _fake_results("VICReg", {(10.0, 0): 0.6}, settings=both)
    assert ev.compare_results(a, c)["notes"] == []
    d = _fake_results("VICReg", {(10.0, 0): 0.6}, settings=dict(both, frozen={"batch": 32, "lr": 1e-3}))
    assert ev.compare_results(a, d, a_name="a", b_name="d")["notes"] == [
        "settings of frozen: {'batch': 16, 'lr': 0.001} in a, {'batch': 32, 'lr': 0.001} in d"]


def test_auc_ranks_logits_where_float32_sigmoids_tie():
    """sigmoid(20) == sigmoid(17) == 1.0 and sigmoid(-90) == sigmoid(-104) == 0.0 in float32: AUC of
    the sigmoids would count those pairs as ties (0.5 here); of the logits it is 0.75."""
    logits = np.array([[20.0], [17.0], [-90.0], [-104.0]], dtype=np.float32)
    assert torch.sigmoid(torch.from_numpy(logits)).unique().numel() == 2
    scores = ev._score_cls(np.array([[1], [0], [1], [0]]), logits, ["Pneumonia"], binary=True)
    assert scores["mean_auc"] == pytest.approx(0.75) and scores["accuracy"] == pytest.approx(0.5)


def test_label_subsets_are_seeded_and_sized():
    a = ev.label_subset(1000, 10, seed=3)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, ev.label_subset(1000, 10, seed=3))
    assert not np.array_equal(a, ev.label_subset(1000, 10, seed=4))
    assert len(ev.label_subset(50, 1, seed=0)) == 1  # never empty
    assert np.array_equal(ev.label_subset(7, 100, seed=0), np.arange(7))
    with pytest.raises(ev.EvaluationError, match="got 150"):
        ev.label_subset(10, 150, seed=0)
    # nested across fractions for one seed
    assert set(ev.label_subset(1000, 1, seed=5)) <= set(ev.label_subset(1000, 10, seed=5)) <= set(
        ev.label_subset(1000, 30, seed=5))


def test_label_subsets_are_the_loaders_label_fractions():
    loader = pytest.importorskip("mlvicx_fast.data.loader")
    for n, pct in ((1000, 1), (777, 10), (50, 30)):
        seed = int(np.random.randint(1000))
        assert np.array_equal(ev.label_subset(n, pct, seed), loader.fraction_indices(n, pct / 100, seed))


def test_grad_cam_of_a_linear_head_is_the_class_activation_map():
    model = ev.Classifier(ResNet18(), 3).eval()
    with torch.no_grad():  # class 2 sees every (non-negative) feature positively, class 1 negatively
        model.fc.weight[2].abs_()
        model.fc.weight[1] = -model.fc.weight[2]
    x = torch.randn(1, 3, SIZE, SIZE)
    cams, probs = ev.grad_cam(model, x, [0, 1, 2])
    assert cams.shape == (3, SIZE, SIZE) and probs.shape == (3,)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1 + 1e-6 and not cams.isnan().any()
    assert float(cams[1].abs().max()) == 0.0  # nothing speaks for class 1: an empty map, not NaN
    # for fc on average pooling, Grad-CAM weights are fc.weight[k] / (h w): the CAM of Zhou et al.
    with torch.no_grad():
        a = model.last_map(x)
        cam = torch.relu(torch.einsum("c,chw->hw", model.fc.weight[2], a[0]))
        cam = torch.nn.functional.interpolate(cam[None, None], size=(SIZE, SIZE), mode="bilinear",
                                              align_corners=False)[0, 0]
        cam = cam / cam.max()
    assert float(cams[2].max()) == pytest.approx(1.0)
    assert torch.allclose(cams[2], cam, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# end to end on the phantom set
# ------------------------------------------------------------------------------------------------
def test_cls_end_to_end_compare_and_heatmap(tmp_path, phantom, run_folder, capsys):
    out = tmp_path / "cls"
    code = ev.main(["cls", "--data", str(phantom / "nih"), "--ckpt", f"MLVICX={run_folder}", "--ckpt", "random",
                    "--protocol", "frozen", "finetune", "--fractions", "50", "100", "--seeds", "0", "1",
                    "--epochs", "1", "--batch", "16", "--out", str(out), "--quiet", "--save-models"])
    assert code == 0
    printed = capsys.readouterr().out
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    res = json.loads(text)
    assert res["methods"] == ["MLVICX", "Random init"] and res["metric"] == "mean_auc"
    assert len(res["runs"]) == 2 * 2 * 2 * 2
    n_train = json.loads((phantom / "nih" / "meta.json").read_text())["splits"]["train"]["n"]
    for r in res["runs"]:
        assert r["epochs_run"] == 1 and r["best_epoch"] == 0 and r["eval_split"] == "test"
        assert r["val_criterion"] == "mean_auc"
        assert r["n_train"] == (n_train if r["fraction"] == 100 else round(n_train / 2))
        # the phantom draws 6 of the 14 NIH findings: the other 8 are undefined, not 0.5 or a crash
        assert r["per_class_auc"]["Hernia"] is None and r["per_class_auc"]["Atelectasis"] is None
        defined = [v for v in r["per_class_auc"].values() if v is not None]
        assert r["defined_classes"] == len(defined) and r["mean_auc"] == pytest.approx(np.mean(defined))
    table = (out / "table.md").read_text()
    from mlvicx_fast.data import NIH_LABELS
    assert "| MLVICX (frozen) |" in table and "| Random init (finetune) |" in table and "—" in table
    assert table.splitlines()[4] == "| Method | " + " | ".join(NIH_LABELS) + " | Mean AUC |"  # paper Table I layout
    assert table in printed
    assert (out / "plot.png").stat().st_size > 1000
    # same subsets for both methods: the runs pair up
    assert len(list((out / "models").glob("*.pt"))) == 16

    # compare: the two methods in one file, against scipy on the stored scores
    code = ev.main(["compare", str(out), str(out / "results.json"), "--a-method", "MLVICX", "--b-method",
                    "Random init", "--out", str(tmp_path / "cmp.json")])
    assert code == 0
    assert "the fewest pairs here are 2, which gives the test little power" in capsys.readouterr().out
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert len(cmp["settings"]) == 4
    for s in cmp["settings"]:
        a = [r["score"] for r in ev._runs_of(res, "MLVICX", s["protocol"], s["fraction"])]
        b = [r["score"] for r in ev._runs_of(res, "Random init", s["protocol"], s["fraction"])]
        assert len(a) == len(b) == 2
        assert s["n"] == 2 and s["mean_diff"] == pytest.approx(np.mean(a) - np.mean(b))
        assert s["p"] == pytest.approx(ttest_rel(a, b).pvalue)
    # --out a folder writes compare.json there; an evaluation's results.json is not replaced by it
    cmp_args = ["compare", str(out), str(out), "--a-method", "MLVICX", "--b-method", "Random init"]
    assert ev.main([*cmp_args, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "compare.json").read_text()) == cmp
    before = (out / "results.json").read_text()
    assert ev.main([*cmp_args, "--out", str(out / "results.json")]) == 2
    assert "the comparison would replace it" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert ev.main(["compare", str(out), str(out)]) == 2
    assert "choose one with --a-method" in capsys.readouterr().err

    # table: runs evaluated by separate commands in one table
    one = dict(res, runs=[r for r in res["runs"] if r["method"] == "MLVICX"])
    two = dict(res, runs=[r for r in res["runs"] if r["method"] != "MLVICX"])
    ev.write_json(one, tmp_path / "one" / "results.json")
    ev.write_json(two, tmp_path / "two.json")
    assert ev.main(["table", str(tmp_path / "one"), str(tmp_path / "two.json"), "--out", str(tmp_path / "all")]) == 0
    assert (tmp_path / "all" / "table.md").read_text() == table
    assert ev.main(["table", str(out), str(tmp_path / "two.json")]) == 2
    assert "is in both" in capsys.readouterr().err

    # heatmaps of a fine-tuned classifier: one PNG per class and image, at the image size
    model = out / "models" / "MLVICX-finetune-100pct-seed0.pt"
    png = tmp_path / "xray.png"
    Image.fromarray((np.random.rand(100, 80) * 255).astype(np.uint8)).save(png)
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "xray.png"  # the same name in another folder: its own overlays, not the first's
    Image.fromarray((np.random.rand(60, 90) * 255).astype(np.uint8)).save(other)
    code = ev.main(["heatmap", "--model", str(model), str(png), str(other), "--data", str(phantom / "nih"), "--n", "2",
                    "--classes", "Effusion", "Mass", "--out", str(tmp_path / "hm"), "--quiet"])
    assert code == 0
    ids = [line.split(",")[1][:-4] for line in (phantom / "nih" / "test_index.csv").read_text().splitlines()[1:3]]
    for stem in ("xray", "xray-2", f"test-00000-{ids[0]}", f"test-00001-{ids[1]}"):
        for name in ("Effusion.png", "Mass.png", "input.png"):
            with Image.open(tmp_path / "hm" / stem / name) as im:
                assert im.size == (SIZE, SIZE)
    rep = json.loads((tmp_path / "hm" / "heatmaps.json").read_text())
    assert set(rep["images"]["xray"]["probabilities"]) == {"Effusion", "Mass"}
    assert rep["images"]["xray"]["probabilities"] != rep["images"]["xray-2"]["probabilities"]
    labels = np.load(phantom / "nih" / "test_labels.npy")
    from mlvicx_fast.data import NIH_LABELS
    assert rep["images"][f"test-00001-{ids[1]}"]["labels"] == {
        "Effusion": int(labels[1, NIH_LABELS.index("Effusion")]), "Mass": int(labels[1, NIH_LABELS.index("Mass")])}
    ev.run_heatmap(model, tmp_path / "hm96", images=[png], size=96, progress=False)
    with Image.open(tmp_path / "hm96" / "xray" / "Cardiomegaly.png") as im:
        assert im.size == (96, 96) and im.mode == "RGB"
    with pytest.raises(ev.EvaluationError, match=r"unknown classes \['Flu'\]"):
        ev.run_heatmap(model, tmp_path / "x", images=[png], classes=["Flu"], progress=False)
    with pytest.raises(ev.EvaluationError, match="expected an 'mlvicx-classifier'"):
        ev.run_heatmap(run_folder / "final.pt", tmp_path / "x", images=[png], progress=False)


def test_deterministic_cls_repeats_a_seed_exactly(tmp_path, phantom, run_folder, monkeypatch):
    """--deterministic switches the deterministic algorithms on (the GPU's non-deterministic
    kernels; a CPU run repeats anyway) and two runs of a seed give the same scores."""
    for name in ("MLVICX_AUTOTUNE", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    args = ["cls", "--data", str(phantom / "nih"), "--ckpt", f"MLVICX={run_folder}", "--protocol", "finetune",
            "--fractions", "50", "--seeds", "3", "--epochs", "1", "--batch", "16", "--quiet", "--deterministic"]
    try:
        assert ev.main([*args, "--out", str(tmp_path / "a")]) == 0
        assert torch.are_deterministic_algorithms_enabled() and os.environ["MLVICX_AUTOTUNE"] == "0"
        assert ev.main([*args, "--out", str(tmp_path / "b")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in "ab")
    assert [r["per_class_auc"] for r in a] == [r["per_class_auc"] for r in b]


def test_linear_probe_for_the_demo(tmp_path, phantom, run_folder):
    res = ev.linear_probe(phantom / "nih", {"MLVICX": str(run_folder), "Random init": "random"}, fraction=10,
                          seeds=(0, 1), epochs=2, progress=False, log=lambda s: None)
    assert {(r["protocol"], r["fraction"]) for r in res["runs"]} == {("frozen", 10.0)}
    means = ev.mean_scores(res)
    for name in ("MLVICX", "Random init"):
        runs = [r["score"] for r in res["runs"] if r["method"] == name]
        assert len(runs) == 2 and means[name]["frozen"][10.0] == pytest.approx(np.mean(runs))
    assert "## 10% labels (2 seeds), AUC" in ev.format_table(res)


def test_finetune_with_the_loaders_augmentation(tmp_path, phantom, run_folder):
    res = ev.run_cls(phantom / "nih", {"MLVICX": str(run_folder)}, protocols=("finetune",), fractions=(50,),
                     seeds=(0,), epochs=1, batch=16, augment=True, progress=False, log=lambda s: None)
    (run,) = res["runs"]
    assert res["config"]["augment_finetune"] and run["epochs_run"] == 1 and run["history"][0]["train_loss"] > 0
    assert run["mean_auc"] is not None


def test_a_diverging_run_is_scored_undefined_not_a_crash(tmp_path, phantom, run_folder):
    res = ev.run_cls(phantom / "nih", ["random"], fractions=(100,), seeds=(0,), epochs=2, lr=float("inf"),
                     out=tmp_path / "nan", progress=False, log=lambda s: None)
    (run,) = res["runs"]
    assert run["diverged"] and run["score"] is None and run["best_epoch"] is None and run["epochs_run"] == 2
    assert "| Random init | — |" in (tmp_path / "nan" / "table.md").read_text()


def test_seg_end_to_end(tmp_path, phantom, run_folder):
    res = ev.run_seg(phantom / "siim", {"MLVICX": str(run_folder / "final.pt"), "Random init": "random"},
                     protocols=("frozen", "finetune"), fractions=(30, 100), seeds=(0,), epochs=1, batch=8,
                     with_context=True, out=tmp_path / "seg", progress=False, log=lambda s: None)
    assert len(res["runs"]) == 2 * 2 * 2
    for r in res["runs"]:
        assert r["metric"] == "dice" and 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["dice_image"] <= 1.0
        assert r["eval_split"] == "test"  # early stopping on val, scored on the held-out split
    saved = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert saved["config"]["settings"]["finetune"] == {"batch": 8, "lr": 3e-4}
    assert "| MLVICX (frozen) |" in (tmp_path / "seg" / "table.md").read_text()
    assert (tmp_path / "seg" / "plot.png").is_file()


# numba raises a KeyError while garbage-collecting the functions FFCV compiled for a loader: harmless
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_beton_and_npy_read_the_same(tmp_path, phantom, monkeypatch):
    from mlvicx_fast.data.loader import ffcv_available

    if not ffcv_available():  # not pytest.importorskip: a bare import leaves torch on one thread
        pytest.skip("ffcv is not installed")
    prepare("nih", phantom / "raw", tmp_path / "raw", size=SIZE, fmt="raw", workers=1, progress=False)
    a, b = ev.PreparedData(tmp_path / "raw").split("val"), ev.PreparedData(phantom / "nih").split("val")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    prepare("siim", phantom / "raw", tmp_path / "siim", size=SIZE, fmt="raw", workers=1, progress=False)
    a, b = ev.PreparedData(tmp_path / "siim").split("val"), ev.PreparedData(phantom / "siim").split("val")
    assert set(a) == set(b) == {"images", "labels", "masks"}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # decoded once into memory maps beside the .beton (memory holds a batch, not the split) ...
    assert isinstance(a["images"], np.memmap) and isinstance(a["masks"], np.memmap)
    decoded = tmp_path / "siim" / ".decoded"
    assert sorted(p.name for p in decoded.iterdir()) == ["val.json", "val_images.npy", "val_labels.npy",
                                                         "val_masks.npy"]
    # ... which later reads map without FFCV while the .beton is unchanged ...
    from mlvicx_fast.data.loader import keep_torch_threads

    with keep_torch_threads():
        import ffcv.loader

    def no_loader(*a, **k):
        raise AssertionError("decoded the .beton again")

    monkeypatch.setattr(ffcv.loader, "Loader", no_loader)
    c = ev.PreparedData(tmp_path / "siim").split("val")
    assert all(np.array_equal(a[k], c[k]) for k in a)
    # ... and decode again after it changed
    os.utime(tmp_path / "siim" / "val.beton", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded the .beton again"):
        ev.PreparedData(tmp_path / "siim").split("val")
    assert not (decoded / "val.json").exists()

    class Broken:  # a decode that fails half-way leaves neither partial files nor a stamp
        def __init__(self, *a, **k):
            self.indices = np.arange(len(c["labels"]))

        def __iter__(self):
            yield [np.zeros((2, SIZE, SIZE), np.uint8), np.zeros((2, 14), np.uint8), np.arange(2),
                   np.zeros((2, SIZE, SIZE), np.uint8)]
            raise OSError("disk gone")

    monkeypatch.setattr(ffcv.loader, "Loader", Broken)
    with pytest.raises(OSError, match="disk gone"):
        ev.PreparedData(tmp_path / "siim").split("val")
    assert not list(decoded.glob("*.part")) and not (decoded / "val.json").exists()
    prepare("siim", phantom / "raw", tmp_path / "siim", size=SIZE, fmt="raw", workers=1, progress=False)
    assert not decoded.exists(), "preparing again leaves the decoded copies of the old files behind"
    import gc
    gc.collect()  # let the FFCV loaders go here, where the warning filter applies, not at exit


def test_decoded_splits_go_to_the_user_cache_when_the_data_folder_is_not_writable(tmp_path, phantom, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text((phantom / "nih" / "meta.json").read_text())
    assert ev.PreparedData(data)._decoded_dir() == data / ".decoded"
    (data / ".decoded").rmdir()
    (data / ".decoded").write_text("not a folder")  # mkdir fails, as in a read-only folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    where = ev.PreparedData(data)._decoded_dir()
    assert where.is_dir() and where.parent == tmp_path / "cache" / "mlvicx_fast" / "decoded"
    assert ev.PreparedData(data)._decoded_dir() == where  # the same folder every time


def test_demo_help_says_what_it_runs_and_expects(capsys):
    from mlvicx_fast.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as e:
        evaluate_main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "at least 0.05 mean AUC" in text and "--ablations" in text and "--pretrained" in text


def test_demo_run_again_reuses_or_continues_its_pretraining(tmp_path, capsys):
    """A demo run a second time with the same --out: a finished pretraining is reused, a stopped one
    continued; another run in its folder stops the demo instead of being replaced."""
    import dataclasses

    from mlvicx_fast import train

    run = tmp_path / "demo" / "mlvicx"
    assert ev._demo_pretraining(run, []) == ["--out", str(run)]  # nothing there yet
    config = dataclasses.asdict(train.resolve(train.Config(out=str(run))))
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-00000007.pt").write_bytes(b"x")
    assert ev._demo_pretraining(run, []) == ["--resume", str(run)]
    assert "continuing the stopped pretraining" in capsys.readouterr().out
    (run / "final.pt").write_bytes(b"x")
    assert ev._demo_pretraining(run, []) is None
    assert "finished pretraining: reusing it" in capsys.readouterr().out
    # the ablation's folder holding the default run: not the pretraining the demo asks for
    with pytest.raises(ev.EvaluationError, match=r"mlvicx holds a run that is not this demo's pretraining "
                                                 r"\(--lambda 0.0 \(the run: 1.0\)\); remove it or give demo another --out"):
        ev._demo_pretraining(run, ["--lambda", "0"])
    (run / "config.json").write_text(json.dumps(dict(config, seed=4, epochs=1)))
    with pytest.raises(ev.EvaluationError, match=r"\(--epochs \d+ \(the run: 1\); --seed 0 \(the run: 4\)\)"):
        ev._demo_pretraining(run, [])
    # a config.json of an older version, without the options added since, is the same pretraining
    older = {k: v for k, v in config.items() if k != "init"}
    (run / "config.json").write_text(json.dumps(older))
    assert ev._demo_pretraining(run, []) is None
    if config["phantom_size"] != 256:  # one without phantom_size read the 256 px set: another pretraining
        (run / "config.json").write_text(json.dumps({k: v for k, v in older.items() if k != "phantom_size"}))
        with pytest.raises(ev.EvaluationError, match=r"\(--phantom-size \d+ \(the run: 256\)\)"):
            ev._demo_pretraining(run, [])
    # stopped before its first checkpoint: nothing to continue
    (run / "config.json").write_text(json.dumps(config))
    (run / "final.pt").unlink()
    (run / "checkpoints" / "ckpt-00000007.pt").unlink()
    (run / "log.csv").write_text("step,loss\n1,40\n")
    with pytest.raises(ev.EvaluationError, match=r"stopped before its first checkpoint; remove it"):
        ev._demo_pretraining(run, [])


def test_early_stopping_says_when_it_ranked_epochs_by_the_validation_loss():
    """With no validation class that has both labels there is no AUC to stop on: the best epoch is
    the lowest validation loss, and the run records that its val_best is minus that loss."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), (torch.rand(40, 3) > 0.5).float().numpy()
    val_x, flat_y = torch.randn(12, 6), np.zeros((12, 3), dtype=np.float32)
    kwargs = dict(prepare=lambda data, idx: data[torch.as_tensor(idx)], classes=["a", "b", "c"], batch=8, lr=1e-2,
                  epochs=3, patience=5, seed=0, device=torch.device("cpu"), eval_batch=16)
    hist = ev.train_classifier(torch.nn.Linear(6, 3), x, y, val_x, flat_y, **kwargs)
    assert hist["best_val_criterion"] == "-val_loss"
    best = hist["history"][hist["best_epoch"]]
    assert hist["best_val"] == pytest.approx(-best["val_loss"]) and best["val_mean_auc"] is None
    assert hist["best_val"] == pytest.approx(max(-h["val_loss"] for h in hist["history"]))
    val_y = np.tile(np.array([[0, 1, 0]], dtype=np.float32), (12, 1))
    val_y[::2] = 1 - val_y[::2]
    hist = ev.train_classifier(torch.nn.Linear(6, 3), x, y, val_x, val_y, **kwargs)
    assert hist["best_val_criterion"] == "mean_auc" and 0 <= hist["best_val"] <= 1
