r"""Batch normalisation with statistics over every process, for CPU training on gloo.

torch.nn.SyncBatchNorm runs only on GPUs. This module computes the same thing with plain
collectives, so a multi-process CPU run (and its test) normalises by the global batch::

    S1_c = all_reduce(sum_{n,h,w} x),  M = all_reduce(count),  mean = S1 / M
    var = all_reduce(sum_{n,h,w} (x - mean)^2) / M      (biased, used to normalise)
    y = (x - mean) / sqrt(var + eps) * weight + bias
    running_mean/var updated with mean and var * M / (M - 1)   (as torch's BatchNorm)

Gradients flow through the all-reduces (their backward all-reduces the gradient), like torch's
SyncBatchNorm backward. The sums are float64, the per-element work float32 (x's dtype if wider).
In eval mode, or without a process group, it is plain batch norm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d whose training statistics are taken over all processes of the default group."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNormCPU: expected at least 2-D input (N, C, ...), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(x)  # torch's own BatchNorm (num_batches_tracked, momentum=None)
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=torch.float64)
        # sums in float64 (a float32 sum of values around 300 is off by a few 1e-3 of a spread of
        # 0.01), the per-element work in float32
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims, dtype=torch.float64), count]))
        m = stats[-1]
        if m.item() <= 1:
            raise ValueError(f"SyncBatchNormCPU: expected more than 1 value per channel over all processes, "
                             f"got {int(m.item())} (local input {tuple(x.shape)})")
        shape = [1, c] + [1] * (x.dim() - 2)
        mean = stats[:c] / m
        # two passes: E[x^2] - mean^2 cancels to garbage (NaN under the root) when the mean is
        # large against the spread; the centred sum does not. The float64 mean is split into its
        # float32 part and the rest, so x - mean loses nothing to the mean's rounding.
        m_hi = mean.to(xf.dtype)
        m_lo = (mean - m_hi).to(xf.dtype)
        centred = (xf - m_hi.view(shape)) - m_lo.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims, dtype=torch.float64)) / m
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (m / (m - 1)), alpha=momentum)
        y = centred * torch.rsqrt(var + self.eps).to(xf.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm_cpu(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in module by SyncBatchNormCPU with the same state (values,
    device, dtype, which parameters are frozen, train/eval mode)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNormCPU):
        like = module.weight if module.affine else module.running_mean
        kw = {} if like is None else dict(device=like.device, dtype=like.dtype)
        out = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, **kw)
        out.load_state_dict(module.state_dict())
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm_cpu(child))
    return out
