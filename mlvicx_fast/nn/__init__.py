"""Thin torch.nn modules over the fused ops."""
from .aggregate import MultiLevelAggregation
from .context import ContextBottleneck
from .loss import MLVICXLoss, VICRegLoss

__all__ = ["ContextBottleneck", "MultiLevelAggregation", "MLVICXLoss", "VICRegLoss"]
