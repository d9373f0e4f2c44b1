"""The fused two-view augmentation: Triton kernel (interpreter on the CPU) against the torch
reference for fixed parameters, the recipe's statistics, determinism by seed, and bad inputs."""
import math

import pytest
import torch

from mlvicx_fast.ops import augment as A

from .helpers import TRITON_DEVICE


def random_params(n, H, W, gen, blur=None, solar=None):
    p = A.sample_params(n, H, W, A.VICREG, gen)
    if blur is not None:
        p[..., A.P_SIGMA] = blur
    if solar is not None:
        p[..., A.P_SOLAR] = solar
    return p


@pytest.mark.triton
@pytest.mark.parametrize("shape,size,channels,layout", [
    ((3, 40, 48), 32, 3, "nhw"),      # upsampling crops, two tiles a side (second one partial)
    ((2, 70, 64), 24, 1, "nhwc"),     # downsampling crops, decoder layout (channel 0 of 3)
    ((2, 36, 36), 36, 3, "nchw"),
    ((2, 160, 144), 96, 1, "nhw"),    # views larger than the 64-pixel halo: each tile reads a sub-window
    ((2, 200, 180), 72, 3, "nhw"),    # downsampling up to ~2.8x: several source blocks per tile
])
def test_kernel_matches_torch(shape, size, channels, layout, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    N, H, W = shape
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if layout == "nhwc":
        x = torch.stack([x, torch.randint_like(x, 0, 256), x], dim=3)
    elif layout == "nchw":
        x = x[:, None]
    p = random_params(N, H, W, gen)
    p[1, :, A.P_SOLAR] = 1.0  # exercise every branch in one batch
    p[1, 0, A.P_SIGMA] = 0.0
    p[0, :, A.P_FLIP] = torch.tensor([1.0, 0.0, 1.0])[:N]
    p[0, :, A.P_CFIRST] = torch.tensor([1.0, 0.0, 1.0])[:N]
    xt = x.to(TRITON_DEVICE)
    k1, k2 = A.augment_with_params(xt, p, size, channels, out_dtype=torch.float32, backend="triton")
    r1, r2 = A.augment_with_params(x, p, size, channels, out_dtype=torch.float32, backend="torch")
    for k, r in ((k1, r1), (k2, r2)):
        assert k.shape == (N, channels, size, size) and k.is_contiguous(memory_format=torch.channels_last)
        # TF32 products on a GPU; float32 in the interpreter
        tol = 1e-4 if TRITON_DEVICE == "cpu" else 3e-2
        assert (k.cpu() - r).abs().max().item() < tol


@pytest.mark.triton
def test_kernel_bf16_channels_last_default(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8, generator=gen).to(TRITON_DEVICE)
    v1, v2 = A.two_view_augment(x, size=16, generator=torch.Generator().manual_seed(3), backend="triton")
    assert v1.dtype == torch.bfloat16 and v1.shape == (2, 3, 16, 16)
    assert v1.is_contiguous(memory_format=torch.channels_last)
    w1, w2 = A.two_view_augment(x.cpu(), size=16, generator=torch.Generator().manual_seed(3), backend="torch")
    assert (v1.float().cpu() - w1.float()).abs().max() < 0.08  # bf16 rounding of values up to ~2.6 (+ TF32 on a GPU)
    assert not torch.equal(v1.float().cpu(), v2.float().cpu())


def test_identity_parameters_give_the_normalised_image(fresh_seed):
    x = torch.randint(0, 256, (2, 20, 20), dtype=torch.uint8)
    p = A.sample_params(2, 20, 20, A.CROP_FLIP, torch.Generator().manual_seed(fresh_seed), random_crop=False)
    p[..., A.P_FLIP] = 0
    v1, _ = A.augment_with_params(x, p, size=20, channels=2, out_dtype=torch.float32, backend="torch")
    for c in range(2):
        expect = (x.float() / 255 - A.IMAGENET_MEAN[c]) / A.IMAGENET_STD[c]
        assert torch.allclose(v1[:, c], expect, atol=1e-5)
    p[..., A.P_FLIP] = 1
    p[..., A.P_SOLAR] = 1
    v1, _ = A.augment_with_params(x, p, size=20, channels=1, out_dtype=torch.float32, backend="torch")
    xs = x.float() / 255
    xs = torch.where(xs >= 128 / 255, 1 - xs, xs).flip(-1)
    assert torch.allclose(v1[:, 0], (xs - A.IMAGENET_MEAN[0]) / A.IMAGENET_STD[0], atol=1e-5)


def test_blur_is_the_23_tap_gaussian():
    x = torch.zeros(1, 40, 40, dtype=torch.uint8)
    x[0, 20, 20] = 255
    p = A.sample_params(1, 40, 40, A.CROP_FLIP, torch.Generator().manual_seed(0), random_crop=False)
    p[..., A.P_FLIP] = 0
    p[..., A.P_SIGMA] = 2.0
    v1, _ = A.augment_with_params(x, p, size=40, channels=1, mean=(0.0,), std=(1.0,), out_dtype=torch.float32,
                                  backend="torch")
    d = torch.arange(-11, 12, dtype=torch.float64)
    k = torch.exp(-d * d / 8)
    k = k / k.sum()
    assert torch.allclose(v1[0, 0, 9:32, 9:32].double(), torch.outer(k, k), atol=1e-6)
    assert v1.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_recipe_statistics_and_seed():
    n = 4000
    p = A.sample_params(n, 256, 256, A.VICREG, torch.Generator().manual_seed(1))
    q = A.sample_params(n, 256, 256, A.VICREG, torch.Generator().manual_seed(1))
    assert torch.equal(p, q)
    assert not torch.equal(p, A.sample_params(n, 256, 256, A.VICREG, torch.Generator().manual_seed(2)))
    se = 3 / math.sqrt(n)  # 3 standard errors of a fraction (<= 0.5 / sqrt(n) each)
    frac = lambda t: t.float().mean().item()  # noqa: E731
    for v, (blur, sol) in enumerate(((1.0, 0.0), (0.1, 0.2))):
        assert abs(frac(p[v, :, A.P_FLIP] > 0) - 0.5) < se
        assert abs(frac(p[v, :, A.P_B] != 1) - 0.8) < se
        assert abs(frac(p[v, :, A.P_SIGMA] > 0) - blur) < se
        assert abs(frac(p[v, :, A.P_SOLAR] > 0) - sol) < se
        b = p[v, :, A.P_B][p[v, :, A.P_B] != 1]
        assert b.min() >= 0.6 and b.max() <= 1.4
        s = p[v, :, A.P_SIGMA][p[v, :, A.P_SIGMA] > 0]
        assert s.min() >= 0.1 and s.max() <= 2.0
        area = p[v, :, A.P_H] * p[v, :, A.P_W] / 256 ** 2
        ratio = p[v, :, A.P_W] / p[v, :, A.P_H]
        assert area.min() >= 0.07 and area.max() <= 1.0
        assert ratio.min() >= 0.7 and ratio.max() <= 1.4
        assert (p[v, :, A.P_Y0] + p[v, :, A.P_H]).max() <= 256
        assert abs(area.mean().item() - loop_rrc_mean_area(256, 256, 20000)) < 0.02


def loop_rrc_mean_area(H, W, n, seed=0):
    """torchvision's RandomResizedCrop.get_params as a plain loop: mean crop area / image area."""
    import random
    rnd = random.Random(seed)
    total = 0.0
    for _ in range(n):
        for _ in range(10):
            target = H * W * rnd.uniform(0.08, 1.0)
            ar = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < w <= W and 0 < h <= H:
                total += w * h / (H * W)
                break
        else:
            total += 1.0
    return total / n


def test_crop_means_are_exact_on_large_bright_images(fresh_seed):
    """The contrast pivot is the crop's mean from an integral image; a 3000 x 3000 white image sums
    to 2.3e9, past int32 (the GPU path used an int32 table, which wrapped there)."""
    x = torch.full((2, 3000, 3000), 255, dtype=torch.uint8)
    x[1, :1500] = 51  # top half 0.2, bottom half 1.0
    p = torch.zeros(1, 2, A.N_PARAMS)
    p[0, :, A.P_H], p[0, :, A.P_W] = 3000, 3000
    means = A.crop_means(x, p)[0, :, A.P_MEAN]
    assert means.tolist() == pytest.approx([1.0, 0.6], abs=1e-7)
    # and the recipe's random crops of random images: the mean of each crop's pixels
    gen = torch.Generator().manual_seed(fresh_seed)
    x = torch.randint(0, 256, (5, 37, 50), dtype=torch.uint8, generator=gen)
    p = A.sample_params(5, 37, 50, A.VICREG, gen)
    got = A.crop_means(x, p)
    for v in range(2):
        for n in range(5):
            y0, x0, h, w = (int(p[v, n, k]) for k in (A.P_Y0, A.P_X0, A.P_H, A.P_W))
            want = x[n, y0:y0 + h, x0:x0 + w].double().mean().item() / 255
            assert got[v, n, A.P_MEAN].item() == pytest.approx(want, abs=1e-6)


def test_bad_inputs_name_what_is_wrong():
    x = torch.zeros(2, 16, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8.*torch.float32"):
        A.two_view_augment(x.float())
    with pytest.raises(ValueError, match=r"got shape \(16, 16\)"):
        A.two_view_augment(x[0])
    p = A.sample_params(2, 16, 16)
    p[0, 0, A.P_H] = 40
    with pytest.raises(ValueError, match="outside the 16x16 images"):
        A.augment_with_params(x, p, size=14)
    with pytest.raises(ValueError, match=r"params must have shape \(2, 2, 12\)"):
        A.augment_with_params(x, p[:, :1], size=14)
    with pytest.raises(ValueError, match="size must be > 12"):
        A.two_view_augment(x, size=8)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        A.two_view_augment(x, size=14, backend="cuda")


@pytest.mark.triton
def test_one_view_equals_the_first_of_two(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    x = torch.randint(0, 256, (2, 30, 30), dtype=torch.uint8, generator=gen)
    p = random_params(2, 30, 30, gen)
    for backend, xx in (("torch", x), ("triton", x.to(TRITON_DEVICE))):
        (one,) = A.augment_with_params(xx, p[:1], 24, out_dtype=torch.float32, backend=backend)
        two = A.augment_with_params(xx, p, 24, out_dtype=torch.float32, backend=backend)
        assert torch.equal(one, two[0])
