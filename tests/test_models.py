"""ResNet18 layout and the MLVICX network: fused and reference backends agree."""
import copy
import os

import pytest
import torch

from mlvicx_fast import MLVICX, ResNet18
from mlvicx_fast.models import ContextEncoder
from mlvicx_fast.ops.augment import IMAGENET_MEAN, IMAGENET_STD

from .helpers import TRITON_DEVICE, rel_err

STAGES = [(1, 64, 64), (2, 64, 128), (3, 128, 256), (4, 256, 512)]


def torchvision_resnet18_shapes(in_chans=3, with_fc=True):
    """torchvision resnet18's state_dict keys and shapes, in order, written from its layout."""
    out = {"conv1.weight": (64, in_chans, 7, 7)}

    def bn(p, c):
        out.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,),
                    f"{p}.running_var": (c,), f"{p}.num_batches_tracked": ()})

    bn("bn1", 64)
    for layer, c_in, c in STAGES:
        for block in range(2):
            p, first_in = f"layer{layer}.{block}", (c_in if block == 0 else c)
            out[f"{p}.conv1.weight"] = (c, first_in, 3, 3)
            bn(f"{p}.bn1", c)
            out[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if layer > 1 and block == 0:
                out[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                bn(f"{p}.downsample.1", c)
    if with_fc:
        out.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    return out


def random_checkpoint():
    """A stand-in for a torchvision ImageNet checkpoint: its keys and shapes, random values."""
    sd = {}
    for k, shape in torchvision_resnet18_shapes().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.randint(0, 100, shape)
        elif len(shape) >= 2:  # conv / fc weights at He scale, so activations stay O(1)
            sd[k] = torch.randn(shape) * (2.0 / torch.Size(shape[1:]).numel()) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape) + 0.5
        elif k.endswith(".weight"):  # BN scale
            sd[k] = 1.0 + 0.1 * torch.randn(shape)
        else:
            sd[k] = 0.1 * torch.randn(shape)
    return sd


def test_resnet18_layout_and_parameter_count():
    net = ResNet18()
    assert sum(p.numel() for p in net.parameters()) == 11_176_512  # torchvision's, without fc
    expected = torchvision_resnet18_shapes(with_fc=False)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == list(expected.items())
    with_fc = ResNet18(num_classes=1000)
    assert sum(p.numel() for p in with_fc.parameters()) == 11_689_512
    assert list(with_fc.state_dict()) == list(torchvision_resnet18_shapes())
    # avgpool is torchvision's AdaptiveAvgPool2d(1) in value (a mean, for a deterministic CUDA backward)
    for shape in ((2, 512, 7, 7), (3, 5, 1, 4)):
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(net.avgpool(x), torch.nn.functional.adaptive_avg_pool2d(x, 1), rtol=1e-14, atol=1e-14)


def test_resnet18_loads_torchvision_checkpoint_into_3_and_1_channel_stems():
    sd = random_checkpoint()
    rgb = ResNet18(num_classes=1000)
    rgb.load_state_dict(sd)  # strict
    torch.testing.assert_close(rgb.layer3[0].downsample[1].running_var, sd["layer3.0.downsample.1.running_var"])
    backbone = ResNet18()
    backbone.load_state_dict(sd)  # strict: fc.* is dropped for a model without fc
    grey = ResNet18(in_chans=1)
    grey.load_state_dict(sd)  # conv1 converted to one channel (convert_stem)
    assert sd["conv1.weight"].shape[1] == 3  # the caller's dict is left alone
    rgb.eval(), grey.eval(), backbone.eval()
    # the same grey image through the package's normalisation: per channel for 3, channel 0's for 1
    g = torch.rand(2, 1, 96, 96)
    u = (g - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    x = torch.cat([(g - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dim=1)
    stem_grey, stem_rgb = grey.bn1(grey.conv1(u)), backbone.bn1(backbone.conv1(x))
    # exact away from the 3-pixel zero padding (2 output pixels at stride 2); summing the RGB
    # weights, the usual recipe, is ~20 % off here
    assert rel_err(stem_grey[..., 2:-2, 2:-2], stem_rgb[..., 2:-2, 2:-2]) < 1e-5
    assert rel_err(grey(u), backbone(x)) < 2e-2  # the border's share
    # and back: a 1-channel checkpoint in a 3-channel stem gives the 1-channel network's output
    back = ResNet18()
    back.load_state_dict(grey.state_dict())
    back.eval()
    assert rel_err(back(x), grey(u)) < 1e-5
    # also as a submodule of the MLVICX network
    model = MLVICX(preset="paper", dim=32, in_chans=1, backend="torch")
    model.backbone.load_state_dict(sd)
    torch.testing.assert_close(model.encoder().conv1.weight, grey.conv1.weight)


def test_resnet18_loads_checkpoints_of_wrapped_models():
    """A state_dict saved from DataParallel/DDP ('module.') or torch.compile ('_orig_mod.'), or
    both, loads strictly; a prefix only some keys carry is left for strict loading to report."""
    sd = random_checkpoint()
    for wrap in ("module.", "_orig_mod.", "_orig_mod.module."):
        net = ResNet18(in_chans=1)
        net.load_state_dict({wrap + k: v for k, v in sd.items()})  # strict, fc.* dropped, stem converted
        assert torch.equal(net.layer4[1].bn2.running_mean, sd["layer4.1.bn2.running_mean"])
        assert net.conv1.weight.shape == (64, 1, 7, 7)
    holder = torch.nn.Module()
    holder.backbone = ResNet18()
    holder.load_state_dict({"backbone.module." + k: v for k, v in sd.items() if not k.startswith("fc.")})
    assert torch.equal(holder.backbone.conv1.weight, sd["conv1.weight"])
    mixed = dict(sd)
    mixed["module.conv1.weight"] = mixed.pop("conv1.weight")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*conv1\.weight"):
        ResNet18().load_state_dict(mixed)
    # stripping never overwrites a key: 'module.module.a' and 'module.a' both stay
    from mlvicx_fast.models.resnet import strip_wrappers

    a, b = torch.randn(3), torch.randn(3)
    nested = {"module.module.a": a, "module.a": b}
    strip_wrappers(nested)
    assert set(nested) == {"module.a", "a"} and nested["module.a"] is a and nested["a"] is b


def test_presets_and_state_dict_names():
    official, paper = MLVICX("official", backend="torch"), MLVICX("paper", backend="torch")
    assert official.dim == 4096 and official.final_bn
    assert isinstance(official.global_expander[-1], torch.nn.BatchNorm1d)
    assert paper.dim == 2048 and isinstance(paper.multilevel_expander[-1], torch.nn.Linear)
    assert official.multilevel_expander[0].in_features == 512 * 16
    keys = set(paper.state_dict())
    for i, c in enumerate((64, 64, 128, 256, 512)):
        assert paper.state_dict()[f"context.{i}.mlp.0.weight"].shape == (c // 2, c, 1, 1)
        assert f"context.{i}.spatial.weight" in keys
        assert paper.state_dict()[f"aggregation.proj.{i}.weight"].shape == (512, c, 1, 1)
        assert f"aggregation.proj.{i}.bias" in keys
    assert {k for k in keys if k.startswith("backbone.")} == {
        "backbone." + k for k in torchvision_resnet18_shapes(with_fc=False)}


def run_recording_relu_signs(model, x, gz=None, gm=None):
    """(z, m), the gradient probes, and the signs of every ReLU module's input (backbone and
    expanders: at batch 4 a flip inside an expander's Linear-BN-ReLU moves every gradient upstream
    by ~1e-3 as well)."""
    signs = []
    hooks = [mod.register_forward_pre_hook(lambda _m, inp: signs.append(inp[0].detach() > 0))
             for mod in model.modules() if isinstance(mod, torch.nn.ReLU)]
    z, m = model(x)
    for h in hooks:
        h.remove()
    gz = torch.randn_like(z) if gz is None else gz
    gm = torch.randn_like(m) if gm is None else gm
    ((z * gz).sum() + (m * gm).sum()).backward()
    return z, m, gz, gm, signs


@pytest.mark.triton
def test_fused_backend_matches_reference():
    """(z, m) and every parameter gradient of the Triton network against the reference network,
    same weights, float32, channels_last, train mode.

    A ReLU input within rounding of zero can take the other branch in the two runs (the blocks
    round differently at 1e-7); one flipped element spreads through BatchNorm to the whole
    gradient, which says nothing about the op. Such a draw is detected and drawn again."""
    model = MLVICX(preset="paper", dim=256, backend="triton").to(TRITON_DEVICE)
    model = model.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model).set_backend("torch")
    for _attempt in range(8):  # about 1 draw in 4 has a flip at this size
        model.zero_grad(), ref.zero_grad()
        x = torch.randn(4, 3, 64, 64, device=TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
        z, m, gz, gm, signs = run_recording_relu_signs(model, x)
        z_ref, m_ref, _, _, signs_ref = run_recording_relu_signs(ref, x, gz, gm)
        if all(torch.equal(a, b) for a, b in zip(signs, signs_ref)):
            break
    else:
        pytest.fail("ReLU signs differed between the fused and the reference network in 8 draws")
    assert rel_err(z, z_ref) < 1e-4 and rel_err(m, m_ref) < 1e-4
    # biases whose output only ever reaches a BatchNorm (which removes any constant shift): their
    # gradient is zero in exact arithmetic and rounding noise (about 1e-8 of the total) here
    before_bn = {f"aggregation.proj.{i}.bias" for i in range(5)} | {
        f"{head}.{j}.bias" for head in ("global_expander", "multilevel_expander") for j in (0, 3)}
    total = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name in before_bn:
            assert p.grad.norm() < 1e-6 * total and q.grad.norm() < 1e-6 * total, name
        else:
            assert rel_err(p.grad, q.grad) < 1e-3, name


def test_exact_and_official_aggregation_agree():
    model = MLVICX(preset="paper", dim=64, backend="torch")
    x = torch.randn(3, 3, 64, 64)
    z, m = model(x)
    z2, m2 = model.set_aggregation("official")(x)
    torch.testing.assert_close(z2, z)
    assert rel_err(m2, m) < 1e-4


def test_encoders_share_weights():
    model = MLVICX(preset="paper", dim=32, backend="torch").eval()
    plain = model.encoder()
    assert isinstance(plain, ResNet18) and plain.conv1.weight is model.backbone.conv1.weight
    with_context = model.encoder(with_context=True)
    assert isinstance(with_context, ContextEncoder)
    x = torch.randn(2, 3, 64, 64)
    taps = model.forward_taps(x)
    assert [t.shape[1:] for t in taps] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    torch.testing.assert_close(with_context(x), taps[-1].mean((2, 3)))
    assert plain(x).shape == (2, 512)


def test_one_channel_stem_and_bf16_autocast_channels_last():
    model = MLVICX(preset="paper", dim=32, in_chans=1, backend="torch").to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, m = model(x)
    assert z.shape == m.shape == (2, 32) and z.dtype == torch.bfloat16
    (z.float().sum() + m.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_inputs():
    model = MLVICX(preset="paper", dim=16, backend="torch")
    with pytest.raises(ValueError, match=r"expected 3 input channels, got x of shape \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected a 4-D image batch \(N, 3, H, W\), got \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    for shape in ((2, 3, 0, 32), (2, 3, 32, 0)):
        with pytest.raises(ValueError, match=rf"every dimension of x must be >= 1, got shape \({', '.join(map(str, shape))}\)"):
            model(torch.randn(*shape))
    with pytest.raises(ValueError, match="unknown preset 'large'"):
        MLVICX("large")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        MLVICX(backend="cuda")
    with pytest.raises(ValueError, match="unknown aggregation 'fast'"):
        MLVICX(aggregation="fast")
    with pytest.raises(ValueError, match="in_chans must be 1 or 3, got 2"):
        ResNet18(in_chans=2)


@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("MLVICX_SLOW_TESTS"),
                    reason="compiling the network takes about 30 s on a CPU; set MLVICX_SLOW_TESTS=1")
def test_network_compiles_channels_last():
    """torch.compile of the fused network (the Triton op is an opaque custom op in the graph)."""
    model = MLVICX(preset="paper", dim=64, backend="triton").to(TRITON_DEVICE).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device=TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    z, m = model(x)
    (z.sum() + m.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    z2, m2 = torch.compile(model)(x)
    (z2.sum() + m2.sum()).backward()
    assert rel_err(z2, z) < 1e-4 and rel_err(m2, m) < 1e-4
    for p, g in zip(model.parameters(), grads):
        if g.norm() > 1e-3:
            assert rel_err(p.grad, g) < 1e-3


def test_fp32_heads_run_the_expanders_in_float32_under_autocast():
    """fp32_heads=True: under bf16 autocast the backbone and context blocks keep bf16, and both
    expanders take their inputs cast up and run in float32 (what train's --fp32-heads
    sets); gradients reach the backbone through the cast."""
    model = MLVICX(preset="official", dim=48, backend="torch", fp32_heads=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, m = model(x)
        taps = model.forward_taps(x)
        g = torch.flatten(model.backbone.avgpool(taps[-1]), 1)
        a = model.aggregation(taps)
    assert g.dtype == torch.bfloat16 and z.dtype == m.dtype == torch.float32
    with torch.no_grad():  # the same batch: train-mode BN normalises with its statistics again
        z_ref, m_ref = model.global_expander(g.float()), model.multilevel_expander(a.float())
    assert rel_err(z, z_ref) < 1e-6 and rel_err(m, m_ref) < 1e-6
    (z.sum() + m.sum()).backward()
    grad = model.backbone.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert "fp32_heads=True" in repr(model)


@pytest.mark.parametrize("fp32_heads", [False, True])
def test_a_head_turned_off_is_not_run(fp32_heads):
    """The ablations' forward: the head left off gives None, is not run (the aggregation neither,
    with the multi-level head) and gets no gradient; the other head is the full forward's."""
    model = MLVICX(preset="paper", dim=32, backend="torch", fp32_heads=fp32_heads).eval()
    x = torch.randn(2, 3, 64, 64)
    z, m = model(x)
    calls = []
    model.aggregation.register_forward_hook(lambda *_: calls.append("aggregation"))
    z_only, none = model(x, multilevel_head=False)
    none2, m_only = model(x, global_head=False)
    assert none is None and none2 is None and calls == ["aggregation"]
    assert torch.equal(z_only, z) and torch.equal(m_only, m)
    model.train()
    z_only, _ = model(x, multilevel_head=False)
    z_only.sum().backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*model.aggregation.parameters(), *model.multilevel_expander.parameters()])
