"""Model registry tests (CPU only). Parametrized over ``MODELS``, so registering a model also tests it."""

import pytest
import torch
from torch import nn

from rpat.models import MODELS, Normalized, build, param_count

# Exact parameter counts for 10 classes (docs/faithfulness.md D6). A new model must be added here.
PARAMS_10 = {
    "cnn": 94_762,
    "resnet18": 11_173_962,
    "resnet18_bottleneck": 13_958_986,
    "preact_resnet18": 11_172_170,
    "wrn34_10": 46_160_474,
    "wrn28_10": 36_479_194,
}

# Models whose 64x64 stem has stride 2, so the pooled feature map matches the 32x32 case.
STRIDE2_STEM_AT_64 = ["resnet18", "resnet18_bottleneck", "preact_resnet18", "wrn34_10", "wrn28_10"]

ALL = sorted(MODELS)


def _sizes(name):
    sizes = MODELS[name].image_sizes
    return [s for s in (32, 64) if sizes is None or s in sizes]


def test_every_registered_model_has_a_param_count():
    missing = sorted(set(MODELS) - set(PARAMS_10))
    assert not missing, f"add the 10-class parameter count of {missing} to PARAMS_10"


def test_documented_models_are_registered():
    assert set(PARAMS_10) <= set(MODELS)


@pytest.mark.parametrize("name", ALL)
def test_param_count(name):
    if name not in PARAMS_10:
        pytest.fail(f"{name!r} has no expected parameter count in PARAMS_10")
    counts = {s: param_count(build(name, num_classes=10, image_size=s)) for s in _sizes(name)}
    assert set(counts.values()) == {PARAMS_10[name]}, counts


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", ALL)
def test_output_shape(name, num_classes, size):
    if size not in _sizes(name):
        pytest.skip(f"{name} does not support {size}x{size}")
    torch.manual_seed(0)
    model = build(name, num_classes=num_classes, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_one_channel_input(name):
    size = _sizes(name)[0]
    model = build(name, num_classes=10, in_channels=1, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 10)


def test_cnn_on_8x8_digits():
    model = build("cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.25]).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in STRIDE2_STEM_AT_64 if n in MODELS])
def test_64x64_stem_matches_32x32_feature_maps(name):
    shapes = {}
    for size in (32, 64):
        model = build(name, num_classes=10, image_size=size).eval()
        pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        assert len(pools) == 1
        seen = []
        pools[0].register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
        with torch.no_grad():
            model(torch.rand(1, 3, size, size))
        shapes[size] = seen[0]
    assert shapes[32] == shapes[64], shapes


def test_build_applies_normalisation():
    torch.manual_seed(0)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    model = build("cnn", num_classes=10, mean=mean, std=std).eval()
    assert isinstance(model, Normalized)
    x = torch.rand(2, 3, 32, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
        # Without mean/std the wrapper is the identity.
        plain = build("cnn", num_classes=10)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        torch.testing.assert_close(plain(x), model.net(x))


def test_wide_resnet_reference_init():
    torch.manual_seed(0)
    net = build("wrn28_10", num_classes=10).net
    assert torch.equal(net.fc.bias, torch.zeros_like(net.fc.bias))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = net.block3.layer[1].conv1  # 640 -> 640, 3x3: std sqrt(2 / (9 * 640))
    expected = (2.0 / (9 * conv.out_channels)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02


def test_unknown_model_is_a_key_error_naming_the_registered_models():
    with pytest.raises(KeyError) as excinfo:
        build("no_such_model", num_classes=10)
    message = str(excinfo.value)
    assert "no_such_model" in message
    for name in MODELS:
        assert name in message
