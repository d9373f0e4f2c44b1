"""Fused ops: each file holds the math, the Triton kernels, the autograd glue and a torch reference."""
from .vicreg import vicreg_loss, vicreg_loss_reference

__all__ = ["vicreg_loss", "vicreg_loss_reference"]
