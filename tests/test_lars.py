"""The fused LARS kernels (mlvicx_fast.ops.lars, TRITON_INTERPRET=1 on the CPU) against the
official per-parameter loop in float64, over several steps, with chunk boundaries, channels_last
weights, zero-norm parameters, parameters without gradients, float and tensor learning rates."""
import pytest
import torch

import mlvicx_fast.ops.lars as lars_op
from mlvicx_fast.optim import LARS, lars_step_reference
from tests.helpers import TRITON_DEVICE

pytestmark = pytest.mark.triton

CHUNK = lars_op.CHUNK_INTERP


def make_params():
    """Shapes around the chunk size, a bias, a 1-element tensor, a channels_last conv weight."""
    shapes = [(CHUNK,), (CHUNK + 1,), (3, CHUNK - 5), (7,), (1,), (2 * CHUNK + 3,), (5, 3, 7, 7)]
    ps = [torch.randn(s, device=TRITON_DEVICE) for s in shapes]
    ps[-1] = ps[-1].contiguous(memory_format=torch.channels_last)
    return ps


def run_both(params, steps, lr, grads_fn, **hyper):
    ours = [p.clone().requires_grad_() for p in params]  # clone keeps channels_last
    ref = [p.detach().double().requires_grad_() for p in params]
    opt = LARS(ours, lr=lr, fused=True, **hyper)
    state = {}
    for step in range(steps):
        grads = grads_fn(step, ours)
        for p, q, g in zip(ours, ref, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.double()
        opt.step()
        lars_step_reference(ref, state, float(lr), **hyper)
        for i, (p, q) in enumerate(zip(ours, ref)):
            err = (p.double() - q).abs().max().item()
            assert err <= 2e-6 * q.abs().max().item() + 1e-7, f"step {step}, param {i}: off by {err:.3e}"
    return opt, ours


@pytest.mark.parametrize("lr_as_tensor", [False, True], ids=["float-lr", "tensor-lr"])
def test_fused_matches_official_loop(lr_as_tensor):
    params = make_params()
    params[1].zero_()  # zero norm: trust ratio 1

    def grads(step, ps):
        out = [torch.randn_like(p) for p in ps]
        out[2] = None if step == 1 else out[2]  # no gradient this step: left alone
        out[3] = torch.zeros_like(ps[3]) if step == 2 else out[3]
        return out

    lr = torch.tensor(0.7, device=TRITON_DEVICE) if lr_as_tensor else 0.7
    run_both(params, 4, lr, grads, weight_decay=1e-2, momentum=0.9, eta=0.02)


def test_tables_follow_new_tensors_and_layout_kept():
    params = make_params()

    def grads(step, ps):  # fresh gradient tensors every step: the pointer table must be rebuilt
        return [torch.randn_like(p) for p in ps]

    opt, ours = run_both(params, 3, 0.3, grads, weight_decay=1e-6, momentum=0.9, eta=0.001)
    assert ours[-1].is_contiguous(memory_format=torch.channels_last)
    tables = opt._tables[0]
    assert tables.chunks.shape[0] == sum(max(1, -(-p.numel() // CHUNK)) for p in ours)


def test_channels_last_1x1_weight_with_row_major_gradient_is_fused():
    """A 1x1 conv weight in channels_last has strides (C, 1, C, C); autograd may hand it a
    gradient with strides (C, 1, 1, 1) (it ignores size-1 strides). Same memory order, so fused."""
    w = torch.randn(4, 6, 1, 1, device=TRITON_DEVICE).to(memory_format=torch.channels_last)  # what Module.to gives
    g = torch.randn(4, 6, 1, 1, device=TRITON_DEVICE)
    assert w.stride() != g.stride()
    assert lars_op.fused_lars_supported([w], [g], [torch.zeros_like(w)])
    grads = [torch.randn(p.shape, device=TRITON_DEVICE) for p in (w, w)]  # row-major, both steps
    run_both([w], 2, 0.5, lambda step, ps: [grads[step]], weight_decay=1e-6, momentum=0.9, eta=0.001)


def test_new_tensors_during_a_graph_capture_are_a_clear_error(monkeypatch):
    """Rebuilding the pointer tables copies them from the host, which a CUDA-graph capture cannot
    hold (gradients freed by zero_grad(set_to_none=True) come back at new addresses)."""
    p = torch.randn(5, device=TRITON_DEVICE, requires_grad=True)
    p.grad = torch.randn(5, device=TRITON_DEVICE)
    opt = LARS([p], lr=0.1, fused=True)
    opt.step()
    p.grad = torch.randn(5, device=TRITON_DEVICE)  # a new gradient tensor
    monkeypatch.setattr(lars_op, "_capturing", lambda t: True)
    with pytest.raises(RuntimeError, match=r"new since the last step, inside a CUDA-graph capture"):
        opt.step()


def test_auto_choice_and_fallback():
    # CPU tensors: auto uses the foreach ops (the interpreter is for tests only)
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    opt = LARS([p], lr=0.1)
    opt.step()
    assert opt._tables == {}
    # fused=True with something the kernels do not take: a clear error
    q = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    q.grad = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fused kernels take float32 .* got cpu/torch.float64/dense"):
        LARS([q], lr=0.1, fused=True).step()
    # a gradient whose layout differs from its parameter's is not fused either
    w = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert not lars_op.fused_lars_supported([w], [torch.randn(2, 3, 4, 5)], [torch.zeros_like(w)])


def test_two_groups_keep_their_own_hyperparameters():
    a = [torch.randn(300, requires_grad=True), torch.randn(3, 40, requires_grad=True)]
    b = [torch.randn(50, requires_grad=True), torch.randn(6, 6, requires_grad=True)]
    ref_a = [p.detach().double().clone() for p in a]
    ref_b = [p.detach().double().clone() for p in b]
    opt = LARS([{"params": a, "weight_decay": 0.1}, {"params": b, "eta": 0.05}], lr=0.5, fused=True)
    state = {}
    for _ in range(2):
        for ps, rs in ((a, ref_a), (b, ref_b)):
            for p, r in zip(ps, rs):
                g = torch.randn_like(p)
                p.grad, r.grad = g.clone(), g.double()
        opt.step()
        lars_step_reference(ref_a, state, 0.5, weight_decay=0.1, momentum=0.9, eta=0.001)
        lars_step_reference(ref_b, state, 0.5, weight_decay=1e-6, momentum=0.9, eta=0.05)
        for p, r in zip(a + b, ref_a + ref_b):
            assert torch.allclose(p.detach().double(), r, rtol=2e-6, atol=1e-7)
