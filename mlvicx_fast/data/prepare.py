"""python -m mlvicx_fast.data.prepare: chest X-ray datasets as downloaded -> FFCV .beton files.

Two stages. (1) Every listed image is decoded (PNG 8/16-bit, DICOM), made grayscale uint8, padded
to a square and resized to --size (see `images.py`), in --workers processes, into a temporary
uint8 array on disk; SIIM masks are decoded from their RLE rows and stored at the same size.
Missing or unreadable files are skipped and listed with the reason in OUT/skipped.csv (or stop the
run at the first one with --strict). (2) The kept images are written per split:

  --format jpg   OUT/<split>.beton, image as an FFCV RGBImageField (JPEG q90, gray in 3 channels)
  --format raw   OUT/<split>.beton, image as an FFCV NDArrayField uint8 (size, size): no decode cost
  --format npy   OUT/<split>_images.npy, <split>_labels.npy (+ _masks.npy): no FFCV needed

Every .beton holds the fields, in this order: image, labels (uint8 multi-hot, n_classes), index
(row in OUT/<split>_index.csv), and for SIIM mask (uint8 0/1, size x size). OUT/<split>_index.csv
lists row, image id and the labels in words-as-columns; OUT/meta.json the dataset, classes, task,
how the labels were derived from the label rows (labels_from), size, format, split sizes and
per-class positive counts.

SIIM masks are decoded on each image's own size, or on --mask-grid N x N (downsized copies of the
1024 x 1024 originals). All rows of one label file share one grid, so an image smaller than the
furthest run of the file (meta.json's rle_extent) stops the run with a `MaskError` naming the image
and suggesting --mask-grid 1024, rather than skipping the masks that run past it and keeping, wrong
and without a word, those that happen to fit; a --mask-grid too small for the file stops it before
decoding, and a forced --rle that the file's rows cannot be in stops it at the scan.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from ..checkpoint import atomic_write_text
from ..progress import progress as progress_bar
from .datasets import SCANNERS, LabelFileError, Record, Scan
from .images import ImageError, MaskError, MissingDecoderError, fit_square, fit_square_mask, read_image, rle_decode
from .loader import drop_numba_finalizer_errors, ffcv_available, keep_torch_threads

SPLITS = ("train", "val", "test")
FORMATS = ("jpg", "raw", "npy")


class StrictError(RuntimeError):
    """--strict: the first missing or unreadable image stops the run."""


# ----------------------------------------------------------------------------------------------
# stage 1: decode one image (runs in the worker processes)
# ----------------------------------------------------------------------------------------------
SIIM_GRID = 1024  # the side of SIIM's DICOMs, on which its RLE masks are drawn


class MaskSpec(NamedTuple):
    """How the SIIM masks of one run are decoded (the same for every image of it)."""
    form: str  # "relative" or "absolute"
    grid: Optional[int]  # --mask-grid, or None: each image's own size
    extent: int = 0  # the pixel after the furthest run of any row of the label file (Scan.rle_extent)
    source: str = "the label file"  # the label file, for messages
    form_hint: str = ""  # a sentence for messages when the file reads as another form than the one used


def _misfit_hint(spec: MaskSpec, below_siim: bool) -> str:
    """The likely cause of masks that do not fit their grid: the RLE form, a grid below SIIM's
    (below_siim: the grid used is smaller than SIIM's originals), or another label file."""
    if spec.form_hint:
        return spec.form_hint
    if below_siim and spec.extent <= SIIM_GRID * SIIM_GRID:
        return (f"SIIM's masks are drawn on its {SIIM_GRID}x{SIIM_GRID} originals: for downsized copies of them "
                f"pass --mask-grid {SIIM_GRID}.")
    return "Is the label file the one of these images (--csv)?"


def _grid_misfit(path, h: int, w: int, spec: MaskSpec) -> str:
    gh, gw = (spec.grid, spec.grid) if spec.grid else (h, w)
    where = f"the {gh}x{gw} grid of --mask-grid {spec.grid}" if spec.grid else "the image's own grid"
    hint = _misfit_hint(spec, below_siim=not spec.grid and max(h, w) < SIIM_GRID)
    return (f"{path} is {h}x{w}, but the rows of {spec.source} reach pixel {spec.extent} as {spec.form} RLE, past "
            f"the {gh * gw} pixels of {where}. All rows of one label file share one grid, so masks decoded on "
            f"this one would be wrong, with no error for those that happen to fit. {hint}")


def _load_one(task):
    """(k, path, size, (rle rows, MaskSpec) or None) -> (k, image uint8 (size,size) | None, mask | None, reason).

    A mask is decoded on the image's own height x width, or on a grid x grid square (--mask-grid:
    downsized copies of SIIM's 1024 x 1024 originals) that then takes the image's geometry. A grid
    smaller than the label file's furthest run raises MaskError (it stops the run), whether or not
    this image's own rows fit: they were drawn on the same grid as the others."""
    k, path, size, mask_task = task
    try:
        img = read_image(path)
        mask = None
        if mask_task is not None:
            rles, spec = mask_task
            h, w = img.shape
            if spec.grid and h != w:
                raise ImageError(f"--mask-grid {spec.grid} needs square images; this one is {h}x{w}")
            gh, gw = (spec.grid, spec.grid) if spec.grid else (h, w)
            if spec.extent > gh * gw:
                raise MaskError(_grid_misfit(path, h, w, spec))
            full = np.zeros((gh, gw), dtype=np.uint8)
            for rle in rles:
                try:
                    full |= rle_decode(rle, gh, gw, spec.form)
                except ValueError as e:  # rows the scan did not check (a caller of its own)
                    raise MaskError(f"{path}: its mask does not fit the {gh}x{gw} grid: {e}") from None
            mask = fit_square_mask(full, size)
        return k, fit_square(img, size), mask, ""
    except ImageError as e:
        return k, None, None, str(e)


def _decode_all(records: List[Record], size: int, workers: int, mask_spec: Optional[MaskSpec], tmp: Path,
                strict: bool, progress: bool):
    """Decode into memmaps; returns (images, masks|None, reasons list ('' = kept)). mask_spec:
    None (no masks) or how to decode them."""
    with_mask = mask_spec is not None
    n = len(records)
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(max(n, 1), size, size))
    masks = (np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(max(n, 1), size, size))
             if with_mask else None)
    reasons = [""] * n
    tasks = []
    for k, r in enumerate(records):
        if r.path is None:
            reasons[k] = "file not found"
            if strict:
                raise StrictError(f"--strict: {r.image_id} ({r.split}) is listed but its image file was not found")
        else:
            tasks.append((k, str(r.path), size, (r.rle, mask_spec) if with_mask else None))
    bar = progress_bar(total=len(tasks), desc="decode", unit="img", disable=not progress)
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap_unordered(_load_one, tasks, chunksize=max(1, min(64, len(tasks) // (4 * workers))))
        else:
            results = map(_load_one, tasks)
        for k, img, mask, reason in results:
            bar.update(1)
            if img is None:
                reasons[k] = reason
                if strict:
                    raise StrictError(f"--strict: {records[k].image_id} ({records[k].path}): {reason}")
                continue
            images[k] = img
            if masks is not None:
                masks[k] = mask
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return images, masks, reasons


# ----------------------------------------------------------------------------------------------
# stage 2: write one split
# ----------------------------------------------------------------------------------------------
class _Rows:
    """Indexable view the FFCV writer reads: (image, labels, index[, mask]) for kept row j."""

    def __init__(self, images, labels, keep, masks, fmt):
        self.images, self.labels, self.keep, self.masks, self.fmt = images, labels, keep, masks, fmt

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, j):
        k = self.keep[j]
        img = np.asarray(self.images[k])
        if self.fmt == "jpg":
            img = np.repeat(img[:, :, None], 3, axis=2)
        out = (img, self.labels[j], int(j))
        if self.masks is not None:
            out = out + (np.asarray(self.masks[k]),)
        return out


def _write_beton(path: Path, rows: _Rows, n_classes: int, size: int, fmt: str, workers: int, progress: bool):
    with keep_torch_threads():
        import ffcv.writer
        from ffcv.fields import IntField, NDArrayField, RGBImageField
        from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode="jpg", jpeg_quality=90) if fmt == "jpg"
        else NDArrayField(np.dtype("u1"), (size, size)),
        "labels": NDArrayField(np.dtype("u1"), (n_classes,)),
        "index": IntField(),
    }
    if rows.masks is not None:
        fields["mask"] = NDArrayField(np.dtype("u1"), (size, size))
    writer = DatasetWriter(str(path), fields, num_workers=max(1, workers))
    bar = ffcv.writer.tqdm  # FFCV's writer always draws a bar; --quiet turns it off
    ffcv.writer.tqdm = bar if progress else functools.partial(bar, disable=True)
    try:
        writer.from_indexed_dataset(rows, chunksize=64)
    finally:
        ffcv.writer.tqdm = bar


def _write_npy(out: Path, split: str, rows: _Rows):
    n = len(rows)
    size = rows.images.shape[1]
    dst = np.lib.format.open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    for a in range(0, n, 1024):
        dst[a:a + 1024] = rows.images[rows.keep[a:a + 1024]]
    dst.flush()
    np.save(out / f"{split}_labels.npy", rows.labels)
    if rows.masks is not None:
        m = np.lib.format.open_memmap(out / f"{split}_masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        for a in range(0, n, 1024):
            m[a:a + 1024] = rows.masks[rows.keep[a:a + 1024]]
        m.flush()


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------
def prepare(dataset: str, root, out, size: int = 256, fmt: str = "jpg", workers: Optional[int] = None,
            strict: bool = False, limit: Optional[int] = None, seed: int = 0, progress: bool = True,
            mask_grid: Optional[int] = None, **scan_options) -> Dict:
    """Prepare one dataset; returns the summary that is also written to OUT/meta.json.
    mask_grid: SIIM masks are decoded on a mask_grid x mask_grid square (default: the image's size)."""
    if dataset not in SCANNERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(SCANNERS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not 8 <= size <= 4096:
        raise ValueError(f"size must be in [8, 4096], got {size}")
    if mask_grid is not None and mask_grid < 1:
        raise ValueError(f"--mask-grid must be a positive side in pixels, got {mask_grid}")
    if fmt in ("jpg", "raw") and not ffcv_available():
        raise RuntimeError(f"--format {fmt} writes FFCV .beton files and needs ffcv (bash scripts/setup.sh "
                           "installs it); --format npy works without it")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    workers = workers or min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    scan: Scan = SCANNERS[dataset](root, seed=seed, **{k: v for k, v in scan_options.items() if v is not None})
    records = scan.records
    if limit is not None:
        per = {s: 0 for s in SPLITS}
        kept = []
        for r in records:
            if per[r.split] < limit:
                per[r.split] += 1
                kept.append(r)
        records = kept
    with_mask = scan.task == "segmentation"
    spec = None
    if with_mask:
        form_hint = ("The rows read as absolute pixel positions instead (the standard Kaggle RLE): --rle absolute, "
                     "or auto." if scan.rle_form == "relative" and scan.rle_detected == "absolute" else "")
        spec = MaskSpec(scan.rle_form, mask_grid, scan.rle_extent, str(scan.label_file or "the label file"), form_hint)
        if mask_grid and scan.rle_extent > mask_grid * mask_grid:  # every image would fail: say so before decoding
            raise MaskError(f"--mask-grid {mask_grid}: the rows of {spec.source} reach pixel {scan.rle_extent} as "
                            f"{scan.rle_form} RLE, past the {mask_grid * mask_grid} pixels of a {mask_grid}x{mask_grid} "
                            f"grid. {_misfit_hint(spec, below_siim=mask_grid < SIIM_GRID)}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".prepare_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    n_classes = len(scan.classes)
    try:
        images, masks, reasons = _decode_all(records, size, workers, spec, tmp, strict, progress)
        skipped = [(r, why) for r, why in zip(records, reasons) if why]
        with open(out / "skipped.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "split", "path", "reason"])
            for r, why in skipped:
                w.writerow([r.image_id, r.split, str(r.path) if r.path else "", why])
        if records and len(skipped) == len(records):
            why = "; ".join(f"{r} ({n})" for r, n in Counter(w for _, w in skipped).most_common(3))
            raise RuntimeError(f"none of the {len(records)} listed images was kept ({why}); nothing written but "
                               f"{out / 'skipped.csv'} (is --root the dataset folder as downloaded?)")
        summary = {
            "dataset": scan.dataset, "task": scan.task, "classes": list(scan.classes), "size": size,
            "format": fmt, "seed": seed, "root": str(root.resolve()), "labels_from": scan.labels_from,
            "splits": {},
            "skipped": {}, "left_out": scan.notes, "fields": ["image", "labels", "index"] + (["mask"] if with_mask else []),
        }
        if with_mask:
            summary.update(rle_form=scan.rle_form, mask_grid=mask_grid, rle_extent=scan.rle_extent)
        for _, why in skipped:
            summary["skipped"][why] = summary["skipped"].get(why, 0) + 1
        # the old outputs go from here on: first their meta.json, so a run stopped before it writes
        # the new one leaves no folder that claims splits whose files are gone
        (out / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(out / ".decoded", ignore_errors=True)  # evaluate's decoded copies of the old files
        for split in SPLITS:
            keep = np.array([k for k, r in enumerate(records) if r.split == split and not reasons[k]], dtype=np.int64)
            for old in (f"{split}.beton", f"{split}_images.npy", f"{split}_labels.npy", f"{split}_masks.npy"):
                (out / old).unlink(missing_ok=True)
            labels = (np.stack([records[k].labels for k in keep]) if len(keep)
                      else np.zeros((0, n_classes), dtype=np.uint8)).astype(np.uint8)
            with open(out / f"{split}_index.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["row", "image_id"] + list(scan.classes) + (["mask_pixels"] if with_mask else []))
                for j, k in enumerate(keep):
                    extra = [int(masks[k].sum())] if with_mask else []
                    w.writerow([j, records[k].image_id] + labels[j].tolist() + extra)
            info = {"n": int(len(keep)), "positives": dict(zip(scan.classes, labels.sum(0).astype(int).tolist()))}
            if len(keep):
                rows = _Rows(images, labels, keep, masks, fmt)
                if fmt == "npy":
                    _write_npy(out, split, rows)
                    info["files"] = [f"{split}_images.npy", f"{split}_labels.npy"] + ([f"{split}_masks.npy"] if with_mask else [])
                else:
                    images.flush()
                    if masks is not None:
                        masks.flush()
                    _write_beton(out / f"{split}.beton", rows, n_classes, size, fmt, workers, progress)
                    info["files"] = [f"{split}.beton"]
            summary["splits"][split] = info
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        with open(out / "meta.json", "w") as f:
            json.dump(summary, f, indent=1)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_summary(s: Dict, out) -> None:
    print(f"\n{s['dataset']}: {s['task']}, {len(s['classes'])} classes, {s['size']}x{s['size']} {s['format']}, "
          f"{s['seconds']} s -> {out}")
    for split, info in s["splits"].items():
        pos = ", ".join(f"{c} {n}" for c, n in info["positives"].items() if n)
        print(f"  {split:5s} {info['n']:7d} images   positives: {pos or 'none'}")
    n_skip = sum(s["skipped"].values())
    print(f"  skipped {n_skip}" + (": " + "; ".join(f"{why} ({n})" for why, n in s["skipped"].items()) if n_skip else "")
          + (f"  (listed in {Path(out) / 'skipped.csv'})" if n_skip else ""))
    for why, n in s.get("left_out", {}).items():
        if n:
            print(f"  left out {n}: {why}")
    if "rle_form" in s:
        print(f"  masks: {s['rle_form']} RLE, decoded on " + (f"a {s['mask_grid']}x{s['mask_grid']} grid" if s["mask_grid"]
                                                              else "each image's own size"))
    kept = sum(info["n"] for info in s["splits"].values())
    if n_skip > kept:
        print(f"  warning: more images were skipped ({n_skip}) than kept ({kept})", file=sys.stderr)


@contextlib.contextmanager
def exclusive_lock(path: Path, waiting: str = ""):
    """Hold an exclusive advisory lock (flock) on `path` (created if missing) for the block; when
    another process holds it, print `waiting` (if given) to stderr and wait for it. No-op where
    fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_phantom(out="data/phantom", n: int = 2000, seed: int = 0, size: int = 256, fmt: Optional[str] = None,
                   workers: Optional[int] = None, quiet: bool = True) -> Path:
    """The built-in default data set: OUT/nih (classification) and OUT/siim (segmentation) from the
    phantom generator, prepared unless OUT/phantom.json shows the same n, seed, size and format.
    .beton formats are written by a subprocess (FFCV's writer forks; it must not run beside loader
    threads of this process). Returns OUT.

    Processes that ask for the same OUT at once (two runs started together on a fresh machine)
    take turns through a lock file, OUT/.build.lock: one builds, the others wait and then find the
    set ready, so no run reads files another is still writing."""
    out = Path(out)
    fmt = fmt or ("jpg" if ffcv_available() else "npy")
    want = {"n": n, "seed": seed, "size": size, "format": fmt}
    stamp = out / "phantom.json"

    def ready() -> bool:
        try:
            return json.loads(stamp.read_text()) == want and (out / "nih" / "meta.json").is_file() \
                and (out / "siim" / "meta.json").is_file()
        except (OSError, ValueError):
            return False

    if ready():
        return out
    with exclusive_lock(out / ".build.lock", f"waiting for another process that is building the phantom set in {out}"):
        if not ready():
            stamp.unlink(missing_ok=True)  # a build from here on is not the stamped one
            _build_phantom(out, n, seed, size, fmt, workers, quiet)
            atomic_write_text(stamp, json.dumps(want))
    return out


def _build_phantom(out: Path, n: int, seed: int, size: int, fmt: str, workers: Optional[int], quiet: bool) -> None:
    if fmt == "npy":
        from .phantom import write_phantom
        write_phantom(out / "raw", n=n, seed=seed, size=size, workers=workers)
        for name in ("nih", "siim"):
            prepare(name, out / "raw", out / name, size=size, fmt=fmt, workers=workers, seed=seed, progress=not quiet)
    else:
        import subprocess
        cmd = [sys.executable, "-m", "mlvicx_fast.data.prepare", "phantom", "--out", str(out), "--n", str(n),
               "--seed", str(seed), "--size", str(size), "--format", fmt] + (["--quiet"] if quiet else []) + \
              (["--workers", str(workers)] if workers else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])] +
                                                          [p for p in [os.environ.get("PYTHONPATH")] if p]))
        r = subprocess.run(cmd, capture_output=quiet, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"preparing the phantom set failed ({' '.join(cmd)}):\n{r.stderr if quiet else ''}")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
EPILOG = """\
what it reads (--root, as downloaded):
  nih     Data_Entry_2017_v2020.csv or Data_Entry_2017.csv, train_val_list.txt, test_list.txt,
          images*/**/*.png
  vinbig  train.csv (image_id, class_name, class_id, rad_id, ...), train/*.dicom
  rsna    stage_2_train_labels.csv (patientId, ..., Target), stage_2_train_images/*.dcm
  siim    train-rle.csv or stage_2_train.csv (ImageId, EncodedPixels), **/*.dcm
  phantom nothing: generates a synthetic set (NIH layout) under OUT/raw first
what it writes (--out):
  <split>.beton (--format jpg|raw) or <split>_images.npy + _labels.npy (--format npy),
  <split>_index.csv (row, image id, labels), meta.json (classes, sizes, counts), skipped.csv
  (files left out and why). phantom writes OUT/raw, OUT/nih and OUT/siim.
example:
  python -m mlvicx_fast.data.prepare nih --root ~/data/ChestX-ray14 --out ~/data/nih256 --workers 16
  python -m mlvicx_fast.data.prepare phantom --out ~/data/phantom --n 4000 --seed 0
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlvicx_fast.data.prepare",
        description="Decode a chest X-ray dataset (PNG or DICOM) to grayscale uint8, pad to a square, "
                    "resize, and write FFCV .beton files per split with labels (or masks).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=sorted(SCANNERS) + ["phantom"])
    p.add_argument("--root", help="the dataset folder as downloaded (not used by phantom)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--size", type=int, default=256, help="stored side length in pixels (default 256)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default=None,
                   help="jpg (default with FFCV), raw (uncompressed .beton, fastest to load), npy (no FFCV; default without it)")
    p.add_argument("--workers", type=int, default=None, help="decode/write processes (default min(8, cores))")
    p.add_argument("--strict", action="store_true", help="stop at the first missing or unreadable image")
    p.add_argument("--limit", type=int, default=None, help="at most N images per split (the first listed), for trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the val/test splits, the SIIM balancing, and the phantom")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="validation share (NIH: of train_val patients, default 0.1; VinBig/RSNA/SIIM 0.1)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="VinBig/RSNA/SIIM test share (default 0.2; NIH has its official test list)")
    p.add_argument("--csv", dest="csv_path", default=None, help="label file to use instead of the default name under --root")
    p.add_argument("--rle", choices=("auto", "relative", "absolute"), default=None,
                   help="SIIM: how EncodedPixels is encoded: relative offsets (train-rle.csv), absolute 1-based "
                        "positions (the standard Kaggle form, stage_2_train.csv), or auto (default: told apart "
                        "from the file, the form is written to meta.json)")
    p.add_argument("--mask-grid", type=int, default=None,
                   help="SIIM: decode masks on an N x N grid, then give them the image's geometry (for downsized "
                        "copies of the 1024 x 1024 originals: --mask-grid 1024; default: the image's own size; "
                        "an image or grid smaller than the label file's masks stops the run)")
    p.add_argument("--n", type=int, default=2000, help="phantom: number of images (default 2000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    drop_numba_finalizer_errors()  # FFCV's writer compiles with numba too
    fmt = args.fmt or ("jpg" if ffcv_available() else "npy")
    common = dict(size=args.size, fmt=fmt, workers=args.workers, strict=args.strict, limit=args.limit,
                  seed=args.seed, progress=not args.quiet)
    try:
        if args.dataset == "phantom":
            from .phantom import write_phantom
            out = Path(args.out)
            raw = out / "raw"
            t0 = time.perf_counter()
            write_phantom(raw, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
            print(f"phantom: {args.n} images written to {raw} in {time.perf_counter() - t0:.1f} s")
            for name in ("nih", "siim"):
                s = prepare(name, raw, out / name, val_fraction=args.val_fraction, **common)
                print_summary(s, out / name)
            return 0
        if not args.root:
            print(f"prepare {args.dataset}: --root is required (the dataset folder as downloaded)", file=sys.stderr)
            return 2
        s = prepare(args.dataset, args.root, args.out, val_fraction=args.val_fraction,
                    test_fraction=args.test_fraction, csv_path=args.csv_path, rle=args.rle,
                    mask_grid=args.mask_grid, **common)
        print_summary(s, args.out)
        return 0
    except (LabelFileError, MissingDecoderError, MaskError, StrictError, FileNotFoundError, ValueError,
            RuntimeError) as e:
        print(f"prepare {args.dataset}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
