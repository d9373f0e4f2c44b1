"""Thin torch.nn modules over the fused ops."""
from .loss import MLVICXLoss, VICRegLoss

__all__ = ["MLVICXLoss", "VICRegLoss"]
