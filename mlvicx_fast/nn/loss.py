"""VICRegLoss and MLVICXLoss: modules over :func:`mlvicx_fast.ops.vicreg_loss`."""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
from torch import nn

from ..distributed import gather_with_grad
from ..ops.vicreg import vicreg_loss

LossOut = Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


class VICRegLoss(nn.Module):
    """VICReg loss with the official coefficients (Bardes et al. 2022, facebookresearch/vicreg).

    ``loss(z1, z2)`` returns the scalar ``sim*inv + std*(var(z1)+var(z2))/2 + cov*(cov(z1)+cov(z2))``.
    With ``gather_distributed=True`` and an initialised process group the embeddings of all ranks
    are gathered first, so all three terms use the global batch, and gradients flow back to each
    rank's slice (summed over ranks, as the official gather does).
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, gather_distributed: bool = False, backend: str = "auto"):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.eps = float(eps)
        self.gather_distributed = gather_distributed
        self.backend = backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, return_terms: bool = False) -> LossOut:
        if self.gather_distributed:
            z1, z2 = gather_with_grad(z1, z2)
        return vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps,
                           backend=self.backend, return_terms=return_terms)

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, "
                f"eps={self.eps}, gather_distributed={self.gather_distributed}, backend={self.backend!r}")


class MLVICXLoss(nn.Module):
    """MLVICX loss: ``global_weight * L(z1, z2) + lambda_ * L(m1, m2)``, L the VICReg loss.

    z are the global embeddings (global expander g), m the multi-level ones (expander h).
    ``lambda_=0`` is plain VICReg (global only); ``global_weight=0`` the multi-level-only ablation.
    A zero weight skips that loss entirely. Keyword arguments go to :class:`VICRegLoss`.
    """

    def __init__(self, lambda_: float = 1.0, global_weight: float = 1.0, **vicreg_args):
        super().__init__()
        if lambda_ == 0 and global_weight == 0:
            raise ValueError("MLVICXLoss: lambda_ and global_weight are both 0, so the loss would be empty")
        self.lambda_ = float(lambda_)
        self.global_weight = float(global_weight)
        self.vicreg = VICRegLoss(**vicreg_args)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor,
                return_terms: bool = False) -> LossOut:
        total = None
        terms: Dict[str, torch.Tensor] = {}
        for prefix, weight, a, b in (("global", self.global_weight, z1, z2), ("multi", self.lambda_, m1, m2)):
            if weight == 0:
                continue
            loss, parts = self.vicreg(a, b, return_terms=True)
            terms[f"{prefix}/loss"] = loss.detach()
            terms.update({f"{prefix}/{k}": v for k, v in parts.items()})
            total = weight * loss if total is None else total + weight * loss
        return (total, terms) if return_terms else total

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, global_weight={self.global_weight}"
