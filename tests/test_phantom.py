"""The phantom set: deterministic by seed, labels that change the picture, NIH layout and SIIM masks."""
import csv
import shutil

import numpy as np
import pytest
import torch

from mlvicx_fast.data.images import read_image, rle_decode
from mlvicx_fast.data.phantom import FINDINGS, render_batch, write_phantom


def test_deterministic_by_seed(fresh_seed):
    a, la, ma = render_batch(fresh_seed, 64, 8, 64)
    b, lb, mb = render_batch(fresh_seed, 64, 8, 64)
    c, _, _ = render_batch(fresh_seed + 1, 64, 8, 64)
    assert a.dtype == np.uint8 and a.shape == (8, 64, 64)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and all(np.array_equal(la[f], lb[f]) for f in FINDINGS)
    assert not np.array_equal(a, c)
    # varied exposure: not all images share one histogram
    assert np.std([im.mean() for im in a]) > 2


@pytest.mark.parametrize("finding", FINDINGS)
def test_findings_change_the_picture(finding, fresh_seed):
    """The same 16 images with and without the finding: it adds visible density where it should
    (the pneumothorax rim instead turns darker), and sets the label."""
    a, la, ma = render_batch(fresh_seed, 0, 16, 96, force={finding: False})
    b, lb, mb = render_batch(fresh_seed, 0, 16, 96, force={finding: True})
    assert not la[finding].any() and lb[finding].all()
    d = b.astype(np.int32) - a.astype(np.int32)
    for k in range(16):
        if finding == "Pneumothorax":
            assert mb[k].any() and not ma[k].any()
            assert d[k][mb[k]].mean() < -3
        else:
            assert d[k].sum() > 0 and d[k].max() >= 12, (finding, k)  # visible, not a faint haze
            if finding != "Cardiomegaly":  # a wider heart also moves its centre
                assert d[k].min() >= -1


def test_label_frequencies(fresh_seed):
    _, lab, _ = render_batch(fresh_seed, 0, 64, 32)
    _, lab2, _ = render_batch(fresh_seed, 64, 64, 32)
    for f in FINDINGS:
        assert 0.02 < (lab[f].mean() + lab2[f].mean()) / 2 < 0.45, f


def test_nih_layout_labels_and_masks(tmp_path, fresh_seed):
    counts = write_phantom(tmp_path, n=70, seed=fresh_seed, size=64, workers=1)
    with open(tmp_path / "Data_Entry_2017_v2020.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 70
    tv = (tmp_path / "train_val_list.txt").read_text().split()
    te = (tmp_path / "test_list.txt").read_text().split()
    assert sorted(tv + te) == sorted(r["Image Index"] for r in rows) and len(te) == 14
    with open(tmp_path / "train-rle.csv") as f:
        rle = {r["ImageId"]: r[" EncodedPixels"] for r in csv.DictReader(f)}
    for r in rows:
        img = read_image(tmp_path / "images_001" / "images" / r["Image Index"])
        assert img.shape == (64, 64)
        names = [] if r["Finding Labels"] == "No Finding" else r["Finding Labels"].split("|")
        assert set(names) <= set(FINDINGS)
        mask = rle_decode(rle[r["Image Index"][:-4]], 64, 64)
        assert mask.any() == ("Pneumothorax" in names)
    assert counts == {f: sum(f in r["Finding Labels"].split("|") for r in rows) for f in FINDINGS}
    # the same seed writes the same files
    write_phantom(tmp_path / "again", n=70, seed=fresh_seed, size=64, workers=1)
    assert (tmp_path / "again" / "Data_Entry_2017_v2020.csv").read_bytes() == \
        (tmp_path / "Data_Entry_2017_v2020.csv").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_writing_leaves_torch_threads_alone(tmp_path, workers):
    """Pool workers run on one thread each; written in this process, the set must not leave the
    process's later training on one core (it did: every in-process run after a small phantom set)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        write_phantom(tmp_path, n=70, seed=0, size=32, workers=workers)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be at least 2, got 1"):
        write_phantom("/nonexistent", n=1)
    with pytest.raises(ValueError, match="size must be at least 32, got 16"):
        write_phantom("/nonexistent", n=4, size=16)


def test_ensure_phantom_prepares_once(tmp_path):
    from mlvicx_fast.data import ensure_phantom, make_loader

    out = ensure_phantom(tmp_path / "ph", n=40, seed=1, size=32, fmt="npy", workers=1)
    stamp = (out / "nih" / "train_images.npy").stat().st_mtime_ns
    assert ensure_phantom(tmp_path / "ph", n=40, seed=1, size=32, fmt="npy", workers=1) == out
    assert (out / "nih" / "train_images.npy").stat().st_mtime_ns == stamp  # not written again
    x, y = next(iter(make_loader(out / "nih", mode="classify", split="test", batch_size=4, size=24)))
    assert x.shape == (4, 3, 24, 24) and y.shape == (4, 14)


def test_ensure_phantom_waits_for_a_build_in_progress(tmp_path, capsys):
    """A second caller while another holds the build lock waits, says so, and then finds the set
    the first one stamped (here the holder builds it), instead of writing the same files at once."""
    import threading

    from mlvicx_fast.data import ensure_phantom
    from mlvicx_fast.data.prepare import exclusive_lock

    out = tmp_path / "ph"
    done = []
    with exclusive_lock(out / ".build.lock"):
        waiter = threading.Thread(target=lambda: done.append(ensure_phantom(out, n=40, seed=2, size=32, fmt="npy",
                                                                            workers=1)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not (out / "phantom.json").exists()  # it waits for the lock
        ensure_phantom(tmp_path / "elsewhere", n=40, seed=2, size=32, fmt="npy", workers=1)  # other folders do not wait
        for name in ("raw", "nih", "siim"):
            shutil.copytree(tmp_path / "elsewhere" / name, out / name)
        shutil.copy(tmp_path / "elsewhere" / "phantom.json", out / "phantom.json")
        built = (out / "nih" / "train_images.npy").stat().st_mtime_ns
    waiter.join(timeout=60)
    assert done == [out]
    assert (out / "nih" / "train_images.npy").stat().st_mtime_ns == built  # found ready, not rebuilt
    assert "waiting for another process that is building the phantom set" in capsys.readouterr().err


def test_ensure_phantom_rebuilds_after_an_interrupted_build(tmp_path):
    """A build that stopped half-way (files written, no stamp; or a stamp cut short) is built again."""
    from mlvicx_fast.data import ensure_phantom

    out = ensure_phantom(tmp_path / "ph", n=40, seed=2, size=32, fmt="npy", workers=1)
    (out / "phantom.json").write_text('{"n": 40, "se')  # torn
    (out / "nih" / "train_images.npy").write_bytes(b"half")
    ensure_phantom(out, n=40, seed=2, size=32, fmt="npy", workers=1)
    assert np.load(out / "nih" / "train_images.npy").shape[1:] == (32, 32)
