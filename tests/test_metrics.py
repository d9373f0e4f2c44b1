"""Downstream metrics: AUC table against scikit-learn, undefined classes, Dice, early stopping, t-test."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import ttest_rel
from sklearn.metrics import roc_auc_score

from mlvicx_fast.metrics import (EarlyStopping, accuracy, auc_table, dice, dice_per_image, dice_pooled,
                                 mean_std_cell, paired_ttest)


def test_auc_table_hand_made_case_and_sklearn():
    labels = np.array([[0, 1], [0, 0], [1, 1], [1, 0]])
    scores = np.array([[0.1, 0.9], [0.4, 0.2], [0.35, 0.6], [0.8, 0.7]])
    t = auc_table(labels, scores, ["a", "b"])
    # class a: positives {0.35, 0.8} against negatives {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75
    # class b: positives {0.9, 0.6} against negatives {0.2, 0.7}: 3 of 4 pairs ordered -> 0.75
    assert t["per_class"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.75)}
    assert t["mean"] == pytest.approx(0.75) and t["defined"] == 2


def test_auc_table_random_against_sklearn():
    n, c = 200, 5
    labels = (np.random.rand(n, c) < 0.3).astype(np.uint8)
    scores = np.random.rand(n, c) + 0.5 * labels
    t = auc_table(labels, scores, [f"c{j}" for j in range(c)])
    ref = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(c)]
    assert [t["per_class"][f"c{j}"] for j in range(c)] == pytest.approx(ref, abs=1e-12)
    assert t["mean"] == pytest.approx(np.mean(ref), abs=1e-12)


def test_single_valued_class_is_undefined_not_a_number():
    n = 30
    labels = np.zeros((n, 3), dtype=np.uint8)
    labels[:, 1] = 1  # all positive
    labels[::3, 2] = 1  # defined
    scores = np.random.rand(n, 3)
    t = auc_table(labels, scores, ["none", "all", "some"])
    assert t["per_class"]["none"] is None and t["per_class"]["all"] is None
    assert t["per_class"]["some"] == pytest.approx(roc_auc_score(labels[:, 2], scores[:, 2]))
    assert t["mean"] == t["per_class"]["some"] and t["defined"] == 1
    # nothing defined: no mean at all, and it serialises as null
    empty = auc_table(labels[:, :2], scores[:, :2], ["none", "all"])
    assert empty["mean"] is None and empty["defined"] == 0
    assert json.loads(json.dumps(empty, allow_nan=False))["per_class"] == {"none": None, "all": None}
    assert mean_std_cell([None, None]) == "—"
    assert mean_std_cell([0.5, None]) == "0.500"
    assert mean_std_cell([0.5, 0.7]) == "0.600 ± 0.141"


def test_auc_table_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"labels \(4, 2\) and scores \(4, 3\)"):
        auc_table(np.zeros((4, 2)), np.zeros((4, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="2 label columns but 1 class names"):
        auc_table(np.zeros((4, 2)), np.zeros((4, 2)), ["a"])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        auc_table(np.full((4, 1), 2), np.zeros((4, 1)), ["a"])
    with pytest.raises(ValueError, match="NaN"):
        auc_table(np.array([[0], [1]]), np.array([[0.1], [np.nan]]), ["a"])


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.5]) == pytest.approx(0.5)
    assert accuracy([], []) is None


def test_dice_on_known_masks():
    target = torch.zeros(4, 8, 8, dtype=torch.uint8)
    pred = torch.zeros(4, 8, 8, dtype=torch.uint8)
    target[0, 0, :4] = 1
    pred[0, 0, 2:6] = 1        # 4 and 4 pixels, 2 shared: 2*2/8 = 0.5
    target[1, 3:5, 3:5] = 1
    pred[1, 3:5, 3:5] = 1      # identical: 1
    target[2, 0, 0] = 1        # missed entirely: 0
    # image 3: both empty -> 1 (SIIM convention)
    per = dice_per_image(pred, target)
    assert per.tolist() == pytest.approx([0.5, 1.0, 0.0, 1.0])
    assert dice(pred, target) == pytest.approx(0.625)
    assert dice_per_image(pred[3:], target[3:], empty=0.0).tolist() == [0.0]
    # pooled: 2 * (2 + 4) / ((4 + 4) + (4 + 4) + (0 + 1)) = 12 / 17
    assert dice_pooled(pred, target) == pytest.approx(12 / 17)
    assert dice_pooled(pred[3:], target[3:]) == 1.0
    assert dice_pooled(torch.zeros_like(target), target) == 0.0
    with pytest.raises(ValueError, match=r"\(4, 8, 8\) and target \(4, 8, 7\)"):
        dice(pred, target[..., :7])


def test_early_stopping_keeps_the_best_and_waits_patience_epochs():
    stopper = EarlyStopping(patience=3)
    scores = [0.50, 0.60, 0.60, 0.55, 0.70, 0.69, None, float("nan"), 0.9]
    improved, stopped_at = [], None
    for epoch, s in enumerate(scores):
        improved.append(stopper.step(s))
        if stopper.stop:
            stopped_at = epoch
            break
    # a tie (0.60) is no improvement; None and NaN never improve
    assert improved == [True, True, False, False, True, False, False, False]
    assert stopped_at == 7 and stopper.best == 0.70 and stopper.best_epoch == 4
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        EarlyStopping(patience=0)


def test_paired_ttest_against_scipy_on_known_numbers():
    a = [0.71, 0.73, 0.70, 0.74, 0.72]
    b = [0.69, 0.70, 0.70, 0.71, 0.69]
    r = paired_ttest(a, b)
    ref = ttest_rel(a, b)
    d = np.subtract(a, b)  # 0.02 0.03 0.00 0.03 0.03: mean 0.022, sd 0.013038
    assert r["mean_diff"] == pytest.approx(0.022)
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(5)))
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    assert r["t"] == pytest.approx(3.77297, abs=1e-4) and r["p"] == pytest.approx(0.019554, abs=1e-5)
    # random pairs, too
    x, y = np.random.rand(10), np.random.rand(10)
    assert paired_ttest(x, y)["p"] == pytest.approx(ttest_rel(x, y).pvalue)
    # undefined cases: one pair, identical differences
    assert paired_ttest([0.7], [0.6])["p"] is None
    assert paired_ttest([0.7, 0.8], [0.6, 0.7])["t"] is None
    with pytest.raises(ValueError, match="same length"):
        paired_ttest([0.1, 0.2], [0.1])
