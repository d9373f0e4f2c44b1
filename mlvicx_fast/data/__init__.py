"""Chest X-ray data: reading the four datasets, the phantom set, .beton preparation and loaders.

    python -m mlvicx_fast.data.prepare {nih,vinbig,rsna,siim,phantom} --root DIR --out DIR
"""
from .datasets import NIH_LABELS, RSNA_LABELS, SIIM_LABELS, VINBIG_LABELS
from .loader import make_loader
from .prepare import ensure_phantom, prepare

__all__ = ["NIH_LABELS", "VINBIG_LABELS", "RSNA_LABELS", "SIIM_LABELS", "ensure_phantom", "make_loader", "prepare"]
