"""Fused context-bottleneck op against the official block in float64."""
import importlib

import pytest
import torch

from mlvicx_fast import ContextBottleneck
from mlvicx_fast.ops.context_bottleneck import context_bottleneck, context_bottleneck_reference

cb = importlib.import_module("mlvicx_fast.ops.context_bottleneck")  # the module (ops re-exports the function)

from .helpers import TRITON_DEVICE, count_host_ops, rel_err

SHAPES = [(2, 8, 7, 7), (3, 16, 13, 11), (1, 64, 1, 1), (2, 32, 28, 28), (1, 1, 5, 3), (2, 3, 1, 9)]
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


def tied_maxima(shape, channels_last, ties=3, device=TRITON_DEVICE):
    """Integer-valued x in -2..1 with the maximum of each (n, c), 2, at `ties` random pixels: the
    spatial max ties, within a tile and (where there are several) across tiles and pixel splits,
    and its first index falls anywhere in the image, not nearly always in the first tile."""
    N, C, H, W = shape
    x = torch.randint(-2, 2, (N, C, H * W), device=device).float()
    x.scatter_(-1, torch.rand(N, C, H * W, device=device).argsort(-1)[..., :ties], 2.0)
    assert x.eq(x.amax(-1, keepdim=True)).sum(-1).ge(2).all(), "the test needs spatial ties"
    return x.view(shape).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def run_both(x, w1, w2, ws):
    """Fused op (Triton) and float64 reference: outputs and the four gradients of each, and the
    weight gradients of the reference evaluated in float32 (the yardstick of weight_grad_misses)."""
    fused = [t.detach().clone().requires_grad_() for t in (x, w1, w2, ws)]
    ref = [t.detach().double().requires_grad_() for t in (x, w1, w2, ws)]
    ref32 = [t.detach().float().requires_grad_() for t in (x, w1, w2, ws)]
    out = context_bottleneck(*fused, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref = context_bottleneck_reference(*ref)
    out_ref.backward(grad.double())
    context_bottleneck_reference(*ref32).backward(grad.float())
    return out, out_ref, [t.grad for t in fused], [t.grad for t in ref], [t.grad for t in ref32[1:]]


def weight_grad_misses(grads, grads_ref, grads_f32, tol_w):
    """Names of the weight gradients off the float64 reference by more than tol_w, or by more than
    10x the error of the reference itself evaluated in float32 where that is larger: the spatial
    weight's gradient sums ds = sum_c g a x, which can cancel (a 1 x 1 image has one such sum), and
    then float32 torch misses 1e-5 too (seen: 5.9e-5 torch, 2.0e-4 fused)."""
    bad = []
    for name, g, g_ref, g32 in zip(("mlp.0", "mlp.2", "spatial"), grads[1:], grads_ref[1:], grads_f32):
        assert g.dtype == torch.float32
        if rel_err(g, g_ref) >= max(tol_w, 10 * rel_err(g32, g_ref)):
            bad.append(f"{name}: {rel_err(g, g_ref):.2e} (float32 torch {rel_err(g32, g_ref):.2e})")
    return bad


def assert_float32_matches(x, w1, w2, ws):
    """A float32 call against the float64 reference: dx element by element (the gradient of the
    spatial max sits at one pixel per (n, c); at the wrong one of tied pixels the norm of dx
    hardly moves on a big image), the weight gradients by the yardstick above."""
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, w2, ws)
    assert rel_err(out, out_ref) < 2e-5
    assert torch.allclose(grads[0].double(), grads_ref[0], rtol=1e-4, atol=1e-5), "x"
    assert not weight_grad_misses(grads, grads_ref, grads_f32, 2e-5)


@pytest.mark.triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_fused_matches_reference(shape, dtype, channels_last):
    x, w1, w2, ws = make_inputs(shape, dtype, channels_last)
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, w2, ws)
    tol_x, tol_w = TOL[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    assert rel_err(out, out_ref) < tol_x
    assert rel_err(grads[0], grads_ref[0]) < tol_x, "dx"
    assert not weight_grad_misses(grads, grads_ref, grads_f32, tol_w)


@pytest.mark.triton
def test_weight_gradients_have_the_weights_strides_in_channels_last():
    """In channels_last the 1x1 weights have strides (C, 1, C, C); their gradients must have the
    same (DDP's bucket views and the fused LARS check compare strides exactly)."""
    block = ContextBottleneck(16, backend="triton").to(TRITON_DEVICE, memory_format=torch.channels_last)
    x = torch.randn(2, 16, 9, 7, device=TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    block(x).square().sum().backward()
    for name, w in block.named_parameters():
        assert w.grad.stride() == w.stride(), (name, w.grad.stride(), w.stride())


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
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, w2, ws)
    assert rel_err(out, out_ref) < 1e-6
    for name, g, g_ref in zip(("x", "mlp.0", "mlp.2", "spatial"), grads, grads_ref):
        assert torch.allclose(g.double(), g_ref, rtol=1e-4, atol=1e-5), name


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_spatial_max_ties_route_to_first_index(channels_last):
    """With W2 = 0 (above) the MLP passes no gradient, so dmx = 0 and which of the tied pixels
    gets it goes unchecked: here a random W2 and several pixels at each channel's maximum."""
    x, w1, w2, ws = make_inputs((2, 16, 24, 24), torch.float32, channels_last)
    assert_float32_matches(tied_maxima(x.shape, channels_last), w1, w2, ws)


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
    for shape in ((2, 8, 0, 5), (2, 8, 5, 0), (0, 8, 5, 5)):
        with pytest.raises(ValueError, match=rf"every dimension of x must be >= 1, got shape \({', '.join(map(str, shape))}\)"):
            block(torch.randn(*shape, device=TRITON_DEVICE))
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
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, w2, ws)
    tol_x, tol_w = TOL[torch.float16]
    assert out.dtype == torch.float16 and rel_err(out, out_ref) < tol_x
    assert rel_err(grads[0], grads_ref[0]) < tol_x
    assert not weight_grad_misses(grads, grads_ref, grads_f32, tol_w)
    strided = make_inputs((2, 12, 9, 28), torch.float32, False)[0][..., ::2]
    assert not strided.is_contiguous() and not strided.is_contiguous(memory_format=torch.channels_last)
    out, out_ref, grads, grads_ref, grads_f32 = run_both(strided, w1, w2, ws)
    assert rel_err(out, out_ref) < 2e-5 and rel_err(grads[0], grads_ref[0]) < 2e-5


# --------------------------------------------------------------------------------------------
# The launch plan a GPU gets, checked here too (interpreted on the CPU): pixel splits (S > 1)
# finished by the gate kernel, small tiles, several partial rows per reduction step
# --------------------------------------------------------------------------------------------
def use_gpu_plan(monkeypatch, sms):
    """Launch with the plan of a GPU of `sms` multiprocessors, whatever runs the kernels."""
    plan_for = cb._plan_for
    monkeypatch.setattr(cb, "_plan_for", lambda x, hidden: plan_for(x, hidden, sms=sms, interp=False))


@pytest.fixture
def gpu_plan(monkeypatch):
    """Launch with the plan of a 132-multiprocessor GPU, whatever runs the kernels."""
    use_gpu_plan(monkeypatch, 132)


GPU_PLAN_SHAPES = [(2, 8, 7, 7), (3, 40, 13, 11), (2, 64, 36, 36), (2, 130, 9, 9), (17, 6, 23, 23), (1, 1, 5, 3),
                   (2, 3, 1, 1)]


@pytest.mark.triton
@pytest.mark.parametrize("shape", GPU_PLAN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_plan_matches_reference(gpu_plan, shape, channels_last):
    x, w1, w2, ws = make_inputs(shape, torch.float32, channels_last)
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, w2, ws)
    assert rel_err(out, out_ref) < 2e-5
    assert rel_err(grads[0], grads_ref[0]) < 2e-5, "x"
    # the weight gradients by the file's yardstick: 2 x 3 x 1 x 1 (seed 727743010) cancels so far
    # that float32 torch itself misses by 6.3e-5 (mlp.0) and 4.9e-5 (mlp.2), the fused op by the same
    assert not weight_grad_misses(grads, grads_ref, grads_f32, 2e-5)


def test_gpu_plan_splits_pixels():
    """The shapes above reach what only the GPU plan does: pixel splits finished by the gate
    kernel, more partial rows than one reduction step takes, several dW tiles and n steps."""
    plan = cb._plan(2, 64, 36, 36, 32, True, 132, False)
    assert plan.S > 1 and plan.n_pb > plan.rows and plan.n_cb == 1
    plan = cb._plan(17, 6, 23, 23, 3, True, 132, False)
    assert 17 * plan.n_sb > plan.rows and 17 > 16  # dWs rows; n steps of BLOCK_N = 16
    assert cb._plan(2, 130, 9, 9, 65, True, 132, False).n_w2 > 1
    assert cb._plan(64, 64, 112, 112, 32, True, 132, False).S > 1
    assert cb._plan(2, 64, 36, 36, 32, True, 0, True).S == 1


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_plan_bf16_and_ties(gpu_plan, channels_last):
    x, w1, w2, ws = make_inputs((2, 48, 15, 17), torch.bfloat16, channels_last)
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, w2, ws)
    tol_x, tol_w = TOL[torch.bfloat16]
    assert out.dtype == torch.bfloat16 and rel_err(out, out_ref) < tol_x
    assert rel_err(grads[0], grads_ref[0]) < tol_x
    assert not weight_grad_misses(grads, grads_ref, grads_f32, tol_w)
    # integer x, a = 1/2 exactly: ties in both maxima; the first index takes the gradient
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randint(-2, 3, (2, 48, 15, 17), device=TRITON_DEVICE).float().contiguous(memory_format=fmt)
    out, out_ref, grads, grads_ref, grads_f32 = run_both(x, w1, torch.zeros_like(w2), ws)
    assert rel_err(out, out_ref) < 1e-6
    for name, g, g_ref in zip(("x", "mlp.0", "mlp.2", "spatial"), grads, grads_ref):
        assert torch.allclose(g.double(), g_ref, rtol=1e-4, atol=1e-5), name


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_plan_spatial_max_ties_across_splits(gpu_plan, channels_last):
    """Tied spatial maxima with a live dmx (random W2) where the pixels are split: the first
    split that reaches the maximum keeps its index."""
    x, w1, w2, ws = make_inputs((2, 16, 24, 24), torch.float32, channels_last)
    assert cb._plan_for(x, w1.shape[0])[0].S == 3, "the test needs pixel splits"
    assert_float32_matches(tied_maxima(x.shape, channels_last), w1, w2, ws)


# the plan of a 1-multiprocessor GPU: 2 splits of 2 pixel tiles of 256 (the last one partial), and
# with N = 4 no split, 2 tiles; the kernels that reduce over a split loop over its tiles (every other
# shape in this file gives one tile per split)
SEVERAL_TILES = [pytest.param((2, 16, 24, 40), 2, id="2x16x24x40-S2"),
                 pytest.param((4, 16, 16, 24), 1, id="4x16x16x24-S1")]


@pytest.mark.triton
@pytest.mark.parametrize("shape,splits", SEVERAL_TILES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("ties", [False, True], ids=["randn", "ties"])
def test_gpu_plan_several_tiles_per_split(monkeypatch, shape, splits, channels_last, ties):
    """Random x, and tied spatial maxima with a live dmx, where a split holds several pixel tiles."""
    use_gpu_plan(monkeypatch, 1)
    x, w1, w2, ws = make_inputs(shape, torch.float32, channels_last)
    plan = cb._plan_for(x, w1.shape[0])[0]
    tiles = cb._cdiv(min(plan.split_len, shape[2] * shape[3]), plan.bp)  # in the first split
    assert plan.S == splits and tiles > 1, "the test needs several pixel tiles per split"
    assert_float32_matches(tied_maxima(shape, channels_last) if ties else x, w1, w2, ws)


@pytest.mark.triton
def test_deterministic(gpu_plan):
    """No atomics: two runs give the same bits, output and every gradient."""
    x, w1, w2, ws = make_inputs((3, 40, 13, 11), torch.float32, True)
    grad = torch.randn_like(x)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, ws)]
        out = context_bottleneck(*leaves, backend="triton")
        out.backward(grad)
        runs.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Which path runs: eager autograd.Function, custom ops under torch.compile, no autograd at all
# --------------------------------------------------------------------------------------------
@pytest.mark.triton
def test_eager_goes_through_autograd_function():
    x, w1, w2, ws = make_inputs((2, 16, 9, 9), torch.float32, True)
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = context_bottleneck(x, w1, w2, ws, backend="triton")
        out.sum().backward()
    assert type(out.grad_fn).__name__ == "_ContextBottleneckFunctionBackward"
    assert not [e.name for e in prof.events() if e.name.startswith("mlvicx_fast::")], "custom op used in eager"
    with torch.no_grad():
        plain = context_bottleneck(x, w1, w2, ws, backend="triton")
    assert plain.grad_fn is None and torch.equal(plain, out.detach())
    frozen = context_bottleneck(x.detach(), w1, w2, ws, backend="triton")  # nothing needs a gradient
    assert frozen.grad_fn is None and torch.equal(frozen, out.detach())


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_compile_goes_through_custom_ops(channels_last):
    """Under torch.compile the block is one custom-op node (its backward the other custom op);
    output and all gradients match the float64 reference."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the captured graph as it is: the custom ops and their autograd

    x, w1, w2, ws = make_inputs((2, 16, 9, 9), torch.float32, channels_last)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, ws)]
    ref = [t.detach().double().requires_grad_() for t in (x, w1, w2, ws)]
    fn = torch.compile(lambda *t: context_bottleneck(*t, backend="triton"), backend=record, fullgraph=True)
    out = fn(*leaves)
    code = "\n".join(gm.code for gm in graphs)
    assert "context_bottleneck_forward" in code and "_ContextBottleneckFunction" not in code
    grad = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    assert any(e.name == "mlvicx_fast::context_bottleneck_backward" for e in prof.events())
    out_ref = context_bottleneck_reference(*ref)
    out_ref.backward(grad.double())
    assert rel_err(out, out_ref) < 2e-5
    for name, t, r in zip(("x", "mlp.0", "mlp.2", "spatial"), leaves, ref):
        assert rel_err(t.grad, r.grad) < 2e-5, name


# --------------------------------------------------------------------------------------------
# Weights and gradients in other layouts and dtypes
# --------------------------------------------------------------------------------------------
@pytest.mark.triton
def test_channels_last_module_and_bf16_weights():
    """module.to(memory_format=channels_last) gives the 7x7 weight other strides; bf16 weights
    get bf16 gradients. Both against the torch backend on the same module."""
    block = ContextBottleneck(24).to(TRITON_DEVICE).to(memory_format=torch.channels_last)
    assert not block.spatial.weight.is_contiguous()
    x = torch.randn(2, 24, 11, 10, device=TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    results = {}
    for backend in ("torch", "triton"):
        block.zero_grad(set_to_none=True)
        block.backend = backend
        xg = x.detach().requires_grad_()
        block(xg).square().sum().backward()
        results[backend] = [xg.grad] + [p.grad for p in block.parameters()]
    for name, a, b in zip(("x", "mlp.0", "mlp.2", "spatial"), results["triton"], results["torch"]):
        assert rel_err(a, b) < 1e-4, name
    block = block.to(torch.bfloat16)
    block.zero_grad(set_to_none=True)
    block.backend = "triton"
    block(x.to(torch.bfloat16)).float().square().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.triton
def test_gradient_with_other_strides():
    """dL/dout in another layout than x (or expanded) is copied to x's strides first."""
    x, w1, w2, ws = make_inputs((2, 12, 8, 9), torch.float32, True)
    ref = [t.detach().double().requires_grad_() for t in (x, w1, w2, ws)]
    out_ref = context_bottleneck_reference(*ref)
    for grad in (torch.randn(x.shape, device=x.device), torch.ones(()).expand(x.shape)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, ws)]
        context_bottleneck(*leaves, backend="triton").backward(grad)
        expected = torch.autograd.grad(out_ref, ref, grad.double(), retain_graph=True)
        for name, t, r in zip(("x", "mlp.0", "mlp.2", "spatial"), leaves, expected):
            assert rel_err(t.grad, r) < 2e-5, name


@pytest.mark.triton
def test_nan_input_gives_nan():
    x, w1, w2, ws = make_inputs((2, 8, 6, 6), torch.float32, False)
    x[1, 3, 2, 2] = float("nan")
    out = context_bottleneck(x, w1, w2, ws, backend="triton")
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_host_work_per_call(channels_last):
    """What one eager call asks of the host, counted as bench_context.py counts it: forward 4
    Triton launches and 2 allocations, backward 5 launches and 5 allocations, no other torch op
    (this shape has one pixel block, so no split partial sums and their buffer on any device)."""
    block = ContextBottleneck(16, backend="triton").to(TRITON_DEVICE)
    x, *_ = make_inputs((2, 16, 9, 9), torch.float32, channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    block(x).backward(grad)  # warm-up
    out = []
    forward = count_host_ops(lambda: out.append(block(x)))
    backward = count_host_ops(lambda: out[0].backward(grad))
    assert (forward["triton"], forward["torch"], forward["custom_op"]) == (4, 2, 0), forward["names"]
    assert (backward["triton"], backward["torch"], backward["custom_op"]) == (5, 5, 0), backward["names"]
    assert set(forward["names"]) - {"aten::empty", "aten::empty_like"} == {
        "triton::_spatial_stats_kernel", "triton::_gate_kernel", "triton::_channel_stats_kernel", "triton::_apply_kernel"}
