"""The MLVICX pretraining network (Singh, Gorade, Mishra, IEEE JBHI 2024; DESIGN.md section 1).

One view x (N, 3 or 1, H, W) goes through ResNet18 with a context-bottleneck block inline after
each of its five stages (the block's output feeds the next stage)::

    t0 = Ct0(relu(bn1(conv1(x))))          64 x H/2   (before maxpool)
    t1 = Ct1(layer1(maxpool(t0)))          64 x H/4
    t2 = Ct2(layer2(t1))                  128 x H/8
    t3 = Ct3(layer3(t2))                  256 x H/16
    t4 = Ct4(layer4(t3))                  512 x H/32
    z  = g(avgpool(t4))                    global embedding        (N, D)
    m  = h(aggregate(t0, ..., t4))         multi-level embedding   (N, D)

aggregate = flatten(pool_4x4(sum_p conv1x1_p(resize_64x64(t_p)))) with Conv1x1(C_p, 512) + bias,
8192 features (computed pool-first, exactly, unless aggregation='official'). Expanders g
(512 -> D -> D -> D) and h (8192 -> D -> D -> D) are Linear-BN-ReLU, Linear-BN-ReLU, Linear(-BN).

Presets: ``official`` (the authors' code: D = 4096, final BN on both heads) and ``paper``
(the paper text: D = 2048, no final BN). All Linear layers have a bias, as in the official code.
The loss of the two views is :class:`mlvicx_fast.MLVICXLoss` on (z1, z2, m1, m2).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..nn.aggregate import MultiLevelAggregation
from ..nn.context import ContextBottleneck
from ..ops.aggregate import AGGREGATIONS
from ..ops.context_bottleneck import BACKENDS
from .resnet import STAGE_CHANNELS, ResNet18

PRESETS = {
    "official": dict(dim=4096, final_bn=True),
    "paper": dict(dim=2048, final_bn=False),
}


def expander(in_features: int, dim: int, final_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear(-BN): in_features -> dim -> dim -> dim."""
    layers = [
        nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim),
    ]
    if final_bn:
        layers.append(nn.BatchNorm1d(dim))
    return nn.Sequential(*layers)


def refined_taps(backbone: ResNet18, context: nn.ModuleList, x: torch.Tensor) -> List[torch.Tensor]:
    """t0..t4: each ResNet stage followed by its context block, whose output feeds the next."""
    backbone.check_input(x)
    taps = []
    for i, block in enumerate(context):
        x = block(backbone.stage(i, x))
        taps.append(x)
    return taps


class ContextEncoder(nn.Module):
    """ResNet18 with the context blocks inline; ``forward`` gives (N, 512) pooled features.
    Shares its modules with the MLVICX network it came from."""

    def __init__(self, backbone: ResNet18, context: nn.ModuleList):
        super().__init__()
        self.backbone = backbone
        self.context = context
        self.num_features = backbone.num_features

    def forward_taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five refined maps t0..t4."""
        return refined_taps(self.backbone, self.context, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone.avgpool(self.forward_taps(x)[-1]), 1)


class MLVICX(nn.Module):
    """MLVICX network for one view: ``z, m = model(x)``.

    Args:
        preset: 'official' (D=4096, final BN) or 'paper' (D=2048, no final BN).
        dim, final_bn: override the preset's expander width / final BN.
        in_chans: 3 (grey replicated to RGB, as the official code) or 1.
        backend: context blocks' backend, 'auto' (Triton on CUDA), 'triton' or 'torch'.
        aggregation: 'exact' (pool first) or 'official' (resize every tap to 64x64).
        reduction: channel reduction r of the context blocks' MLP (official 2).
        width, resize, pool: aggregation projection width (512), resize side (64), pool side (4).
        fp32_heads: run both expanders in float32 even under autocast (their inputs cast up; the
            backbone and context blocks keep the autocast dtype). Measured on the CPU
            (built-in run, three seeds, 2026-12-04): with bf16 expanders the demo's probe margin fell
            at every seed (mean +0.035 against fp32's +0.060); with fp32 expanders it was +0.055,
            at bf16's step time.
    """

    def __init__(self, preset: str = "official", dim: int = None, final_bn: bool = None,
                 in_chans: int = 3, backend: str = "auto", aggregation: str = "exact",
                 reduction: int = 2, width: int = 512, resize: int = 64, pool: int = 4,
                 fp32_heads: bool = False):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"MLVICX: unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
        if backend not in BACKENDS:
            raise ValueError(f"MLVICX: unknown backend {backend!r}; expected one of {BACKENDS}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"MLVICX: unknown aggregation {aggregation!r}; expected one of {tuple(AGGREGATIONS)}")
        dim = PRESETS[preset]["dim"] if dim is None else dim
        final_bn = PRESETS[preset]["final_bn"] if final_bn is None else final_bn
        self.preset, self.dim, self.final_bn, self.fp32_heads = preset, dim, final_bn, fp32_heads
        self.backbone = ResNet18(in_chans=in_chans)
        self.context = nn.ModuleList(ContextBottleneck(c, reduction, backend) for c in STAGE_CHANNELS)
        self.aggregation = MultiLevelAggregation(STAGE_CHANNELS, width, resize, pool, aggregation)
        self.global_expander = expander(self.backbone.num_features, dim, final_bn)
        self.multilevel_expander = expander(self.aggregation.out_features, dim, final_bn)

    def set_backend(self, backend: str) -> "MLVICX":
        """Switch every context block to backend ('auto', 'triton', 'torch')."""
        if backend not in BACKENDS:
            raise ValueError(f"MLVICX: unknown backend {backend!r}; expected one of {BACKENDS}")
        for block in self.context:
            block.backend = backend
        return self

    def set_aggregation(self, mode: str) -> "MLVICX":
        """Switch the aggregation between 'exact' and 'official' (same parameters)."""
        if mode not in AGGREGATIONS:
            raise ValueError(f"MLVICX: unknown aggregation {mode!r}; expected one of {tuple(AGGREGATIONS)}")
        self.aggregation.mode = mode
        return self

    def encoder(self, with_context: bool = False) -> nn.Module:
        """The encoder for downstream use, sharing this network's parameters (deepcopy it to
        fine-tune separately). with_context=False: the plain ResNet18 (what the official
        evaluation loads); True: ResNet18 with the five context blocks inline. Both return
        (N, 512) features from ``forward`` and the five maps from ``forward_taps``."""
        return ContextEncoder(self.backbone, self.context) if with_context else self.backbone

    def forward_taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five refined maps t0..t4."""
        return refined_taps(self.backbone, self.context, x)

    def forward(self, x: torch.Tensor, global_head: bool = True, multilevel_head: bool = True):
        """(z, m) for the view x. An ablation that trains one head only turns the other off (None
        in its place): multilevel_head=False skips the aggregation and the multi-level expander,
        global_head=False the global expander."""
        taps = self.forward_taps(x)
        g = torch.flatten(self.backbone.avgpool(taps[-1]), 1) if global_head else None
        a = self.aggregation(taps) if multilevel_head else None
        if not self.fp32_heads:
            return self._heads(g, a)
        with torch.autocast(x.device.type, enabled=False):
            return self._heads(None if g is None else g.float(), None if a is None else a.float())

    def modules_off(self, global_head: bool = True, multilevel_head: bool = True) -> List[nn.Module]:
        """The modules ``forward(x, global_head, multilevel_head)`` does not run."""
        return ([] if global_head else [self.global_expander]) + (
            [] if multilevel_head else [self.aggregation, self.multilevel_expander])

    def _heads(self, g: Optional[torch.Tensor], a: Optional[torch.Tensor]):
        return (None if g is None else self.global_expander(g),
                None if a is None else self.multilevel_expander(a))

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, dim={self.dim}, final_bn={self.final_bn}, fp32_heads={self.fp32_heads}"
