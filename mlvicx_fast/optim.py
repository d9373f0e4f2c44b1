r"""LARS and the warmup-cosine learning-rate schedule of official VICReg (used by MLVICX).

LARS step for a parameter p with gradient g (You et al. 2017, as in facebookresearch/vicreg)::

    d  = g + wd * p                                    (not for biases / norm weights: p.ndim == 1)
    q  = eta * ||p|| / ||d||  if ||p|| > 0 and ||d|| > 0, else 1      (same exclusion)
    mu = momentum * mu + q * d
    p  = p - lr * mu

Defaults: momentum 0.9, eta 0.001, weight decay 1e-6 (the official VICReg/MLVICX code).

Schedule: lr = base_lr * batch / 256; linear warmup from 0 over `warmup_steps`, then a half
cosine that reaches 0.001 * lr at step `total_steps`, one past the last step taken (as official
VICReg: the last step of a 100-step run with 10 warm-up steps has 0.0013 * lr). The MLVICX code
divides the cosine's argument by all the steps T instead of T - warmup (its `self.total_steps -=
self.warmup_steps` is commented out), so its cosine stops short of the end: over 300 epochs with 2
of warm-up the two schedules differ by at most 0.6 % of the peak; this one is DESIGN.md's and
official VICReg's.

:class:`LARS` updates float32 CUDA parameters with the fused Triton kernels of
:mod:`mlvicx_fast.ops.lars` (three launches, seven passes over the parameters) and anything else
with ``torch._foreach_*`` ops over all parameters of a group at once. Neither synchronises with
the host, so a CUDA graph can capture the step; ``lr`` may be a float or a 0-dim tensor on the
parameters' device. :func:`lars_step_reference` is the plain per-parameter loop both are tested
against.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch.optim import Optimizer

Number = Union[float, torch.Tensor]


def exclude_bias_and_norm(p: torch.Tensor) -> bool:
    """Parameters left out of weight decay and of the trust ratio: biases and norm weights."""
    return p.ndim == 1


class LARS(Optimizer):
    """LARS with the official VICReg exclusions (biases and norm parameters: ndim == 1).

    fused: None (default) updates float32 CUDA parameters with the fused Triton kernels of
    :mod:`mlvicx_fast.ops.lars` (seven passes over the parameters instead of about seventeen) and
    everything else with foreach ops; True requires the fused kernels (an error names what does not
    fit; CPU tensors need TRITON_INTERPRET=1); False always uses the foreach ops."""

    def __init__(self, params: Iterable, lr: Number, weight_decay: float = 1e-6, momentum: float = 0.9,
                 eta: float = 0.001, fused: Optional[bool] = None):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if weight_decay < 0 or momentum < 0 or eta <= 0:
            raise ValueError(f"LARS: need weight_decay >= 0, momentum >= 0, eta > 0; got "
                             f"weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))
        self.fused = fused
        self._tables: Dict[int, object] = {}  # fused kernels' pointer tables, per param group
        self._scratch: Dict[int, List[torch.Tensor]] = {}  # foreach path's d = g + wd p, per group

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._step_fused(i, group, params):
                continue
            adapt = [p for p in params if not exclude_bias_and_norm(p)]
            plain = [p for p in params if exclude_bias_and_norm(p)]
            updates: List[torch.Tensor] = [p.grad for p in plain]
            if adapt:
                # d = g + wd p in buffers kept between steps: a fresh allocation of the size of the
                # parameters costs more than the arithmetic on the CPU (the pages are faulted in anew)
                d = self._scratch_for(i, adapt)
                torch._foreach_copy_(d, [p.grad for p in adapt])
                torch._foreach_add_(d, adapt, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(adapt))
                d_norm = torch.stack(torch._foreach_norm(d))
                one = torch.ones_like(p_norm)
                q = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, one)
                torch._foreach_mul_(d, list(q.unbind(0)))
                updates = list(d) + updates
                params = adapt + plain
            else:
                params = plain
            mu = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            torch._foreach_add_(mu, updates)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type == "cpu":
                lr = float(lr)  # no device to wait for; saves a parameter-sized temporary
            if isinstance(lr, torch.Tensor):
                torch._foreach_add_(params, torch._foreach_mul(mu, -lr))
            else:
                torch._foreach_add_(params, mu, alpha=-lr)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, and each momentum buffer takes its parameter's layout: a run resumed with
        another --channels-last than it was saved with kept the saved layout, and the fused kernels,
        which walk a parameter, its gradient and its momentum in one memory order, were passed over
        for the rest of the run."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                mu = self.state.get(p, {}).get("mu")
                if mu is not None and mu.stride() != p.stride():
                    self.state[p]["mu"] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(mu)

    def _scratch_for(self, index: int, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per-group buffers shaped like `params`, reused across steps (not part of the state)."""
        bufs = self._scratch.get(index)
        if bufs is None or [(b.shape, b.dtype, b.device, b.stride()) for b in bufs] != \
                [(p.shape, p.dtype, p.device, p.stride()) for p in params]:
            bufs = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            self._scratch[index] = bufs
        return bufs

    def _step_fused(self, index: int, group: dict, params: List[torch.Tensor]) -> bool:
        """Update the group with the fused kernels when allowed and possible; False otherwise."""
        if self.fused is False or (self.fused is None and not all(p.is_cuda for p in params)):
            return False
        from .ops.lars import fused_lars_step, fused_lars_supported

        grads = [p.grad for p in params]
        bufs = [self.state[p]["mu"] for p in params]
        if not fused_lars_supported(params, grads, bufs):
            if self.fused:
                kinds = sorted({f"{p.device}/{p.dtype}/{'dense' if p.is_contiguous() else 'strided'}" for p in params})
                raise ValueError(
                    "LARS(fused=True): the fused kernels take float32 parameters, gradients and momentum with one "
                    "dense layout, on a CUDA device (or CPU with TRITON_INTERPRET=1); got " + ", ".join(kinds)
                )
            return False
        self._tables[index] = fused_lars_step(
            params, grads, bufs, group["lr"], group["weight_decay"], group["momentum"], group["eta"],
            self._tables.get(index),
        )
        return True


@torch.no_grad()
def lars_step_reference(params: List[torch.Tensor], state: dict, lr: float, weight_decay: float = 1e-6,
                        momentum: float = 0.9, eta: float = 0.001) -> None:
    """One LARS step, one parameter at a time, written as the official VICReg optimizer."""
    for p in params:
        if p.grad is None:
            continue
        dp = p.grad
        if not exclude_bias_and_norm(p):
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, eta * param_norm / update_norm, one), one)
            dp = dp.mul(q)
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of the official code: base_lr * batch / 256."""
    return base_lr * batch_size / 256


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, end_factor: float = 0.001) -> float:
    """Learning rate at `step` (0-based): linear warmup to peak_lr, then half-cosine to end_factor * peak_lr."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine_lr: total_steps must be > 0, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    q = 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    end = peak_lr * end_factor
    return peak_lr * q + end * (1 - q)
