"""U-Net on the ResNet18 / MLVICX encoder: shapes, and the frozen protocol really freezes the encoder."""
import pytest
import torch

from mlvicx_fast.models.mlvicx import MLVICX
from mlvicx_fast.models.resnet import ResNet18
from mlvicx_fast.models.unet import UNet


@pytest.mark.parametrize("size", [64, 48])
@pytest.mark.parametrize("context", [False, True])
def test_unet_gives_a_logit_map_of_the_input_size(size, context):
    encoder = MLVICX(preset="paper", dim=16, backend="torch").encoder(with_context=True) if context else ResNet18()
    net = UNet(encoder)
    x = torch.randn(2, 3, size, size)
    y = net(x)
    assert y.shape == (2, 1, size, size)
    y.mean().backward()
    assert all(p.grad is not None for p in net.decoder.parameters())


def test_frozen_encoder_does_not_change():
    net = UNet(ResNet18(in_chans=1)).freeze_encoder()
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    dec = net.head.weight.clone()
    net.train()
    assert not net.encoder.training  # BN statistics stay as pretrained
    for _ in range(2):
        loss = net(torch.randn(3, 1, 64, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(dec, net.head.weight)


def test_unet_needs_an_encoder_with_taps():
    with pytest.raises(TypeError, match="forward_taps"):
        UNet(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("shape,size", [((2, 5, 7, 7), (14, 14)), ((3, 4, 4, 9), (13, 8)), ((1, 2, 1, 6), (3, 12))])
def test_resize_by_matrices_is_bilinear(shape, size):
    """The matrix form the U-Net uses under deterministic algorithms on CUDA equals bilinear
    F.interpolate (align_corners=False), values and gradients, also for channels_last and shrinking."""
    from mlvicx_fast.models.unet import resize_bilinear

    y = torch.randn(*shape, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        a = y.clone(memory_format=layout).requires_grad_()
        b = y.clone().requires_grad_()
        out_a, out_b = resize_bilinear(a, size, by_matrices=True), torch.nn.functional.interpolate(
            b, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(out_b)
        out_a.backward(g)
        out_b.backward(g)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)

