"""LARS (foreach) against the per-parameter official loop, and the warmup-cosine schedule."""
import math

import pytest
import torch

from mlvicx_fast.optim import LARS, lars_step_reference, scaled_lr, warmup_cosine_lr


def _params():
    shapes = [(16, 8), (16,), (4, 3, 5, 5), (7,), (33, 17)]
    return [torch.randn(s) for s in shapes]


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_lars_matches_reference(lr_as_tensor):
    ours = [p.clone().requires_grad_() for p in _params()]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    with torch.no_grad():
        ours[2].zero_()  # a parameter with zero norm: trust ratio falls back to 1
        ref[2].zero_()
    lr = 0.3
    opt = LARS(ours, lr=torch.tensor(lr) if lr_as_tensor else lr, weight_decay=1e-2, momentum=0.9, eta=0.02)
    state = {}
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        grads[4] = None if _ == 1 else grads[4]  # a parameter without a gradient this step
        for p, q, g in zip(ours, ref, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        opt.step()
        lars_step_reference(ref, state, lr, weight_decay=1e-2, momentum=0.9, eta=0.02)
        for p, q in zip(ours, ref):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()


def test_lars_excludes_bias_from_decay_and_trust_ratio():
    # float64: the step is ~1e-3 of the weights, so float32 rounding of w0 - w would be ~1e-4 of it
    w = torch.nn.Parameter(torch.randn(5, 5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.0, eta=0.001)
    gb = torch.randn(5, dtype=torch.float64)
    w.grad, b.grad = torch.randn(5, 5, dtype=torch.float64), gb.clone()
    b0, w0 = b.detach().clone(), w.detach().clone()
    opt.step()
    assert torch.allclose(b, b0 - gb)  # plain SGD for ndim == 1
    step = (w0 - w).norm()
    assert step.item() == pytest.approx(0.001 * w0.norm().item(), rel=1e-5)  # trust ratio: eta * ||w||


@pytest.mark.parametrize("saved, loaded", [(torch.contiguous_format, torch.channels_last),
                                           (torch.channels_last, torch.contiguous_format)], ids=["to-cl", "from-cl"])
def test_resumed_momentum_takes_the_parameters_layout(saved, loaded):
    """A resume under another --channels-last: the momentum comes back in the parameter's layout
    (the fused kernels need one memory order for all three), with its values, and the next steps
    equal those of an optimizer that never changed layout."""
    def run(fmt, state=None):
        w = torch.nn.Parameter(torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(1)).to(memory_format=fmt))
        opt = LARS([w], lr=0.1, weight_decay=1e-4)
        if state is not None:
            opt.load_state_dict(state)
        return w, opt

    g = torch.randn(6, 5, 3, 3)
    w, opt = run(saved)
    w.grad = g.clone().to(memory_format=saved)
    opt.step()
    state = opt.state_dict()
    mu = state["state"][0]["mu"].clone()
    w2, opt2 = run(loaded, state)
    w2.data.copy_(w.detach())
    assert opt2.state[w2]["mu"].stride() == w2.stride() != mu.stride()
    assert torch.equal(opt2.state[w2]["mu"], mu)
    w.grad, w2.grad = g.to(memory_format=saved), g.to(memory_format=loaded)
    opt.step()
    opt2.step()
    assert torch.allclose(w2, w, rtol=0, atol=1e-7)


def test_lars_bad_arguments():
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        LARS([torch.nn.Parameter(torch.randn(2))], lr=-1)
    with pytest.raises(ValueError, match="eta=0"):
        LARS([torch.nn.Parameter(torch.randn(2))], lr=0.1, eta=0)


def test_schedule_shape():
    peak, total, warm = 0.8, 100, 10
    lrs = [warmup_cosine_lr(s, total, warm, peak) for s in range(total + 1)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.4)
    assert lrs[warm] == pytest.approx(peak)
    assert lrs[total] == pytest.approx(0.001 * peak)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # monotone decay after warmup
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(peak * 0.5 + 0.001 * peak * 0.5)
    assert scaled_lr(0.2, 64) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="total_steps must be > 0, got 0"):
        warmup_cosine_lr(0, 0, 0, 1.0)
    assert not math.isnan(warmup_cosine_lr(3, 5, 10, 1.0))  # warmup longer than the run is clipped
