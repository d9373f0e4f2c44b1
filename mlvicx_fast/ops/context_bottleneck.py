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

Backward, with g = dL/dout, e = dL/d[mean, cmax] = conv7x7^T(ds * s (1 - s); Ws) and
``argmax`` the FIRST index of the maximum (torch's rule for ``torch.max(dim)`` and
``adaptive_max_pool2d``, which the official block uses; ties get the whole gradient at that one
index, not a share)::

    ds_p   = sum_c g_cp a_c x_cp
    dk_cp  = g_cp s_p + e_mean,p / C + [c = argmax_c k_.p] e_max,p
    da_c   = sum_p dk_cp x_cp
    davg, dmx, dW1, dW2 = backward of the tiny MLP from du = da a (1 - a)
    dx_cp  = a_c dk_cp + davg_c / P + [p = argmax_p x_c.] dmx_c

The (N, C, H, W) passes run in Triton; the MLP on the (N, C) pooled vectors and the 7x7 conv on
the (N, 2, H, W) pooled map (and their weight gradients) are small and run in float32 torch ops
between the kernels. Bytes moved over the big tensor: forward reads x three times and writes
out once; backward reads (g, x), then x, then g, and writes dx once: nine passes in all, the
bandwidth floor of this block. Nothing of size (N, C, H, W) is saved for backward besides x
itself: the saved extras are a, avg, mx, the spatial argmax (N, C), the pooled map, s and the
channel argmax (N, H, W), all O(N (C + H W)).

Inputs: x of any N, C, H, W >= 1, float32/bfloat16/float16, NCHW-contiguous or channels_last
(other strides are copied to NCHW first); accumulation is float32 and out/dx have x's dtype and
layout. Weight gradients are returned in the weights' dtype. NaN in x gives NaN in out.

Backends:
  ``triton``     the fused kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  ``torch``      the plain-torch reference below (autograd), written as the official block
  ``reference``  the same as ``torch``
  ``auto``       triton on CUDA tensors when Triton is installed (float64 stays on torch)
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreting, require_triton, tl, triton

BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SPATIAL_KERNEL = 7


# --------------------------------------------------------------------------------------------
# Triton kernels. x is addressed as x[n, c, p] = x_ptr + n*sN + c*sC + p*sP (NCHW: sC = P,
# sP = 1; channels_last: sC = 1, sP = C); g, out and dx share x's strides.
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _spatial_stats_kernel(
        x_ptr, sN, sC, sP, sum_ptr, max_ptr, idx_ptr,
        C, P, split_len, S,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, channel block, pixel split): sum, max and first argmax of x over its pixels.
        Partial results go to [n, c, split] of three (N, C, S) buffers."""
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
        out = (n * C + c) * S + split
        tl.store(sum_ptr + out, total, mask=cmask)
        tl.store(max_ptr + out, best, mask=cmask)
        tl.store(idx_ptr + out, best_i, mask=cmask)

    @triton.jit
    def _channel_stats_kernel(
        x_ptr, sN, sC, sP, a_ptr, pooled_ptr, idx_ptr,
        C, P, inv_C,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, pixel block): mean_c and max_c (with first argmax) of k = a_c x_cp.
        pooled is (N, 2, P) float32 [mean, max]; idx is (N, P) int32."""
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        base = x_ptr + n.to(tl.int64) * sN + p.to(tl.int64)[None, :] * sP
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_P], dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            m = cm[:, None] & pmask[None, :]
            v = tl.load(base + c.to(tl.int64)[:, None] * sC, mask=m, other=0.0).to(tl.float32)
            gate = tl.load(a_ptr + n * C + c, mask=cm, other=0.0)
            k = v * gate[:, None]
            total += tl.sum(k, axis=0)
            kmax, karg = tl.max(tl.where(m, k, float("-inf")), axis=0, return_indices=True,
                                return_indices_tie_break_left=True)
            take = kmax > best
            best_i = tl.where(take, c0 + karg, best_i)
            best = tl.where(take, kmax, best)
        row = pooled_ptr + n.to(tl.int64) * 2 * P
        tl.store(row + p, total * inv_C, mask=pmask)
        tl.store(row + P + p, best, mask=pmask)
        tl.store(idx_ptr + n.to(tl.int64) * P + p, best_i, mask=pmask)

    @triton.jit
    def _apply_gates_kernel(
        x_ptr, out_ptr, sN, sC, sP, a_ptr, s_ptr,
        C, P,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """out_cp = s_p a_c x_cp for one (pixel block, channel block, n) tile."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2)
        pmask = p < P
        cm = c < C
        m = cm[:, None] & pmask[None, :]
        offs = n.to(tl.int64) * sN + c.to(tl.int64)[:, None] * sC + p.to(tl.int64)[None, :] * sP
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(a_ptr + n * C + c, mask=cm, other=0.0)
        sg = tl.load(s_ptr + n.to(tl.int64) * P + p, mask=pmask, other=0.0)
        y = v * gate[:, None] * sg[None, :]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_reduce_kernel(
        g_ptr, x_ptr, sN, sC, sP, a_ptr, s_ptr, ds_ptr, da_part_ptr,
        C, P, n_pblocks,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, pixel block): ds_p = sum_c g a x (complete), and the partial sums over this
        block's pixels of sum_p g s x for every channel, into da_part[n, pixel block, c]."""
        n = tl.program_id(0)
        pb = tl.program_id(1)
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        sg = tl.load(s_ptr + n.to(tl.int64) * P + p, mask=pmask, other=0.0)
        base = n.to(tl.int64) * sN + p.to(tl.int64)[None, :] * sP
        part = da_part_ptr + (n * n_pblocks + pb).to(tl.int64) * C
        ds = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            m = cm[:, None] & pmask[None, :]
            offs = base + c.to(tl.int64)[:, None] * sC
            gx = (tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
                  * tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32))
            gate = tl.load(a_ptr + n * C + c, mask=cm, other=0.0)
            ds += tl.sum(gx * gate[:, None], axis=0)
            tl.store(part + c, tl.sum(gx * sg[None, :], axis=1), mask=cm)
        tl.store(ds_ptr + n.to(tl.int64) * P + p, ds, mask=pmask)

    @triton.jit
    def _bwd_pooled_kernel(
        x_ptr, sN, sC, sP, e_ptr, cidx_ptr, part_ptr,
        C, P, inv_C, split_len, S,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Per (n, channel block, pixel split): sum_p x_cp (e_mean,p / C + [c = cidx_p] e_max,p),
        the part of da that flows back through the spatial gate's pooled map."""
        n = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(2)
        cmask = c < C
        base = x_ptr + n.to(tl.int64) * sN + c.to(tl.int64)[:, None] * sC
        erow = e_ptr + n.to(tl.int64) * 2 * P
        irow = cidx_ptr + n.to(tl.int64) * P
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        p_begin = split * split_len
        for p0 in range(p_begin, p_begin + split_len, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < P
            m = cmask[:, None] & pm[None, :]
            e_mean = tl.load(erow + p, mask=pm, other=0.0)
            e_max = tl.load(erow + P + p, mask=pm, other=0.0)
            ci = tl.load(irow + p, mask=pm, other=-1)
            w = e_mean[None, :] * inv_C + tl.where(ci[None, :] == c[:, None], e_max[None, :], 0.0)
            v = tl.load(base + p.to(tl.int64)[None, :] * sP, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(w * v, axis=1)
        tl.store(part_ptr + (n * C + c) * S + split, acc, mask=cmask)

    @triton.jit
    def _bwd_input_kernel(
        g_ptr, dx_ptr, sN, sC, sP, a_ptr, s_ptr, e_ptr, cidx_ptr, davg_ptr, dmx_ptr, pidx_ptr,
        C, P, inv_C, inv_P,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """dx_cp = a_c dk_cp + davg_c / P + [p = pidx_c] dmx_c, with
        dk_cp = g_cp s_p + e_mean,p / C + [c = cidx_p] e_max,p. Reads g only."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2)
        pmask = p < P
        cm = c < C
        m = cm[:, None] & pmask[None, :]
        offs = n.to(tl.int64) * sN + c.to(tl.int64)[:, None] * sC + p.to(tl.int64)[None, :] * sP
        grad = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        prow = n.to(tl.int64) * P + p
        erow = e_ptr + n.to(tl.int64) * 2 * P
        sg = tl.load(s_ptr + prow, mask=pmask, other=0.0)
        e_mean = tl.load(erow + p, mask=pmask, other=0.0)
        e_max = tl.load(erow + P + p, mask=pmask, other=0.0)
        ci = tl.load(cidx_ptr + prow, mask=pmask, other=-1)
        crow = n * C + c
        gate = tl.load(a_ptr + crow, mask=cm, other=0.0)
        davg = tl.load(davg_ptr + crow, mask=cm, other=0.0)
        dmx = tl.load(dmx_ptr + crow, mask=cm, other=0.0)
        pi = tl.load(pidx_ptr + crow, mask=cm, other=-1)
        dk = (grad * sg[None, :] + e_mean[None, :] * inv_C
              + tl.where(ci[None, :] == c[:, None], e_max[None, :], 0.0))
        dx = (dk * gate[:, None] + davg[:, None] * inv_P
              + tl.where(p[None, :] == pi[:, None], dmx[:, None], 0.0))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Launch settings
# --------------------------------------------------------------------------------------------
def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _blocks(C: int, P: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for the tiles over x: the contiguous dimension gets the long side.
    The interpreter pays per program and per loop step, so it gets tiles 16x larger."""
    elems = 1 << 16 if interpreting() else 4096
    if channels_last:
        bc = min(_next_pow2(C), 256 if interpreting() else 64)
        bp = min(_next_pow2(P), elems // bc)
    else:
        bp = min(_next_pow2(P), 4096 if interpreting() else 256)
        bc = min(_next_pow2(C), elems // bp)
    return max(bc, 16), max(bp, 16)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pixel_splits(x: torch.Tensor, n_cblocks: int, P: int, block_p: int) -> Tuple[int, int]:
    """(split_len, S) for the kernels that reduce over pixels per channel: split the pixels
    so that the grid N * n_cblocks * S fills the GPU about four times over."""
    n_pblocks = triton.cdiv(P, block_p)
    if interpreting() or not x.is_cuda:
        want = 1
    else:
        want = triton.cdiv(4 * _sm_count(x.device.index or 0), x.shape[0] * n_cblocks)
    per_split = triton.cdiv(n_pblocks, max(1, min(want, n_pblocks)))
    split_len = per_split * block_p
    return split_len, triton.cdiv(P, split_len)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way (and not also NCHW-contiguous), else NCHW."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _as_pixels(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """(N, C, P) view of t stored in layout fmt (copying t into fmt if it is not)."""
    N, C, H, W = t.shape
    return t.contiguous(memory_format=fmt).view(N, C, H * W)


# --------------------------------------------------------------------------------------------
# The small torch pieces: channel-gate MLP (N, C) and its backward, in float32
# --------------------------------------------------------------------------------------------
def _channel_gate(avg, mx, w1, w2):
    """a = sigmoid(M(avg) + M(mx)); also returns the MLP's hidden pre-activations (2, N, C/r)."""
    hidden = torch.stack([avg, mx]) @ w1.t()
    u = torch.relu(hidden) @ w2.t()
    return torch.sigmoid(u[0] + u[1]), hidden


def _channel_gate_backward(da, a, avg, mx, w1, w2):
    """Gradients of avg, mx, W1, W2 (2-D) from dL/da through a = sigmoid(M(avg) + M(mx))."""
    hidden = torch.stack([avg, mx]) @ w1.t()
    relu_h = torch.relu(hidden)
    du = da * a * (1.0 - a)
    dw2 = du.t() @ (relu_h[0] + relu_h[1])
    dhidden = (du @ w2).unsqueeze(0) * (hidden > 0)
    dw1 = dhidden[0].t() @ avg + dhidden[1].t() @ mx
    dpooled = dhidden @ w1
    return dpooled[0], dpooled[1], dw1, dw2


# --------------------------------------------------------------------------------------------
# Forward and backward with the Triton kernels
# --------------------------------------------------------------------------------------------
def _forward_triton(x, w1, w2, ws):
    N, C, H, W = x.shape
    P = H * W
    fmt = _layout(x)
    x3 = _as_pixels(x, fmt)
    strides = x3.stride()
    f32 = dict(device=x.device, dtype=torch.float32)
    bc, bp = _blocks(C, P, strides[1] == 1 and C > 1)
    n_cb, n_pb = triton.cdiv(C, bc), triton.cdiv(P, bp)

    # 1. spatial mean and max (first argmax) per (n, c), over pixel splits
    split_len, S = _pixel_splits(x, n_cb, P, bp)
    psum = torch.empty(N, C, S, **f32)
    pmax = torch.empty(N, C, S, **f32)
    pidx = torch.empty(N, C, S, device=x.device, dtype=torch.int32)
    _spatial_stats_kernel[(N, n_cb, S)](
        x3, *strides, psum, pmax, pidx, C, P, split_len, S, BLOCK_C=bc, BLOCK_P=bp,
    )
    avg = psum.sum(-1) / P
    mx = pmax.amax(-1)
    # first index among the splits that reach the maximum (splits are in pixel order)
    idx = torch.where(pmax == mx.unsqueeze(-1), pidx, torch.iinfo(torch.int32).max).amin(-1)
    idx = idx.to(torch.int32)

    # 2. channel gate (tiny MLP)
    w1_2d = w1.reshape(w1.shape[0], C).float()
    w2_2d = w2.reshape(C, w2.shape[1]).float()
    a, _ = _channel_gate(avg, mx, w1_2d, w2_2d)
    a = a.contiguous()

    # 3. channel mean and max (first argmax) of k = a x per pixel
    pooled = torch.empty(N, 2, H, W, **f32)
    cidx = torch.empty(N, H, W, device=x.device, dtype=torch.int32)
    _channel_stats_kernel[(N, n_pb)](
        x3, *strides, a, pooled, cidx, C, P, 1.0 / C, BLOCK_C=bc, BLOCK_P=bp,
    )

    # 4. spatial gate: 7x7 conv on the (N, 2, H, W) map
    s = torch.sigmoid(F.conv2d(pooled, ws.float(), padding=SPATIAL_KERNEL // 2)).contiguous()

    # 5. out = s a x
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    _apply_gates_kernel[(n_pb, n_cb, N)](
        x3, out.view(N, C, P), *strides, a, s, C, P, BLOCK_C=bc, BLOCK_P=bp,
    )
    return out, a, avg, mx, idx, pooled, cidx, s.view(N, H, W)


def _backward_triton(g, x, w1, w2, ws, a, avg, mx, pidx, pooled, cidx, s):
    N, C, H, W = x.shape
    P = H * W
    fmt = _layout(x)
    x3 = _as_pixels(x, fmt)
    g3 = _as_pixels(g, fmt)  # same strides as x3
    strides = x3.stride()
    f32 = dict(device=x.device, dtype=torch.float32)
    bc, bp = _blocks(C, P, strides[1] == 1 and C > 1)
    n_cb, n_pb = triton.cdiv(C, bc), triton.cdiv(P, bp)

    # 1. ds_p = sum_c g a x, and the direct part of da: sum_p g s x
    ds = torch.empty(N, 1, H, W, **f32)
    da_part = torch.empty(N, n_pb, C, **f32)
    _bwd_reduce_kernel[(N, n_pb)](
        g3, x3, *strides, a, s, ds, da_part, C, P, n_pb, BLOCK_C=bc, BLOCK_P=bp,
    )
    da = da_part.sum(1)

    # 2. back through the spatial gate's sigmoid and 7x7 conv (small, torch)
    s4 = s.view(N, 1, H, W)
    dt = ds * s4 * (1.0 - s4)
    ws32 = ws.float()
    pad = SPATIAL_KERNEL // 2
    e = torch.nn.grad.conv2d_input(pooled.shape, ws32, dt, padding=pad).contiguous()
    dws = torch.nn.grad.conv2d_weight(pooled, ws.shape, dt, padding=pad)

    # 3. the part of da that flows through [mean_c k, max_c k]
    split_len, S = _pixel_splits(x, n_cb, P, bp)
    part = torch.empty(N, C, S, **f32)
    _bwd_pooled_kernel[(N, n_cb, S)](
        x3, *strides, e, cidx, part, C, P, 1.0 / C, split_len, S, BLOCK_C=bc, BLOCK_P=bp,
    )
    da = da + part.sum(-1)

    # 4. back through the channel gate's MLP (small, torch)
    w1_2d = w1.reshape(w1.shape[0], C).float()
    w2_2d = w2.reshape(C, w2.shape[1]).float()
    davg, dmx, dw1, dw2 = _channel_gate_backward(da, a, avg, mx, w1_2d, w2_2d)

    # 5. dx, one pass over g
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    _bwd_input_kernel[(n_pb, n_cb, N)](
        g3, dx.view(N, C, P), *strides, a, s, e, cidx, davg.contiguous(), dmx.contiguous(), pidx,
        C, P, 1.0 / C, 1.0 / P, BLOCK_C=bc, BLOCK_P=bp,
    )
    # weight gradients are returned contiguous whatever the weights' layout (the fake below agrees)
    return (dx, dw1.reshape(w1.shape).to(w1.dtype).contiguous(), dw2.reshape(w2.shape).to(w2.dtype).contiguous(),
            dws.to(ws.dtype).contiguous())


# --------------------------------------------------------------------------------------------
# The op: torch custom ops (opaque to torch.compile) with a recompute-style backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mlvicx_fast::context_bottleneck_fwd", mutates_args=())
def _cb_fwd(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _forward_triton(x, w1, w2, ws)


@_cb_fwd.register_fake
def _(x, w1, w2, ws):
    N, C, H, W = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    i32 = dict(device=x.device, dtype=torch.int32)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_layout(x))
    return (out, x.new_empty(N, C, **f32), x.new_empty(N, C, **f32), x.new_empty(N, C, **f32),
            x.new_empty(N, C, **i32), x.new_empty(N, 2, H, W, **f32), x.new_empty(N, H, W, **i32),
            x.new_empty(N, H, W, **f32))


@torch.library.custom_op("mlvicx_fast::context_bottleneck_bwd", mutates_args=())
def _cb_bwd(
    g: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor,
    a: torch.Tensor, avg: torch.Tensor, mx: torch.Tensor, pidx: torch.Tensor, pooled: torch.Tensor,
    cidx: torch.Tensor, s: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _backward_triton(g, x, w1, w2, ws, a, avg, mx, pidx, pooled, cidx, s)


@_cb_bwd.register_fake
def _(g, x, w1, w2, ws, a, avg, mx, pidx, pooled, cidx, s):
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_layout(x))
    return dx, *(torch.empty(w.shape, device=w.device, dtype=w.dtype) for w in (w1, w2, ws))


def _setup_context(ctx, inputs, output):
    x, w1, w2, ws = inputs
    _, a, avg, mx, pidx, pooled, cidx, s = output
    ctx.save_for_backward(x, w1, w2, ws, a, avg, mx, pidx, pooled, cidx, s)


def _backward(ctx, grad_out, *_unused):
    dx, dw1, dw2, dws = _cb_bwd(grad_out, *ctx.saved_tensors)
    return dx, dw1, dw2, dws


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
    return _cb_fwd(x, w1, w2, ws)[0]
