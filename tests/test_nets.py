import math

import pytest
import torch

from diffbook.nets import MLPConfig, TimeMLP, UNet, UNetConfig, build_net, count_parameters, timestep_embedding


@pytest.mark.parametrize("config", [
    UNetConfig(base_channels=8, channel_mults=(1, 2, 3), attention_resolutions=(7,)),
    UNetConfig(image_size=32, in_channels=3, base_channels=8, channel_mults=(1, 2, 2, 2), attention_resolutions=(8,)),
    UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=2, num_classes=10, dropout=0.1),
])
def test_unet_maps_images_to_same_shape(config):
    torch.manual_seed(0)
    net = UNet(config)
    x = torch.randn(3, config.in_channels, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2]) if config.num_classes else None
    assert net(x, torch.tensor([0.0, 10.0, 999.0]), y).shape == x.shape


def test_default_unet_size_and_zero_initialised_output():
    torch.manual_seed(0)
    net = UNet()
    assert count_parameters(net) == 1_805_121
    out = net(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2)), torch.tensor([1.0, 500.0]))
    assert torch.count_nonzero(out) == 0  # the output conv starts at zero: the initial prediction is 0


def test_unet_depends_on_time_and_class():
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_classes=10))
    for p in net.parameters():  # leave the zero-initialised state so outputs differ
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5.0, 5.0])
    assert not torch.allclose(net(x, t), net(x, t + 100))
    assert not torch.allclose(net(x, t, torch.tensor([1, 1])), net(x, t, torch.tensor([2, 2])))


def test_unet_rejects_wrong_shape_with_expected_shape():
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        UNet(UNetConfig(base_channels=8))(torch.zeros(2, 1, 32, 32), torch.zeros(2))


def test_mlp_and_build_net_from_manifest_dicts():
    torch.manual_seed(0)
    mlp = build_net("mlp", MLPConfig(hidden=16).to_dict())
    gen = torch.Generator().manual_seed(4)
    assert isinstance(mlp, TimeMLP) and mlp(torch.randn(5, 2, generator=gen), torch.rand(5, generator=gen)).shape == (5, 2)
    unet = build_net("unet", {**UNetConfig(base_channels=8).to_dict(), "channel_mults": [1, 2]})
    assert unet.config.channel_mults == (1, 2)
    with pytest.raises(ValueError, match="unknown network kind"):
        build_net("transformer", {})


def test_timestep_embedding_is_cos_sin_of_scaled_time():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    omega = [10_000 ** (-k / 4) for k in range(4)]  # omega_k = P^(-k / (d/2)), P = 10000, d = 8
    expected = [math.cos(3 * w) for w in omega] + [math.sin(3 * w) for w in omega]
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
