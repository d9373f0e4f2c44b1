r"""LARS update of many parameters at once, fused (three Triton launches per step).

For every parameter p of a group, with gradient g and momentum buffer mu (official VICReg LARS,
``main_vicreg.py``; biases and norm weights, p.ndim == 1, are left out of weight decay and of
the trust ratio)::

    d   = g + wd * p                                   (ndim != 1),   d = g  (ndim == 1)
    q   = eta * ||p|| / ||d||  if ||p|| > 0 and ||d|| > 0 and ndim != 1, else 1
    mu  = momentum * mu + q * d
    p   = p - lr * mu

The foreach version (``mlvicx_fast.optim.LARS`` on CPU tensors) makes about seventeen passes over
the parameters (d is formed, normed and scaled, mu is scaled and added to, lr * mu is formed and
added to p). Here, with the parameters addressed through a table of pointers:

  1. per chunk of CHUNK elements: partial sums of p^2 and d^2 (reads p, g)
  2. per parameter: its norms from its chunks' partial sums (in chunk order, deterministic), q
  3. per chunk: d, mu and p as above (reads p, g, mu; writes mu, p)

seven passes in all. No host synchronisation; the learning rate may live in a device tensor, so a
CUDA graph captures the step and replays it with each step's rate.

Accepted: float32 parameters, gradients and momentum buffers with one common dense layout per
parameter (contiguous or channels_last: the kernels walk the storage in memory order; sums of
squares do not depend on the order). :func:`fused_lars_supported` says whether a list qualifies;
the optimizer falls back to the foreach ops otherwise. The reference is
:func:`mlvicx_fast.optim.lars_step_reference`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton, triton_can_run

CHUNK_GPU = 16384
BLOCK_GPU = 1024
CHUNK_INTERP = 1024  # the interpreter pays per loop step: whole chunks in one block
Number = Union[float, torch.Tensor]

if HAS_TRITON:

    @triton.jit
    def _chunk(table_ptr, chunks_ptr, c):
        """Chunk c: its parameter's index t, the p, g, mu pointers, the chunk's first element, the
        parameter's element count and whether it is adapted (ndim != 1). table rows are
        [p, g, mu, numel, adapt] per parameter; chunks rows [t, start]."""
        t = tl.load(chunks_ptr + c * 2)
        start = tl.load(chunks_ptr + c * 2 + 1)
        row = table_ptr + t * 5
        p = tl.load(row + 0).to(tl.pointer_type(tl.float32))
        g = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        mu = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        numel = tl.load(row + 3)
        adapt = tl.load(row + 4)
        return t, p, g, mu, start, numel, adapt

    @triton.jit
    def _lars_norms_kernel(table_ptr, chunks_ptr, part_ptr, wd, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """part[c] = (sum p^2, sum d^2) over chunk c."""
        c = tl.program_id(0)
        t, p, g, mu, start, numel, adapt = _chunk(table_ptr, chunks_ptr, c)
        wd_eff = tl.where(adapt != 0, wd, 0.0)
        acc_p = tl.zeros([BLOCK], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, CHUNK, BLOCK):
            i = start + off + tl.arange(0, BLOCK)
            m = i < numel
            pv = tl.load(p + i, mask=m, other=0.0)
            dv = tl.load(g + i, mask=m, other=0.0) + wd_eff * pv
            acc_p += pv * pv
            acc_d += dv * dv
        tl.store(part_ptr + c * 2, tl.sum(acc_p, axis=0))
        tl.store(part_ptr + c * 2 + 1, tl.sum(acc_d, axis=0))

    @triton.jit
    def _lars_ratio_kernel(first_ptr, part_ptr, table_ptr, q_ptr, eta, BLOCK: tl.constexpr):
        """q[t] for parameter t from the partial sums of its chunks first[t] .. first[t+1]-1."""
        t = tl.program_id(0)
        lo = tl.load(first_ptr + t)
        hi = tl.load(first_ptr + t + 1)
        acc_p = tl.zeros([BLOCK], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(lo, hi, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            m = c < hi
            acc_p += tl.load(part_ptr + c * 2, mask=m, other=0.0)
            acc_d += tl.load(part_ptr + c * 2 + 1, mask=m, other=0.0)
        p_norm = tl.sqrt(tl.sum(acc_p, axis=0))
        d_norm = tl.sqrt(tl.sum(acc_d, axis=0))
        adapt = tl.load(table_ptr + t * 5 + 4)
        ok = (adapt != 0) & (p_norm > 0.0) & (d_norm > 0.0)
        q = tl.where(ok, eta * p_norm / tl.where(ok, d_norm, 1.0), 1.0)
        tl.store(q_ptr + t, q)

    @triton.jit
    def _lars_update_kernel(table_ptr, chunks_ptr, q_ptr, lr_ptr, lr_value, wd, momentum,
                            LR_IN_MEMORY: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """mu = momentum mu + q d, p = p - lr mu over chunk c."""
        c = tl.program_id(0)
        t, p, g, mu, start, numel, adapt = _chunk(table_ptr, chunks_ptr, c)
        wd_eff = tl.where(adapt != 0, wd, 0.0)
        q = tl.load(q_ptr + t)
        if LR_IN_MEMORY:
            lr = tl.load(lr_ptr).to(tl.float32)
        else:
            lr = lr_value
        for off in range(0, CHUNK, BLOCK):
            i = start + off + tl.arange(0, BLOCK)
            m = i < numel
            pv = tl.load(p + i, mask=m, other=0.0)
            dv = tl.load(g + i, mask=m, other=0.0) + wd_eff * pv
            mv = momentum * tl.load(mu + i, mask=m, other=0.0) + q * dv
            tl.store(mu + i, mv, mask=m)
            tl.store(p + i, pv - lr * mv, mask=m)


def _dense_layout(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1, so the same memory order
    (a size-1 dimension's stride is arbitrary: autograd keeps such gradients as they come)."""
    return a.shape == b.shape and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


def fused_lars_supported(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         bufs: Sequence[torch.Tensor]) -> bool:
    """Whether the fused kernels can update these tensors here (float32, one dense layout each,
    all on one CUDA device, or CPU under TRITON_INTERPRET=1)."""
    if not HAS_TRITON or not params:
        return False
    everything = [*params, *grads, *bufs]
    if not triton_can_run(*everything) or len({t.device for t in everything}) != 1:
        return False
    for p, g, m in zip(params, grads, bufs):
        if not (p.dtype == g.dtype == m.dtype == torch.float32):
            return False
        if not (_dense_layout(p) and _same_layout(p, g) and _same_layout(p, m)):
            return False
    return True


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA-graph capture runs on the current stream of t's device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class _Tables:
    """Device tables of one parameter list: pointers, chunk map; rebuilt when a pointer changes."""

    def __init__(self):
        self.key = None

    def get(self, params, grads, bufs):
        key = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), p.numel()) for p, g, m in zip(params, grads, bufs))
        if key != self.key:
            if _capturing(params[0]):
                # building copies the tables from the host, which a capture cannot hold
                raise RuntimeError(
                    "LARS(fused): a parameter, gradient or momentum tensor is new since the last step, "
                    "inside a CUDA-graph capture; keep gradients allocated between steps "
                    "(zero_grad(set_to_none=False)) and take a step before capturing"
                )
            self._build(key, params)
        return self

    def _build(self, key, params):
        dev = params[0].device
        self.chunk = CHUNK_INTERP if interpreting() else CHUNK_GPU
        self.block = self.chunk if interpreting() else BLOCK_GPU
        rows, chunks, first = [], [], [0]
        for t, ((p_ptr, g_ptr, mu_ptr, numel), p) in enumerate(zip(key, params)):
            rows.append([p_ptr, g_ptr, mu_ptr, numel, int(p.dim() != 1)])
            n_chunks = max(1, -(-numel // self.chunk))
            chunks += [(t, i * self.chunk) for i in range(n_chunks)]
            first.append(first[-1] + n_chunks)
        as_dev = dict(device=dev, dtype=torch.int64)
        self.table = torch.tensor(rows, **as_dev)
        self.chunks = torch.tensor(chunks, **as_dev)
        self.first = torch.tensor(first, **as_dev)
        self.part = torch.empty(len(chunks), 2, device=dev, dtype=torch.float32)
        self.q = torch.empty(len(params), device=dev, dtype=torch.float32)
        self.key = key


def fused_lars_step(params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor],
                    lr: Number, weight_decay: float, momentum: float, eta: float,
                    tables: Optional[_Tables] = None) -> _Tables:
    """One LARS step over the lists (see the module docstring), in place on params and bufs.
    Pass the returned tables back on the next call to skip rebuilding them."""
    if isinstance(lr, torch.Tensor) and lr.device != params[0].device:
        lr = float(lr)  # e.g. a CPU scalar tensor with CUDA parameters: read it on the host
    tables = (tables or _Tables()).get(params, grads, bufs)
    n_chunks = tables.chunks.shape[0]
    _lars_norms_kernel[(n_chunks,)](
        tables.table, tables.chunks, tables.part, float(weight_decay), CHUNK=tables.chunk, BLOCK=tables.block,
    )
    _lars_ratio_kernel[(len(params),)](tables.first, tables.part, tables.table, tables.q, float(eta), BLOCK=256)
    in_memory = isinstance(lr, torch.Tensor)
    _lars_update_kernel[(n_chunks,)](
        tables.table, tables.chunks, tables.q, lr if in_memory else tables.q, 0.0 if in_memory else float(lr),
        float(weight_decay), float(momentum), LR_IN_MEMORY=in_memory, CHUNK=tables.chunk, BLOCK=tables.block,
    )
    return tables
