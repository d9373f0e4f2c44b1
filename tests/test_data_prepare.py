"""prepare on the real label rows of the four datasets (tests/data excerpts) with generated pixels:
every written label and mask is checked against the CSV row(s) of its image id."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

from mlvicx_fast.data import datasets as ds  # noqa: E402
from mlvicx_fast.data.images import fit_square, fit_square_mask, read_image, rle_decode, rle_encode  # noqa: E402
from mlvicx_fast.data.loader import ffcv_available  # noqa: E402
from mlvicx_fast.data.prepare import prepare  # noqa: E402

from .data_layouts import excerpt_rows, make_nih, make_rsna, make_siim, make_vinbig, write_dicom, write_png  # noqa: E402

HAS_FFCV = ffcv_available()  # a bare `import ffcv` left torch on one thread for the whole session

ROOT = Path(__file__).resolve().parents[1]
NIH_ORDER = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
             "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def read_index(out, split):
    with open(Path(out) / f"{split}_index.csv") as f:
        return list(csv.DictReader(f))


def written(out, splits=("train", "val", "test")):
    """{image id: (labels row, image, mask)} from the npy outputs, through the index files."""
    res = {}
    for split in splits:
        idx = read_index(out, split)
        if not idx:
            continue
        imgs = np.load(Path(out) / f"{split}_images.npy")
        labs = np.load(Path(out) / f"{split}_labels.npy")
        masks = np.load(Path(out) / f"{split}_masks.npy") if (Path(out) / f"{split}_masks.npy").exists() else None
        assert len(idx) == len(imgs) == len(labs)
        for j, row in enumerate(idx):
            assert int(row["row"]) == j
            res[row["image_id"]] = (labs[j], imgs[j], None if masks is None else masks[j], split)
    return res


def run_cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mlvicx_fast.data.prepare", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ pixels
def test_fit_square_pads_centred_and_keeps_aspect():
    img = np.full((20, 40), 200, np.uint8)
    out = fit_square(img, 40)
    assert out.shape == (40, 40)
    assert (out[:10] == 0).all() and (out[30:] == 0).all() and (out[10:30] == 200).all()
    small = fit_square(img, 8)
    assert small.shape == (8, 8) and small[0].max() == 0 and small[4].min() > 150
    m = np.zeros((20, 40), np.uint8)
    m[:, :20] = 1
    ms = fit_square_mask(m, 8)
    assert ms[2:6, :4].all() and not ms[:, 4:].any() and not ms[:2].any()


def test_png_8_and_16_bit(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    a8 = rng.integers(0, 256, (17, 23)).astype(np.uint8)
    write_png(tmp_path / "a.png", a8)
    assert np.array_equal(read_image(tmp_path / "a.png"), a8)
    a16 = rng.integers(100, 4000, (17, 23)).astype(np.uint16)
    write_png(tmp_path / "b.png", a16)
    got = read_image(tmp_path / "b.png")
    expect = np.round((a16.astype(np.float64) - a16.min()) * 255 / (a16.max() - a16.min())).astype(np.uint8)
    assert np.abs(got.astype(int) - expect).max() <= 1


def test_dicom_luts_monochrome1_and_compressed(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    a = rng.integers(0, 4096, (30, 20)).astype(np.uint16)
    write_dicom(tmp_path / "m2.dcm", a)
    write_dicom(tmp_path / "m1.dcm", a, photometric="MONOCHROME1")
    write_dicom(tmp_path / "rs.dcm", a, slope=3, intercept=-1024)
    write_dicom(tmp_path / "rle.dcm", a, syntax="rle")
    m2 = read_image(tmp_path / "m2.dcm")
    expect = np.round((a.astype(np.float64) - a.min()) * 255 / (a.max() - a.min())).astype(np.uint8)
    assert np.abs(m2.astype(int) - expect).max() <= 1
    assert np.array_equal(read_image(tmp_path / "m1.dcm"), 255 - m2)
    assert np.abs(read_image(tmp_path / "rs.dcm").astype(int) - m2).max() <= 1
    assert np.array_equal(read_image(tmp_path / "rle.dcm"), m2)
    # a window narrower than the data saturates both ends
    write_dicom(tmp_path / "w.dcm", a, window=(2048, 1000))
    w = read_image(tmp_path / "w.dcm")
    assert (w[a < 1400] == 0).all() and (w[a > 2600] == 255).all()
    # JPEG baseline (a decoder plugin: pylibjpeg-libjpeg or Pillow)
    a8 = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    write_dicom(tmp_path / "j.dcm", a8, syntax="jpeg")
    j = read_image(tmp_path / "j.dcm")
    assert j.shape == a8.shape and np.abs(j.astype(int) - a8).mean() < 4


def test_dicom_without_decoder_names_the_package(tmp_path, monkeypatch):
    """No installed plugin for the file's compression: a MissingDecoderError (it stops the run)
    that names what to install. The plugins are hidden from pydicom, so the test does not depend
    on which decoders this machine has."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEG2000Lossless

    from mlvicx_fast.data.images import MissingDecoderError

    write_dicom(tmp_path / "j2k.dcm", np.zeros((8, 8), np.uint16), syntax="j2k-no-decoder")
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(MissingDecoderError, match="pylibjpeg-openjpeg"):
        read_image(tmp_path / "j2k.dcm")


def test_corrupt_or_private_dicom_is_unreadable_not_a_missing_decoder(tmp_path):
    """A damaged compressed file whose decoder is installed, or a transfer syntax pydicom does not
    decode at all, is one unreadable image (skipped, with the reason), not a stop of the run."""
    from mlvicx_fast.data.images import ImageError

    a8 = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    write_dicom(tmp_path / "j.dcm", a8, syntax="jpeg")
    raw = (tmp_path / "j.dcm").read_bytes()
    soi = raw.index(b"\xff\xd8\xff")  # the JPEG stream: keep its headers, garble its scan data
    (tmp_path / "bad.dcm").write_bytes(raw[:soi + 400] + bytes(len(raw) - soi - 400))
    with pytest.raises(ImageError, match="unreadable DICOM pixel data"):
        read_image(tmp_path / "bad.dcm")
    import pydicom

    ds = pydicom.dcmread(str(tmp_path / "j.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.99.1"  # a private syntax
    ds.save_as(str(tmp_path / "private.dcm"))
    with pytest.raises(ImageError, match="unreadable DICOM pixel data"):
        read_image(tmp_path / "private.dcm")


def loop_rle_decode(rle, h, w):
    """Independent, slow decoder of the SIIM format (the Kaggle description, written as a loop)."""
    flat = np.zeros(h * w, np.uint8)
    if rle.strip() == "-1":
        return flat.reshape(w, h).T
    nums = [int(t) for t in rle.split()]
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        pos += start
        flat[pos:pos + length] = 1
        pos += length
    return flat.reshape(w, h).T


def test_rle_matches_loop_decoder_on_real_rows_and_roundtrips():
    _, _, rows = excerpt_rows("siim_train-rle.csv.gz")
    assert any(r[1].strip() == "-1" for r in rows) and any(r[1].strip() != "-1" for r in rows)
    for _, rle in rows[:40]:
        m = rle_decode(rle, 1024, 1024)
        assert np.array_equal(m, loop_rle_decode(rle, 1024, 1024))
        assert rle_encode(m) == (rle.strip() if rle.strip() != "-1" else "-1")
    with pytest.raises(ValueError, match="runs past the image"):
        rle_decode("10 5", 3, 3)
    # the same mask in absolute starts (standard Kaggle RLE) runs past the image: the error says why
    rle = next(r for _, r in rows if len(r.split()) > 20)
    nums = np.array(rle.split(), dtype=np.int64)
    starts = np.cumsum(nums[0::2] + nums[1::2]) - nums[1::2]
    absolute = " ".join(f"{a} {n}" for a, n in zip(starts.tolist(), nums[1::2].tolist()))
    with pytest.raises(ValueError, match=r"runs past the image.*like absolute pixel positions"):
        rle_decode(absolute, 1024, 1024)


def loop_rle_decode_absolute(rle, h, w):
    """Independent decoder of the standard Kaggle RLE: 1-based absolute starts, column-major."""
    flat = np.zeros(h * w, np.uint8)
    nums = [int(t) for t in rle.split()]
    for start, length in zip(nums[0::2], nums[1::2]):
        flat[start - 1:start - 1 + length] = 1
    return flat.reshape(w, h).T


def test_rle_absolute_form_and_telling_the_forms_apart():
    """The same real masks in both forms: each decodes to the same mask, and rle_form names the
    form of each set of rows (relative offsets never come in order as positions)."""
    from mlvicx_fast.data.images import rle_form

    _, _, rows = excerpt_rows("siim_train-rle.csv.gz")
    relative = [r.strip() for _, r in rows if r.strip() != "-1"]
    absolute = []
    for rle in relative:
        m = rle_decode(rle, 1024, 1024)
        a = rle_encode(m, "absolute")
        assert np.array_equal(loop_rle_decode_absolute(a, 1024, 1024), m)
        assert np.array_equal(rle_decode(a, 1024, 1024, "absolute"), m)
        absolute.append(a)
    assert rle_form(relative) == "relative" and rle_form(absolute) == "absolute"
    assert rle_form([]) == "relative" and rle_form(absolute[:1] + relative[:1]) == "relative"
    # a small mask far left stays inside the image when read as relative: in order, but not past it
    assert rle_form(["10 3 1030 3"]) == "relative"
    with pytest.raises(ValueError, match="start of 0"):
        rle_decode("0 4", 8, 8, "absolute")
    with pytest.raises(ValueError, match="runs past the image"):
        rle_decode("60 8", 8, 8, "absolute")
    with pytest.raises(ValueError, match="rle form must be"):
        rle_decode("1 2", 8, 8, "standard")


def _siim_rows_to(root, name, form):
    """Rewrite make_siim's train-rle.csv as `name` in `form`; returns {image id: [rle rows]}."""
    _, _, rows = excerpt_rows("siim_train-rle.csv.gz")
    (root / "train-rle.csv").unlink()
    out = {}
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "EncodedPixels"])
        for iid, rle in rows:
            rle = rle.strip()
            if rle != "-1":
                rle = rle_encode(rle_decode(rle, 1024, 1024), form)
            w.writerow([iid, rle])
            out.setdefault(iid, []).append(rle)
    return out


def test_siim_stage2_file_in_absolute_form_is_read_as_such(tmp_path, fresh_seed):
    """stage_2_train.csv in the standard (absolute) RLE: found, told apart, every mask right."""
    rng = np.random.default_rng(fresh_seed)
    make_siim(tmp_path / "siim", rng)
    rles = _siim_rows_to(tmp_path / "siim", "stage_2_train.csv", "absolute")
    s = prepare("siim", tmp_path / "siim", tmp_path / "out", size=64, fmt="npy", workers=2, progress=False,
                seed=fresh_seed)
    assert s["rle_form"] == "absolute" and s["mask_grid"] is None and not s["skipped"]
    got = written(tmp_path / "out")
    assert sum(int(y[0]) for y, *_ in got.values()) > 0
    for iid, (y, _, mask, _) in got.items():
        full = np.zeros((1024, 1024), np.uint8)
        for rle in rles[iid]:
            if rle != "-1":
                full |= loop_rle_decode_absolute(rle, 1024, 1024)
        assert y[0] == int(full.any()) and np.array_equal(mask, fit_square_mask(full, 64)), iid
    # forcing the other form: read as relative offsets the rows run far past every image, which stops
    # the run (rather than skipping the positives one by one) and says how to read them
    from mlvicx_fast.data.images import MaskError

    with pytest.raises(MaskError, match=r"stage_2_train.csv reach pixel \d+ as relative RLE.*--rle absolute"):
        prepare("siim", tmp_path / "siim", tmp_path / "out2", size=64, fmt="npy", workers=1, progress=False,
                seed=fresh_seed, rle="relative")
    assert not (tmp_path / "out2" / "meta.json").exists()


def test_siim_mask_grid_for_downsized_copies(tmp_path, fresh_seed):
    """PNG copies at 256 px with the original 1024 x 1024 RLE rows: --mask-grid 1024 gives the
    masks of the originals; without it, or with a grid too small for the rows, the run stops with
    a hint (a MaskError, before any output)."""
    from mlvicx_fast.data.images import MaskError

    rng = np.random.default_rng(fresh_seed)
    root = tmp_path / "siim"
    rles = _siim_png_copies(root, rng, 256)
    s = prepare("siim", root, tmp_path / "out", size=64, fmt="npy", workers=2, progress=False, seed=fresh_seed,
                mask_grid=1024)
    assert s["mask_grid"] == 1024 and not s["skipped"]
    assert max(_relative_end(v) for v in rles.values()) == s["rle_extent"] <= 1024 * 1024
    for iid, (y, _, mask, _) in written(tmp_path / "out").items():
        full = np.zeros((1024, 1024), np.uint8)
        for rle in rles[iid]:
            full |= loop_rle_decode(rle, 1024, 1024)
        assert np.array_equal(mask, fit_square_mask(full, 64)), iid
    with pytest.raises(MaskError, match=r"png/[0-9.]+\.png is 256x256, but the rows of .*train-rle.csv reach pixel "
                                        r"\d+ as relative RLE.*--mask-grid 1024"):
        prepare("siim", root, tmp_path / "out2", size=64, fmt="npy", workers=1, progress=False, seed=fresh_seed)
    grid = int(rng.integers(300, 900))  # smaller than the excerpt's furthest run (890 of 1024 columns)
    with pytest.raises(MaskError, match=rf"--mask-grid {grid}: the rows of .*train-rle.csv reach pixel .*--mask-grid 1024"):
        prepare("siim", root, tmp_path / "out2", size=64, fmt="npy", workers=1, progress=False, seed=fresh_seed,
                mask_grid=grid)
    assert not (tmp_path / "out2" / "meta.json").exists() and not (tmp_path / "out2" / ".prepare_tmp").exists()


def _siim_png_copies(root, rng, side, keep=lambda iid, rles: True):
    """The real train-rle.csv rows (drawn on 1024 x 1024) beside side x side PNG copies of the images
    for which keep(iid, rows) holds; returns {image id: [rle rows]}."""
    _, _, rows = excerpt_rows("siim_train-rle.csv.gz")
    root.mkdir(parents=True)
    rles = {}
    for iid, rle in rows:
        rles.setdefault(iid, []).append(rle.strip())
    with open(root / "train-rle.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", " EncodedPixels"])
        w.writerows(rows)
    for iid, lst in rles.items():
        if keep(iid, lst):
            write_png(root / "png" / f"{iid}.png", rng.integers(0, 256, (side, side), dtype=np.uint8))
    return rles


def _relative_end(lst):
    """The pixel after the last run of these relative rows ('-1' rows reach nothing)."""
    return max([int(np.array(r.split(), dtype=np.int64).sum()) for r in lst if r != "-1"] or [0])


def test_siim_masks_that_fit_a_downsized_copy_by_chance_stop_the_run(tmp_path, fresh_seed):
    """Downsized copies without --mask-grid where the only positives on disk are the few whose
    1024-grid rows happen to fit the small image: decoded on the image's own grid their masks would
    be wrong without any error. All rows of one file share one grid, so the run stops, naming the
    image, the label file and --mask-grid 1024, and writes nothing."""
    from mlvicx_fast.data.images import MaskError

    rng = np.random.default_rng(fresh_seed)
    side = int(rng.integers(512, 701))  # 1 to 17 of the excerpt's 40 positives fit a copy of this size
    fits = lambda iid, lst: _relative_end(lst) <= side * side  # noqa: E731
    rles = _siim_png_copies(tmp_path / "siim", rng, side, keep=fits)
    on_disk = [i for i, lst in rles.items() if fits(i, lst)]
    assert any(_relative_end(rles[i]) for i in on_disk) and len(on_disk) < len(rles)
    with pytest.raises(MaskError, match=rf"png/[0-9.]+\.png.*{side}x{side}.*train-rle.csv.*--mask-grid 1024"):
        prepare("siim", tmp_path / "siim", tmp_path / "out", size=32, fmt="npy", workers=int(rng.integers(1, 3)),
                progress=False, seed=fresh_seed, balanced=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    r = run_cli("siim", "--root", tmp_path / "siim", "--out", tmp_path / "o", "--format", "npy", "--size", "16",
                "--quiet", "--workers", "1")
    assert r.returncode == 1 and "--mask-grid 1024" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # with the grid the same files give the masks of the originals
    s = prepare("siim", tmp_path / "siim", tmp_path / "out", size=32, fmt="npy", workers=1, progress=False,
                seed=fresh_seed, balanced=False, mask_grid=1024)
    assert sum(v["n"] for v in s["splits"].values()) == len(on_disk)
    for iid, (y, _, mask, _) in written(tmp_path / "out").items():
        full = np.zeros((1024, 1024), np.uint8)
        for rle in rles[iid]:
            full |= loop_rle_decode(rle, 1024, 1024)
        assert y[0] == int(full.any()) and np.array_equal(mask, fit_square_mask(full, 32)), iid


def test_rle_absolute_rejects_runs_out_of_order(fresh_seed):
    """Standard (absolute) RLE lists its runs in increasing order without overlap; relative offsets
    read as positions mostly do not: rle_decode(form='absolute') says so instead of drawing garbage."""
    rng = np.random.default_rng(fresh_seed)
    raised = 0
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(40, 200, 2))
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            m[y:y + int(rng.integers(3, 30)), x:x + int(rng.integers(2, 30))] = 1
        rel = rle_encode(m)
        assert np.array_equal(rle_decode(rle_encode(m, "absolute"), h, w, "absolute"), m)
        nums = np.array(rel.split(), dtype=np.int64)
        st, ln = nums[0::2], nums[1::2]
        if (st[1:] >= st[:-1] + ln[:-1]).all():
            continue  # in order as positions too: a row alone cannot tell (the file's form can, rle_form)
        raised += 1
        with pytest.raises(ValueError, match=r"not in increasing order.*looks like.*relative.*--rle relative"):
            rle_decode(rel, h, w, "absolute")
    assert raised >= 20
    a = int(rng.integers(1, 50))
    with pytest.raises(ValueError, match="overlap"):
        rle_decode(f"{a} 10 {a + 9} 2", 64, 64, "absolute")
    with pytest.raises(ValueError, match="not in increasing order"):
        rle_decode(f"{a + 20} 3 {a} 2", 64, 64, "absolute")
    assert rle_decode(f"{a} 2 {a + 2} 3", 64, 64, "absolute").sum() == 5  # touching runs are in order


def test_siim_forced_absolute_on_the_relative_file_stops(tmp_path, fresh_seed):
    """--rle absolute on SIIM's relative train-rle.csv: the scan stops at the first row that cannot
    be absolute (runs out of order), naming the file, the line, the image and the form it reads as."""
    rng = np.random.default_rng(fresh_seed)
    _, _, rows = excerpt_rows("siim_train-rle.csv.gz")
    rows = [rows[j] for j in rng.permutation(len(rows))]
    (tmp_path / "train-rle.csv").write_text("ImageId,EncodedPixels\n" + "".join(f"{i},{r.strip()}\n" for i, r in rows))
    first = None
    for j, (iid, rle) in enumerate(rows):
        nums = np.array(rle.split(), dtype=np.int64)
        st, ln = nums[0::2], nums[1::2]
        if rle.strip() != "-1" and not (st[1:] >= st[:-1] + ln[:-1]).all():
            first = (j + 2, iid)
            break
    with pytest.raises(ds.LabelFileError, match=rf"train-rle.csv, line {first[0]} \({first[1]}\): .*not in increasing "
                                                r"order.*the file reads as relative"):
        ds.scan_siim(tmp_path, rle="absolute")
    assert ds.scan_siim(tmp_path).rle_form == "relative" and ds.scan_siim(tmp_path, rle="relative").rle_form == "relative"


# ------------------------------------------------------------------------------------------------ label files
@pytest.mark.parametrize("old_csv", [False, True])
def test_nih_labels_row_by_row(tmp_path, fresh_seed, old_csv):
    rng = np.random.default_rng(fresh_seed)
    labels, bad = make_nih(tmp_path / "nih", rng, old_csv=old_csv)
    s = prepare("nih", tmp_path / "nih", tmp_path / "out", size=32, fmt="npy", workers=1, progress=False, seed=fresh_seed)
    got = written(tmp_path / "out")
    assert set(got) == set(labels) - set(bad)
    test_ids = set((tmp_path / "nih" / "test_list.txt").read_text().split())
    for iid, (y, img, _, split) in got.items():
        names = [] if labels[iid] == "No Finding" else labels[iid].split("|")
        assert [NIH_ORDER[c] for c in np.flatnonzero(y)] == [n for n in NIH_ORDER if n in names], iid
        assert (split == "test") == (iid in test_ids)
        src = read_image(next((tmp_path / "nih").glob(f"images_*/images/{iid}")))
        assert np.array_equal(img, fit_square(src, 32)), iid
    # the val split is whole patients, disjoint from train
    pid = lambda i: i.split("_")[0]  # noqa: E731
    assert not {pid(i) for i, v in got.items() if v[3] == "val"} & {pid(i) for i, v in got.items() if v[3] == "train"}
    # skipped files are listed with their reason
    with open(tmp_path / "out" / "skipped.csv") as f:
        sk = {r["image_id"]: r["reason"] for r in csv.DictReader(f)}
    assert set(sk) == set(bad)
    for iid, why in bad.items():
        assert sk[iid].startswith(why)
    assert sum(s["skipped"].values()) == 2
    assert sum(v["n"] for v in s["splits"].values()) == len(labels) - 2


def test_vinbig_any_radiologist_and_no_finding(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    rows = make_vinbig(tmp_path / "vin", rng)
    s = prepare("vinbig", tmp_path / "vin", tmp_path / "out", size=24, fmt="npy", workers=2, progress=False)
    assert "any of its radiologists" in s["labels_from"] and "'No finding' rows add nothing" in s["labels_from"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["labels_from"] == s["labels_from"]
    got = written(tmp_path / "out")
    expect = {}
    for r in rows:  # image_id, class_name, class_id, rad_id, ...
        y = expect.setdefault(r[0], np.zeros(14, np.uint8))
        if int(r[2]) != 14:
            y[int(r[2])] = 1
    assert set(got) == set(expect)
    for iid, (y, img, _, _) in got.items():
        assert np.array_equal(y, expect[iid]), iid
    assert any(v.sum() == 0 for v in expect.values()) and any(v.sum() > 1 for v in expect.values())
    # MONOCHROME1 files were inverted: stored image = 255 - (what MONOCHROME2 reading gives)
    ids = sorted(expect)
    mono1 = ids[1]
    raw = read_image(tmp_path / "vin" / "train" / f"{mono1}.dicom")
    assert np.array_equal(got[mono1][1], fit_square(raw, 24))


def test_rsna_target_is_max_over_rows(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    rows = make_rsna(tmp_path / "rsna", rng)
    prepare("rsna", tmp_path / "rsna", tmp_path / "out", size=16, fmt="npy", workers=1, progress=False,
            seed=fresh_seed)
    got = written(tmp_path / "out")
    expect = {}
    for r in rows:
        expect[r[0]] = max(expect.get(r[0], 0), int(r[-1]))
    assert set(got) == set(expect)
    for iid, (y, _, _, _) in got.items():
        assert y.tolist() == [expect[iid]], iid
    splits = {v[3] for v in got.values()}
    assert splits == {"train", "val", "test"}


def test_siim_masks_union_balanced_and_split(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    rows = make_siim(tmp_path / "siim", rng)
    s = prepare("siim", tmp_path / "siim", tmp_path / "out", size=64, fmt="npy", workers=2, progress=False,
                seed=fresh_seed)
    got = written(tmp_path / "out", splits=("train", "val", "test"))
    rles = {}
    for iid, rle in rows:
        rles.setdefault(iid, []).append(rle)
    pos = [i for i in got if got[i][0][0] == 1]
    assert len(pos) == len(got) - len(pos) == sum(any(r.strip() != "-1" for r in v) for v in rles.values())
    for iid, (y, img, mask, _) in got.items():
        full = np.zeros((1024, 1024), np.uint8)
        for rle in rles[iid]:
            full |= loop_rle_decode(rle, 1024, 1024)
        assert y[0] == int(full.any())
        assert np.array_equal(mask, fit_square_mask(full, 64)), iid
    assert s["splits"]["val"]["n"] == round(0.1 * len(got)) and s["splits"]["test"]["n"] == round(0.2 * len(got))
    # the balanced subset and split are the same for the same seed
    s2 = prepare("siim", tmp_path / "siim", tmp_path / "out2", size=8, fmt="npy", workers=1, progress=False,
                 seed=fresh_seed, limit=None)
    assert [r["image_id"] for r in read_index(tmp_path / "out2", "val")] == \
        [r["image_id"] for r in read_index(tmp_path / "out", "val")]
    assert s2["splits"]["train"]["n"] == s["splits"]["train"]["n"]


def test_image_index_skips_mask_folders_and_prefers_dicom(tmp_path):
    """Several files per id: a DICOM over its PNG copy, never a mask named like its image, and the
    same choice whatever order the file system lists them in."""
    root = tmp_path / "siim"
    for rel in ("png_masks/a.png", "png_images/a.png", "png_images/b.png", "Masks/b.png",
                "dicom/1/2/a.dcm", "z/c.png", "y/c.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    found = ds._index_files([root], (".dcm", ".dicom", ".png"))
    assert found["a"] == root / "dicom/1/2/a.dcm" and found["a.png"] == root / "png_images/a.png"
    assert found["b"] == root / "png_images/b.png" and found["c"] == root / "y/c.png"
    # the earlier folder of the list wins over the later (RSNA: stage 2 images before stage 1)
    found = ds._index_files([root / "z", root], (".png",))
    assert found["c"] == root / "z/c.png"


# ------------------------------------------------------------------------------------------------ bad input
def test_broken_csv_names_file_and_columns(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Labels\n00000001_000.png,Mass\n")
    with pytest.raises(ds.LabelFileError, match=r"Data_Entry_2017.csv.*missing required column.*Finding Labels"):
        ds.scan_nih(tmp_path)
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y\nabc,1,2\n")
    with pytest.raises(ds.LabelFileError, match=r"stage_2_train_labels.csv.*\['Target'\]"):
        ds.scan_rsna(tmp_path)
    (tmp_path / "train-rle.csv").write_text("ImageId,EncodedPixels\n1.2.3,12 4 5\n")
    with pytest.raises(ds.LabelFileError, match=r"train-rle.csv, line 2 \(1.2.3\).*pairs"):
        ds.scan_siim(tmp_path)


def test_unknown_label_names_line_and_value(tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels\n00000001_000.png,Mass\n00000002_000.png,Nodule|Pneumonitis\n")
    with pytest.raises(ds.LabelFileError, match=r"line 3 \(00000002_000.png\): unknown finding 'Pneumonitis'"):
        ds.scan_nih(tmp_path)
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id\nab,Cardiomegaly,3,R1\ncd,Heart,3,R2\n")
    with pytest.raises(ds.LabelFileError, match=r"line 3 \(cd\): unknown class_name 'Heart'"):
        ds.scan_vinbig(tmp_path)
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id\nab,Cardiomegaly,4,R1\n")
    with pytest.raises(ds.LabelFileError, match=r"class_id '4' does not match class_name 'Cardiomegaly'"):
        ds.scan_vinbig(tmp_path)
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,Target\nabc,2\n")
    with pytest.raises(ds.LabelFileError, match=r"Target '2'; expected 0 or 1"):
        ds.scan_rsna(tmp_path)


def test_cli_strict_help_and_errors(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    make_nih(tmp_path / "nih", rng)
    r = run_cli("nih", "--root", tmp_path / "nih", "--out", tmp_path / "o", "--strict", "--format", "npy",
                "--size", "16", "--quiet")
    assert r.returncode == 1 and "--strict" in r.stderr and "not found" in r.stderr, r.stderr
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ("what it reads", "what it writes", "example", "--limit", "--strict", "--format"):
        assert word in r.stdout
    (tmp_path / "nih" / "Data_Entry_2017_v2020.csv").write_text("Image Index,Findings\n")
    r = run_cli("nih", "--root", tmp_path / "nih", "--out", tmp_path / "o", "--format", "npy", "--quiet")
    assert r.returncode == 1 and "Data_Entry_2017_v2020.csv" in r.stderr and "Finding Labels" in r.stderr


def test_cli_fails_when_nothing_is_kept_and_on_bad_fractions(tmp_path, fresh_seed):
    """A --root whose label files are there but not its images (the wrong folder) is an error, not
    a dataset of empty splits with status 0; the run keeps skipped.csv to show why. NIH's
    --val-fraction is checked as the others' are (a negative one had sliced the split backwards)."""
    rng = np.random.default_rng(fresh_seed)
    make_nih(tmp_path / "nih", rng)
    for d in (tmp_path / "nih").glob("images_*"):
        os.rename(d, tmp_path / f"moved-{d.name}")
    r = run_cli("nih", "--root", tmp_path / "nih", "--out", tmp_path / "o", "--format", "npy", "--quiet")
    assert r.returncode == 1 and "none of the" in r.stderr and "file not found" in r.stderr, r.stderr
    assert (tmp_path / "o" / "skipped.csv").is_file() and not (tmp_path / "o" / "meta.json").exists()
    for bad in ("-0.1", "1.5"):
        r = run_cli("nih", "--root", tmp_path / "nih", "--out", tmp_path / "o", "--format", "npy", "--quiet",
                    "--val-fraction", bad)
        assert r.returncode == 1 and f"val_fraction must be in [0, 1), got {float(bad)}" in r.stderr, r.stderr
    assert "RuntimeWarning" not in r.stderr  # python -m of a module the package had imported already


@pytest.mark.skipif(not HAS_FFCV, reason="ffcv is not installed (scripts/setup.sh --dev installs it)")
def test_cli_writes_beton_with_limit(tmp_path, fresh_seed):
    """The whole CLI in a subprocess (FFCV's writer forks), jpg .beton, --limit, summary printed."""
    rng = np.random.default_rng(fresh_seed)
    labels, bad = make_nih(tmp_path / "nih", rng, bad=True)
    r = run_cli("nih", "--root", tmp_path / "nih", "--out", tmp_path / "o", "--format", "jpg", "--size", "32",
                "--limit", "40", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "skipped" in r.stdout
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["classes"] == NIH_ORDER and meta["format"] == "jpg"
    for split in ("train", "val", "test"):
        n = meta["splits"][split]["n"]
        assert 0 < n <= 40 and len(read_index(tmp_path / "o", split)) == n
        assert (tmp_path / "o" / f"{split}.beton").stat().st_size > 0
