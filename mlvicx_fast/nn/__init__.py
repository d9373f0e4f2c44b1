"""Thin torch.nn modules over the fused ops."""
from .context import ContextBottleneck
from .loss import MLVICXLoss, VICRegLoss

__all__ = ["ContextBottleneck", "MLVICXLoss", "VICRegLoss"]
