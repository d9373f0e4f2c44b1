r"""Two-view VICReg augmentation of a uint8 grayscale batch, fused: crop-resize, flip, brightness and
contrast jitter, Gaussian blur, solarize, normalise, written as bf16 channels_last.

For each image x (H x W, uint8) and each view v in {1, 2}, with per-sample parameters drawn by
`sample_params` from a seeded torch.Generator (DESIGN.md section 4, official VICReg recipe):

    crop      (y0, x0, h, w): RandomResizedCrop, area scale U(0.08, 1), log-ratio U(log 3/4, log 4/3),
              ten tries then the centre crop of clamped ratio (as torchvision)
    R         = clamp(bicubic_resize(x[y0:y0+h, x0:x0+w] / 255, size x size), 0, 1)
              (torch's bicubic, A = -0.75, align_corners=False, edge taps clamped to the crop)
    flip      R[:, ::-1] with p 0.5
    jitter    with p 0.8, brightness b ~ U(0.6, 1.4) and contrast c ~ U(0.6, 1.4) in random order:
                brightness  R = clamp(b R, 0, 1)
                contrast    R = clamp(c (R - m) + m, 0, 1),   m = mean of the crop's source pixels / 255,
                            times b when brightness came first (torchvision takes the mean of the
                            current image: the same unless brightness saturated pixels, or the
                            bicubic resize moved the mean slightly)
              saturation and hue are no-ops on gray; RandomGrayscale (p 0.2) is a no-op on gray
    blur      p 1.0 (view 1) / 0.1 (view 2): 23-tap Gaussian, sigma ~ U(0.1, 2.0), reflect padding,
                g_d = exp(-d^2 / (2 sigma^2)) / sum_{|d'|<=11} exp(-d'^2 / (2 sigma^2))
    solarize  p 0.0 (view 1) / 0.2 (view 2): R = 1 - R where R >= 128/255
    normalise out_c = (R - mean_c) / std_c, ImageNet mean/std, c = 0..C-1 (C = 3 replicates gray)

The paper also names rotation; the official code does not rotate, and neither do we.

Fused form (the Triton kernel): every step before the pointwise jitter is linear and separable,
and so is the blur after it, so one 32 x 32 output tile is

    tile = B_y  J( clamp(W_y S W_x^T) )  B_x^T

with S the window of source pixels the tile's halo reads (uint8; about 64 h/size + 5 rows by
64 w/size + 5 columns for a crop of h x w), W_y / W_x the bicubic weights of the tile's 64 rows /
columns including a 16-pixel halo on each side, J the pointwise jitter, and B_y / B_x (32 x 64)
the Gaussian taps with the reflection folded in (the identity when the view is not blurred). The
resize products run over 32 x 32 blocks of S with the weight blocks built as they are needed, so
the per-thread state stays small (sm_90: no register spills at 8 warps); then two blur products.
All on tensor cores, in TF32 on a GPU: the uint8 sources are exact, the weights keep 10 bits of
mantissa, so a pixel is off by the order of 1e-3 of its range. That is about a bf16 output's own
rounding, and also what a float32 output carries (the GPU test allows 3e-2 after normalisation);
the interpreter multiplies in IEEE float32. No intermediate image touches memory. The flip
mirrors the stored columns (everything after the crop is mirror-symmetric).

Inputs: x uint8 (N, H, W), or (N, H, W, C) / (N, C, H, W) whose channel 0 is used, any strides,
on CUDA (or CPU under TRITON_INTERPRET=1) for the kernel, anywhere for the torch backend.
Output: (view1, view2), each (N, C, size, size) in `out_dtype` (default bfloat16), channels_last
(or one view, for parameters of one view).

Backends: ``triton`` (the kernel), ``torch`` (the reference below: the same math per sample with
torch ops; the CPU path), ``auto`` (triton on CUDA tensors when Triton is installed, else torch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreting, require_triton, tl, triton

BACKENDS = ("auto", "triton", "torch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_RADIUS = 11  # kernel 23
TILE = 32
HALO = 64  # TILE + 2 * 16 >= TILE + 2 * BLUR_RADIUS
AUG_KC = 32  # source columns per block of the resize product (64 spills at 8 warps on sm_90)
# parameter columns (float32)
P_Y0, P_X0, P_H, P_W, P_FLIP, P_B, P_C, P_CFIRST, P_MEAN, P_SIGMA, P_SOLAR = range(11)
N_PARAMS = 12


@dataclass(frozen=True)
class Recipe:
    """Augmentation probabilities and ranges; defaults are the official VICReg two-view recipe."""

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_p: Tuple[float, float] = (1.0, 0.1)
    sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: Tuple[float, float] = (0.0, 0.2)
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD


VICREG = Recipe()
# downstream training: crop and flip only; evaluation: the whole image, nothing random
CROP_FLIP = Recipe(jitter_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


# --------------------------------------------------------------------------------------------
# parameters (torch, on the generator's device; shared by both backends)
# --------------------------------------------------------------------------------------------
def _rrc_boxes(n, H, W, recipe: Recipe, g) -> torch.Tensor:
    """RandomResizedCrop boxes (n, 4) int64 [y0, x0, h, w]: ten vectorised tries, then the fallback."""
    area = H * W
    tries = 10
    s = torch.empty(n, tries).uniform_(recipe.scale[0], recipe.scale[1], generator=g) * area
    lr = torch.empty(n, tries).uniform_(math.log(recipe.ratio[0]), math.log(recipe.ratio[1]), generator=g)
    ar = torch.exp(lr)
    w = torch.round(torch.sqrt(s * ar)).long()
    h = torch.round(torch.sqrt(s / ar)).long()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    u = torch.rand(n, tries, 2, generator=g)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long))
    rows = torch.arange(n)
    hh, ww = h[rows, first], w[rows, first]
    y0 = (u[rows, first, 0] * (H - hh + 1).float()).long().clamp(min=0)
    x0 = (u[rows, first, 1] * (W - ww + 1).float()).long().clamp(min=0)
    # fallback: centre crop with the ratio clamped to the range (torchvision)
    in_ratio = W / H
    if in_ratio < min(recipe.ratio):
        fw, fh = W, int(round(W / min(recipe.ratio)))
    elif in_ratio > max(recipe.ratio):
        fh, fw = H, int(round(H * max(recipe.ratio)))
    else:
        fw, fh = W, H
    bad = ~ok.any(1)
    hh = torch.where(bad, torch.full_like(hh, fh), hh)
    ww = torch.where(bad, torch.full_like(ww, fw), ww)
    y0 = torch.where(bad, torch.full_like(y0, (H - fh) // 2), y0)
    x0 = torch.where(bad, torch.full_like(x0, (W - fw) // 2), x0)
    return torch.stack([y0, x0, hh, ww], 1)


def sample_params(n: int, height: int, width: int, recipe: Recipe = VICREG,
                  generator: Optional[torch.Generator] = None, random_crop: bool = True) -> torch.Tensor:
    """Per-sample parameters of both views, float32 (2, n, N_PARAMS) on the CPU (without the crop
    means, which `crop_means` fills in on the images' device). The same generator state gives the
    same parameters."""
    g = generator if generator is not None else torch.default_generator
    p = torch.zeros(2, n, N_PARAMS)
    for v in range(2):
        if random_crop:
            box = _rrc_boxes(n, height, width, recipe, g).float()
        else:
            box = torch.tensor([0.0, 0.0, float(height), float(width)]).expand(n, 4)
        p[v, :, P_Y0:P_W + 1] = box
        p[v, :, P_FLIP] = (torch.rand(n, generator=g) < recipe.flip_p).float()
        jit = torch.rand(n, generator=g) < recipe.jitter_p
        b = torch.empty(n).uniform_(1 - recipe.brightness, 1 + recipe.brightness, generator=g)
        c = torch.empty(n).uniform_(1 - recipe.contrast, 1 + recipe.contrast, generator=g)
        p[v, :, P_B] = torch.where(jit, b, torch.ones(n))
        p[v, :, P_C] = torch.where(jit, c, torch.ones(n))
        p[v, :, P_CFIRST] = (torch.rand(n, generator=g) < 0.5).float()
        blur = torch.rand(n, generator=g) < recipe.blur_p[v]
        sig = torch.empty(n).uniform_(recipe.sigma[0], recipe.sigma[1], generator=g)
        p[v, :, P_SIGMA] = torch.where(blur, sig, torch.zeros(n))
        p[v, :, P_SOLAR] = (torch.rand(n, generator=g) < recipe.solarize_p[v]).float()
    return p


def crop_means(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Fill column P_MEAN with mean(x[n, crop]) / 255 for every view; returns a float32 copy of
    params on x's device. Exact integer sums at any image size: per-row prefix sums in int32 (a row
    sums to at most 255 W), then per crop the sum of its rows' spans in int64. (A full integral
    image needs int64, 8 bytes per pixel: ~2 GB per 256 images of 1024 x 1024; in int32 it wrapped
    past 8.4 M white pixels.) The parameters go to a GPU without waiting for its queue."""
    if x.is_cuda:
        p = params.to(torch.float32).pin_memory().to(x.device, non_blocking=True)
    else:
        p = params.to(device=x.device, dtype=torch.float32, copy=True)
    N, H, W = x.shape
    rows = torch.zeros(N, H, W + 1, dtype=torch.int32, device=x.device)
    rows[:, :, 1:] = x.cumsum(2, dtype=torch.int32)
    ys = torch.arange(H, device=x.device)
    for v in range(p.shape[0]):
        y0, x0 = p[v, :, P_Y0].long(), p[v, :, P_X0].long()
        y1, x1 = y0 + p[v, :, P_H].long(), x0 + p[v, :, P_W].long()
        span = rows.gather(2, x1.view(N, 1, 1).expand(N, H, 1)) - rows.gather(2, x0.view(N, 1, 1).expand(N, H, 1))
        inside = (ys >= y0[:, None]) & (ys < y1[:, None])
        s = (span.squeeze(2).long() * inside).sum(1).double()
        p[v, :, P_MEAN] = (s / (p[v, :, P_H].double() * p[v, :, P_W].double() * 255.0)).float()
    return p


# --------------------------------------------------------------------------------------------
# torch reference (and CPU path): the module docstring, step by step, one sample at a time
# --------------------------------------------------------------------------------------------
def _gaussian_1d(sigma: float, device) -> torch.Tensor:
    d = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=device, dtype=torch.float32)
    k = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return k / k.sum()


def augment_reference(x: torch.Tensor, params: torch.Tensor, size: int, channels: int = 3,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      out_dtype=torch.bfloat16) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op in plain torch for parameters (V, N, N_PARAMS) with the crop means filled in (see
    `crop_means`); returns V tensors."""
    N = x.shape[0]
    p = params.float().cpu()
    outs = []
    m = torch.tensor(mean[:channels], dtype=torch.float32, device=x.device).view(channels, 1, 1)
    s = torch.tensor(std[:channels], dtype=torch.float32, device=x.device).view(channels, 1, 1)
    for v in range(p.shape[0]):
        out = torch.empty(N, channels, size, size, dtype=out_dtype, device=x.device).contiguous(
            memory_format=torch.channels_last)
        for n in range(N):
            y0, x0, h, w = (int(p[v, n, k]) for k in (P_Y0, P_X0, P_H, P_W))
            crop = x[n, y0:y0 + h, x0:x0 + w].float()[None, None] / 255.0
            r = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
            b, c, mu = float(p[v, n, P_B]), float(p[v, n, P_C]), float(p[v, n, P_MEAN])
            if p[v, n, P_CFIRST] > 0:
                r = ((r - mu) * c + mu).clamp(0, 1)
                r = (r * b).clamp(0, 1)
            else:
                r = (r * b).clamp(0, 1)
                r = ((r - mu * b) * c + mu * b).clamp(0, 1)
            sigma = float(p[v, n, P_SIGMA])
            if sigma > 0:
                k = _gaussian_1d(sigma, x.device)
                r = F.pad(r, (BLUR_RADIUS,) * 4, mode="reflect")
                r = F.conv2d(r, k.view(1, 1, -1, 1))
                r = F.conv2d(r, k.view(1, 1, 1, -1))
            if p[v, n, P_SOLAR] > 0:
                r = torch.where(r >= 128.0 / 255.0, 1.0 - r, r)
            if p[v, n, P_FLIP] > 0:
                r = r.flip(-1)
            out[n] = ((r[0] - m) / s).to(out_dtype)
        outs.append(out)
    return tuple(outs)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _cubic(t):
        """Keys cubic convolution weight, A = -0.75 (torch's bicubic), for |t| in [0, 2)."""
        a = -0.75
        t = tl.abs(t)
        w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
        w2 = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
        return tl.where(t <= 1.0, w1, tl.where(t < 2.0, w2, 0.0))

    @triton.jit
    def _resize_weights(base, c0, clen, clen_i, size, KB: tl.constexpr, k0, win0, NH: tl.constexpr):
        """(NH, KB) bicubic weights: output positions base..base+NH-1 (outside [0, size) -> zero rows)
        against source indices win0+k0 .. win0+k0+KB-1, taps clamped to the crop [c0, c0+clen)."""
        q = base + tl.arange(0, NH)
        u = c0 + (q.to(tl.float32) + 0.5) * (clen / size) - 0.5
        i0 = tl.floor(u)
        t = u - i0
        src = win0 + k0 + tl.arange(0, KB)
        lo = c0
        hi = c0 + clen_i - 1
        w = tl.zeros([NH, KB], dtype=tl.float32)
        for tap in tl.static_range(4):
            idx = tl.minimum(tl.maximum(i0.to(tl.int32) + (tap - 1), lo), hi)
            wt = _cubic(t - (tap - 1))
            w += tl.where(idx[:, None] == src[None, :], wt[:, None], 0.0)
        valid = (q >= 0) & (q < size)
        return tl.where(valid[:, None], w, 0.0)

    @triton.jit
    def _blur_matrix(out0, base, sigma, size, TILE_: tl.constexpr, NH: tl.constexpr, RADIUS: tl.constexpr):
        """(TILE_, NH) Gaussian taps from halo positions base..base+NH-1 to outputs out0..out0+TILE_-1,
        reflect padding folded in; the identity when sigma == 0."""
        i = out0 + tl.arange(0, TILE_)
        q = base + tl.arange(0, NH)
        qv = (q >= 0) & (q < size)
        sg = tl.maximum(sigma, 1e-3)
        inv2s2 = 1.0 / (2.0 * sg * sg)
        dk = tl.arange(0, 32) - 16
        kk = tl.where(tl.abs(dk) <= RADIUS, tl.exp(-(dk * dk).to(tl.float32) * inv2s2), 0.0)
        norm = 1.0 / tl.sum(kk, axis=0)
        d1 = i[:, None] - q[None, :]
        d2 = i[:, None] + q[None, :]  # partner -q of q >= 1
        d3 = i[:, None] - (2 * (size - 1) - q[None, :])  # partner 2(size-1)-q of q <= size-2
        g1 = tl.where(tl.abs(d1) <= RADIUS, tl.exp(-(d1 * d1).to(tl.float32) * inv2s2), 0.0)
        g2 = tl.where((tl.abs(d2) <= RADIUS) & (q[None, :] >= 1), tl.exp(-(d2 * d2).to(tl.float32) * inv2s2), 0.0)
        g3 = tl.where((tl.abs(d3) <= RADIUS) & (q[None, :] <= size - 2), tl.exp(-(d3 * d3).to(tl.float32) * inv2s2), 0.0)
        blur = (g1 + g2 + g3) * norm
        ident = tl.where(d1 == 0, 1.0, 0.0)
        m = tl.where(sigma > 0.0, blur, ident)
        return tl.where(qv[None, :] & (i < size)[:, None], m, 0.0)

    @triton.jit
    def _augment_kernel(
        x_ptr, sxn, sxh, sxw,
        p_ptr, out_ptr, s_view, s_n, s_c, s_h, s_w,
        N, size,
        m0, m1, m2, is0, is1, is2,
        C: tl.constexpr, NP: tl.constexpr, KB: tl.constexpr, KC: tl.constexpr,
        TILE_: tl.constexpr, NH: tl.constexpr, RADIUS: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = tl.program_id(1)
        v = tl.program_id(2)
        n_tx = tl.cdiv(size, TILE_)
        ty = pid // n_tx
        tx = pid % n_tx
        p = p_ptr + (v * N + n) * NP
        y0 = tl.load(p + 0).to(tl.int32)
        x0 = tl.load(p + 1).to(tl.int32)
        ch = tl.load(p + 2)
        cw = tl.load(p + 3)
        flip = tl.load(p + 4)
        bright = tl.load(p + 5)
        contr = tl.load(p + 6)
        cfirst = tl.load(p + 7)
        mu = tl.load(p + 8)
        sigma = tl.load(p + 9)
        solar = tl.load(p + 10)
        chi = ch.to(tl.int32)
        cwi = cw.to(tl.int32)
        pad = (NH - TILE_) // 2
        by = ty * TILE_ - pad
        bx = tx * TILE_ - pad
        # first source row/col the halo needs (bicubic tap -1 of its first in-range position)
        qy = tl.maximum(by, 0)
        qx = tl.maximum(bx, 0)
        wy0 = tl.floor(y0 + (qy + 0.5) * (ch / size) - 0.5).to(tl.int32) - 1
        wx0 = tl.floor(x0 + (qx + 0.5) * (cw / size) - 0.5).to(tl.int32) - 1
        wy0 = tl.minimum(tl.maximum(wy0, y0), y0 + chi - 1)
        wx0 = tl.minimum(tl.maximum(wx0, x0), x0 + cwi - 1)
        # R = clamp(W_y S W_x^T) over this sample's source window: blocks of KB source rows x KC
        # source columns, the weight blocks built as needed (a whole window-wide W_x held in
        # registers spilled on sm_90: 255 registers and a 1.5 KB stack for a 128-pixel window)
        need_y = tl.ceil(NH * ch / size).to(tl.int32) + 6
        need_x = tl.ceil(NH * cw / size).to(tl.int32) + 6
        r = tl.zeros([NH, NH], dtype=tl.float32)
        xbase = x_ptr + n.to(tl.int64) * sxn
        for k0 in range(0, need_y, KB):
            rows = wy0 + k0 + tl.arange(0, KB)
            rmask = rows < y0 + chi
            t = tl.zeros([KB, NH], dtype=tl.float32)
            for j0 in range(0, need_x, KC):
                cols = wx0 + j0 + tl.arange(0, KC)
                m = rmask[:, None] & (cols < x0 + cwi)[None, :]
                s = tl.load(xbase + rows[:, None] * sxh + cols[None, :] * sxw, mask=m, other=0).to(tl.float32)
                wx = _resize_weights(bx, x0, cw, cwi, size, KC, j0, wx0, NH)  # (NH, KC)
                t = tl.dot(s, tl.trans(wx), t, input_precision=PREC)  # (KB, NH)
            wy = _resize_weights(by, y0, ch, chi, size, KB, k0, wy0, NH)  # (NH, KB)
            r = tl.dot(wy, t, r, input_precision=PREC)
        r = tl.minimum(tl.maximum(r * (1.0 / 255.0), 0.0), 1.0)
        # jitter (pointwise)
        c_first = cfirst > 0.0
        piv = tl.where(c_first, mu, mu * bright)
        r1 = tl.where(c_first, tl.minimum(tl.maximum((r - piv) * contr + piv, 0.0), 1.0),
                      tl.minimum(tl.maximum(r * bright, 0.0), 1.0))
        r2 = tl.where(c_first, tl.minimum(tl.maximum(r1 * bright, 0.0), 1.0),
                      tl.minimum(tl.maximum((r1 - piv) * contr + piv, 0.0), 1.0))
        # blur: B_y R B_x^T
        byt = _blur_matrix(ty * TILE_, by, sigma, size, TILE_, NH, RADIUS)  # (TILE, NH)
        bxt = _blur_matrix(tx * TILE_, bx, sigma, size, TILE_, NH, RADIUS)
        o = tl.dot(byt, tl.dot(r2, tl.trans(bxt), input_precision=PREC), input_precision=PREC)
        o = tl.where(o >= 128.0 / 255.0, o + solar * (1.0 - 2.0 * o), o)  # solar is 0.0 or 1.0
        oy = ty * TILE_ + tl.arange(0, TILE_)
        ox = tx * TILE_ + tl.arange(0, TILE_)
        ox_st = tl.where(flip > 0.0, size - 1 - ox, ox)
        om = (oy < size)[:, None] & (ox < size)[None, :]
        dst = out_ptr + v.to(tl.int64) * s_view + n.to(tl.int64) * s_n + oy[:, None] * s_h + ox_st[None, :] * s_w
        for c in tl.static_range(C):
            if c == 0:
                val = (o - m0) * is0
            elif c == 1:
                val = (o - m1) * is1
            else:
                val = (o - m2) * is2
            tl.store(dst + c * s_c, val.to(out_ptr.dtype.element_ty), mask=om)


def _augment_triton(x, p, size, channels, mean, std, out_dtype):
    N = x.shape[0]
    views = p.shape[0]
    out = torch.empty(views, N, size, size, channels, dtype=out_dtype, device=x.device).permute(0, 1, 4, 2, 3)
    n_t = triton.cdiv(size, TILE)
    mean = list(mean) + [0.0] * (3 - len(mean))
    istd = [1.0 / s for s in std] + [1.0] * (3 - len(std))
    prec = "ieee" if interpreting() else "tf32"
    _augment_kernel[(n_t * n_t, N, views)](
        x, *x.stride(), p.contiguous(), out, *out.stride(), N, size, *mean[:3], *istd[:3],
        C=channels, NP=N_PARAMS, KB=32, KC=AUG_KC,
        TILE_=TILE, NH=HALO, RADIUS=BLUR_RADIUS, PREC=prec, num_warps=8,
    )
    return tuple(out[v] for v in range(views))


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def as_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) view of a uint8 batch given as (N, H, W), (N, H, W, C) or (N, C, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"augment: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"augment: x must be uint8 (as decoded), got {x.dtype}")
    if x.dim() == 3:
        return x
    if x.dim() == 4 and x.shape[-1] in (1, 3, 4):
        return x[..., 0]
    if x.dim() == 4 and x.shape[1] in (1, 3):
        return x[:, 0]
    raise ValueError(f"augment: x must be (N, H, W), (N, H, W, C) or (N, C, H, W) uint8, got shape {tuple(x.shape)}")


def augment_with_params(x: torch.Tensor, params: torch.Tensor, size: int = 224, channels: int = 3,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                        out_dtype=torch.bfloat16, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The views for given parameters (V, N, N_PARAMS), V = 2 (both views) or 1 (one view, e.g.
    downstream training): a tuple of V tensors. Crop means are recomputed here."""
    x = as_gray(x)
    N, H, W = x.shape
    if params.dim() != 3 or params.shape[0] not in (1, 2) or params.shape[1:] != (N, N_PARAMS):
        raise ValueError(f"augment: params must have shape (2, {N}, {N_PARAMS}) or (1, {N}, {N_PARAMS}), "
                         f"got {tuple(params.shape)}")
    if not 1 <= channels <= 3:
        raise ValueError(f"augment: channels must be 1, 2 or 3, got {channels}")
    if size <= BLUR_RADIUS + 1:
        raise ValueError(f"augment: size must be > {BLUR_RADIUS + 1} (the blur reflects at the border), got {size}")
    if len(mean) < channels or len(std) < channels:
        raise ValueError(f"augment: mean/std need {channels} values, got {len(mean)} and {len(std)}")
    box = params[..., P_Y0:P_W + 1]
    if (box[..., 2] < 1).any() or (box[..., 3] < 1).any() or (box[..., 0] + box[..., 2] > H).any() \
            or (box[..., 1] + box[..., 3] > W).any() or (box[..., :2] < 0).any():
        raise ValueError(f"augment: a crop box lies outside the {H}x{W} images")
    if backend not in BACKENDS:
        raise ValueError(f"augment: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and HAS_TRITON else "torch"
    p = crop_means(x, params)
    if backend == "triton":
        require_triton("augment", x)
        return _augment_triton(x, p, size, channels, mean, std, out_dtype)
    return augment_reference(x, p, size, channels, mean, std, out_dtype)


def two_view_augment(x: torch.Tensor, size: int = 224, generator: Optional[torch.Generator] = None,
                     recipe: Recipe = VICREG, channels: int = 3, out_dtype=torch.bfloat16,
                     backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views (DESIGN.md section 4) of a uint8 batch; parameters from `generator`
    (a CPU torch.Generator; the same seed gives the same views). Returns two (N, C, size, size)
    tensors in `out_dtype`, channels_last, on x's device."""
    g = as_gray(x)
    params = sample_params(g.shape[0], g.shape[1], g.shape[2], recipe, generator)
    return augment_with_params(g, params, size, channels, recipe.mean, recipe.std, out_dtype, backend)


def eval_transform(x: torch.Tensor, size: int = 224, channels: int = 3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   out_dtype=torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """Whole image resized to size x size and normalised (no randomness): (N, C, size, size)."""
    g = as_gray(x)
    params = sample_params(g.shape[0], g.shape[1], g.shape[2], CROP_FLIP, torch.Generator().manual_seed(0),
                           random_crop=False)
    params[..., P_FLIP] = 0.0
    return augment_with_params(g, params[:1], size, channels, mean, std, out_dtype, backend)[0]
