r"""VICReg loss (invariance, variance, covariance) through the small Gram matrix.

For embeddings Z, Z' of shape (b, r), b >= 2 samples and r >= 1 features (official VICReg,
facebookresearch/vicreg ``main_vicreg.py``, which MLVICX follows)::

    inv(Z, Z') = 1/(b r) * sum_ij (Z_ij - Z'_ij)^2                         (F.mse_loss)
    Zc         = Z - mean_rows(Z),   v_j = sum_i Zc_ij^2 / (b - 1)          (unbiased variance)
    var(Z)     = 1/r * sum_j relu(1 - sqrt(v_j + eps))
    cov(Z)     = 1/r * sum_{l != q} C_lq^2,   C = Zc^T Zc / (b - 1)          (r x r)
    L          = sim * inv + std * (var(Z) + var(Z')) / 2 + cov_c * (cov(Z) + cov(Z'))

Exact reformulation used here (no r x r matrix when b <= r): with G = Zc Zc^T (b x b),
``||C||_F^2 = ||G||_F^2 / (b-1)^2`` and ``sum_l C_ll^2 = sum_j v_j^2``, so

    cov(Z) = (||G||_F^2 / (b-1)^2 - sum_j v_j^2) / r
    d cov / dZ = 4 / (r (b-1)) * (G Zc / (b-1) - Zc diag(v))
    d var / dZ = -1 / (r (b-1)) * Zc * [sqrt(v + eps) < 1] / sqrt(v + eps)     (per view, before /2)
    d inv / dZ = 2 (Z - Z') / (b r),   d inv / dZ' = -d inv / dZ

Both gradient terms of cov already have zero column mean, so centring adds nothing to them.
When b > r the r x r form is cheaper and is used instead:
``cov = sum_{l != q} C_lq^2 / r`` and ``d cov / dZ = 4 / (r (b-1)) * Zc (C - diag C)``.

The Gram form subtracts the diagonal energy D = sum_j v_j^2 from ||G||^2/(b-1)^2; everything is
accumulated in float32, so its absolute error is about 1e-7 * D even when the embeddings are
nearly decorrelated (the off-diagonal part then is a tiny remainder of two large numbers).

Inputs: two 2-D tensors of equal shape and floating dtype (float32, bfloat16, float16), any
strides. Statistics accumulate in float32; gradients are returned in the input dtype. They are
computed in the forward pass at dL/dloss = 1 and rounded to that dtype there, then scaled in
backward: with float16 inputs under a GradScaler, elements below float16's normal range (2^-14)
lose precision before the scale reaches them. Give float32 embeddings (``z.float()``, as the
training loop does) where that matters.
NaN or Inf anywhere in the inputs gives a NaN loss (never a silent zero).

Backends:
  ``triton``    the fused kernels below: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  ``torch``     the same Gram formulation in plain torch ops (the CPU path, or no Triton)
  ``reference`` the official formula, autograd through an r x r covariance (for tests)
  ``auto``      triton on CUDA tensors when Triton is installed, torch otherwise
The forward pass computes the gradients too (the loss is a scalar), so backward is one scale.

Triton launches: when b <= min(r, 128) (64 before Hopper; the usual SSL case, e.g. 64 x 2048) two
launches do everything. Programs that each hold every row of a column chunk centre it exactly and
add its Zc Zc^T to a partial b x b tile; the second launch sums those tiles in every program (they
are small and sit in L2), writes the gradient of its columns, and one extra program writes the
loss. Otherwise: column statistics, the tiled Gram matrix (split over K when it has few tiles, then
a reduction), the gradient tiles and a one-program finalize.

Products of float32 tiles (see ``_triton.fp32_dot_precision``): 'tf32x3' by default; on the tiled
path a GPU autotuner may pick 'fp16x3' instead, where each operand X is scaled by a power of two
s (from the bounds |Zc| <= sqrt((b-1) max_j v_j), |G_ij|/(b-1) <= r max_j v_j, |C_lq| <= max_j v_j)
into float16's range, split as sX = hi + lo in float16, and sX sY = hi_x hi_y + hi_x lo_y +
lo_x hi_y (+ a dropped lo_x lo_y): 22 significant bits per operand, like 'tf32x3', on float16
tensor cores at twice the TF32 rate.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, fp32_dot_precision, interpreting, require_triton, tl, triton

BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mma(a, b, acc, PREC: tl.constexpr):
        """acc + a @ b for float32 tiles. PREC 'fp16x3' (operands already scaled into float16's
        range by the caller, see _fp16_scale): a = a_hi + a_lo, b = b_hi + b_lo in float16 and
        acc + a_hi b_lo + a_lo b_hi + a_hi b_hi, the small products first, each exact in float32.
        Otherwise tl.dot with input_precision=PREC."""
        if PREC == "fp16x3":
            a_hi = a.to(tl.float16)
            b_hi = b.to(tl.float16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.float16)
            b_lo = (b - b_hi.to(tl.float32)).to(tl.float16)
            acc = tl.dot(a_hi, b_lo, acc)
            acc = tl.dot(a_lo, b_hi, acc)
            acc = tl.dot(a_hi, b_hi, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
        return acc

    @triton.jit
    def _fp16_scale(bound):
        """Power of two s with bound * s <= 2^14 (1 when bound is 0, Inf or NaN): scaled operands
        stay below float16's 65504 and their low parts stay normal down to 2^-17 of the bound.
        s is at most 2^63, so the product of two scales and its inverse stay finite and normal
        in float32 (an unbounded s overflowed for bounds below 2^-113, and Inf times a masked
        zero made the product NaN); below 2^-49 the low parts lose bits, on values too small
        to matter beside the variance term."""
        ok = (bound > 0.0) & (bound < 3.0e38)
        e = tl.ceil(tl.log2(tl.where(ok, bound, 1.0)))
        return tl.where(ok, tl.exp2(tl.minimum(14.0 - e, 63.0)), 1.0)

    @triton.jit
    def _max_var(stat_ptr, n_stat, view, BLOCK: tl.constexpr):
        """The largest column variance of one view, from the column-statistics partials."""
        offs = tl.arange(0, BLOCK)
        vmax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_stat, BLOCK):
            idx = start + offs
            vmax = tl.maximum(vmax, tl.load(stat_ptr + idx * 8 + 5 + view, mask=idx < n_stat, other=0.0))
        return tl.max(vmax, axis=0)


    @triton.jit
    def _stats_kernel(
        z1_ptr, z2_ptr, sb, sr,
        mean_ptr, var_ptr, part_ptr,
        b, r, eps,
        HAS_INV: tl.constexpr, NEED_STATS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Per column block: mean and unbiased variance of both views, and partial sums of
        (z1 - z2)^2, relu(1 - std) per view and v^2 per view (row `pid` of `part`, 8 floats)."""
        pid = tl.program_id(0)
        cols = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # int64: cols * sr may pass 2^31
        cmask = cols < r
        # sums are taken around the first row (shifted data), so that a constant column has
        # exactly its value as mean and exactly zero deviations
        shift1 = tl.load(z1_ptr + cols * sr, mask=cmask, other=0.0).to(tl.float32)
        shift2 = tl.load(z2_ptr + cols * sr, mask=cmask, other=0.0).to(tl.float32)
        sum1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        sum2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, b, BLOCK_B):
            rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
            m = (rows < b)[:, None] & cmask[None, :]
            x1 = tl.load(z1_ptr + rows[:, None] * sb + cols[None, :] * sr, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(z2_ptr + rows[:, None] * sb + cols[None, :] * sr, mask=m, other=0.0).to(tl.float32)
            sum1 += tl.sum(tl.where(m, x1 - shift1[None, :], 0.0), axis=0)
            sum2 += tl.sum(tl.where(m, x2 - shift2[None, :], 0.0), axis=0)
            if HAS_INV:
                d = x1 - x2
                sq += tl.sum(d * d, axis=0)
        part = part_ptr + pid * 8
        tl.store(part + 0, tl.sum(sq, axis=0))
        if not NEED_STATS:
            for slot in tl.static_range(1, 7):
                tl.store(part + slot, 0.0)
        else:
            mean1 = shift1 + sum1 / b
            mean2 = shift2 + sum2 / b
            ss1 = tl.zeros([BLOCK_R], dtype=tl.float32)
            ss2 = tl.zeros([BLOCK_R], dtype=tl.float32)
            for start in range(0, b, BLOCK_B):
                rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
                m = (rows < b)[:, None] & cmask[None, :]
                x1 = tl.load(z1_ptr + rows[:, None] * sb + cols[None, :] * sr, mask=m, other=0.0).to(tl.float32)
                x2 = tl.load(z2_ptr + rows[:, None] * sb + cols[None, :] * sr, mask=m, other=0.0).to(tl.float32)
                c1 = tl.where(m, x1 - mean1[None, :], 0.0)
                c2 = tl.where(m, x2 - mean2[None, :], 0.0)
                ss1 += tl.sum(c1 * c1, axis=0)
                ss2 += tl.sum(c2 * c2, axis=0)
            v1 = ss1 / (b - 1)
            v2 = ss2 / (b - 1)
            tl.store(mean_ptr + cols, mean1, mask=cmask)
            tl.store(mean_ptr + r + cols, mean2, mask=cmask)
            tl.store(var_ptr + cols, v1, mask=cmask)
            tl.store(var_ptr + r + cols, v2, mask=cmask)
            # relu written as where(h < 0, 0, h) so that a NaN passes through
            h1 = 1.0 - tl.sqrt(v1 + eps)
            h2 = 1.0 - tl.sqrt(v2 + eps)
            h1 = tl.where(cmask, tl.where(h1 < 0.0, 0.0, h1), 0.0)
            h2 = tl.where(cmask, tl.where(h2 < 0.0, 0.0, h2), 0.0)
            tl.store(part + 1, tl.sum(h1, axis=0))
            tl.store(part + 2, tl.sum(h2, axis=0))
            tl.store(part + 3, tl.sum(tl.where(cmask, v1 * v1, 0.0), axis=0))
            tl.store(part + 4, tl.sum(tl.where(cmask, v2 * v2, 0.0), axis=0))
            # largest variance per view: the fp16x3 products scale their operands by it
            tl.store(part + 5, tl.max(tl.where(cmask, v1, 0.0), axis=0))
            tl.store(part + 6, tl.max(tl.where(cmask, v2, 0.0), axis=0))

    @triton.jit
    def _gram_epilogue(acc, rm, rn, M, out_ptr, part, pid_m, pid_n, scale, TRANSPOSED: tl.constexpr):
        """Scale a finished tile (zero its diagonal in the r x r form), store it and its mirror, and
        write the sum of squares it adds to the Frobenius norm."""
        acc = acc * scale
        if TRANSPOSED:
            acc = tl.where(rm[:, None] == rn[None, :], 0.0, acc)
        omask = (rm < M)[:, None] & (rn < M)[None, :]
        tl.store(out_ptr + rm[:, None] * M + rn[None, :], acc, mask=omask)
        sq = tl.sum(tl.sum(tl.where(omask, acc * acc, 0.0), axis=1), axis=0)
        if pid_n != pid_m:
            tl.store(out_ptr + rn[None, :] * M + rm[:, None], acc, mask=omask)
            sq = sq * 2.0
        tl.store(part, sq)

    @triton.jit
    def _gram_kernel(
        z1_ptr, z2_ptr, sb, sr,
        mean_ptr, out_ptr, part_ptr, partial_ptr, stat_ptr, n_stat,
        b, r, scale, k_chunk, part_stride,
        TRANSPOSED: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr,
    ):
        """One BM x BM tile of X X^T * scale, X the centred input of one view.

        TRANSPOSED=False: X = Zc (b x r), reduction over r; out is the (b x b) matrix G/(b-1).
        TRANSPOSED=True:  X = Zc^T (r x r result), reduction over b; the diagonal is zeroed so out
        is C - diag(C). Only tiles with pid_n >= pid_m are computed and mirrored.
        program_id(2) = view * n_split + split. SPLIT=False: one program reduces all of K and
        finishes the tile (_gram_epilogue). SPLIT=True (few tiles, long K): each program reduces
        k_chunk of K into partial[view, split] and _gram_reduce_kernel finishes the tile.
        part[view * part_stride + tile] gets each tile's sum of squares (the buffer is zeroed, and
        sized for the smallest BM, so an autotuned BM leaves the unused slots at zero)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        n_split = tl.num_programs(2) // 2
        view = tl.program_id(2) // n_split
        split = tl.program_id(2) % n_split
        part = part_ptr + view * part_stride + pid_m * tl.num_programs(1) + pid_n
        if pid_n < pid_m:  # mirrored from the upper tile; its part slot stays zero
            return
        if view == 0:
            z_ptr = z1_ptr
        else:
            z_ptr = z2_ptr
        mean = mean_ptr + view * r
        if TRANSPOSED:
            M = r
            K = b
        else:
            M = b
            K = r
        k_begin = split * k_chunk
        k_end = tl.minimum(K, k_begin + k_chunk)
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid_n * BM + tl.arange(0, BM)).to(tl.int64)
        acc = tl.zeros([BM, BM], dtype=tl.float32)
        zs = 1.0
        if PREC == "fp16x3":  # |Zc| <= sqrt((b-1) max v): scale it into float16's range
            zs = _fp16_scale(tl.sqrt((b - 1) * _max_var(stat_ptr, n_stat, view, 128)))
        for k0 in range(k_begin, k_end, BK):
            rk = (k0 + tl.arange(0, BK)).to(tl.int64)
            if TRANSPOSED:
                # tiles Z[k, m] and Z[k, n]; centre by the column means of m and n
                ma = (rk < k_end)[:, None] & (rm < M)[None, :]
                mb = (rk < k_end)[:, None] & (rn < M)[None, :]
                a = tl.load(z_ptr + rk[:, None] * sb + rm[None, :] * sr, mask=ma, other=0.0).to(tl.float32)
                bt = tl.load(z_ptr + rk[:, None] * sb + rn[None, :] * sr, mask=mb, other=0.0).to(tl.float32)
                mu_m = tl.load(mean + rm, mask=rm < M, other=0.0)
                mu_n = tl.load(mean + rn, mask=rn < M, other=0.0)
                a = tl.where(ma, (a - mu_m[None, :]) * zs, 0.0)
                bt = tl.where(mb, (bt - mu_n[None, :]) * zs, 0.0)
                acc = _mma(tl.trans(a), bt, acc, PREC)
            else:
                # tiles Z[m, k] and Z[n, k]; centre by the column means of k
                ma = (rm < M)[:, None] & (rk < k_end)[None, :]
                mb = (rn < M)[:, None] & (rk < k_end)[None, :]
                a = tl.load(z_ptr + rm[:, None] * sb + rk[None, :] * sr, mask=ma, other=0.0).to(tl.float32)
                bt = tl.load(z_ptr + rn[:, None] * sb + rk[None, :] * sr, mask=mb, other=0.0).to(tl.float32)
                mu_k = tl.load(mean + rk, mask=rk < K, other=0.0)
                a = tl.where(ma, (a - mu_k[None, :]) * zs, 0.0)
                bt = tl.where(mb, (bt - mu_k[None, :]) * zs, 0.0)
                acc = _mma(a, tl.trans(bt), acc, PREC)
        if PREC == "fp16x3":
            acc = acc * (1.0 / (zs * zs))  # powers of two: exact
        if SPLIT:
            omask = (rm < M)[:, None] & (rn < M)[None, :]
            tile = partial_ptr + (view * n_split + split).to(tl.int64) * M * M
            tl.store(tile + rm[:, None] * M + rn[None, :], acc, mask=omask)
        else:
            _gram_epilogue(acc, rm, rn, M, out_ptr + view.to(tl.int64) * M * M, part, pid_m, pid_n, scale, TRANSPOSED)

    @triton.jit
    def _gram_reduce_kernel(
        partial_ptr, out_ptr, part_ptr, M, n_split, scale, part_stride,
        TRANSPOSED: tl.constexpr, BM: tl.constexpr,
    ):
        """Sum the n_split partial tiles of _gram_kernel (SPLIT=True) and finish the tile."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        view = tl.program_id(2)
        part = part_ptr + view * part_stride + pid_m * tl.num_programs(1) + pid_n
        if pid_n < pid_m:  # mirrored from the upper tile; its part slot stays zero
            return
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid_n * BM + tl.arange(0, BM)).to(tl.int64)
        omask = (rm < M)[:, None] & (rn < M)[None, :]
        acc = tl.zeros([BM, BM], dtype=tl.float32)
        for split in range(0, n_split):
            tile = partial_ptr + (view * n_split + split).to(tl.int64) * M * M
            acc += tl.load(tile + rm[:, None] * M + rn[None, :], mask=omask, other=0.0)
        _gram_epilogue(acc, rm, rn, M, out_ptr + view.to(tl.int64) * M * M, part, pid_m, pid_n, scale, TRANSPOSED)

    @triton.jit
    def _view_ptrs(view, z1_ptr, z2_ptr, dz1_ptr, dz2_ptr):
        """(this view, the other view, this view's gradient) for view 0 or 1."""
        if view == 0:
            z_ptr = z1_ptr
            o_ptr = z2_ptr
            dz_ptr = dz1_ptr
        else:
            z_ptr = z2_ptr
            o_ptr = z1_ptr
            dz_ptr = dz2_ptr
        return z_ptr, o_ptr, dz_ptr

    @triton.jit
    def _grad_kernel(
        z1_ptr, z2_ptr, sb, sr,
        dz1_ptr, dz2_ptr, mean_ptr, var_ptr, gram_ptr, stat_ptr, n_stat,
        b, r, eps, c_inv, c_var, c_cov,
        HAS_INV: tl.constexpr, HAS_VAR: tl.constexpr, HAS_COV: tl.constexpr,
        TRANSPOSED: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        """One BM x BN tile of dL/dZ for view program_id(2) (dz buffers are contiguous b x r).

        c_inv = 2 sim / (b r), c_var = std / (2 r (b-1)), c_cov = 4 cov / (r (b-1))."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        view = tl.program_id(2)
        z_ptr, o_ptr, dz_ptr = _view_ptrs(view, z1_ptr, z2_ptr, dz1_ptr, dz2_ptr)
        mean = mean_ptr + view * r
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        mask = (rm < b)[:, None] & (rn < r)[None, :]
        mu_n = tl.load(mean + rn, mask=rn < r, other=0.0)
        v_n = tl.load(var_ptr + view * r + rn, mask=rn < r, other=0.0)
        # the covariance product first, so that only its accumulator is live across the K loop (the
        # tile's own values are loaded after it: with them live, 128-wide tiles spilled on sm_90)
        if HAS_COV:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            zs = 1.0  # fp16x3: power-of-two scales from bounds on |Zc| and |G|, |C| (see _fp16_scale)
            ms = 1.0
            if PREC == "fp16x3":
                vmax = _max_var(stat_ptr, n_stat, view, 128)
                zs = _fp16_scale(tl.sqrt((b - 1) * vmax))  # |Zc| <= sqrt((b-1) max v)
                if TRANSPOSED:
                    ms = _fp16_scale(vmax)  # |C_lq| <= max v
                else:
                    ms = _fp16_scale(r * vmax)  # |G_ij| / (b-1) <= r max v
            if TRANSPOSED:
                # acc = Zc[m, :] @ (C - diag C)[:, n], reduction over r
                cmat = gram_ptr + view.to(tl.int64) * r * r
                for k0 in range(0, r, BK):
                    rk = (k0 + tl.arange(0, BK)).to(tl.int64)
                    ma = (rm < b)[:, None] & (rk < r)[None, :]
                    a = tl.load(z_ptr + rm[:, None] * sb + rk[None, :] * sr, mask=ma, other=0.0).to(tl.float32)
                    mu_k = tl.load(mean + rk, mask=rk < r, other=0.0)
                    a = tl.where(ma, (a - mu_k[None, :]) * zs, 0.0)
                    mc = (rk < r)[:, None] & (rn < r)[None, :]
                    c = tl.load(cmat + rk[:, None] * r + rn[None, :], mask=mc, other=0.0) * ms
                    acc = _mma(a, c, acc, PREC)
            else:
                # acc = (G/(b-1))[m, :] @ Zc[:, n], reduction over b (- Zc[m, n] v[n] below)
                gmat = gram_ptr + view.to(tl.int64) * b * b
                for k0 in range(0, b, BK):
                    rk = (k0 + tl.arange(0, BK)).to(tl.int64)
                    ma = (rm < b)[:, None] & (rk < b)[None, :]
                    a = tl.load(gmat + rm[:, None] * b + rk[None, :], mask=ma, other=0.0) * ms
                    mz = (rk < b)[:, None] & (rn < r)[None, :]
                    zk = tl.load(z_ptr + rk[:, None] * sb + rn[None, :] * sr, mask=mz, other=0.0).to(tl.float32)
                    zk = tl.where(mz, (zk - mu_n[None, :]) * zs, 0.0)
                    acc = _mma(a, zk, acc, PREC)
            if PREC == "fp16x3":
                acc = acc * (1.0 / (zs * ms))
        x = tl.load(z_ptr + rm[:, None] * sb + rn[None, :] * sr, mask=mask, other=0.0).to(tl.float32)
        g = tl.zeros([BM, BN], dtype=tl.float32)
        if HAS_INV:
            y = tl.load(o_ptr + rm[:, None] * sb + rn[None, :] * sr, mask=mask, other=0.0).to(tl.float32)
            g += c_inv * (x - y)
        if HAS_VAR or HAS_COV:
            xc = x - mu_n[None, :]
            if HAS_VAR:
                std = tl.sqrt(v_n + eps)
                w = tl.where(1.0 - std > 0.0, 1.0 / std, 0.0)
                g -= c_var * xc * w[None, :]
            if HAS_COV:
                if not TRANSPOSED:
                    acc -= xc * v_n[None, :]
                g += c_cov * acc
        tl.store(dz_ptr + rm[:, None] * r + rn[None, :], g.to(dz_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_loss(out_ptr, inv, var, cov, sim, std_c, cov_c,
                    HAS_INV: tl.constexpr, HAS_VAR: tl.constexpr, HAS_COV: tl.constexpr):
        """out = [loss, inv, var, cov]; a term whose coefficient is zero adds nothing to the loss."""
        loss = 0.0
        if HAS_INV:
            loss += sim * inv
        if HAS_VAR:
            loss += std_c * var
        if HAS_COV:
            loss += cov_c * cov
        tl.store(out_ptr + 0, loss)
        tl.store(out_ptr + 1, inv)
        tl.store(out_ptr + 2, var)
        tl.store(out_ptr + 3, cov)

    @triton.jit
    def _finalize_kernel(
        stat_ptr, n_stat, gram_part_ptr, n_gram, out_ptr,
        b, r, sim, std_c, cov_c,
        HAS_INV: tl.constexpr, HAS_VAR: tl.constexpr, HAS_COV: tl.constexpr,
        SUB_DIAG: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Reduce the partial sums into out = [loss, inv, var, cov] (float32)."""
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([8, BLOCK], dtype=tl.float32)
        slot = tl.arange(0, 8)
        for start in range(0, n_stat, BLOCK):
            idx = start + offs
            m = (idx < n_stat)[None, :] & (slot < 5)[:, None]
            acc += tl.load(stat_ptr + idx[None, :] * 8 + slot[:, None], mask=m, other=0.0)
        s = tl.sum(acc, axis=1)
        inv_sum = tl.sum(tl.where(slot == 0, s, 0.0), axis=0)
        h_sum = tl.sum(tl.where((slot == 1) | (slot == 2), s, 0.0), axis=0)
        d1 = tl.sum(tl.where(slot == 3, s, 0.0), axis=0)
        d2 = tl.sum(tl.where(slot == 4, s, 0.0), axis=0)
        g1 = tl.zeros([BLOCK], dtype=tl.float32)
        g2 = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_COV:
            for start in range(0, n_gram, BLOCK):
                idx = start + offs
                m = idx < n_gram
                g1 += tl.load(gram_part_ptr + idx, mask=m, other=0.0)
                g2 += tl.load(gram_part_ptr + n_gram + idx, mask=m, other=0.0)
        f1 = tl.sum(g1, axis=0)
        f2 = tl.sum(g2, axis=0)
        if SUB_DIAG:
            f1 = f1 - d1
            f2 = f2 - d2
        inv = inv_sum / b / r
        var = h_sum / (2 * r)
        cov = (f1 + f2) / r
        _store_loss(out_ptr, inv, var, cov, sim, std_c, cov_c, HAS_INV, HAS_VAR, HAS_COV)

    # ----------------------------------------------------------------------------------------
    # Narrow path (b <= NARROW_MAX_B <= r): two launches in all. A program that holds every row
    # of a column block can centre it exactly, so the statistics and the Gram matrix are formed
    # in one pass over Z; the second launch reduces the partial Gram matrices, forms the
    # gradients and (one extra program) the loss. Workspace layout, float32:
    #   mean (2, r) | var (2, r) | stat partials
    #   (2, n_split, 4) = [sum (z1 - z2)^2, sum relu(1 - std), sum v^2, 0] | Gram partials
    #   (2, n_split, BM, BM), the rows beyond b zero.
    # ----------------------------------------------------------------------------------------
    @triton.jit
    def _narrow_stats_gram_kernel(
        z1_ptr, z2_ptr, sb, sr, ws_ptr,
        b, r, eps, chunk,
        HAS_INV: tl.constexpr, HAS_COV: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr,
    ):
        """Program (split, view): columns [split * chunk, (split + 1) * chunk) of one view, all
        rows. Writes their mean and variance, partial sums of the loss terms and the partial Gram
        matrix Zc[:, cols] Zc[:, cols]^T."""
        split = tl.program_id(0)
        view = tl.program_id(1)
        n_split = tl.num_programs(0)
        if view == 0:
            z_ptr = z1_ptr
        else:
            z_ptr = z2_ptr
        mean_ptr = ws_ptr + view * r
        var_ptr = ws_ptr + 2 * r + view * r
        spart = ws_ptr + 4 * r + (view * n_split + split) * 4
        gpart = ws_ptr + 4 * r + 8 * n_split + (view * n_split + split).to(tl.int64) * BM * BM
        rows = tl.arange(0, BM)
        rmask = rows < b
        row_off = rows.to(tl.int64)[:, None] * sb
        acc = tl.zeros([BM, BM], dtype=tl.float32)
        sq = tl.zeros([BK], dtype=tl.float32)
        hinge = tl.zeros([BK], dtype=tl.float32)
        vsq = tl.zeros([BK], dtype=tl.float32)
        k_begin = split * chunk
        for k0 in range(k_begin, tl.minimum(r, k_begin + chunk), BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < r
            m = rmask[:, None] & cmask[None, :]
            col_off = cols.to(tl.int64)[None, :] * sr
            x = tl.load(z_ptr + row_off + col_off, mask=m, other=0.0).to(tl.float32)
            # centre around the first row first: a constant column gives exactly zero deviations
            shift = tl.load(z_ptr + cols.to(tl.int64) * sr, mask=cmask, other=0.0).to(tl.float32)
            xs = tl.where(m, x - shift[None, :], 0.0)
            mu = tl.sum(xs, axis=0) / b
            xc = tl.where(m, xs - mu[None, :], 0.0)
            v = tl.sum(xc * xc, axis=0) / (b - 1)
            tl.store(mean_ptr + cols, shift + mu, mask=cmask)
            tl.store(var_ptr + cols, v, mask=cmask)
            h = 1.0 - tl.sqrt(v + eps)
            hinge += tl.where(cmask, tl.where(h < 0.0, 0.0, h), 0.0)  # relu that keeps NaN
            vsq += tl.where(cmask, v * v, 0.0)
            if HAS_INV:
                if view == 0:
                    y = tl.load(z2_ptr + row_off + col_off, mask=m, other=0.0).to(tl.float32)
                    d = x - y
                    sq += tl.sum(d * d, axis=0)
            if HAS_COV:
                acc = _mma(xc, tl.trans(xc), acc, PREC)
        tl.store(spart + 0, tl.sum(sq, axis=0))
        tl.store(spart + 1, tl.sum(hinge, axis=0))
        tl.store(spart + 2, tl.sum(vsq, axis=0))
        tl.store(spart + 3, 0.0)
        if HAS_COV:
            tl.store(gpart + rows[:, None] * BM + rows[None, :], acc)

    @triton.jit
    def _narrow_gram(ws_ptr, r, n_split, view, scale, BM: tl.constexpr):
        """The (BM x BM) matrix G / (b - 1) of one view, summed from its partial tiles."""
        rows = tl.arange(0, BM)
        gpart = ws_ptr + 4 * r + 8 * n_split + view * n_split * BM * BM  # small: no int64 needed
        tile = rows[:, None] * BM + rows[None, :]
        g = tl.zeros([BM, BM], dtype=tl.float32)
        for s in range(0, n_split):
            g += tl.load(gpart + s * BM * BM + tile)
        return g * scale

    @triton.jit
    def _narrow_grad_kernel(
        z1_ptr, z2_ptr, sb, sr, dz1_ptr, dz2_ptr, ws_ptr, out_ptr,
        b, r, n_split, n_col_blocks, eps, sim, std_c, cov_c,
        HAS_INV: tl.constexpr, HAS_VAR: tl.constexpr, HAS_COV: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    ):
        """Program (block, view), block < n_col_blocks: dL/dZ for BN columns of one view (dz
        buffers are contiguous b x r). Program (n_col_blocks, 0): out = [loss, inv, var, cov]."""
        pid = tl.program_id(0)
        view = tl.program_id(1)
        scale = 1.0 / (b - 1)
        if pid == n_col_blocks:
            if view == 0:
                # out = [loss, inv, var, cov] from the partial sums of both views
                slot = tl.arange(0, 4)
                s_idx = tl.arange(0, BS)
                stats = tl.zeros([BS, 4], dtype=tl.float32)
                spart = ws_ptr + 4 * r
                for s0 in range(0, 2 * n_split, BS):
                    idx = s0 + s_idx
                    vals = tl.load(spart + idx[:, None] * 4 + slot[None, :], mask=(idx < 2 * n_split)[:, None],
                                   other=0.0)
                    stats += vals
                tot = tl.sum(stats, axis=0)
                inv = tl.sum(tl.where(slot == 0, tot, 0.0), axis=0) / b / r
                var = tl.sum(tl.where(slot == 1, tot, 0.0), axis=0) / (2 * r)
                diag = tl.sum(tl.where(slot == 2, tot, 0.0), axis=0)
                cov = 0.0
                if HAS_COV:  # one view's Gram matrix at a time (two 128 x 128 tiles at once spilled)
                    g1 = _narrow_gram(ws_ptr, r, n_split, 0, scale, BM)
                    f1 = tl.sum(tl.sum(g1 * g1, axis=1), axis=0)
                    g2 = _narrow_gram(ws_ptr, r, n_split, 1, scale, BM)
                    f2 = tl.sum(tl.sum(g2 * g2, axis=1), axis=0)
                    cov = (f1 + f2 - diag) / r
                _store_loss(out_ptr, inv, var, cov, sim, std_c, cov_c, HAS_INV, HAS_VAR, HAS_COV)
            return
        z_ptr, o_ptr, dz_ptr = _view_ptrs(view, z1_ptr, z2_ptr, dz1_ptr, dz2_ptr)
        rows = tl.arange(0, BM)
        cols = pid * BN + tl.arange(0, BN)
        cmask = cols < r
        m = (rows < b)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * sb + cols.to(tl.int64)[None, :] * sr
        x = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        grad = tl.zeros([BM, BN], dtype=tl.float32)
        if HAS_INV:
            y = tl.load(o_ptr + offs, mask=m, other=0.0).to(tl.float32)
            grad += (2.0 * sim / (b * r)) * (x - y)
        if HAS_VAR or HAS_COV:
            mu = tl.load(ws_ptr + view * r + cols, mask=cmask, other=0.0)
            v = tl.load(ws_ptr + 2 * r + view * r + cols, mask=cmask, other=0.0)
            xc = tl.where(m, x - mu[None, :], 0.0)
            if HAS_VAR:
                sd = tl.sqrt(v + eps)
                w = tl.where(1.0 - sd > 0.0, 1.0 / sd, 0.0)
                grad -= (std_c / (2.0 * r * (b - 1))) * xc * w[None, :]
            if HAS_COV:
                g = _narrow_gram(ws_ptr, r, n_split, view, scale, BM)
                gz = _mma(g, xc, tl.zeros([BM, BN], dtype=tl.float32), PREC)
                grad += (4.0 * cov_c / (r * (b - 1))) * (gz - xc * v[None, :])
        out = rows.to(tl.int64)[:, None] * r + cols.to(tl.int64)[None, :]
        tl.store(dz_ptr + out, grad.to(dz_ptr.dtype.element_ty), mask=m)


    # On a GPU the two big products of the tiled path pick their tiles, and between 'tf32x3' and
    # 'fp16x3' (equally accurate, see fp32_dot_precision), by measurement once per shape: the first
    # call times each config with a short do_bench. The fixed config of _tile_sizes is among them, so
    # tuning cannot pick anything slower. Only the unsplit Gram launch is tuned: its BM decides
    # nothing outside the kernel. With a precision fixed by the user (MLVICX_FP32_DOT, or TF32
    # allowed in torch) only the tiles are tuned. MLVICX_AUTOTUNE=0 keeps the fixed tiles and
    # 'tf32x3' (bit-identical runs).
    # (benchmarks/compile_check.py: none of these spills registers on sm_90, in either precision)
    _GRAM_CONFIGS = [
        triton.Config({"BM": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BK": 32}, num_warps=8, num_stages=4),
        triton.Config({"BM": 128, "BK": 16}, num_warps=8, num_stages=4),
    ]
    _GRAD_CONFIGS = [
        triton.Config({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128, "BN": 64, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
    ]
    TUNED_PRECISIONS = ("tf32x3", "fp16x3")

    def _with_precisions(configs):
        return [triton.Config({**c.kwargs, "PREC": p}, num_warps=c.num_warps, num_stages=c.num_stages)
                for p in TUNED_PRECISIONS for c in configs]

    def _quick_bench(kernel_call, quantiles):
        import triton.testing

        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    def _tuner(configs, key, fn, reset=None):
        try:
            return triton.autotune(configs, key=key, do_bench=_quick_bench, reset_to_zero=reset)(fn)
        except TypeError:  # older Triton: no do_bench argument, the same short timing by warmup/rep
            return triton.autotune(configs, key=key, warmup=5, rep=20, reset_to_zero=reset)(fn)

    _GRAM_KEY = ["b", "r", "TRANSPOSED"]
    _GRAD_KEY = ["b", "r", "TRANSPOSED", "HAS_COV"]
    # [precision tuned too, precision given]
    # part_ptr is zeroed before each timed config and before the real launch: a config with larger
    # tiles writes fewer per-tile slots, and the finalize sums them all
    _gram_tuned = {True: _tuner(_with_precisions(_GRAM_CONFIGS), _GRAM_KEY, _gram_kernel, ["part_ptr"]),
                   False: _tuner(_GRAM_CONFIGS, _GRAM_KEY, _gram_kernel, ["part_ptr"])}
    _grad_tuned = {True: _tuner(_with_precisions(_GRAD_CONFIGS), _GRAD_KEY, _grad_kernel),
                   False: _tuner(_GRAD_CONFIGS, _GRAD_KEY, _grad_kernel)}


def _autotune() -> bool:
    """Tuned tiles on a GPU (the interpreter cannot time configs); MLVICX_AUTOTUNE=0 turns it off."""
    return not interpreting() and os.environ.get("MLVICX_AUTOTUNE", "1") != "0"

def _tile_sizes(b: int, r: int) -> Dict[str, int]:
    """Block sizes: GPU tiles for tensor cores; bigger, fewer programs in the interpreter."""
    if interpreting():
        return dict(stats_b=128, stats_r=64, gram_m=32, gram_k=128, grad_m=32, grad_n=64, grad_k=64, warps=4)
    return dict(stats_b=32, stats_r=64, gram_m=64, gram_k=32, grad_m=64, grad_n=64, grad_k=32, warps=4)


def _gram_split(tiles: int, k_dim: int, bk: int):
    """(k_chunk, n_split) for the Gram reduction: with few tiles (small b, or small r when b > r)
    one program per tile would walk all of K alone, so K is split until there are ~128 programs
    per view, each with at least 4 steps of BK; with many tiles, no split."""
    steps = triton.cdiv(k_dim, bk)
    n_split = max(1, min(32, 128 // tiles, steps // 4))
    k_chunk = triton.cdiv(steps, n_split) * bk
    return k_chunk, triton.cdiv(k_dim, k_chunk)


NARROW_MAX_B = 128  # b up to this (and b <= r) takes the two-launch path; its Gram matrix stays on chip
NARROW_MAX_B_SMALL = 64  # elsewhere: before sm_90 a 128-row tile spills (sm_86), and it needs
NARROW_128_SHARED_BYTES = 163840  # this much shared memory per block (_narrow_grad_kernel, BM=128; sm_86/90/120)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _cuda_shared_per_block(index: int) -> int:
    """Shared memory one block may opt in to (0 where torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0))


def _narrow_limit(device: torch.device) -> int:
    """The largest b of the narrow path on this device (see benchmarks/compile_check.py): 128 on
    sm_90 and later with the shared memory for it (H100/H200, B200); 64 before sm_90 and on the
    sm_120 cards (RTX 50xx: 99 KB per block)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _cuda_capability(index) < (9, 0) or _cuda_shared_per_block(index) < NARROW_128_SHARED_BYTES:
            return min(NARROW_MAX_B, NARROW_MAX_B_SMALL)
    return NARROW_MAX_B


@functools.lru_cache(maxsize=256)
def _narrow_config(b: int, r: int, interp: bool) -> Tuple[int, int, int, int, int, int, int]:
    """(BM, BK, chunk, n_split, BN, n_col_blocks, warps) of the narrow path.

    The first launch splits the r columns into n_split chunks of whole BK blocks, enough programs
    to spread the reduction while the partial Gram tiles (n_split * BM^2 floats a view) stay no
    larger than the input; the second launch has one program per BN columns, each summing the
    n_split partial tiles again (they sit in L2), and one more for the loss."""
    bm = max(16, 1 << (b - 1).bit_length())
    bk = 128 if interp else 32
    blocks = triton.cdiv(r, bk)
    want = 4 if interp else max(1, min(32, r // 128, r // bm))
    per = triton.cdiv(blocks, max(1, min(want, blocks)))
    chunk = per * bk
    bn = 128 if interp else (32 if bm > 64 else 64)  # sm_90: a 128-row G with 64 columns spilled
    warps = 4 if bm <= 64 else 8
    return bm, bk, chunk, triton.cdiv(r, chunk), bn, triton.cdiv(r, bn), warps


def _forward_narrow(z1, z2, sim, std, cov, eps, need_grad):
    """Two launches for b <= NARROW_MAX_B <= r (see _narrow_stats_gram_kernel)."""
    b, r = z1.shape
    has_inv, has_var, has_cov = sim != 0.0, std != 0.0, cov != 0.0
    bm, bk, chunk, n_split, bn, n_cb, warps = _narrow_config(b, r, interpreting())
    prec = fp32_dot_precision()
    if prec == "fp16x3":  # these shapes are bound by latency, not products: keep the unscaled path
        prec = "tf32x3" if not interpreting() else "ieee"
    if z1.stride() != z2.stride():  # the kernels address both views with one pair of strides
        z1, z2 = z1.contiguous(), z2.contiguous()
    sb, sr = z1.stride()
    ws = torch.empty(4 * r + 8 * n_split + (2 * n_split * bm * bm if has_cov else 0),
                     device=z1.device, dtype=torch.float32)
    _narrow_stats_gram_kernel[(n_split, 2)](
        z1, z2, sb, sr, ws, b, r, eps, chunk,
        HAS_INV=has_inv, HAS_COV=has_cov, PREC=prec, BM=bm, BK=bk, num_warps=warps,
    )
    if need_grad:
        dz1 = torch.empty((b, r), device=z1.device, dtype=z1.dtype)
        dz2 = torch.empty((b, r), device=z2.device, dtype=z2.dtype)
        grid = (n_cb + 1, 2)
    else:  # only the loss program (its index is n_col_blocks = 0)
        dz1, dz2 = z1.new_empty(0), z2.new_empty(0)  # outputs of a custom op may not alias
        grid, n_cb = (1, 1), 0
    out = torch.empty(4, device=z1.device, dtype=torch.float32)  # its own storage: a custom op's output
    _narrow_grad_kernel[grid](
        z1, z2, sb, sr, dz1, dz2, ws, out, b, r, n_split, n_cb, eps, sim, std, cov,
        HAS_INV=has_inv, HAS_VAR=has_var, HAS_COV=has_cov, PREC=prec, BM=bm, BN=bn, BS=64,
        num_warps=warps,
    )
    return out, dz1, dz2


def _forward_triton(z1, z2, sim, std, cov, eps, need_grad):
    b, r = z1.shape
    if b <= min(r, _narrow_limit(z1.device)):
        return _forward_narrow(z1, z2, sim, std, cov, eps, need_grad)
    dev = z1.device
    has_inv, has_var, has_cov = sim != 0.0, std != 0.0, cov != 0.0
    need_stats = has_var or has_cov
    transposed = b > r
    t = _tile_sizes(b, r)
    prec = fp32_dot_precision()
    # the autotuner may choose the precision too, unless the user fixed one (MLVICX_FP32_DOT, or
    # TF32 allowed in torch)
    tune_prec = prec == "tf32x3" and not os.environ.get("MLVICX_FP32_DOT")
    if z1.stride() != z2.stride():  # the kernels address both views with one pair of strides
        z1, z2 = z1.contiguous(), z2.contiguous()
        strides = (r, 1)
    else:
        strides = z1.stride()

    n_stat = triton.cdiv(r, t["stats_r"])
    mean = torch.empty(2, r, device=dev, dtype=torch.float32)
    var = torch.empty(2, r, device=dev, dtype=torch.float32)
    stat_part = torch.empty(n_stat, 8, device=dev, dtype=torch.float32)
    _stats_kernel[(n_stat,)](
        z1, z2, *strides, mean, var, stat_part, b, r, eps,
        HAS_INV=has_inv, NEED_STATS=need_stats,
        BLOCK_B=t["stats_b"], BLOCK_R=t["stats_r"], num_warps=t["warps"],
    )

    m_dim = r if transposed else b
    if has_cov:
        gm, gk = t["gram_m"], t["gram_k"]
        n_m = triton.cdiv(m_dim, gm)
        k_dim = b if transposed else r
        k_chunk, n_split = _gram_split(n_m * (n_m + 1) // 2, k_dim, gk)
        gram = torch.empty(2, m_dim, m_dim, device=dev, dtype=torch.float32)
        gram_part = torch.zeros(2, n_m * n_m, device=dev, dtype=torch.float32)
        partial = torch.empty(2, n_split, m_dim, m_dim, device=dev, dtype=torch.float32) if n_split > 1 else gram
        args = (z1, z2, *strides, mean, gram, gram_part, partial, stat_part, n_stat, b, r, 1.0 / (b - 1), k_chunk,
                n_m * n_m)
        if n_split == 1 and _autotune():
            prec_kw = {} if tune_prec else dict(PREC=prec)
            _gram_tuned[tune_prec][lambda meta: (triton.cdiv(m_dim, meta["BM"]), triton.cdiv(m_dim, meta["BM"]), 2)](
                *args, TRANSPOSED=transposed, SPLIT=False, **prec_kw,
            )
        else:
            _gram_kernel[(n_m, n_m, 2 * n_split)](
                *args, TRANSPOSED=transposed, SPLIT=n_split > 1, PREC=prec, BM=gm, BK=gk, num_warps=t["warps"],
            )
        if n_split > 1:
            _gram_reduce_kernel[(n_m, n_m, 2)](
                partial, gram, gram_part, m_dim, n_split, 1.0 / (b - 1), n_m * n_m,
                TRANSPOSED=transposed, BM=gm, num_warps=t["warps"],
            )
    else:
        gram = gram_part = stat_part  # placeholders, never read
    n_gram = gram_part.shape[1] if has_cov else 0

    if need_grad:
        dz1 = torch.empty((b, r), device=dev, dtype=z1.dtype)
        dz2 = torch.empty((b, r), device=dev, dtype=z2.dtype)
        args = (z1, z2, *strides, dz1, dz2, mean, var, gram, stat_part, n_stat, b, r, eps,
                2.0 * sim / (b * r), std / (2.0 * r * (b - 1)), 4.0 * cov / (r * (b - 1)))
        flags = dict(HAS_INV=has_inv, HAS_VAR=has_var, HAS_COV=has_cov, TRANSPOSED=transposed)
        if _autotune():
            prec_kw = {} if tune_prec else dict(PREC=prec)
            _grad_tuned[tune_prec][lambda meta: (triton.cdiv(b, meta["BM"]), triton.cdiv(r, meta["BN"]), 2)](
                *args, **flags, **prec_kw,
            )
        else:
            bm, bn = t["grad_m"], t["grad_n"]
            _grad_kernel[(triton.cdiv(b, bm), triton.cdiv(r, bn), 2)](
                *args, **flags, PREC=prec, BM=bm, BN=bn, BK=t["grad_k"], num_warps=t["warps"],
            )
    else:
        dz1, dz2 = z1.new_empty(0), z2.new_empty(0)  # outputs of a custom op may not alias

    out = torch.empty(4, device=dev, dtype=torch.float32)
    _finalize_kernel[(1,)](
        stat_part, n_stat, gram_part, n_gram, out, b, r, sim, std, cov,
        HAS_INV=has_inv, HAS_VAR=has_var, HAS_COV=has_cov, SUB_DIAG=not transposed, BLOCK=128,
    )
    return out, dz1, dz2


# --------------------------------------------------------------------------------------------
# Plain-torch Gram implementation (CPU, or no Triton): same math, float32 accumulation
# --------------------------------------------------------------------------------------------
def _forward_torch(z1, z2, sim, std, cov, eps, need_grad):
    b, r = z1.shape
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    x = (z1.to(acc), z2.to(acc))
    nan = torch.full((), math.nan, dtype=acc, device=z1.device)
    terms = {"inv": nan, "var": nan, "cov": nan}
    grads = [None, None]

    def add_grad(i, g):
        grads[i] = g if grads[i] is None else grads[i] + g

    if sim != 0.0:
        d = x[0] - x[1]
        terms["inv"] = d.square().sum() / (b * r)
        if need_grad:
            add_grad(0, d * (2.0 * sim / (b * r)))
            add_grad(1, d * (-2.0 * sim / (b * r)))
    if std != 0.0 or cov != 0.0:
        var_terms, cov_terms = [], []
        for i in range(2):
            xc = x[i] - x[i][0]  # centre around the first row first: a constant column gives exact zeros
            xc = xc - xc.mean(dim=0)
            v = xc.square().sum(dim=0) / (b - 1)
            if std != 0.0:
                s = torch.sqrt(v + eps)
                h = 1.0 - s
                var_terms.append(torch.where(h < 0, 0.0, h).mean())  # relu that keeps NaN
                if need_grad:
                    add_grad(i, xc * torch.where(h > 0, 1.0 / s, 0.0) * (-std / (2.0 * r * (b - 1))))
            if cov != 0.0:
                c_cov = 4.0 * cov / (r * (b - 1))
                if b <= r:  # Gram form, b x b
                    gram = (xc @ xc.T) / (b - 1)
                    cov_terms.append((gram.square().sum() - v.square().sum()) / r)
                    if need_grad:
                        add_grad(i, (gram @ xc - xc * v) * c_cov)
                else:  # r x r form without its diagonal
                    c = (xc.T @ xc) / (b - 1)
                    c.diagonal().zero_()
                    cov_terms.append(c.square().sum() / r)
                    if need_grad:
                        add_grad(i, (xc @ c) * c_cov)
        if var_terms:
            terms["var"] = (var_terms[0] + var_terms[1]) / 2
        if cov_terms:
            terms["cov"] = cov_terms[0] + cov_terms[1]
    loss = torch.zeros((), dtype=acc, device=z1.device)
    for coeff, key in ((sim, "inv"), (std, "var"), (cov, "cov")):
        if coeff != 0.0:
            loss = loss + coeff * terms[key]
    out = torch.stack([loss, terms["inv"], terms["var"], terms["cov"]])
    if not need_grad:
        return out, z1.new_empty(0), z2.new_empty(0)
    # contiguous, as the custom op's fake says (elementwise ops on a transposed z1 keep its strides)
    dz = [torch.zeros(z1.shape, dtype=z1.dtype, device=z1.device) if g is None
          else g.to(z1.dtype).contiguous() for g in grads]
    return out, dz[0], dz[1]


# --------------------------------------------------------------------------------------------
# The op: a torch custom op (opaque to torch.compile), gradients computed in forward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mlvicx_fast::vicreg_fwd", mutates_args=())
def _vicreg_fwd(
    z1: torch.Tensor, z2: torch.Tensor, sim: float, std: float, cov: float, eps: float,
    need_grad: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPLS[backend](z1, z2, sim, std, cov, eps, need_grad)


@_vicreg_fwd.register_fake
def _(z1, z2, sim, std, cov, eps, need_grad, backend):
    out = z1.new_empty(4, dtype=torch.float64 if z1.dtype == torch.float64 else torch.float32)
    shape = z1.shape if need_grad else (0,)
    return out, z1.new_empty(shape), z2.new_empty(shape)


def _setup_context(ctx, inputs, output):
    _, dz1, dz2 = output
    ctx.save_for_backward(dz1, dz2)
    ctx.need_grad = inputs[6]


def _backward(ctx, grad_out, _g1, _g2):
    if not ctx.need_grad:
        raise RuntimeError("vicreg_loss: the loss was computed without gradients (no input required grad)")
    # only the loss entry of the output is differentiable; the terms are for logging
    return (*_hand_over_grads(ctx, grad_out[0]), None, None, None, None, None, None)


def _hand_over_grads(ctx, g):
    """The gradients saved by the forward, scaled in place by g = dL/dloss and handed over: no
    second full-size buffer and no host sync (a CUDA graph can capture it). A second backward
    through the same forward is refused by autograd's version check on the saved tensors."""
    dz1, dz2 = ctx.saved_tensors
    return dz1.mul_(g), dz2.mul_(g)


_vicreg_fwd.register_autograd(_backward, setup_context=_setup_context)


_IMPLS = {"triton": _forward_triton, "torch": _forward_torch}


class _VICRegFunction(torch.autograd.Function):
    """The eager path: the same forward (gradients included) and in-place backward as the custom
    op. Returns (loss, [inv, var, cov]) with the terms non-differentiable, so backward receives
    dL/dloss as it is (no select / select_backward round trip through the 4-vector)."""

    @staticmethod
    def forward(ctx, z1, z2, sim, std, cov, eps, backend):
        out, dz1, dz2 = _IMPLS[backend](z1, z2, sim, std, cov, eps, True)
        ctx.save_for_backward(dz1, dz2)
        terms = out[1:]
        ctx.mark_non_differentiable(terms)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the terms
        # the loss as a tensor of its own: a view of out would refuse in-place changes
        # (loss /= accumulation_steps) as a view made inside a custom Function
        return out[0].clone(), terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        return (*_hand_over_grads(ctx, grad_loss), None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# Reference: the official formula (autograd through the r x r covariance)
# --------------------------------------------------------------------------------------------
def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_loss_reference(
    z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
    cov_coeff: float = 1.0, eps: float = 1e-4, return_terms: bool = False,
):
    """The official VICReg loss, written as in facebookresearch/vicreg (main_vicreg.py)."""
    check_inputs(z1, z2)
    b, r = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    x = z1 - z1.mean(dim=0)
    y = z2 - z2.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (b - 1)
    cov_y = (y.T @ y) / (b - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum() / r + _off_diagonal(cov_y).pow(2).sum() / r
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    if return_terms:
        return loss, {"inv": repr_loss.detach(), "var": std_loss.detach(), "cov": cov_loss.detach()}
    return loss


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def check_inputs(z1: torch.Tensor, z2: torch.Tensor) -> None:
    """Raise ValueError/TypeError naming what was received when z1, z2 are not a valid pair."""
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"vicreg_loss: {name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(
                f"vicreg_loss: {name} must be 2-D (batch, features), got shape {tuple(z.shape)}"
            )
        if z.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"vicreg_loss: {name} has dtype {z.dtype}; expected one of float32, bfloat16, "
                "float16 (or float64)"
            )
    if z1.shape != z2.shape:
        raise ValueError(
            f"vicreg_loss: z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.dtype != z2.dtype:
        raise TypeError(f"vicreg_loss: z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"vicreg_loss: z1 and z2 are on different devices ({z1.device} and {z2.device})")
    b, r = z1.shape
    if b < 2:
        raise ValueError(
            f"vicreg_loss: the batch must hold at least 2 samples (variance is unbiased), got shape {tuple(z1.shape)}"
        )
    if r < 1:
        raise ValueError(f"vicreg_loss: embeddings need at least 1 feature, got shape {tuple(z1.shape)}")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map backend='auto' to 'triton' (CUDA tensors and Triton installed) or 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"vicreg_loss: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        fp64 = any(t.dtype == torch.float64 for t in tensors)
        return "triton" if all(t.is_cuda for t in tensors) and HAS_TRITON and not fp64 else "torch"
    if backend == "triton":
        require_triton("vicreg_loss", *tensors)
        if any(t.dtype == torch.float64 for t in tensors):
            raise TypeError("vicreg_loss: backend='triton' takes float32, bfloat16 or float16, got float64")
    return backend


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    backend: str = "auto",
    return_terms: bool = False,
):
    """VICReg loss of two views, official value, fused forward and backward.

    Args:
        z1, z2: embeddings of the two views, shape (b, r) with b >= 2; float32, bfloat16 or
            float16 (float64 runs on the torch backend); any strides.
        sim_coeff, std_coeff, cov_coeff: weights of the invariance, variance and covariance terms
            (official 25, 25, 1). A zero weight skips that term's work.
        eps: added to the variance under the square root (official 1e-4).
        backend: 'auto', 'triton', 'torch' or 'reference' (see the module docstring).
        return_terms: also return a dict of the unweighted terms {'inv', 'var', 'cov'} (detached
            float32 scalars, from the same pass); a term whose weight is zero is not computed and
            is left out.

    Returns:
        The scalar loss (float32 on the fused backends, whatever the input dtype), or
        (loss, terms) with return_terms=True. NaN or Inf in the inputs gives a NaN loss.
    """
    check_inputs(z1, z2)
    if torch.is_autocast_enabled(z1.device.type):
        # a caller's autocast would run the torch backends' products in bfloat16/float16; the loss
        # keeps float32 accumulation (inputs keep their own dtype)
        with torch.autocast(z1.device.type, enabled=False):
            return vicreg_loss(z1, z2, sim_coeff, std_coeff, cov_coeff, eps, backend, return_terms)
    backend = resolve_backend(backend, z1, z2)
    sim, std, cov, eps = float(sim_coeff), float(std_coeff), float(cov_coeff), float(eps)
    if backend == "reference":
        loss, terms = vicreg_loss_reference(z1, z2, sim, std, cov, eps, return_terms=True)
        if return_terms:
            return loss, {k: v for (k, v), c in zip(terms.items(), (sim, std, cov)) if c != 0.0}
        return loss
    need_grad = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
    if torch.compiler.is_compiling():  # one opaque node for torch.compile
        out, _, _ = _vicreg_fwd(z1, z2, sim, std, cov, eps, need_grad, backend)
        loss, values = out[0], out[1:].detach()
    elif need_grad:  # eager: a plain autograd.Function costs far less host time than the custom op
        loss, values = _VICRegFunction.apply(z1, z2, sim, std, cov, eps, backend)
    else:
        out = _IMPLS[backend](z1, z2, sim, std, cov, eps, False)[0]
        loss, values = out[0], out[1:]
    if std == 0.0 and cov == 0.0:  # the invariance term alone makes an Inf input +Inf, not NaN;
        loss = loss + (loss - loss)  # Inf - Inf is NaN, a finite loss is unchanged (and so is its gradient)
    if not return_terms:
        return loss
    terms = {k: values[i] for i, (k, c) in enumerate((("inv", sim), ("var", std), ("cov", cov))) if c != 0.0}
    return loss, terms
