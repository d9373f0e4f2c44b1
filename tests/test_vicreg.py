"""The fused VICReg loss against a float64 evaluation of the official formula.

Tolerance (issue 2): the Gram form cancels the diagonal energy D = cov_coeff * sum_j C_jj^2 / r
(both views), so values are compared on the scale |ref| + D and gradients on the scale
max|grad_ref| + max|4 cov_coeff / (r (b-1)) * Zc * v| (the diagonal part of the covariance
gradient that the Gram form subtracts). fp32: 1e-5 of that scale. bf16/fp16: compared with the
float64 value of the same rounded inputs, 1e-4 of the scale, plus one unit in the last place of
the input dtype per gradient element (the gradients are returned in the input dtype; Triton's CPU
interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest, so a whole ulp).
"""
import math

import pytest
import torch

from mlvicx_fast.ops.vicreg import (
    resolve_backend,
    vicreg_loss,
    vicreg_loss_reference,
)
from tests.helpers import TRITON_DEVICE, count_host_ops, noncontiguous

# b <= min(r, 128) takes the two-launch narrow path on Triton, (129, 131) the tiled Gram path,
# b > r the r x r path; (128, 200) is the largest narrow Gram tile
SHAPES = [(2, 1), (2, 5), (3, 4097), (64, 2048), (300, 64), (1000, 17), (33, 33), (17, 16), (129, 131),
          (128, 200)]
DTYPE_TOL = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-4, 2.0**-7), torch.float16: (1e-4, 2.0**-10)}
COEFFS = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4)


def backend_device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def reference(z1, z2, **coeffs):
    """Loss, terms and gradients of the official formula in float64 on the given values."""
    a = z1.detach().double().cpu().requires_grad_()
    b = z2.detach().double().cpu().requires_grad_()
    loss, terms = vicreg_loss_reference(a, b, **coeffs, return_terms=True)
    loss.backward()
    return loss.detach(), terms, a.grad, b.grad


def scales(z1, z2, cov_coeff=1.0, **_):
    """The value scale |ref| + D and the gradient scale of each view (see the module docstring)."""
    b, r = z1.shape
    d_energy, grad_diag = 0.0, []
    for z in (z1, z2):
        zc = z.detach().double().cpu()
        zc = zc - zc.mean(0)
        v = zc.square().sum(0) / (b - 1)
        d_energy += cov_coeff * v.square().sum().item() / r
        grad_diag.append((4 * cov_coeff / (r * (b - 1)) * zc * v).abs().max().item())
    return d_energy, grad_diag


def run(z1, z2, backend, **coeffs):
    a = z1.detach().clone().requires_grad_()
    b = z2.detach().clone().requires_grad_()
    loss, terms = vicreg_loss(a, b, backend=backend, return_terms=True, **coeffs)
    loss.backward()
    return loss.detach(), terms, a.grad, b.grad


def assert_matches(z1, z2, backend, dtype=torch.float32, **coeffs):
    coeffs = {**COEFFS, **coeffs}
    tol, rounding = DTYPE_TOL[dtype]
    loss, terms, g1, g2 = run(z1, z2, backend, **coeffs)
    ref, ref_terms, r1, r2 = reference(z1, z2, **coeffs)
    d_energy, grad_diag = scales(z1, z2, **coeffs)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    err = abs(loss.double().item() - ref.item())
    assert err <= tol * (abs(ref.item()) + d_energy), f"loss {loss.item()} vs ref {ref.item()} (D={d_energy})"
    for key, coeff in (("inv", "sim_coeff"), ("var", "std_coeff"), ("cov", "cov_coeff")):
        if coeffs[coeff] == 0:
            assert key not in terms
        else:
            scale = abs(ref_terms[key].item()) + (d_energy / coeffs["cov_coeff"] if key == "cov" else 0.0)
            assert abs(terms[key].double().item() - ref_terms[key].item()) <= tol * scale + 1e-12, key

    for g, rg, gd, z in ((g1, r1, grad_diag[0], z1), (g2, r2, grad_diag[1], z2)):
        assert g.dtype == z.dtype and g.shape == z.shape
        scale = rg.abs().max().item() + gd
        diff = (g.double().cpu() - rg).abs()
        bound = tol * scale + rounding * rg.abs()
        worst = (diff - bound).max().item()
        assert worst <= 1e-30, f"gradient off by {diff.max().item():.3e} (scale {scale:.3e})"


def rand_pair(b, r, device, dtype=torch.float32, scale=1.0, shift=0.0):
    """Two random views with a per-feature spread and offset (never zeros)."""
    spread = torch.rand(r, device=device) * 1.5 + 0.25
    z1 = torch.randn(b, r, device=device) * spread * scale + shift
    z2 = z1 + 0.5 * torch.randn(b, r, device=device) * spread * scale
    return z1.to(dtype), z2.to(dtype)


# ------------------------------------------------------------------------------ values, grads
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_official_fp32(backend, shape):
    z1, z2 = rand_pair(*shape, backend_device(backend))
    assert_matches(z1, z2, backend)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 5), (3, 4097), (64, 2048), (40, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("coeffs", [{}, dict(sim_coeff=0.0), dict(cov_coeff=0.0)], ids=["all", "sim=0", "cov=0"])
def test_tiled_gram_path_on_narrow_shapes(monkeypatch, shape, coeffs):
    """Shapes with b <= 128 normally take the narrow path; the tiled Gram path must give the same."""
    import mlvicx_fast.ops.vicreg as vicreg

    monkeypatch.setattr(vicreg, "NARROW_MAX_B", 0)
    z1, z2 = rand_pair(*shape, TRITON_DEVICE)
    assert_matches(z1, z2, "triton", **coeffs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5), (64, 2048), (300, 64), (1000, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_official_half(backend, dtype, shape):
    z1, z2 = rand_pair(*shape, backend_device(backend), dtype)
    assert_matches(z1, z2, backend, dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape", [(5, 40), (64, 2048), (300, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_noncontiguous_inputs(backend, shape):
    dev = backend_device(backend)
    z1, z2 = rand_pair(*shape, dev)
    # both views strided alike (the kernels read them in place) ...
    assert_matches(noncontiguous(z1), noncontiguous(z2), backend)
    # ... strided differently, and a transposed view
    zt = z2.T.contiguous().T
    assert not zt.is_contiguous()
    assert_matches(noncontiguous(z1), zt, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape", [(600, 24), (40, 64), (64, 64), (160, 160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_nearly_decorrelated(backend, shape):
    """Whitened embeddings: the off-diagonal energy is a tiny remainder of the diagonal one.

    With b <= r (the Gram form, where the cancellation is) C has rank b - 1 and its off-diagonal
    energy is at least (r / (b - 1) - 1) D, so b = r (about D / r, one Gram tile at 64 and several
    tiles at 160) is the hardest case there is; 40 x 64 is a rank-deficient one."""
    b, r = shape
    dev = backend_device(backend)
    pair = []
    for _ in range(2):
        x = torch.randn(b, r, dtype=torch.float64)
        x = x - x.mean(0)
        if b > r:  # exactly white: C = I, then a perturbation sized for ~1e-6 of D off the diagonal
            q, _ = torch.linalg.qr(x)
            white = q * math.sqrt(b - 1)
            x = white + 1e-3 * torch.randn(b, r, dtype=torch.float64) / math.sqrt(r)
        else:  # b <= r: C has rank b-1; make it as close to a scaled projection as rank allows
            q, _ = torch.linalg.qr(x.T)
            x = (q * math.sqrt(b - 1)).T[:, :r]
        pair.append(x.float().to(dev))
    z1, z2 = pair
    ref, terms, _, _ = reference(z1, z2)
    d_energy, _ = scales(z1, z2)
    if b > r:
        assert terms["cov"].item() < 1e-4 * d_energy  # the case really is nearly decorrelated
    elif b == r:
        assert terms["cov"].item() < 2 / (r - 1) * d_energy  # as decorrelated as rank b - 1 allows
    assert_matches(z1, z2, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape", [(8, 32), (64, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_collapsed(backend, shape):
    """All rows equal: variance and covariance of each view are zero."""
    b, r = shape
    dev = backend_device(backend)
    z1 = torch.randn(1, r, device=dev).expand(b, r).contiguous()
    z2 = torch.randn(1, r, device=dev).expand(b, r).contiguous()
    loss, terms, _, _ = run(z1, z2, backend)
    assert terms["cov"].item() <= 1e-10
    assert terms["var"].item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-5)
    assert_matches(z1, z2, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize(
    "coeffs",
    [dict(sim_coeff=0.0), dict(std_coeff=0.0), dict(cov_coeff=0.0), dict(sim_coeff=0.0, cov_coeff=0.0),
     dict(std_coeff=0.0, cov_coeff=0.0), dict(sim_coeff=1.5, std_coeff=7.0, cov_coeff=0.04, eps=1e-2)],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_coefficients(backend, coeffs):
    z1, z2 = rand_pair(48, 96, backend_device(backend))
    assert_matches(z1, z2, backend, **coeffs)
    z1, z2 = rand_pair(96, 24, backend_device(backend))
    assert_matches(z1, z2, backend, **coeffs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape", [(48, 96), (96, 24), (200, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_cov_coeff_skips_the_covariance(backend, shape):
    """A column of size 1e20 (the same in both views) overflows the covariance in float32 (C_jj =
    1e40); the variance term stays finite (its hinge is 0 there), so a loss that computed the
    covariance and multiplied it by 0 would not be finite, one that skips it matches float64."""
    z1, z2 = rand_pair(*shape, backend_device(backend))
    z1[:, 3] = z1[:, 3] * 1e20
    z2[:, 3] = z1[:, 3]
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, terms = vicreg_loss(a, b, cov_coeff=0.0, backend=backend, return_terms=True)
    loss.backward()
    ref, _, r1, r2 = reference(z1, z2, cov_coeff=0.0)
    assert set(terms) == {"inv", "var"}
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, rg in ((a.grad, r1), (b.grad, r2)):
        assert torch.isfinite(g).all()
        assert (g.double().cpu() - rg).abs().max().item() <= 1e-5 * rg.abs().max().item()
    assert not torch.isfinite(vicreg_loss(z1, z2, backend=backend))  # computed, the covariance overflows


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_terms_sum_to_loss_and_backward_scales(backend):
    z1, z2 = rand_pair(32, 80, backend_device(backend))
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, t = vicreg_loss(a, b, backend=backend, return_terms=True)
    assert set(t) == {"inv", "var", "cov"}
    assert not any(v.requires_grad for v in t.values())
    assert loss.item() == pytest.approx((25 * t["inv"] + 25 * t["var"] + t["cov"]).item(), rel=1e-6)
    (3.5 * loss).backward()
    _, _, r1, r2 = reference(z1, z2)
    assert torch.allclose(a.grad.double().cpu(), 3.5 * r1, rtol=1e-4, atol=1e-6 * r1.abs().max().item())
    assert torch.allclose(b.grad.double().cpu(), 3.5 * r2, rtol=1e-4, atol=1e-6 * r2.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_without_gradients(backend):
    z1, z2 = rand_pair(16, 40, backend_device(backend))
    ref, _, _, _ = reference(z1, z2)
    with torch.no_grad():
        loss = vicreg_loss(z1.requires_grad_(), z2, backend=backend)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss = vicreg_loss(z1.detach(), z2, backend=backend)  # no input needs a gradient
    assert not loss.requires_grad and loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("coeffs", [{}, {"std_coeff": 0.0, "cov_coeff": 0.0}, {"cov_coeff": 0.0}, {"std_coeff": 0.0}],
                         ids=["all", "inv-only", "no-cov", "no-var"])
def test_nan_or_inf_input_gives_nan(backend, bad, coeffs):
    """Whichever terms run: with the invariance term alone an Inf would otherwise give +Inf."""
    for shape in ((8, 24), (64, 16)):
        z1, z2 = rand_pair(*shape, backend_device(backend))
        z1[3, 5] = bad
        loss, terms = vicreg_loss(z1, z2, backend=backend, return_terms=True, **coeffs)
        assert math.isnan(loss.item()), (shape, loss.item(), terms)


def test_float64_on_torch_backend_is_exact():
    z1, z2 = rand_pair(40, 70, "cpu", torch.float64)
    loss, _, g1, _ = run(z1, z2, "torch")
    ref, _, r1, _ = reference(z1, z2)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) <= 1e-12 * abs(ref.item()) * 100
    assert torch.allclose(g1, r1, rtol=1e-9, atol=1e-14)


def test_compiles_without_graph_break():
    z1, z2 = rand_pair(16, 48, "cpu")
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y):
        return vicreg_loss(x * 2.0, y, backend="torch")

    loss = step(a, b)
    loss.backward()
    ref, _, r1, r2 = reference(2.0 * z1, z2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(a.grad.double(), 2.0 * r1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("layout", ["column-major", "sliced"])
def test_custom_op_outputs_match_its_fake(backend, layout):
    """torch.compile (inductor) plans buffers from the op's fake outputs and checks the real ones
    against them: the gradients must come back contiguous whatever the inputs' strides (the torch
    backend returned a transposed input's strides, and inductor aborted)."""
    z1, z2 = rand_pair(40, 16, TRITON_DEVICE if backend == "triton" else "cpu")
    if layout == "column-major":
        z1, z2 = z1.T.contiguous().T, z2.T.contiguous().T
    else:
        z1, z2 = (torch.cat([z, z], dim=1)[:, ::2] for z in (z1, z2))
    assert not z1.is_contiguous()
    # the autograd checks would trip over the op's design (backward scales its saved outputs in place)
    torch.library.opcheck(torch.ops.mlvicx_fast.vicreg_fwd.default, (z1, z2, 25.0, 25.0, 1.0, 1e-4, True, backend),
                          test_utils="test_faketensor")


def test_loss_can_be_changed_in_place():
    """loss /= accumulation_steps: the loss is a tensor of its own, not a view of the op's output."""
    z1, z2 = rand_pair(8, 12, "cpu")
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = vicreg_loss(a, b, backend="torch")
    loss /= 4.0
    loss.backward()
    _, _, r1, r2 = reference(z1, z2)
    assert torch.allclose(a.grad.double(), r1 / 4.0, rtol=1e-4, atol=1e-7)
    assert torch.allclose(b.grad.double(), r2 / 4.0, rtol=1e-4, atol=1e-7)


def test_auto_backend_choice():
    z = torch.randn(4, 8)
    assert resolve_backend("auto", z, z) == "torch"  # CPU tensors never go to the interpreter on their own
    if torch.cuda.is_available():
        zc = z.cuda()
        assert resolve_backend("auto", zc, zc) == "triton"


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "z1, z2, exc, match",
    [
        (torch.randn(1, 8), torch.randn(1, 8), ValueError, r"at least 2 samples.*\(1, 8\)"),
        (torch.randn(8), torch.randn(8), ValueError, r"z1 must be 2-D.*\(8,\)"),
        (torch.randn(4, 8, 2), torch.randn(4, 8, 2), ValueError, r"z1 must be 2-D.*\(4, 8, 2\)"),
        (torch.randn(4, 8), torch.randn(4, 9), ValueError, r"same shape.*\(4, 8\) and \(4, 9\)"),
        (torch.randn(4, 8), torch.randn(4, 8).half(), TypeError, r"same dtype.*float32 and torch.float16"),
        (torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8)), TypeError, r"z1 has dtype torch.int64.*expected"),
        (torch.randn(4, 8), torch.randint(0, 5, (4, 8)), TypeError, r"z2 has dtype torch.int64"),
        (torch.randn(4, 0), torch.randn(4, 0), ValueError, r"at least 1 feature.*\(4, 0\)"),
        ([[1.0, 2.0]], torch.randn(1, 2), TypeError, r"z1 must be a torch.Tensor, got list"),
    ],
)
def test_bad_input(z1, z2, exc, match):
    for backend in ("torch", "reference"):
        with pytest.raises(exc, match=match):
            vicreg_loss(z1, z2, backend=backend)


def test_bad_backend():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*expected one of"):
        vicreg_loss(z, z, backend="cuda")


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors \(got cpu\)"):
        vicreg_loss(z, z, backend="triton")


def test_second_backward_is_refused():
    """The saved gradients are handed over in place, so retain_graph + a second backward must fail."""
    z1, z2 = rand_pair(8, 16, "cpu")
    z1.requires_grad_()
    loss = vicreg_loss(z1, z2, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_autotune_configs_include_the_fixed_tiles(monkeypatch):
    """The GPU autotuner may only pick among configs that include the fixed tiles, so tuning
    cannot choose anything slower than the untuned launch (the interpreter cannot run it)."""
    import mlvicx_fast.ops.vicreg as vicreg

    monkeypatch.setattr(vicreg, "interpreting", lambda: False)
    t = vicreg._tile_sizes(2048, 8192)
    for tune_prec in (True, False):
        gram = [(c.kwargs["BM"], c.kwargs["BK"], c.num_warps, c.kwargs.get("PREC", "tf32x3"))
                for c in vicreg._gram_tuned[tune_prec].configs]
        grad = [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.kwargs.get("PREC", "tf32x3"))
                for c in vicreg._grad_tuned[tune_prec].configs]
        assert (t["gram_m"], t["gram_k"], t["warps"], "tf32x3") in gram
        assert (t["grad_m"], t["grad_n"], t["grad_k"], t["warps"], "tf32x3") in grad
        assert {p for *_, p in gram} == ({"tf32x3", "fp16x3"} if tune_prec else {"tf32x3"})
        # configs with larger tiles write fewer per-tile sums: the tuner must zero them between runs
        assert vicreg._gram_tuned[tune_prec].reset_to_zero == ["part_ptr"]
    assert vicreg._autotune()
    monkeypatch.setenv("MLVICX_AUTOTUNE", "0")
    assert not vicreg._autotune()


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(64, 2048), (3, 4097), (129, 131), (300, 64), (1000, 17), (17, 16)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (1e3, 5e3), (1e-3, 0.0)], ids=["unit", "large", "small"])
def test_fp16x3_products_keep_fp32_accuracy(monkeypatch, shape, scale, shift):
    """The tiled path with the 'fp16x3' products (operands scaled into float16's range by a power of
    two and split in two halves) meets the float32 tolerance, at large and small magnitudes too."""
    import mlvicx_fast.ops.vicreg as vicreg

    monkeypatch.setattr(vicreg, "NARROW_MAX_B", 0)
    monkeypatch.setenv("MLVICX_FP32_DOT", "fp16x3")
    z1, z2 = rand_pair(*shape, TRITON_DEVICE, scale=scale, shift=shift)
    assert_matches(z1, z2, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(200, 40), (140, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp16x3_nearly_collapsed(monkeypatch, shape):
    """fp16x3 on embeddings with a tiny but non-zero spread (std 1e-19, a projector close to
    collapse): the power-of-two scales stay finite, so the gradient is finite and exact (an
    unbounded scale overflowed to Inf, and Inf times a masked zero made the gradient NaN)."""
    import mlvicx_fast.ops.vicreg as vicreg

    monkeypatch.setattr(vicreg, "NARROW_MAX_B", 0)
    monkeypatch.setenv("MLVICX_FP32_DOT", "fp16x3")
    z1, z2 = rand_pair(*shape, TRITON_DEVICE, scale=1e-19)
    assert_matches(z1, z2, "triton")


@pytest.mark.triton
def test_fp16x3_collapsed_and_nan(monkeypatch):
    """fp16x3 with zero variance (the scale falls back to 1) and with a NaN (NaN loss)."""
    import mlvicx_fast.ops.vicreg as vicreg

    monkeypatch.setattr(vicreg, "NARROW_MAX_B", 0)
    monkeypatch.setenv("MLVICX_FP32_DOT", "fp16x3")
    for shape in ((8, 32), (64, 16)):
        z1 = torch.randn(1, shape[1], device=TRITON_DEVICE).expand(*shape).contiguous()
        z2 = torch.randn(1, shape[1], device=TRITON_DEVICE).expand(*shape).contiguous()
        assert_matches(z1, z2, "triton")
        z1, z2 = rand_pair(*shape, TRITON_DEVICE)
        z1[3, 5] = math.nan
        assert math.isnan(vicreg_loss(z1, z2, backend="triton").item())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_callers_autocast_does_not_lower_the_precision(backend):
    """Under a caller's torch.autocast (bf16) the loss of float32 embeddings is the float32 loss:
    autocast would otherwise run the Gram / covariance products in bfloat16."""
    z1, z2 = rand_pair(64, 96, "cpu")
    plain, plain_terms = vicreg_loss(z1, z2, backend=backend, return_terms=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, terms = vicreg_loss(z1, z2, backend=backend, return_terms=True)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=1e-6, atol=0.0)
    for k in plain_terms:
        torch.testing.assert_close(terms[k], plain_terms[k], rtol=1e-6, atol=1e-9)


def test_fp32_dot_choice_is_checked(monkeypatch):
    from mlvicx_fast.ops._triton import fp32_dot_precision

    monkeypatch.setenv("MLVICX_FP32_DOT", "fp8")
    with pytest.raises(ValueError, match=r"MLVICX_FP32_DOT='fp8': expected one of \('tf32x3', 'fp16x3', 'tf32', 'ieee'\)"):
        fp32_dot_precision()
    monkeypatch.setenv("MLVICX_FP32_DOT", "fp16x3")
    assert fp32_dot_precision() == "fp16x3"


@pytest.mark.parametrize("setting, expected", [
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),  # torch >= 2.9's API
    (lambda: setattr(torch.backends, "fp32_precision", "tf32"), "tf32"),  # its global form, inherited
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "tf32x3"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),  # the older API
    (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False), "tf32x3"),
], ids=["matmul-tf32", "global-tf32", "matmul-ieee", "set_float32_matmul_precision", "allow_tf32-off"])
def test_fp32_dot_follows_torchs_tf32_setting(monkeypatch, setting, expected):
    """On a GPU the loss follows the user's TF32 choice, whichever of torch's APIs set it: reading
    the older allow_tf32 raised once the newer fp32_precision had been set (every loss call failed)."""
    from mlvicx_fast.ops import _triton

    monkeypatch.delenv("MLVICX_FP32_DOT", raising=False)
    monkeypatch.setattr(_triton, "interpreting", lambda: False)  # the GPU branch, on any machine
    before = torch.get_float32_matmul_precision()
    try:
        setting()
        assert _triton.fp32_dot_precision() == expected
    finally:  # torch refuses to read the older API after the newer one set what it would not say
        torch.set_float32_matmul_precision(before)
        torch.backends.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "none"
    assert torch.backends.cuda.matmul.allow_tf32 == (before != "highest")  # readable again for later tests


@pytest.mark.triton
def test_host_work_per_call_of_the_narrow_path():
    """Eager forward + backward at b <= min(r, 128): two Triton launches, four allocations (workspace,
    out, two gradients), the terms view and the loss's copy, and the two in-place scales of backward;
    no custom op.
    (ones_like is backward()'s own seed.) A change that adds host work per call fails here."""
    z1, z2 = rand_pair(24, 100, TRITON_DEVICE)
    z1.requires_grad_()
    z2.requires_grad_()

    def call():
        z1.grad = z2.grad = None
        vicreg_loss(z1, z2, backend="triton").backward()

    call()
    counted = count_host_ops(call)
    assert (counted["triton"], counted["custom_op"]) == (2, 0), counted["names"]
    assert counted["names"]["aten::empty"] == 4, counted["names"]
    assert set(counted["names"]) == {
        "aten::empty", "triton::_narrow_stats_gram_kernel", "triton::_narrow_grad_kernel", "aten::slice",
        "aten::select", "aten::clone", "aten::ones_like", "aten::mul_"}, counted["names"]


def test_narrow_path_limit_by_device(monkeypatch):
    """b up to 128 takes the narrow path on Hopper and Blackwell data-centre parts; before sm_90
    only up to 64 (a 128-row tile spills on sm_86), and on sm_120 too: the 128-row tile needs 160 KB
    of shared memory, more than RTX 30xx/40xx/50xx have (99 KB)."""
    import mlvicx_fast.ops.vicreg as vicreg

    cuda = torch.device("cuda", 0)
    h100, rtx = 232448, 101376  # bytes of opt-in shared memory per block
    for cap, shared, want in (((9, 0), h100, 128), ((10, 0), h100, 128), ((8, 0), 166912, 64), ((8, 6), rtx, 64),
                              ((12, 0), rtx, 64), ((9, 0), 0, 64)):
        monkeypatch.setattr(vicreg, "_cuda_capability", lambda index, cap=cap: cap)
        monkeypatch.setattr(vicreg, "_cuda_shared_per_block", lambda index, shared=shared: shared)
        assert vicreg._narrow_limit(cuda) == want, (cap, shared)
    assert vicreg._narrow_limit(torch.device("cpu")) == vicreg.NARROW_MAX_B  # the interpreter
