r"""Context-bottleneck block (CBAM style, no residual) of MLVICX, fused forward and backward.

For an input x of shape (N, C, H, W), pixels p = (h, w), P = H*W, weights
W1 (C/r, C, 1, 1), W2 (C, C/r, 1, 1) (``mlp.0`` and ``mlp.2``, no bias) and Ws (1, 2, 7, 7)
(``spatial``, no bias)::

    avg_c  = 1/P sum_p x_cp                 mx_c = max_p x_cp                    (per n, c)
    M(v)   = W2 relu(W1 v)                  a_c  = sigmoid(M(avg) + M(mx))_c     channel gate
    k_cp   = a_c x_cp
    mean_p = 1/C sum_c k_cp                 cmax_p = max_c k_cp                  (per n, p)
    s_p    = sigmoid(conv7x7([mean, cmax]; Ws, padding 3))                        spatial gate
    out_cp = s_p k_cp = s_p a_c x_cp

Backward, with g = dL/dout, dt = ds s (1 - s), e = dL/d[mean, cmax] = conv7x7^T(dt; Ws) and
``argmax`` the FIRST index of the maximum (torch's rule for ``torch.max(dim)`` and
``adaptive_max_pool2d``, which the official block uses; ties get the whole gradient at that one
index, not a share)::

    ds_p   = sum_c g_cp a_c x_cp
    dk_cp  = g_cp s_p + e_mean,p / C + [c = argmax_c k_.p] e_max,p
    da_c   = sum_p dk_cp x_cp
    du     = da a (1 - a),  h_v = W1 v,  dh_v = (W2^T du) [h_v > 0]        for v in (avg, mx)
    davg   = W1^T dh_avg,  dmx = W1^T dh_mx
    dW2    = sum_n du (relu(h_avg) + relu(h_mx))^T,  dW1 = sum_n dh_avg avg^T + dh_mx mx^T
    dWs    = sum_n correlation of [mean, cmax] with dt (the 7x7 conv's weight gradient)
    dx_cp  = a_c dk_cp + davg_c / P + [p = argmax_p x_c.] dmx_c

(M(avg) + M(mx) is computed as W2 (relu(h_avg) + relu(h_mx)): the same value, one product.)

Everything runs in Triton, nine launches in all; the only torch calls are the allocations
(``torch.empty``, two in forward and five in backward, one more of each in rare cases: pixel
splits on a GPU, a gradient whose strides differ from x's). Forward:

  1. spatial statistics per (n, channel block, pixel split): sum, max, first argmax of x
  2. channel gate, one program per n: finishes the split reductions (when the pixels were split),
     then the MLP and the sigmoid (float32 products, no tensor cores)
  3. channel statistics per (n, pixel block): mean_c and max_c (first argmax) of k = a x
  4. per (n, pixel block): the 7x7 conv of the pooled map and its sigmoid (s, kept for backward),
     then out = s a x over all channel blocks

Backward:

  1. per (n, pixel block): dt = ds s (1 - s) (complete), and the pixel block's partial sums of
     sum_p g s x per channel
  2. per (n, pixel block): e = conv7x7^T(dt) and the block's partial dWs (98 values)
  3. per (n, channel block, pixel split): partial sums of sum_p x (e_mean / C + [c = cmax] e_max)
  4. one program per n: da from the partial sums of 1 and 3, then du, dh, davg, dmx;
     one more program sums the partial dWs
  5. dx per (n, pixel block), one pass over g; in the same launch, programs of 32 x 32 tiles of
     dW1 and dW2 (products over n)

Every reduction has a fixed order (partial sums are finished by one program each, no atomics), so
results are deterministic. Bytes moved over the big tensor: forward reads x three times and
writes out once; backward reads (g, x), then x, then g, and writes dx once: nine passes in all,
the bandwidth floor of this block. Nothing of size (N, C, H, W) is saved for backward besides x
itself: the forward leaves one float32 ``state`` buffer of N (4 C + 2 C/r + 4 H W) values (spatial
sum, max and argmax, a, the MLP's hidden pre-activations, the pooled map, the channel argmax,
s; argmaxes are int32 bit patterns in that float32 buffer).

Inputs: x of any N, C, H, W >= 1, float32/bfloat16/float16, NCHW-contiguous or channels_last
(other strides are copied to NCHW first); accumulation is float32 and out/dx have x's dtype and
strides. Weight gradients are returned contiguous in the weights' dtype. NaN in x gives NaN in out.

Calls: eager calls that need gradients go through a plain ``torch.autograd.Function`` (little
host work); under torch.compile the same forward and backward run as two torch.library custom
ops (opaque nodes with fake implementations); calls without gradients run the forward directly.

Backends:
  ``triton``     the fused kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  ``torch``      the plain-torch reference below (autograd), written as the official block
  ``reference``  the same as ``torch``
  ``auto``       triton on CUDA tensors when Triton is installed (float64 stays on torch)
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton import HAS_TRITON, interpreting, require_triton, tl, triton

BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SPATIAL_KERNEL = 7


# --------------------------------------------------------------------------------------------
# Triton kernels. x is addressed as x[n, c, p] = x_ptr + n*sN + c*sC + p*sP (NCHW: sC = P,
# sP = 1; channels_last: sC = 1, sP = C); g, out and dx share x's strides. ``state`` is the
# forward's float32 buffer and ``bw`` the backward's scratch buffer; ``o_*`` are offsets into them
# (see _Plan). Argmax indices are stored as int32 bit patterns in those float32 buffers.
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _spatial_stats_kernel(
        x_ptr, sN, sC, sP, part_ptr, plane,
        C, P, split_len, S,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, channel block, pixel split): sum, max and first argmax of x over its pixels,
        to part[k * plane + (n * C + c) * S + split] for k = 0 (sum), 1 (max), 2 (argmax)."""
        n = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(2)
        cmask = c < C
        base = x_ptr + n.to(tl.int64) * sN + c.to(tl.int64)[:, None] * sC
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        p_begin = split * split_len
        best_i = tl.zeros([BLOCK_C], dtype=tl.int32) + p_begin
        for p0 in range(p_begin, p_begin + split_len, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = cmask[:, None] & (p < P)[None, :]
            v = tl.load(base + p.to(tl.int64)[None, :] * sP, mask=m, other=0.0).to(tl.float32)
            total += tl.sum(v, axis=1)
            vmax, varg = tl.max(tl.where(m, v, float("-inf")), axis=1, return_indices=True,
                                return_indices_tie_break_left=True)
            take = vmax > best  # strict: an equal value later keeps the earlier index
            best_i = tl.where(take, p0 + varg, best_i)
            best = tl.where(take, vmax, best)
        out = part_ptr + (n * C + c).to(tl.int64) * S + split
        tl.store(out, total, mask=cmask)
        tl.store(out + plane, best, mask=cmask)
        tl.store(out + 2 * plane, best_i.to(tl.float32, bitcast=True), mask=cmask)

    @triton.jit
    def _gate_kernel(
        state_ptr, part_ptr, plane, o_mx, o_pidx, o_a, o_h,
        w1_ptr, s1j, s1c, w2_ptr, s2c, s2j,
        N, C, HID, P, S,
        BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        """One program per n: finish the spatial statistics over the S pixel splits (when S > 1;
        with S == 1 kernel 1 wrote them in place), then h_v = W1 v for v = avg, mx and
        a = sigmoid(W2 (relu(h_avg) + relu(h_mx)))."""
        n = tl.program_id(0)
        row = n.to(tl.int64) * C
        if S > 1:  # splits are in pixel order: the first split reaching the maximum wins
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < C
                src = part_ptr + (row + c) * S
                total = tl.zeros([BLOCK_C], dtype=tl.float32)
                best = tl.full([BLOCK_C], float("-inf"), tl.float32)
                best_i = tl.zeros([BLOCK_C], dtype=tl.int32)
                for sp in range(0, S):
                    total += tl.load(src + sp, mask=cm, other=0.0)
                    vmax = tl.load(src + plane + sp, mask=cm, other=0.0)
                    vidx = tl.load(src + 2 * plane + sp, mask=cm, other=0.0).to(tl.int32, bitcast=True)
                    take = (vmax > best) | (sp == 0)
                    best_i = tl.where(take, vidx, best_i)
                    best = tl.where(take, vmax, best)
                tl.store(state_ptr + row + c, total, mask=cm)
                tl.store(state_ptr + o_mx + row + c, best, mask=cm)
                tl.store(state_ptr + o_pidx + row + c, best_i.to(tl.float32, bitcast=True), mask=cm)
            tl.debug_barrier()
        # hidden pre-activations h_avg, h_mx (HID each)
        h_row = state_ptr + o_h + n.to(tl.int64) * HID
        h_mx_off = N * HID
        for j0 in range(0, HID, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jm = j < HID
            acc_a = tl.zeros([BLOCK_J], dtype=tl.float32)
            acc_m = tl.zeros([BLOCK_J], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < C
                w = tl.load(w1_ptr + j[:, None] * s1j + c[None, :] * s1c,
                            mask=jm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                avg = tl.load(state_ptr + row + c, mask=cm, other=0.0) / P
                mx = tl.load(state_ptr + o_mx + row + c, mask=cm, other=0.0)
                acc_a += tl.sum(w * avg[None, :], axis=1)
                acc_m += tl.sum(w * mx[None, :], axis=1)
            tl.store(h_row + j, acc_a, mask=jm)
            tl.store(h_row + h_mx_off + j, acc_m, mask=jm)
        tl.debug_barrier()
        # a = sigmoid(W2 (relu(h_avg) + relu(h_mx)))
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for j0 in range(0, HID, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                jm = j < HID
                r = (tl.maximum(tl.load(h_row + j, mask=jm, other=0.0), 0.0)
                     + tl.maximum(tl.load(h_row + h_mx_off + j, mask=jm, other=0.0), 0.0))
                w = tl.load(w2_ptr + c[:, None] * s2c + j[None, :] * s2j,
                            mask=cm[:, None] & jm[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * r[None, :], axis=1)
            tl.store(state_ptr + o_a + row + c, tl.sigmoid(acc), mask=cm)

    @triton.jit
    def _channel_stats_kernel(
        x_ptr, sN, sC, sP, state_ptr, o_a, o_pool, o_cidx,
        C, P,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, pixel block): mean_c and max_c (with first argmax) of k = a_c x_cp, into the
        pooled map (N, 2, P) [mean, max] and the channel argmax (N, P)."""
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        base = x_ptr + n.to(tl.int64) * sN + p.to(tl.int64)[None, :] * sP
        a_row = state_ptr + o_a + n.to(tl.int64) * C
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_P], dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            m = cm[:, None] & pmask[None, :]
            v = tl.load(base + c.to(tl.int64)[:, None] * sC, mask=m, other=0.0).to(tl.float32)
            gate = tl.load(a_row + c, mask=cm, other=0.0)
            k = v * gate[:, None]
            total += tl.sum(k, axis=0)
            kmax, karg = tl.max(tl.where(m, k, float("-inf")), axis=0, return_indices=True,
                                return_indices_tie_break_left=True)
            take = kmax > best
            best_i = tl.where(take, c0 + karg, best_i)
            best = tl.where(take, kmax, best)
        pool_row = state_ptr + o_pool + n.to(tl.int64) * 2 * P
        tl.store(pool_row + p, total / C, mask=pmask)
        tl.store(pool_row + P + p, best, mask=pmask)
        tl.store(state_ptr + o_cidx + n.to(tl.int64) * P + p, best_i.to(tl.float32, bitcast=True), mask=pmask)

    @triton.jit
    def _apply_kernel(
        x_ptr, out_ptr, sN, sC, sP, state_ptr, o_a, o_pool, o_s,
        ws_ptr, sw_c, sw_h, sw_w,
        C, H, W,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, pixel block): s = sigmoid(conv7x7(pooled; Ws)) (stored), then out = s a x over
        every channel block. The conv takes BLOCK_T of its 2 K K taps per step as a 2-D gather."""
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        P = H * W
        pmask = p < P
        h = p // W
        w = p % W
        pool_row = state_ptr + o_pool + n.to(tl.int64) * 2 * P
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for t0 in range(0, 2 * K * K, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)  # tap t: weight channel t // K^2, row and column shift
            tm = t < 2 * K * K
            ci = t // (K * K)
            ky = (t % (K * K)) // K
            kx = t % K
            hh = h[None, :] + ky[:, None] - K // 2
            ww = w[None, :] + kx[:, None] - K // 2
            m = tm[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            v = tl.load(pool_row + ci[:, None] * P + hh * W + ww, mask=m, other=0.0)
            wt = tl.load(ws_ptr + ci * sw_c + ky * sw_h + kx * sw_w, mask=tm, other=0.0).to(tl.float32)
            acc += tl.sum(v * wt[:, None], axis=0)
        sg = tl.sigmoid(acc)
        tl.store(state_ptr + o_s + n.to(tl.int64) * P + p, sg, mask=pmask)
        base = n.to(tl.int64) * sN + p.to(tl.int64)[None, :] * sP
        a_row = state_ptr + o_a + n.to(tl.int64) * C
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            m = cm[:, None] & pmask[None, :]
            offs = base + c.to(tl.int64)[:, None] * sC
            v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            gate = tl.load(a_row + c, mask=cm, other=0.0)
            y = v * gate[:, None] * sg[None, :]
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_reduce_kernel(
        g_ptr, x_ptr, sN, sC, sP, state_ptr, o_a, o_s, bw_ptr, o_dapart,
        C, P, n_pblocks,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, pixel block): dt_p = ds_p s_p (1 - s_p) with ds_p = sum_c g a x (complete, at
        bw[n * P + p]), and the partial sums over this block's pixels of sum_p g s x for every
        channel, into bw[o_dapart + (n * n_pblocks + pixel block) * C + c]."""
        n = tl.program_id(0)
        pb = tl.program_id(1)
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        prow = n.to(tl.int64) * P + p
        sg = tl.load(state_ptr + o_s + prow, mask=pmask, other=0.0)
        base = n.to(tl.int64) * sN + p.to(tl.int64)[None, :] * sP
        a_row = state_ptr + o_a + n.to(tl.int64) * C
        part = bw_ptr + o_dapart + (n.to(tl.int64) * n_pblocks + pb) * C
        ds = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            m = cm[:, None] & pmask[None, :]
            offs = base + c.to(tl.int64)[:, None] * sC
            gx = (tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
                  * tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32))
            gate = tl.load(a_row + c, mask=cm, other=0.0)
            ds += tl.sum(gx * gate[:, None], axis=0)
            tl.store(part + c, tl.sum(gx * sg[None, :], axis=1), mask=cm)
        tl.store(bw_ptr + prow, ds * sg * (1.0 - sg), mask=pmask)

    @triton.jit
    def _spatial_bwd_kernel(
        state_ptr, o_pool, bw_ptr, o_e, o_dwspart,
        ws_ptr, sw_c, sw_h, sw_w,
        H, W, n_sblocks,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, pixel block): e = conv7x7^T(dt; Ws) for the block's pixels ([e_mean, e_max]
        at bw[o_e + n * 2P + ...]), and the block's share of dWs, the 2 K K sums over its pixels
        of dt_p pooled[ci, p + shift], into row n * n_sblocks + block of bw[o_dwspart]. Taps go
        BLOCK_T at a time as 2-D gathers (dt sits at bw[n * P + p])."""
        n = tl.program_id(0)
        sb = tl.program_id(1)
        p = sb * BLOCK_P + tl.arange(0, BLOCK_P)
        P = H * W
        pmask = p < P
        h = p // W
        w = p % W
        dt_row = bw_ptr + n.to(tl.int64) * P
        # e at p gathers dt from the output pixels p - shift that read p through each tap
        e_mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        e_max = tl.zeros([BLOCK_P], dtype=tl.float32)
        for t0 in range(0, K * K, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < K * K
            ky = t // K
            kx = t % K
            hh = h[None, :] - ky[:, None] + K // 2
            ww = w[None, :] - kx[:, None] + K // 2
            m = tm[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            v = tl.load(dt_row + hh * W + ww, mask=m, other=0.0)
            w_mean = tl.load(ws_ptr + ky * sw_h + kx * sw_w, mask=tm, other=0.0).to(tl.float32)
            w_max = tl.load(ws_ptr + sw_c + ky * sw_h + kx * sw_w, mask=tm, other=0.0).to(tl.float32)
            e_mean += tl.sum(v * w_mean[:, None], axis=0)
            e_max += tl.sum(v * w_max[:, None], axis=0)
        e_row = bw_ptr + o_e + n.to(tl.int64) * 2 * P
        tl.store(e_row + p, e_mean, mask=pmask)
        tl.store(e_row + P + p, e_max, mask=pmask)
        # dWs at tap t: sum over the block of dt_p times the pooled map at p + shift
        dt = tl.load(dt_row + p, mask=pmask, other=0.0)
        pool_row = state_ptr + o_pool + n.to(tl.int64) * 2 * P
        dst = bw_ptr + o_dwspart + (n.to(tl.int64) * n_sblocks + sb) * (2 * K * K)
        for t0 in range(0, 2 * K * K, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < 2 * K * K
            ci = t // (K * K)
            ky = (t % (K * K)) // K
            kx = t % K
            hh = h[None, :] + ky[:, None] - K // 2
            ww = w[None, :] + kx[:, None] - K // 2
            m = tm[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            v = tl.load(pool_row + ci[:, None] * P + hh * W + ww, mask=m, other=0.0)
            tl.store(dst + t, tl.sum(v * dt[None, :], axis=1), mask=tm)

    @triton.jit
    def _bwd_pooled_kernel(
        x_ptr, sN, sC, sP, state_ptr, o_cidx, bw_ptr, o_e, o_part,
        C, P, split_len, S,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, channel block, pixel split): sum_p x_cp (e_mean,p / C + [c = cidx_p] e_max,p),
        the part of da that flows back through the spatial gate's pooled map."""
        n = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(2)
        cmask = c < C
        base = x_ptr + n.to(tl.int64) * sN + c.to(tl.int64)[:, None] * sC
        erow = bw_ptr + o_e + n.to(tl.int64) * 2 * P
        irow = state_ptr + o_cidx + n.to(tl.int64) * P
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        p_begin = split * split_len
        for p0 in range(p_begin, p_begin + split_len, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < P
            m = cmask[:, None] & pm[None, :]
            e_mean = tl.load(erow + p, mask=pm, other=0.0)
            e_max = tl.load(erow + P + p, mask=pm, other=0.0)
            ci = tl.load(irow + p, mask=pm, other=0.0).to(tl.int32, bitcast=True)
            wgt = e_mean[None, :] / C + tl.where(ci[None, :] == c[:, None], e_max[None, :], 0.0)
            v = tl.load(base + p.to(tl.int64)[None, :] * sP, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(wgt * v, axis=1)
        tl.store(bw_ptr + o_part + (n * C + c).to(tl.int64) * S + split, acc, mask=cmask)

    @triton.jit
    def _gate_bwd_kernel(
        state_ptr, o_a, o_h, bw_ptr, o_dapart, o_part, o_du, o_dh, o_dpool, o_dwspart,
        w1_ptr, s1j, s1c, w2_ptr, s2c, s2j, dws_ptr,
        N, C, HID, n_pblocks, S, n_rows,
        BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
        TAPS: tl.constexpr,
    ):
        """Programs 0..N-1, one per n: da = (partial sums of backward kernels 1 and 3, summed in
        order), du = da a (1 - a), dh_v = (W2^T du) [h_v > 0], davg = W1^T dh_avg,
        dmx = W1^T dh_mx. Program N: dWs = the sum of the n_rows partial rows of kernel 2."""
        n = tl.program_id(0)
        if n == N:
            taps = tl.arange(0, BLOCK_T)
            tm = taps < TAPS
            acc = tl.zeros([BLOCK_T], dtype=tl.float32)
            for r0 in range(0, n_rows, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                tile = tl.load(bw_ptr + o_dwspart + r.to(tl.int64)[:, None] * TAPS + taps[None, :],
                               mask=(r < n_rows)[:, None] & tm[None, :], other=0.0)
                acc += tl.sum(tile, axis=0)
            tl.store(dws_ptr + taps, acc.to(dws_ptr.dtype.element_ty), mask=tm)
        else:
            row = n.to(tl.int64) * C
            # du = da a (1 - a)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < C
                da = tl.zeros([BLOCK_C], dtype=tl.float32)
                src = bw_ptr + o_dapart + n.to(tl.int64) * n_pblocks * C
                for r0 in range(0, n_pblocks, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    tile = tl.load(src + r[:, None] * C + c[None, :],
                                   mask=(r < n_pblocks)[:, None] & cm[None, :], other=0.0)
                    da += tl.sum(tile, axis=0)
                src = bw_ptr + o_part + (row + c) * S
                for r0 in range(0, S, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    tile = tl.load(src[:, None] + r[None, :], mask=cm[:, None] & (r < S)[None, :], other=0.0)
                    da += tl.sum(tile, axis=1)
                a = tl.load(state_ptr + o_a + row + c, mask=cm, other=0.0)
                tl.store(bw_ptr + o_du + row + c, da * a * (1.0 - a), mask=cm)
            tl.debug_barrier()
            # dh_v = (W2^T du) [h_v > 0]
            h_row = state_ptr + o_h + n.to(tl.int64) * HID
            dh_row = bw_ptr + o_dh + n.to(tl.int64) * HID
            mx_off = N * HID
            for j0 in range(0, HID, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                jm = j < HID
                acc = tl.zeros([BLOCK_J], dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    cm = c < C
                    w = tl.load(w2_ptr + c[:, None] * s2c + j[None, :] * s2j,
                                mask=cm[:, None] & jm[None, :], other=0.0).to(tl.float32)
                    du = tl.load(bw_ptr + o_du + row + c, mask=cm, other=0.0)
                    acc += tl.sum(w * du[:, None], axis=0)
                h_avg = tl.load(h_row + j, mask=jm, other=0.0)
                h_mx = tl.load(h_row + mx_off + j, mask=jm, other=0.0)
                tl.store(dh_row + j, tl.where(h_avg > 0, acc, 0.0), mask=jm)
                tl.store(dh_row + mx_off + j, tl.where(h_mx > 0, acc, 0.0), mask=jm)
            tl.debug_barrier()
            # davg = W1^T dh_avg, dmx = W1^T dh_mx
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < C
                acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
                acc_m = tl.zeros([BLOCK_C], dtype=tl.float32)
                for j0 in range(0, HID, BLOCK_J):
                    j = j0 + tl.arange(0, BLOCK_J)
                    jm = j < HID
                    w = tl.load(w1_ptr + j[:, None] * s1j + c[None, :] * s1c,
                                mask=jm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    dh_a = tl.load(dh_row + j, mask=jm, other=0.0)
                    dh_m = tl.load(dh_row + mx_off + j, mask=jm, other=0.0)
                    acc_a += tl.sum(w * dh_a[:, None], axis=0)
                    acc_m += tl.sum(w * dh_m[:, None], axis=0)
                tl.store(bw_ptr + o_dpool + row + c, acc_a, mask=cm)
                tl.store(bw_ptr + o_dpool + N * C + row + c, acc_m, mask=cm)

    @triton.jit
    def _weight_tile(
        left_ptr, left_stride, right_ptr, right_stride, right2_off, scale, N, rows, cols, rm, cm,
        RELU_PAIR: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """sum over n < N of left[n, rows]^T right[n, cols] * scale, where with RELU_PAIR
        right[n] = relu(r[n]) + relu(r[n + right2_off]) (float32 products, no tensor cores, in a
        fixed order)."""
        acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nm = nn < N
            lt = tl.load(left_ptr + nn.to(tl.int64)[None, :] * left_stride + rows[:, None],
                         mask=rm[:, None] & nm[None, :], other=0.0)
            r_ptr = right_ptr + nn.to(tl.int64)[:, None] * right_stride + cols[None, :]
            r_mask = nm[:, None] & cm[None, :]
            rt = tl.load(r_ptr, mask=r_mask, other=0.0)
            if RELU_PAIR:
                rt = tl.maximum(rt, 0.0) + tl.maximum(tl.load(r_ptr + right2_off, mask=r_mask, other=0.0), 0.0)
            acc += tl.dot(lt, rt * scale, input_precision="ieee")
        return acc

    @triton.jit
    def _bwd_input_kernel(
        g_ptr, dx_ptr, sN, sC, sP, state_ptr, o_mx, o_pidx, o_a, o_h, o_cidx, o_s,
        bw_ptr, o_e, o_du, o_dh, o_dpool, dw1_ptr, dw2_ptr,
        N, C, HID, P, n_pblocks, n_w2, n_w1, w2_cols, w1_cols,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """The first n_w2 programs: BLOCK_W^2 tiles of dW2 (C x HID) = sum_n du^T (relu(h_avg) +
        relu(h_mx)); the next n_w1: tiles of dW1 (HID x C) = sum_n dh_avg^T avg + dh_mx^T mx.
        The rest, one per (n, pixel block), one pass over g:
        dx_cp = a_c dk_cp + davg_c / P + [p = pidx_c] dmx_c, dk_cp = g_cp s_p + e_mean,p / C +
        [c = cidx_p] e_max,p."""
        pid = tl.program_id(0)
        if pid < n_w2:
            rows = (pid // w2_cols) * BLOCK_W + tl.arange(0, BLOCK_W)  # c
            cols = (pid % w2_cols) * BLOCK_W + tl.arange(0, BLOCK_W)  # j
            rm = rows < C
            cm = cols < HID
            acc = _weight_tile(bw_ptr + o_du, C, state_ptr + o_h, HID, N * HID, 1.0, N, rows, cols, rm, cm,
                               True, BLOCK_N)
            tl.store(dw2_ptr + rows[:, None] * HID + cols[None, :], acc.to(dw2_ptr.dtype.element_ty),
                     mask=rm[:, None] & cm[None, :])
        elif pid < n_w2 + n_w1:
            t = pid - n_w2
            rows = (t // w1_cols) * BLOCK_W + tl.arange(0, BLOCK_W)  # j
            cols = (t % w1_cols) * BLOCK_W + tl.arange(0, BLOCK_W)  # c
            rm = rows < HID
            cm = cols < C
            acc = _weight_tile(bw_ptr + o_dh, HID, state_ptr, C, 0, 1.0 / P, N, rows, cols, rm, cm,
                               False, BLOCK_N)
            acc += _weight_tile(bw_ptr + o_dh + N * HID, HID, state_ptr + o_mx, C, 0, 1.0, N, rows, cols, rm, cm,
                                False, BLOCK_N)
            tl.store(dw1_ptr + rows[:, None] * C + cols[None, :], acc.to(dw1_ptr.dtype.element_ty),
                     mask=rm[:, None] & cm[None, :])
        else:
            q = pid - n_w2 - n_w1
            n = q // n_pblocks
            p = (q % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = p < P
            prow = n.to(tl.int64) * P + p
            erow = bw_ptr + o_e + n.to(tl.int64) * 2 * P
            sg = tl.load(state_ptr + o_s + prow, mask=pmask, other=0.0)
            e_mean = tl.load(erow + p, mask=pmask, other=0.0) / C
            e_max = tl.load(erow + P + p, mask=pmask, other=0.0)
            ci = tl.load(state_ptr + o_cidx + prow, mask=pmask, other=0.0).to(tl.int32, bitcast=True)
            base = n.to(tl.int64) * sN + p.to(tl.int64)[None, :] * sP
            row = n.to(tl.int64) * C
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < C
                m = cm[:, None] & pmask[None, :]
                offs = base + c.to(tl.int64)[:, None] * sC
                grad = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
                gate = tl.load(state_ptr + o_a + row + c, mask=cm, other=0.0)
                davg = tl.load(bw_ptr + o_dpool + row + c, mask=cm, other=0.0) / P
                dmx = tl.load(bw_ptr + o_dpool + N * C + row + c, mask=cm, other=0.0)
                pi = tl.load(state_ptr + o_pidx + row + c, mask=cm, other=0.0).to(tl.int32, bitcast=True)
                dk = (grad * sg[None, :] + e_mean[None, :]
                      + tl.where(ci[None, :] == c[:, None], e_max[None, :], 0.0))
                dx = (dk * gate[:, None] + davg[:, None]
                      + tl.where(p[None, :] == pi[:, None], dmx[:, None], 0.0))
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Launch plan: tile sizes, grids and buffer layouts, computed once per shape
# --------------------------------------------------------------------------------------------
def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _blocks(C: int, P: int, channels_last: bool, interp: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for the tiles over x: the contiguous dimension gets the long side.
    The interpreter pays per program and per loop step, so it gets tiles 16x larger."""
    elems = 1 << 16 if interp else 4096
    if channels_last:
        bc = max(min(_next_pow2(C), 256 if interp else 64), 16)
        bp = min(_next_pow2(P), elems // bc)
    else:
        bp = max(min(_next_pow2(P), 4096 if interp else 256), 16)
        bc = min(_next_pow2(C), elems // bp)
    # each side at least 16 (tl.dot's smallest), the other side taken from the raised one, so a
    # tile holds at most elems values (512 channels of a 2x2 map made 512 x 16 in NCHW)
    return max(bc, 16), max(bp, 16)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Plan(NamedTuple):
    bc: int  # tiles over x (BLOCK_C, BLOCK_P) and their counts
    bp: int
    n_cb: int
    n_pb: int
    split_len: int  # pixel splits of the per-channel reductions
    S: int
    gate_c: int  # tiles of the per-n MLP kernels
    gate_j: int
    rows: int  # rows per step when a kernel sums partial rows
    conv_t: int  # taps per step of the forward 7x7 conv (tiles conv_t x bp)
    sp_block: int  # pixel block and taps per step of the spatial-gate backward
    sp_t: int
    n_sb: int
    w_block: int  # dW1/dW2 tiles (square) and their counts
    w2_cols: int
    w1_cols: int
    n_w2: int
    n_w1: int
    # forward state (float32): [sum | max | argmax (N, C)] [a (N, C)] [h_avg | h_mx (N, HID)]
    # [pooled (N, 2, P)] [channel argmax (N, P)] [s (N, P)]
    o_mx: int
    o_pidx: int
    o_a: int
    o_h: int
    o_pool: int
    o_cidx: int
    o_s: int
    state_size: int
    # backward scratch (float32): [dt (N, P)] [da partials (N, n_pb, C)] [e (N, 2, P)]
    # [dWs partials (N n_sb, 2 K K)] [da partials (N, C, S)] [du (N, C)] [dh_avg | dh_mx (N, HID)]
    # [davg | dmx (N, C)]
    o_dapart: int
    o_e: int
    o_dwspart: int
    o_part: int
    o_du: int
    o_dh: int
    o_dpool: int
    bw_size: int


def _state_size(N, C, H, W, hidden):
    """Length of the forward's float32 state buffer (also used by the fake implementation)."""
    return N * (4 * C + 2 * hidden + 4 * H * W)


@functools.lru_cache(maxsize=1024)
def _plan(N: int, C: int, H: int, W: int, hidden: int, channels_last: bool, sms: int, interp: bool) -> _Plan:
    """Everything about the launches that depends only on the shape. sms: the GPU's
    multiprocessor count (0 on the CPU: no pixel splits)."""
    P = H * W
    bc, bp = _blocks(C, P, channels_last, interp)
    n_cb, n_pb = _cdiv(C, bc), _cdiv(P, bp)
    # split the pixels of the per-channel reductions so the grid N * n_cb * S fills the GPU
    # about four times over
    want = _cdiv(4 * sms, N * n_cb) if sms else 1
    per_split = _cdiv(n_pb, max(1, min(want, n_pb)))
    split_len = per_split * bp
    S = _cdiv(P, split_len)
    big = 1024 if interp else 128
    gate_c = max(16, min(_next_pow2(C), big))
    gate_j = max(16, min(_next_pow2(hidden), big if interp else 32))
    rows = 256 if interp else 16
    taps = 2 * SPATIAL_KERNEL * SPATIAL_KERNEL
    conv_t = min(_next_pow2(taps), max(1, (1 << 16 if interp else 1024) // bp))
    sp_block = max(16, min(_next_pow2(P), 4096 if interp else 512))
    sp_t = _next_pow2(taps) if interp else 8
    n_sb = _cdiv(P, sp_block)
    w_block = max(16, min(_next_pow2(max(C, hidden)), 256 if interp else 32))
    w2_cols, w1_cols = _cdiv(hidden, w_block), _cdiv(C, w_block)
    n_w2, n_w1 = _cdiv(C, w_block) * w2_cols, _cdiv(hidden, w_block) * w1_cols
    NC, NP = N * C, N * P
    o_mx, o_pidx, o_a, o_h = NC, 2 * NC, 3 * NC, 4 * NC
    o_pool = o_h + 2 * N * hidden
    o_cidx = o_pool + 2 * NP
    o_s = o_cidx + NP
    state_size = o_s + NP
    assert state_size == _state_size(N, C, H, W, hidden)
    o_dapart = NP
    o_e = o_dapart + N * n_pb * C
    o_dwspart = o_e + 2 * NP
    o_part = o_dwspart + N * n_sb * taps
    o_du = o_part + NC * S
    o_dh = o_du + NC
    o_dpool = o_dh + 2 * N * hidden
    bw_size = o_dpool + 2 * NC
    return _Plan(bc, bp, n_cb, n_pb, split_len, S, gate_c, gate_j, rows, conv_t, sp_block, sp_t, n_sb, w_block, w2_cols,
                 w1_cols, n_w2, n_w1, o_mx, o_pidx, o_a, o_h, o_pool, o_cidx, o_s, state_size, o_dapart, o_e,
                 o_dwspart, o_part, o_du, o_dh, o_dpool, bw_size)


def _plan_for(x: torch.Tensor, hidden: int, sms=None, interp=None) -> Tuple[_Plan, Tuple[int, int, int]]:
    """The plan for x (NCHW- or channels_last-contiguous) and x's (sN, sC, sP) strides. sms and
    interp default to this machine's (the tests pass a GPU's to check its plan interpreted)."""
    N, C, H, W = x.shape
    sN, sC, sH, sW = x.stride()
    sP = sW if W > 1 else sH  # pixel p = h W + w sits at p * sP in either layout
    if interp is None:
        interp = interpreting()
    if sms is None:
        sms = _sm_count(x.device.index) if x.is_cuda and not interp else 0
    return _plan(N, C, H, W, hidden, sC == 1 and C > 1, sms, interp), (sN, sC, sP)


# --------------------------------------------------------------------------------------------
# Forward and backward with the Triton kernels
# --------------------------------------------------------------------------------------------
def _forward_triton(x, w1, w2, ws):
    """out and the state buffer backward needs; x must be NCHW- or channels_last-contiguous."""
    N, C, H, W = x.shape
    hidden = w1.shape[0]
    plan, (sN, sC, sP) = _plan_for(x, hidden)
    state = torch.empty(plan.state_size, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    S = plan.S
    if S == 1:  # the statistics go straight to their place in the state
        part, plane = state, N * C
    else:
        part, plane = torch.empty(3 * N * C * S, device=x.device, dtype=torch.float32), N * C * S
    _spatial_stats_kernel[(N, plan.n_cb, S)](
        x, sN, sC, sP, part, plane, C, H * W, plan.split_len, S, BLOCK_C=plan.bc, BLOCK_P=plan.bp,
    )
    _gate_kernel[(N,)](
        state, part, plane, plan.o_mx, plan.o_pidx, plan.o_a, plan.o_h,
        w1, w1.stride(0), w1.stride(1), w2, w2.stride(0), w2.stride(1),
        N, C, hidden, H * W, S, BLOCK_C=plan.gate_c, BLOCK_J=plan.gate_j,
    )
    _channel_stats_kernel[(N, plan.n_pb)](
        x, sN, sC, sP, state, plan.o_a, plan.o_pool, plan.o_cidx, C, H * W, BLOCK_C=plan.bc, BLOCK_P=plan.bp,
    )
    _apply_kernel[(N, plan.n_pb)](
        x, out, sN, sC, sP, state, plan.o_a, plan.o_pool, plan.o_s, ws, ws.stride(1), ws.stride(2), ws.stride(3),
        C, H, W, K=SPATIAL_KERNEL, BLOCK_T=plan.conv_t, BLOCK_C=plan.bc, BLOCK_P=plan.bp,
    )
    return out, state


def _weight_grad_like(w: torch.Tensor) -> torch.Tensor:
    """An empty gradient for weight w in row-major order (the order the kernels write), with w's
    own strides on its size-1 dimensions: a 1x1 conv weight in channels_last, (C', C, 1, 1) with
    strides (C, 1, C, C), then gets a gradient of exactly its strides. With row-major strides
    there, autograd keeps the gradient as it is (it ignores size-1 strides), and DDP's bucket
    views and the fused LARS update, which compare strides exactly, saw a different layout."""
    strides, step = [], 1
    for n, s in zip(reversed(w.shape), reversed(w.stride())):
        strides.append(s if n == 1 else step)
        step *= n
    return torch.empty_strided(w.shape, strides[::-1], device=w.device, dtype=w.dtype)


def _backward_triton(g, x, w1, w2, ws, state):
    """dx, dW1, dW2, dWs from dL/dout and what the forward saved."""
    N, C, H, W = x.shape
    P = H * W
    hidden = w1.shape[0]
    plan, (sN, sC, sP) = _plan_for(x, hidden)
    if g.stride() != x.stride():  # the kernels address g with x's strides
        g = torch.empty_like(x).copy_(g)
    bw = torch.empty(plan.bw_size, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dw1, dw2, dws = (_weight_grad_like(w) for w in (w1, w2, ws))
    K = SPATIAL_KERNEL
    _bwd_reduce_kernel[(N, plan.n_pb)](
        g, x, sN, sC, sP, state, plan.o_a, plan.o_s, bw, plan.o_dapart, C, P, plan.n_pb,
        BLOCK_C=plan.bc, BLOCK_P=plan.bp,
    )
    _spatial_bwd_kernel[(N, plan.n_sb)](
        state, plan.o_pool, bw, plan.o_e, plan.o_dwspart, ws, ws.stride(1), ws.stride(2), ws.stride(3),
        H, W, plan.n_sb, K=K, BLOCK_T=plan.sp_t, BLOCK_P=plan.sp_block,
    )
    _bwd_pooled_kernel[(N, plan.n_cb, plan.S)](
        x, sN, sC, sP, state, plan.o_cidx, bw, plan.o_e, plan.o_part, C, P, plan.split_len, plan.S,
        BLOCK_C=plan.bc, BLOCK_P=plan.bp,
    )
    _gate_bwd_kernel[(N + 1,)](
        state, plan.o_a, plan.o_h, bw, plan.o_dapart, plan.o_part, plan.o_du, plan.o_dh, plan.o_dpool,
        plan.o_dwspart, w1, w1.stride(0), w1.stride(1), w2, w2.stride(0), w2.stride(1), dws,
        N, C, hidden, plan.n_pb, plan.S, N * plan.n_sb,
        BLOCK_C=plan.gate_c, BLOCK_J=plan.gate_j, BLOCK_R=plan.rows, BLOCK_T=_next_pow2(2 * K * K), TAPS=2 * K * K,
    )
    _bwd_input_kernel[(plan.n_w2 + plan.n_w1 + N * plan.n_pb,)](
        g, dx, sN, sC, sP, state, plan.o_mx, plan.o_pidx, plan.o_a, plan.o_h, plan.o_cidx, plan.o_s,
        bw, plan.o_e, plan.o_du, plan.o_dh, plan.o_dpool, dw1, dw2,
        N, C, hidden, P, plan.n_pb, plan.n_w2, plan.n_w1, plan.w2_cols, plan.w1_cols,
        BLOCK_C=plan.bc, BLOCK_P=plan.bp, BLOCK_W=plan.w_block, BLOCK_N=16,
    )
    return dx, dw1, dw2, dws


# --------------------------------------------------------------------------------------------
# Eager calls: a plain autograd.Function (far less host work per call than a custom op)
# --------------------------------------------------------------------------------------------
class _ContextBottleneckFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, ws):
        out, state = _forward_triton(x, w1, w2, ws)
        ctx.save_for_backward(x, w1, w2, ws, state)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return _backward_triton(grad_out, *ctx.saved_tensors)


# --------------------------------------------------------------------------------------------
# Under torch.compile: the same forward and backward as torch custom ops (opaque nodes)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mlvicx_fast::context_bottleneck_forward", mutates_args=())
def _cb_fwd(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_triton(x, w1, w2, ws)


@_cb_fwd.register_fake
def _(x, w1, w2, ws):
    N, C, H, W = x.shape
    state = x.new_empty(_state_size(N, C, H, W, w1.shape[0]), dtype=torch.float32)
    return torch.empty_like(x), state


@torch.library.custom_op("mlvicx_fast::context_bottleneck_backward", mutates_args=())
def _cb_bwd(
    g: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor, state: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_triton(g, x, w1, w2, ws, state)


@_cb_bwd.register_fake
def _(g, x, w1, w2, ws, state):
    return torch.empty_like(x), *(_weight_grad_like(w) for w in (w1, w2, ws))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else backward gets a zero-filled gradient of the state


def _backward(ctx, grad_out, _grad_state):
    if grad_out is None:  # out did not reach the loss
        return None, None, None, None
    return _cb_bwd(grad_out, *ctx.saved_tensors)


_cb_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Reference: the official block in plain torch (autograd)
# --------------------------------------------------------------------------------------------
def context_bottleneck_reference(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor,
) -> torch.Tensor:
    """The block as the official code writes it (ChannelAttention, then SpatialAttention).
    Weights of another dtype than x are cast to x's dtype first (what autocast does)."""
    w1, w2, ws = (w if w.dtype == x.dtype else w.to(x.dtype) for w in (w1, w2, ws))

    def mlp(v):
        return F.conv2d(F.relu(F.conv2d(v, w1)), w2)

    a = torch.sigmoid(mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1)))
    k = a * x
    pooled = torch.cat([torch.mean(k, dim=1, keepdim=True), torch.max(k, dim=1, keepdim=True)[0]], dim=1)
    s = torch.sigmoid(F.conv2d(pooled, ws, padding=SPATIAL_KERNEL // 2))
    return s * k


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def check_inputs(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the offending value when the inputs do not fit."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"context_bottleneck: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"context_bottleneck: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(
            f"context_bottleneck: every dimension of x must be >= 1, got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"context_bottleneck: x has dtype {x.dtype}; expected float32, bfloat16 or float16 "
            "(or float64 on the torch backend)"
        )
    C = x.shape[1]
    if w1.dim() != 4 or w1.shape[1] != C or w1.shape[2:] != (1, 1):
        raise ValueError(
            f"context_bottleneck: mlp.0 weight must have shape (C/r, {C}, 1, 1) for x with {C} "
            f"channels, got {tuple(w1.shape)}"
        )
    hidden = w1.shape[0]
    if tuple(w2.shape) != (C, hidden, 1, 1):
        raise ValueError(
            f"context_bottleneck: mlp.2 weight must have shape ({C}, {hidden}, 1, 1), got {tuple(w2.shape)}"
        )
    k = SPATIAL_KERNEL
    if tuple(ws.shape) != (1, 2, k, k):
        raise ValueError(
            f"context_bottleneck: spatial weight must have shape (1, 2, {k}, {k}), got {tuple(ws.shape)}"
        )
    for name, w in (("mlp.0", w1), ("mlp.2", w2), ("spatial", ws)):
        if w.device != x.device:
            raise ValueError(f"context_bottleneck: {name} weight is on {w.device} but x is on {x.device}")


def resolve_backend(backend: str, x: torch.Tensor, *weights: torch.Tensor) -> str:
    """'triton' or 'torch' for these tensors ('reference' is the same as 'torch')."""
    if backend not in BACKENDS:
        raise ValueError(f"context_bottleneck: unknown backend {backend!r}; expected one of {BACKENDS}")
    tensors = (x,) + weights
    if backend == "auto":
        fp64 = any(t.dtype == torch.float64 for t in tensors)
        return "triton" if HAS_TRITON and all(t.is_cuda for t in tensors) and not fp64 else "torch"
    if backend == "triton":
        require_triton("context_bottleneck", *tensors)
        if any(t.dtype == torch.float64 for t in tensors):
            raise TypeError("context_bottleneck: backend='triton' takes float32, bfloat16 or float16, got float64")
        return "triton"
    return "torch"


def context_bottleneck(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor, backend: str = "auto",
) -> torch.Tensor:
    """Context-bottleneck block ``s * (a * x)`` (see the module docstring for the math).

    Args:
        x: (N, C, H, W), float32/bfloat16/float16, NCHW or channels_last.
        w1: (C/r, C, 1, 1) first 1x1 conv of the shared MLP (no bias).
        w2: (C, C/r, 1, 1) second 1x1 conv of the shared MLP (no bias).
        ws: (1, 2, 7, 7) spatial conv; input channel 0 is the channel mean, 1 the channel max.
        backend: 'auto', 'triton', 'torch' or 'reference'.

    Returns:
        (N, C, H, W) in x's dtype and layout.
    """
    check_inputs(x, w1, w2, ws)
    if resolve_backend(backend, x, w1, w2, ws) == "torch":
        return context_bottleneck_reference(x, w1, w2, ws)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # the kernels take NCHW or channels_last
    if torch.compiler.is_compiling():  # one opaque node (and one for backward) for torch.compile
        return _cb_fwd(x, w1, w2, ws)[0]
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad or ws.requires_grad):
        return _ContextBottleneckFunction.apply(x, w1, w2, ws)
    return _forward_triton(x, w1, w2, ws)[0]
