"""A synthetic chest X-ray set (the built-in default), written in the NIH ChestX-ray14 layout.

Each image is a frontal (PA) radiograph drawn in attenuation units, then exposed:

  body        a soft-tissue ellipse on black air, shoulders as two wider ellipses
  lungs       two dark fields with low-frequency vascular texture, cut below by the diaphragm domes
  mediastinum a bright vertical band (spine, trachea darker), heart an ellipse left of midline
  ribs        curved bright bands over each lung field (posterior ribs), clavicles
  exposure    random pose (shift, rotation, scale), noise, gamma, output window (never clipped)

Findings change the picture and set the labels (NIH names, each drawn independently):

  Nodule        one small round opacity in a lung (radius 2-3.5 % of the width), density varied
  Mass          one large, fainter opacity in a lung (radius 6-10 %), density varied
  Cardiomegaly  heart 1.25-1.55 times wider (normal hearts 0.9-1.08)
  Effusion      basal opacity with a meniscus in one or both lungs, costophrenic angle blunted
  Pneumothorax  a lucent rim at the apex/lateral edge of one lung: no vascular texture, darker,
                a thin visceral pleural line; its region is also written as a SIIM-style RLE mask
  Consolidation a patchy textured opacity filling part of one lower lung

Signal: a ridge-regression probe on the raw pixels (16 x 16 average-pooled, 768 training and 256
test images at 128 px) reaches AUC Nodule 0.58, Mass 0.83, Cardiomegaly 0.87, Effusion 0.90,
Pneumothorax 0.75, Consolidation 0.76: every finding is visible, none is a fixed template, so
features that are invariant to pose and exposure (what pretraining should learn) have room to help.

Everything is vectorised over batches of 64 images with torch; image i depends only on (seed, i).
Written files (root = the folder given):

  images_001/images/<id>.png       8-bit grayscale, id = '%08d_000.png' % patient (one image each)
  Data_Entry_2017_v2020.csv        the NIH columns; 'Finding Labels' '|'-separated or 'No Finding'
  train_val_list.txt, test_list.txt  a seeded 80/20 split of the patients
  train-rle.csv                    ImageId (id without .png), EncodedPixels: pneumothorax masks
"""
from __future__ import annotations

import csv
import math
import multiprocessing as mp
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import rle_encode

FINDINGS = ("Nodule", "Mass", "Cardiomegaly", "Effusion", "Pneumothorax", "Consolidation")
PREVALENCE = {"Nodule": 0.2, "Mass": 0.15, "Cardiomegaly": 0.2, "Effusion": 0.2, "Pneumothorax": 0.15,
              "Consolidation": 0.15}
BATCH = 64

__all__ = ["FINDINGS", "render_batch", "write_phantom"]


def _u(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _blob(x, y, cx, cy, rx, ry, edge=0.15):
    """Soft ellipse in [0, 1]: 1 inside, falling to 0 over a relative band `edge` at the border."""
    dx = (x - cx[:, None, None]) * (1.0 / rx)[:, None, None]
    dy = (y - cy[:, None, None]) * (1.0 / ry)[:, None, None]
    d = torch.sqrt(dx * dx + dy * dy)
    return ((1.0 + edge - d) / (2 * edge)).clamp(0.0, 1.0)


def _smooth_noise(g, n, size, cells):
    """Low-frequency noise in about [-1, 1]: a cells x cells random grid, bicubic upsampled."""
    grid = torch.randn(n, 1, cells, cells, generator=g)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def render_batch(seed: int, start: int, n: int, size: int = 256, force: Optional[Dict[str, bool]] = None):
    """Images start..start+n-1 (uint8 (n, size, size)), their labels {finding: bool (n,)}, and the
    pneumothorax masks (bool (n, size, size)). Deterministic in (seed, start) for start % 64 == 0.

    `force` sets findings on or off for every image (e.g. {'Mass': True}); all random draws happen
    whatever the labels, so a forced pair differs only by that finding."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(start))
    lab = {f: torch.rand(n, generator=g) < PREVALENCE[f] for f in FINDINGS}
    for f, on in (force or {}).items():
        if f not in FINDINGS:
            raise ValueError(f"phantom: unknown finding {f!r}; expected one of {FINDINGS}")
        lab[f] = torch.full((n,), bool(on))
    # pose: coordinates in [-1, 1], rotated, shifted and scaled per image
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    ang = _u(g, n, -0.14, 0.14)[:, None, None]
    sc = _u(g, n, 0.82, 1.18)[:, None, None]
    tx, ty = _u(g, n, -0.14, 0.14)[:, None, None], _u(g, n, -0.14, 0.14)[:, None, None]
    x = (torch.cos(ang) * xx - torch.sin(ang) * yy) / sc + tx
    y = (torch.sin(ang) * xx + torch.cos(ang) * yy) / sc + ty
    one = torch.ones(n)

    # body, shoulders, neck
    att = 0.05 + 0.40 * _blob(x, y, 0 * one, 0.15 * one, _u(g, n, 0.78, 0.9), 1.05 * one, 0.08)
    att = att + 0.30 * _blob(x, y, 0 * one, -0.95 * one, 0.95 * one, 0.3 * one, 0.3)
    att = att.clamp(max=0.5)
    # lungs: dark fields with vascular texture; the diaphragm domes cut them from below
    lw, lh = _u(g, n, 0.28, 0.34), _u(g, n, 0.6, 0.7)
    lcy = _u(g, n, -0.1, 0.0)
    lungs, lung_parts = 0.0, []
    for side in (-1.0, 1.0):
        cx = side * _u(g, n, 0.36, 0.42)
        part = _blob(x, y, cx, lcy, lw, lh, 0.12)
        dome_y = (lcy + lh * _u(g, n, 0.7, 0.8))[:, None, None] + 0.25 * ((x - cx[:, None, None]) ** 2)
        part = part * ((dome_y - y) / 0.04).clamp(0, 1)
        lung_parts.append((part, cx))
        lungs = lungs + part
    lungs = lungs.clamp(max=1.0)
    vessels = 0.5 + 0.5 * _smooth_noise(g, n, size, 24)
    vessels = vessels * (1.2 - (x.abs() / 0.85).clamp(0, 1))  # markings fade towards the periphery
    lung_att = 0.16 + 0.07 * vessels
    # pneumothorax: one lung retracts from its apex/lateral border; the rim keeps no markings
    ptx_mask = torch.zeros(n, size, size, dtype=torch.bool)
    ptx = lab["Pneumothorax"]  # all draws happen for every batch; rendering only where present
    side = torch.where(torch.rand(n, generator=g) < 0.5, 0, 1)
    rim_w = _u(g, n, 0.06, 0.13)
    for s in (0, 1):
        part, cx = lung_parts[s]
        shrunk = _blob(x, y, cx + (-1.0 if s == 0 else 1.0) * rim_w * 0.2, lcy + rim_w * 0.6,
                       lw - rim_w, lh - rim_w * 1.6, 0.05)
        rim = (part > 0.5) & (shrunk < 0.5)
        sel = (ptx & (side == s))[:, None, None]
        ptx_mask |= rim & sel
    # visceral pleural line: the border of the retracted lung, thin and bright
    line = F.max_pool2d(ptx_mask.float()[:, None], 3, 1, 1)[:, 0] - ptx_mask.float()
    lung_att = torch.where(ptx_mask, torch.full_like(lung_att, 0.07), lung_att) + 0.12 * line
    att = att * (1 - lungs) + lung_att * lungs
    # ribs: curved bands over the lung fields (posterior ribs) and the clavicles
    spacing = _u(g, n, 0.15, 0.19)[:, None, None]
    phase = _u(g, n, 0, 1)[:, None, None]
    ax = x.abs() - 0.35
    curve = y - 0.35 * ax * ax
    ribs = torch.cos(2 * math.pi * (curve / spacing + phase)).clamp(min=0)
    ribs = ribs * ribs * ribs
    att = att + 0.09 * ribs * (lungs + 0.3) * (y < 0.6)
    clav = torch.exp(-(((y + 0.62 + 0.18 * x.abs()) / 0.025) ** 2)) * (x.abs() < 0.6) * (x.abs() > 0.06)
    att = att + 0.15 * clav
    # mediastinum and spine
    att = att + 0.25 * torch.exp(-((x / _u(g, n, 0.09, 0.12)[:, None, None]) ** 2)) * (y > -0.9)
    att = att - 0.06 * torch.exp(-((x / 0.025) ** 2)) * (y < -0.3) * (y > -0.95)  # trachea
    # heart: ellipse left of midline (image right), wider with cardiomegaly
    hw = _u(g, n, 0.24, 0.29) * torch.where(lab["Cardiomegaly"], _u(g, n, 1.25, 1.55), _u(g, n, 0.9, 1.08))
    hcx = _u(g, n, 0.06, 0.12) + 0.35 * (hw - 0.26)
    heart = _blob(x, y, hcx, lcy + lh * _u(g, n, 0.5, 0.6), hw, _u(g, n, 0.2, 0.25), 0.1)
    att = att + 0.22 * heart
    # findings inside a lung: a random lung, a random point well inside it
    for name, (r_lo, r_hi), (d_lo, d_hi) in (("Nodule", (0.035, 0.07), (0.2, 0.4)), ("Mass", (0.12, 0.2), (0.1, 0.25))):
        has = lab[name]
        s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        cx = s * _u(g, n, 0.25, 0.5)
        cy = lcy + _u(g, n, -0.35, 0.25) * lh
        r = _u(g, n, r_lo, r_hi)
        ry = r * _u(g, n, 0.85, 1.15)
        dens = _u(g, n, d_lo, d_hi)
        i = has.nonzero()[:, 0]  # draw for every image (same stream), render only where present
        att[i] += dens[i, None, None] * _blob(x[i], y[i], cx[i], cy[i], r[i], ry[i], 0.3)
    eff = lab["Effusion"]
    both = torch.rand(n, generator=g) < 0.3
    first = torch.rand(n, generator=g) < 0.5
    level = (lcy + lh * _u(g, n, 0.15, 0.5))[:, None, None]
    fl_d = _u(g, n, 0.1, 0.25)[:, None, None]
    for s, (part, cx) in enumerate(lung_parts):
        i = (eff & (both | (first == (s == 0)))).nonzero()[:, 0]
        # meniscus: the fluid climbs laterally
        lat = ((x[i] - cx[i, None, None]) * (-1 if s == 0 else 1)).clamp(min=0)
        fluid = ((y[i] - (level[i] - 0.6 * lat * lat)) * (1 / 0.06)).clamp(0, 1) * part[i]
        att[i] += fl_d[i] * fluid
    con = lab["Consolidation"]
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cx, cy = s * _u(g, n, 0.3, 0.45), lcy + lh * _u(g, n, 0.1, 0.4)
    rx, ry = _u(g, n, 0.12, 0.18), _u(g, n, 0.15, 0.22)
    patch = (0.6 + 0.4 * _smooth_noise(g, n, size, 40)).clamp(0, 1)
    i = con.nonzero()[:, 0]
    att[i] += 0.25 * _blob(x[i], y[i], cx[i], cy[i], rx[i], ry[i], 0.5) * patch[i] * lungs[i]
    # detector noise: low-frequency mottle and per-pixel noise
    att = att + 0.02 * _smooth_noise(g, n, size, 64) + _u(g, n, 0.005, 0.02)[:, None, None] * torch.randn(
        n, size, size, generator=g)
    att = att.clamp(0, 1)
    # exposure: gamma, then a random output window [lo, hi] (no clipping, so no finding is lost)
    gamma = _u(g, n, 0.8, 1.25)[:, None, None]
    lo, hi = _u(g, n, 0.0, 0.12)[:, None, None], _u(g, n, 0.82, 1.0)[:, None, None]
    img = lo + (hi - lo) * att ** gamma
    img = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    labels = {f: v.numpy() for f, v in lab.items()}
    return img.numpy(), labels, ptx_mask.numpy()


def _one_thread():
    torch.set_num_threads(1)  # a pool worker: the workers share the cores


def _write_chunk(job):
    root, seed, start, n, size = job
    img, labels, masks = render_batch(seed, start, n, size)
    rows = []
    folder = Path(root) / "images_001" / "images"
    for j in range(n):
        pid = start + j + 1
        iid = f"{pid:08d}_000.png"
        Image.fromarray(img[j], mode="L").save(folder / iid, compress_level=1)
        found = [f for f in FINDINGS if labels[f][j]]
        rows.append((iid, "|".join(found) if found else "No Finding", pid, rle_encode(masks[j]) if labels["Pneumothorax"][j] else "-1"))
    return rows


def write_phantom(root, n: int = 2000, seed: int = 0, size: int = 256, workers: Optional[int] = None,
                  test_fraction: float = 0.2) -> Dict[str, int]:
    """Write `n` phantom images in the NIH layout under `root`; returns positives per finding."""
    if n < 2:
        raise ValueError(f"phantom: n must be at least 2, got {n}")
    if size < 32:
        raise ValueError(f"phantom: size must be at least 32, got {size}")
    root = Path(root)
    (root / "images_001" / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, s, min(BATCH, n - s), size) for s in range(0, n, BATCH)]
    workers = workers or min(8, mp.cpu_count())
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            chunks = pool.map(_write_chunk, jobs)
    else:
        chunks = [_write_chunk(j) for j in jobs]
    rows: List[tuple] = [r for c in chunks for r in c]
    rng = np.random.default_rng(seed)
    test = set(rng.choice(n, size=int(round(test_fraction * n)), replace=False).tolist())
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        for iid, fl, pid, _ in rows:
            w.writerow([iid, fl, 0, pid, 40 + pid % 40, "MF"[pid % 2], "PA", size, size, 0.143, 0.143])
    with open(root / "train_val_list.txt", "w") as f:
        f.writelines(r[0] + "\n" for i, r in enumerate(rows) if i not in test)
    with open(root / "test_list.txt", "w") as f:
        f.writelines(r[0] + "\n" for i, r in enumerate(rows) if i in test)
    with open(root / "train-rle.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", " EncodedPixels"])
        for iid, _, _, rle in rows:
            w.writerow([iid[:-4], rle])
    return {fd: sum(fd in r[1].split("|") for r in rows) for fd in FINDINGS}
