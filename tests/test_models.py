import pytest
import torch

from d3fast.models import NETWORKS, ConvNet, Decoder, build_network, count_parameters


def conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def test_convnet_known_parameter_counts():
    # the layout of docs/algorithm.md section 3: ConvNet-3 on 3x32x32 -> 320,010; ConvNet-5 on 3x128x128 -> 615,690
    assert count_parameters(build_network("convnet", 3, 10, 32)) == 320_010
    assert count_parameters(build_network("convnet", 3, 10, 128)) == 615_690
    # by formula: conv + instance-norm affine per block, Linear on 128*4*4
    for res, depth in ((32, 3), (64, 4), (128, 5)):
        expected = conv_params(3, 128, 3) + 256 + (depth - 1) * (conv_params(128, 128, 3) + 256) + 2048 * 10 + 10
        assert count_parameters(build_network("convnet", 3, 10, res)) == expected


def test_cross_architecture_parameter_counts():
    # the counts the DC/MTT code's CIFAR-10 models have
    assert count_parameters(build_network("resnet18", 3, 10, 32)) == 11_173_962
    assert count_parameters(build_network("vgg11", 3, 10, 32)) == 9_231_114
    alexnet = (
        conv_params(3, 128, 5) + conv_params(128, 192, 5) + conv_params(192, 256, 3)
        + conv_params(256, 192, 3) + conv_params(192, 192, 3) + 192 * 4 * 4 * 10 + 10
    )
    assert count_parameters(build_network("alexnet", 3, 10, 32)) == alexnet


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("res, channels", [(28, 1), (32, 3), (64, 3)])
def test_network_shapes(name, res, channels):
    net = build_network(name, channels, 7, res)
    x = torch.randn(2, channels, res, res)
    out = net(x)
    assert out.shape == (2, 7)
    assert net.features(x).shape == (2, net.feature_dim)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_convnet_features_and_depth():
    for res, depth in ((28, 3), (32, 3), (64, 4), (128, 5)):
        net = ConvNet(1 if res == 28 else 3, 10, res)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == depth
        assert net.feature_dim == 2048  # 128 x 4 x 4 for every standard resolution
    net = ConvNet(3, 10, 128)
    assert net(torch.randn(1, 3, 128, 128)).shape == (1, 10)
    net = ConvNet(3, 10, 32, width=16, norm="batchnorm", pooling="maxpooling")
    assert net.features(torch.randn(2, 3, 32, 32)).shape == (2, 16 * 4 * 4)


@pytest.mark.parametrize("kind", ["paper", "tiny"])
@pytest.mark.parametrize("res, channels", [(28, 1), (32, 3), (64, 3), (128, 3)])
def test_decoder_shapes_and_range(kind, res, channels):
    mean, std = [0.4] * channels, [0.2] * channels
    dec = Decoder(res, channels, mean, std, kind=kind, width=64 if kind == "tiny" else 256)
    z = torch.randn(3, 64) * 10  # large latents saturate tanh
    x = dec(z)
    assert x.shape == (3, channels, res, res)
    lo, hi = (0 - 0.4) / 0.2, (1 - 0.4) / 0.2
    # elementwise float32 on values <= 3: a few ulps (2.4e-7) past the exact bounds at most
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5
    # the output spans the normalised data range, not tanh's [-1, 1]
    assert x.max() > 1.5 and x.min() < -1.5


def test_decoder_layouts_follow_spec():
    dec = Decoder(128, 3, [0.5] * 3, [0.5] * 3)
    convt = [m for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convt) == 5  # k = 5 blocks at 128 px
    assert [m.out_channels for m in convt] == [128, 64, 32, 16, 8]
    assert dec.project.out_features == 256 * 4 * 4
    assert len([m for m in Decoder(32, 3, [0.5] * 3, [0.5] * 3).modules() if isinstance(m, torch.nn.ConvTranspose2d)]) == 3
    tiny = Decoder(32, 3, [0.5] * 3, [0.5] * 3, kind="tiny", width=128)
    convt = [m for m in tiny.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    # reference TinyVAE at 32 px: divisors [1, 2, 4, 8, 8] -> 4 blocks from 2x2
    assert [(m.in_channels, m.out_channels) for m in convt] == [(128, 64), (64, 32), (32, 16), (16, 16)]
    assert tiny.project.out_features == 128 * 2 * 2
