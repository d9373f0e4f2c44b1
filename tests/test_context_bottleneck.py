"""Fused context-bottleneck op against the official block in float64."""
import pytest
import torch

from mlvicx_fast import ContextBottleneck
from mlvicx_fast.ops.context_bottleneck import context_bottleneck, context_bottleneck_reference

from .helpers import TRITON_DEVICE, rel_err

SHAPES = [(2, 8, 7, 7), (3, 16, 13, 11), (1, 64, 1, 1), (2, 32, 28, 28)]
# relative-norm tolerance of (output and dx, weight gradients) per input dtype: bf16 output
# and dx are rounded to bf16 (2^-9); the weight gradients accumulate in float32 either way
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1e-3), torch.float16: (2e-3, 1e-3)}


def make_inputs(shape, dtype, channels_last, device=TRITON_DEVICE):
    N, C, H, W = shape
    hidden = max(1, C // 2)
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(hidden, C, 1, 1, device=device) / C**0.5
    w2 = torch.randn(C, hidden, 1, 1, device=device) / hidden**0.5
    ws = torch.randn(1, 2, 7, 7, device=device) / 7
    return x, w1, w2, ws


def run_both(x, w1, w2, ws):
    """Fused op (Triton) and float64 reference: outputs and the four gradients of each."""
    fused = [t.detach().clone().requires_grad_() for t in (x, w1, w2, ws)]
    ref = [t.detach().double().requires_grad_() for t in (x, w1, w2, ws)]
    out = context_bottleneck(*fused, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref = context_bottleneck_reference(*ref)
    out_ref.backward(grad.double())
    return out, out_ref, [t.grad for t in fused], [t.grad for t in ref]


@pytest.mark.triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_fused_matches_reference(shape, dtype, channels_last):
    x, w1, w2, ws = make_inputs(shape, dtype, channels_last)
    out, out_ref, grads, grads_ref = run_both(x, w1, w2, ws)
    tol_x, tol_w = TOL[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    assert rel_err(out, out_ref) < tol_x
    assert rel_err(grads[0], grads_ref[0]) < tol_x, "dx"
    for name, g, g_ref in zip(("mlp.0", "mlp.2", "spatial"), grads[1:], grads_ref[1:]):
        assert g.dtype == torch.float32
        assert rel_err(g, g_ref) < tol_w, name


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_max_ties_route_to_first_index(channels_last):
    """Integer-valued x and W2 = 0 (so a = 1/2 exactly): the spatial and the channel maxima tie
    often. Like torch.max / adaptive_max_pool2d, the whole gradient goes to the first index."""
    x, w1, w2, ws = make_inputs((2, 16, 9, 10), torch.float32, channels_last)
    x = torch.randint(-2, 3, x.shape, device=x.device).float().contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w2 = torch.zeros_like(w2)
    k = 0.5 * x
    assert (k == k.amax(1, keepdim=True)).sum(1).gt(1).any(), "the test needs channel ties"
    out, out_ref, grads, grads_ref = run_both(x, w1, w2, ws)
    assert rel_err(out, out_ref) < 1e-6
    for name, g, g_ref in zip(("x", "mlp.0", "mlp.2", "spatial"), grads, grads_ref):
        assert torch.allclose(g.double(), g_ref, rtol=1e-4, atol=1e-5), name


@pytest.mark.triton
def test_saved_for_backward_is_input_plus_small():
    """Besides x itself, nothing of size (N, C, H, W) is kept for backward."""
    N, C, H, W = 2, 32, 12, 12
    x, w1, w2, ws = make_inputs((N, C, H, W), torch.float32, False)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        context_bottleneck(x, w1, w2, ws, backend="triton")
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    extra = sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) - w1.numel() - w2.numel() - ws.numel()
    assert extra <= 5 * N * (C + H * W)


def test_module_state_dict_and_reference_backend():
    block = ContextBottleneck(16, backend="torch")
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {"mlp.0.weight": (8, 16, 1, 1), "mlp.2.weight": (16, 8, 1, 1), "spatial.weight": (1, 2, 7, 7)}
    x = torch.randn(2, 16, 5, 6)
    expected = context_bottleneck_reference(x, block.mlp[0].weight, block.mlp[2].weight, block.spatial.weight)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.triton
def test_module_fused_compiled():
    """The fused op is a custom op: torch.compile runs it as an opaque call."""
    block = ContextBottleneck(16, backend="triton").to(TRITON_DEVICE)
    x = torch.randn(2, 16, 9, 9, device=TRITON_DEVICE, requires_grad=True)
    eager = block(x)
    compiled = torch.compile(block)(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_bad_inputs(backend):
    block = ContextBottleneck(8, backend=backend).to(TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"expected 8 input channels, got x of shape \(2, 4, 5, 5\)"):
        block(torch.randn(2, 4, 5, 5, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match=r"must be 4-D \(N, C, H, W\), got shape \(8, 5, 5\)"):
        block(torch.randn(8, 5, 5, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match=r"every dimension of x must be >= 1, got shape \(2, 8, 0, 5\)"):
        block(torch.randn(2, 8, 0, 5, device=TRITON_DEVICE))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        block(torch.ones(2, 8, 5, 5, dtype=torch.long, device=TRITON_DEVICE))
    x = torch.randn(2, 8, 5, 5, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"spatial weight must have shape \(1, 2, 7, 7\), got \(1, 2, 3, 3\)"):
        context_bottleneck(x, block.mlp[0].weight, block.mlp[2].weight, torch.ones(1, 2, 3, 3), backend=backend)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        context_bottleneck(x, block.mlp[0].weight, block.mlp[2].weight, block.spatial.weight, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ContextBottleneck(8, backend="fast")


@pytest.mark.triton
def test_bf16_input_with_float32_weights_both_backends():
    """The network's case (bf16 activations, fp32 parameters): the reference casts the weights
    as autocast would, the fused op computes the gates in float32; both stay close."""
    block = ContextBottleneck(16).to(TRITON_DEVICE)
    x = torch.randn(2, 16, 10, 9, device=TRITON_DEVICE, dtype=torch.bfloat16)
    block.backend = "torch"
    ref = block(x)
    block.backend = "triton"
    out = block(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


@pytest.mark.triton
def test_fp16_and_strided_input():
    """float16, and an input that is neither NCHW- nor channels_last-contiguous (copied to NCHW)."""
    x, w1, w2, ws = make_inputs((2, 12, 9, 14), torch.float16, False)
    out, out_ref, grads, grads_ref = run_both(x, w1, w2, ws)
    tol_x, tol_w = TOL[torch.float16]
    assert out.dtype == torch.float16 and rel_err(out, out_ref) < tol_x
    assert rel_err(grads[0], grads_ref[0]) < tol_x
    assert all(rel_err(g, r) < tol_w for g, r in zip(grads[1:], grads_ref[1:]))
    strided = make_inputs((2, 12, 9, 28), torch.float32, False)[0][..., ::2]
    assert not strided.is_contiguous() and not strided.is_contiguous(memory_format=torch.channels_last)
    out, out_ref, grads, grads_ref = run_both(strided, w1, w2, ws)
    assert rel_err(out, out_ref) < 2e-5 and rel_err(grads[0], grads_ref[0]) < 2e-5
