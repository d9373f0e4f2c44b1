"""VICRegLoss / MLVICXLoss modules: the weighted sums they promise, and their options."""
import pytest
import torch

import mlvicx_fast
from mlvicx_fast import MLVICXLoss, VICRegLoss
from mlvicx_fast.ops import vicreg_loss_reference
from tests.helpers import TRITON_DEVICE


def _pairs(device="cpu"):
    z1, z2 = torch.randn(16, 40, device=device), torch.randn(16, 40, device=device)
    m1, m2 = torch.randn(16, 72, device=device), torch.randn(16, 72, device=device)
    return z1, z2, m1, m2


def test_public_api():
    assert mlvicx_fast.VICRegLoss is VICRegLoss and mlvicx_fast.MLVICXLoss is MLVICXLoss
    assert callable(mlvicx_fast.ops.vicreg_loss)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_vicreg_module_matches_reference(backend):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    z1, z2, _, _ = _pairs(dev)
    loss = VICRegLoss(sim_coeff=10.0, std_coeff=5.0, cov_coeff=0.5, eps=1e-3, backend=backend)(z1, z2)
    ref = vicreg_loss_reference(z1.double(), z2.double(), 10.0, 5.0, 0.5, 1e-3)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("lambda_, global_weight", [(1.0, 1.0), (0.3, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_mlvicx_is_weighted_sum(lambda_, global_weight):
    z1, z2, m1, m2 = _pairs()
    z1.requires_grad_()
    m1.requires_grad_()
    fn = MLVICXLoss(lambda_=lambda_, global_weight=global_weight, std_coeff=20.0)
    loss, terms = fn(z1, z2, m1, m2, return_terms=True)
    ref = (global_weight * vicreg_loss_reference(z1.double(), z2.double(), std_coeff=20.0)
           + lambda_ * vicreg_loss_reference(m1.double(), m2.double(), std_coeff=20.0))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ("global/loss" in terms) == (global_weight != 0)
    assert ("multi/loss" in terms) == (lambda_ != 0)
    if global_weight and lambda_:
        assert set(terms) == {f"{p}/{k}" for p in ("global", "multi") for k in ("loss", "inv", "var", "cov")}
    loss.backward()
    assert (z1.grad is not None) == (global_weight != 0)  # a zero weight skips that loss entirely
    assert (m1.grad is not None) == (lambda_ != 0)


def test_mlvicx_rejects_empty_loss():
    with pytest.raises(ValueError, match="lambda_ and global_weight are both 0"):
        MLVICXLoss(lambda_=0.0, global_weight=0.0)


def test_solo_learn_mapping():
    """solo-learn's vicreg_loss_func does not halve the variance term: std_coeff = 2 * var_loss_weight."""
    z1, z2, _, _ = _pairs()
    ours = VICRegLoss(sim_coeff=25.0, std_coeff=50.0, cov_coeff=1.0)(z1, z2)
    _, t = vicreg_loss_reference(z1.double(), z2.double(), return_terms=True)
    solo = 25.0 * t["inv"] + 25.0 * (2 * t["var"]) + 1.0 * t["cov"]  # solo-learn's sum of both views' var
    assert ours.item() == pytest.approx(solo.item(), rel=1e-5)


def test_module_repr_names_settings():
    text = repr(MLVICXLoss(lambda_=0.5, gather_distributed=True))
    assert "lambda_=0.5" in text and "gather_distributed=True" in text
