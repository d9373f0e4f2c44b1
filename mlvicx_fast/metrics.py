"""Downstream metrics: per-class AUC with undefined classes, accuracy, Dice, early stopping, paired t-test.

* AUC (scikit-learn ``roc_auc_score``) is undefined for a class whose labels in the evaluation set
  take a single value (all 0 or all 1): such a class is reported as ``None`` (null in JSON, '—' in
  tables), and the mean AUC is the mean over the defined classes (``None`` when there is none).
  The count of defined classes travels with the mean so a reader can see what it averages.
* Dice per image, 2|P∩T| / (|P| + |T|), with an empty prediction on an empty mask counted as 1
  (the SIIM-ACR challenge convention), averaged over the images.
* Paired t-test: ``scipy.stats.ttest_rel`` on matched runs; undefined (None) for fewer than two
  pairs or when every difference is the same (zero variance).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["auc_table", "accuracy", "dice_per_image", "dice", "dice_pooled", "EarlyStopping", "paired_ttest",
           "mean_or_none", "mean_std_cell"]


def mean_or_none(values) -> Optional[float]:
    """Mean of the values that are not None/NaN; None when there is none."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(kept)) if kept else None


def auc_table(labels, scores, classes: Sequence[str]) -> Dict:
    """Per-class ROC AUC of scores (N, C) against binary labels (N, C).

    Returns {"per_class": {class: auc or None}, "mean": mean over defined classes or None,
    "defined": number of defined classes}. A class whose labels hold a single value is None.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if scores.ndim == 1:
        scores = scores[:, None]
    if labels.shape != scores.shape:
        raise ValueError(f"auc_table: labels {labels.shape} and scores {scores.shape} must have the same shape")
    if labels.shape[1] != len(classes):
        raise ValueError(f"auc_table: {labels.shape[1]} label columns but {len(classes)} class names")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("auc_table: labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("auc_table: scores hold NaN or infinity")
    per_class: Dict[str, Optional[float]] = {}
    for j, name in enumerate(classes):
        y = labels[:, j]
        if y.size == 0 or y.min() == y.max():
            per_class[name] = None
        else:
            per_class[name] = float(roc_auc_score(y, scores[:, j]))
    defined = [v for v in per_class.values() if v is not None]
    return {"per_class": per_class, "mean": float(np.mean(defined)) if defined else None, "defined": len(defined)}


def accuracy(labels, probabilities, threshold: float = 0.5) -> Optional[float]:
    """Share of elements where (probability >= threshold) equals the 0/1 label; None when empty."""
    labels = np.asarray(labels).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if labels.shape != probabilities.shape:
        raise ValueError(f"accuracy: {labels.shape[0]} labels but {probabilities.shape[0]} probabilities")
    if labels.size == 0:
        return None
    return float(((probabilities >= threshold) == (labels > 0.5)).mean())


def dice_per_image(pred: torch.Tensor, target: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Dice of binary masks per image: pred, target (N, H, W) or (N, 1, H, W), any dtype (nonzero =
    foreground). Both empty gives `empty` (1 by the SIIM-ACR convention). Returns (N,) float64."""
    if pred.shape != target.shape:
        raise ValueError(f"dice: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 2:
        raise ValueError(f"dice: expected a batch of masks (N, H, W), got shape {tuple(pred.shape)}")
    p = (pred != 0).reshape(pred.shape[0], -1).double()
    t = (target != 0).reshape(target.shape[0], -1).double()
    inter = (p * t).sum(1)
    total = p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, empty))


def dice(pred: torch.Tensor, target: torch.Tensor, empty: float = 1.0) -> float:
    """Mean per-image Dice (see `dice_per_image`)."""
    return float(dice_per_image(pred, target, empty).mean())


class EarlyStopping:
    """Stop after `patience` epochs without a better score (higher is better, ties do not count).

    ``step(score)`` returns True when the score is a new best (the caller keeps that model);
    ``stop`` becomes True once `patience` epochs in a row brought no improvement. A None/NaN score
    never improves.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1, got {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.bad_epochs = 0
        self.epoch = -1

    def step(self, score: Optional[float]) -> bool:
        self.epoch += 1
        ok = score is not None and not math.isnan(score)
        if ok and (self.best is None or score > self.best + self.min_delta):
            self.best, self.best_epoch, self.bad_epochs = float(score), self.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> Dict:
    """Paired t-test of a against b (``scipy.stats.ttest_rel``): n, mean difference a - b, t and p.
    t and p are None when they are undefined (n < 2, or all differences equal up to rounding)."""
    from scipy.stats import ttest_rel

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_ttest: a {a.shape} and b {b.shape} must be 1-D and of the same length")
    out = {"n": int(a.size), "mean_a": None, "mean_b": None, "mean_diff": None, "t": None, "p": None}
    if a.size == 0:
        return out
    out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), mean_diff=float((a - b).mean()))
    d = a - b
    if a.size >= 2 and np.ptp(d) > 1e-12 * max(1.0, float(np.abs(d).max())):  # equal up to rounding: no variance
        res = ttest_rel(a, b)
        out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def mean_std_cell(values: List[Optional[float]], digits: int = 3) -> str:
    """'0.712 ± 0.010' over the defined values, '0.712' for one, '—' for none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return "—"
    if len(kept) == 1:
        return _fmt(kept[0], digits)
    return f"{np.mean(kept):.{digits}f} ± {np.std(kept, ddof=1):.{digits}f}"


def dice_pooled(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Dice pooled over every pixel of a set of masks, 2 sum|P∩T| / (sum|P| + sum|T|); 1 when both are empty
    everywhere. An all-empty prediction of a set holding any foreground scores 0."""
    if pred.shape != target.shape:
        raise ValueError(f"dice: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p, t = pred != 0, target != 0
    total = float(p.sum() + t.sum())
    return 2 * float((p & t).sum()) / total if total > 0 else 1.0
