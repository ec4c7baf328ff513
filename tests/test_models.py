"""Models (shapes, norm/dropout placement, names) and initialization schemes."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from regexp import config
from regexp.config import CNNConfig, DeepMLPConfig, DropoutConfig, InitConfig, MLPConfig, NormConfig, ResNetConfig
from regexp.init import init_weights
from regexp.models import ACTIVATIONS, build_model

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
ACTIVATION_TYPES = tuple(ACTIVATIONS.values())
# Small versions of each model, to keep the tests fast.
SMALL = {
    "mlp": MLPConfig(name="mlp", hidden=[32, 16]),
    "deep_mlp": DeepMLPConfig(name="deep_mlp", depth=3, width=16),
    "cnn": CNNConfig(name="cnn", channels=[4, 8], fc=16),
    "resnet": ResNetConfig(name="resnet", widths=[4, 8, 16]),
}
BUILT_IN = [name for name in config.REGISTRY["model"] if name != "custom"]  # model=custom: tests/test_custom_model.py
# The gain each activation's variance-preserving init uses, written out rather than asked of torch.
GAIN = {"relu": math.sqrt(2), "gelu": math.sqrt(2), "tanh": 5 / 3, "sigmoid": 1.0}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def cfg(schema):
    return OmegaConf.structured(schema)


def model_cfg(name, **overrides):
    return OmegaConf.merge(cfg(SMALL[name]), overrides)


def build(name="mlp", norm="none", placement="before", dropout=None, shape=MNIST, **overrides):
    norm_cfg = cfg(NormConfig(name=norm, placement=placement))
    dropout_cfg = cfg(dropout) if dropout is not None else None
    return build_model(model_cfg(name, **overrides), norm_cfg, dropout_cfg, shape, 10)


def children(container):
    """(name, module) pairs of every Sequential's direct children, one list per Sequential."""
    return [list(m.named_children()) for m in container.modules() if isinstance(m, nn.Sequential)]


def nearest_weighted_layer_before(layers, i):
    return next(m for _, m in reversed(layers[:i]) if isinstance(m, (nn.Linear, nn.Conv2d)))


def names_of(model, kind):
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


# ---------------------------------------------------------------- registries


def test_registries_cover_the_config_options():
    assert set(SMALL) == set(BUILT_IN)
    assert set(ACTIVATIONS) == set(config.ACTIVATIONS)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="model=transformer"):
        build_model(OmegaConf.create({"name": "transformer"}), cfg(NormConfig(name="none")), None, MNIST, 10)


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("norm,placement", [("none", "before"), ("batchnorm", "before"), ("batchnorm", "after"), ("layernorm", "before")])
@pytest.mark.parametrize("name", BUILT_IN)
def test_logits_shape_and_backprop(name, norm, placement, shape):
    model = build(name, norm, placement, DropoutConfig(p=0.2, p_input=0.1), shape)
    logits = model(torch.randn(4, *shape))
    assert logits.shape == (4, 10)
    logits.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize("name", BUILT_IN)
def test_default_sized_models_run_on_their_data_set(name):
    shape = CIFAR if name == "resnet" else MNIST
    model = build_model(cfg(config.REGISTRY["model"][name].schema(name=name)), cfg(NormConfig(name="none")), None, shape, 10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_activation(name, activation):
    model = build(name, activation=activation)
    acts = [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]
    assert acts and all(isinstance(m, ACTIVATIONS[activation]) for m in acts)
    model(torch.randn(2, *MNIST)).sum().backward()


@pytest.mark.parametrize("name", ["cnn", "resnet"])
@pytest.mark.slow
def test_channels_last_and_compile_match_eager(name):
    model = build(name, "batchnorm", shape=CIFAR).eval()
    x = torch.randn(2, *CIFAR)
    expected = model(x)
    channels_last = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last(x.to(memory_format=torch.channels_last)), expected)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: no graph breaks
    torch.testing.assert_close(compiled(x), expected)


# ---------------------------------------------------------------- norm placement


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_norm_before_activation_replaces_the_bias(name, norm):
    model = build(name, norm, "before")
    seen = 0
    for layers in children(model):
        for i, (_, module) in enumerate(layers):
            if isinstance(module, NORMS):
                seen += 1
                assert isinstance(layers[i + 1][1], ACTIVATION_TYPES)
                assert nearest_weighted_layer_before(layers, i).bias is None
    assert seen > 0
    output_layer = list(model.modules())[-1]
    assert isinstance(output_layer, nn.Linear) and output_layer.bias is not None


@pytest.mark.parametrize("name", BUILT_IN)
def test_norm_after_activation_keeps_the_bias(name):
    model = build(name, "batchnorm", "after")
    seen = 0
    for layers in children(model):
        for i, (_, module) in enumerate(layers):
            if isinstance(module, NORMS):
                seen += 1
                assert isinstance(layers[i - 1][1], ACTIVATION_TYPES)
                assert nearest_weighted_layer_before(layers, i).bias is not None
    assert seen > 0


@pytest.mark.parametrize("name", BUILT_IN)
def test_no_norm_means_every_layer_has_a_bias(name):
    model = build(name)
    assert not any(isinstance(m, NORMS) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("name", BUILT_IN)
def test_norm_kind_follows_the_layer_it_normalizes(name):
    for norm, linear_norm, conv_norm in [("batchnorm", nn.BatchNorm1d, nn.BatchNorm2d), ("layernorm", nn.LayerNorm, nn.GroupNorm)]:
        model = build(name, norm)
        for layers in children(model):
            for i, (_, module) in enumerate(layers):
                if isinstance(module, NORMS):
                    layer = nearest_weighted_layer_before(layers, i)
                    if isinstance(layer, nn.Conv2d):
                        assert isinstance(module, conv_norm)
                        if conv_norm is nn.GroupNorm:  # LayerNorm over (C, H, W)
                            assert (module.num_groups, module.num_channels) == (1, layer.out_channels)
                    else:
                        assert isinstance(module, linear_norm)


def test_norm_settings_are_passed_through():
    norm_cfg = cfg(NormConfig(name="batchnorm", affine=False, momentum=0.01, eps=1e-3))
    model = build_model(model_cfg("cnn"), norm_cfg, None, MNIST, 10)
    for bn in (m for m in model.modules() if isinstance(m, NORMS)):
        assert (bn.affine, bn.momentum, bn.eps) == (False, 0.01, 1e-3)
    layernorm_cfg = cfg(NormConfig(name="layernorm", affine=False, eps=1e-3))
    model = build_model(model_cfg("cnn"), layernorm_cfg, None, MNIST, 10)
    assert model.norm1.eps == 1e-3 and not model.norm1.affine and model.norm3.weight is None


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mlp", ["drop_input", "drop1", "drop2"]),
        ("deep_mlp", ["drop_input", "drop1", "drop2", "drop3"]),
        ("cnn", ["drop_input", "drop3"]),  # the head only; drop3 belongs to fc1, the 3rd hidden layer
        ("resnet", ["drop_input", "drop"]),
    ],
)
def test_dropout_on_hidden_layers_and_input_only(name, expected):
    model = build(name, dropout=DropoutConfig(p=0.3, p_input=0.2))
    assert names_of(model, nn.Dropout) == expected
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2] + [0.3] * (len(expected) - 1)
    assert isinstance(list(model.children())[-1], nn.Linear)  # nothing after the output layer


def test_mlp_dropout_follows_the_activation_and_input_dropout_the_flatten():
    names = [name for name, _ in build("mlp", dropout=DropoutConfig(p=0.3, p_input=0.2)).named_children()]
    assert names == ["flatten", "drop_input", "fc1", "act1", "drop1", "fc2", "act2", "drop2", "fc3"]


@pytest.mark.parametrize("dropout", [None, DropoutConfig(p=0.0, p_input=0.0)], ids=["off", "p=0"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_no_dropout_modules_when_nothing_is_dropped(name, dropout):
    assert names_of(build(name, dropout=dropout), nn.Dropout) == []


def test_input_dropout_alone():
    assert names_of(build("mlp", dropout=DropoutConfig(p=0.0, p_input=0.2)), nn.Dropout) == ["drop_input"]


# ---------------------------------------------------------------- names and sizes


def test_mlp_names_and_widths():
    model = build("mlp", "batchnorm")
    assert [n for n, _ in model.named_children()] == ["flatten", "fc1", "norm1", "act1", "fc2", "norm2", "act2", "fc3"]
    assert [(m.in_features, m.out_features) for m in (model.fc1, model.fc2, model.fc3)] == [(784, 32), (32, 16), (16, 10)]


def test_deep_mlp_depth_and_width():
    model = build("deep_mlp", depth=5, width=64)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in linears] == [f"fc{k}" for k in range(1, 7)]
    assert [m.out_features for _, m in linears] == [64] * 5 + [10]
    assert names_of(model, nn.ReLU) == [f"act{k}" for k in range(1, 6)]


@pytest.mark.parametrize("shape,flat", [(MNIST, 8 * 7 * 7), (CIFAR, 8 * 8 * 8)], ids=["mnist", "cifar"])
def test_cnn_names_and_head_size(shape, flat):
    model = build("cnn", "batchnorm", shape=shape)
    assert names_of(model, (nn.Conv2d, nn.Linear)) == ["conv1", "conv2", "fc1", "fc2"]
    assert names_of(model, NORMS) == ["norm1", "norm2", "norm3"]
    assert model.conv1.in_channels == shape[0] and model.fc1.in_features == flat


def test_cnn_with_three_conv_layers():
    model = build("cnn", channels=[4, 8, 16], shape=CIFAR)
    assert names_of(model, nn.Conv2d) == ["conv1", "conv2", "conv3"]
    assert model.fc1.in_features == 16 * 4 * 4
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_cnn_with_more_pooling_than_pixels_is_a_clear_error():
    with pytest.raises(ValueError, match="model.channels"):
        build("cnn", channels=[4] * 6, shape=MNIST)


def test_resnet_names():
    model = build("resnet", "batchnorm", shape=CIFAR)
    expected = ["stem.conv"]
    for i in (1, 2):
        expected += [f"stage{i}.conv", f"stage{i}.res.conv1", f"stage{i}.res.conv2"]
    assert names_of(model, (nn.Conv2d, nn.Linear)) == expected + ["fc"]
    assert names_of(model, NORMS)[:4] == ["stem.norm", "stage1.norm", "stage1.res.norm1", "stage1.res.norm2"]


def test_resnet_residual_adds_the_identity():
    block = build("resnet", shape=CIFAR).stage1.res
    x = torch.randn(2, 8, 16, 16)
    body = nn.Sequential(*block.children())
    torch.testing.assert_close(block(x), x + body(x))


def test_every_layer_is_hookable():
    """One forward hook per layer sees its activation: what the monitor's act/* metrics rely on."""
    model = build("resnet", "batchnorm", shape=CIFAR)
    outputs = {}
    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.shape))
    model(torch.randn(2, *CIFAR))
    assert outputs["stem.act"] == (2, 4, 32, 32) and outputs["stage2.res.act2"] == (2, 16, 8, 8)
    assert outputs["fc"] == (2, 10)


# ---------------------------------------------------------------- initialization


def init(name, **fields):
    return cfg(InitConfig(name=name, **fields))


@pytest.mark.parametrize("name", [n for n in config.REGISTRY["init"] if n != "default"])
def test_init_zeroes_biases_and_resets_norms(name):
    model = build("cnn", "batchnorm")
    with torch.no_grad():  # off their construction values, so the init must really set them
        for pname, param in model.named_parameters():
            if pname.endswith("bias") or pname.startswith("norm"):
                param.fill_(0.5)
    init_weights(model, init(name), "relu")
    for pname, param in model.named_parameters():
        if pname.endswith("bias"):
            assert (param == 0).all(), pname
        elif pname.startswith("norm"):
            assert (param == 1).all(), pname


def test_default_init_leaves_every_parameter_alone():
    model = build("cnn", "batchnorm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_weights(model, init("default"), "relu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ValueError, match="init=lecun"):
        init_weights(nn.Linear(2, 2), init("lecun"), "relu")


FAN_IN, FAN_OUT = 1024, 512


@pytest.mark.parametrize(
    "name,activation,fields,expected_std",
    [
        ("kaiming_normal", "relu", {}, math.sqrt(2 / FAN_IN)),
        ("kaiming_normal", "relu", {"mode": "fan_out"}, math.sqrt(2 / FAN_OUT)),
        ("kaiming_normal", "gelu", {}, math.sqrt(2 / FAN_IN)),
        ("kaiming_normal", "tanh", {}, GAIN["tanh"] / math.sqrt(FAN_IN)),
        ("kaiming_normal", "sigmoid", {}, 1 / math.sqrt(FAN_IN)),
        ("kaiming_uniform", "relu", {}, math.sqrt(2 / FAN_IN)),  # U(-b, b), b = gain*sqrt(3/fan)
        ("xavier_normal", "tanh", {}, GAIN["tanh"] * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier_normal", "relu", {"gain": 0.5}, 0.5 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier_uniform", "relu", {}, GAIN["relu"] * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier_uniform", "sigmoid", {}, math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("normal", "relu", {"std": 0.05}, 0.05),
    ],
)
def test_init_weight_std_matches_the_formula(name, activation, fields, expected_std):
    layer = nn.Linear(FAN_IN, FAN_OUT)
    init_weights(layer, init(name, **fields), activation)
    assert layer.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert layer.weight.mean().abs().item() < 0.05 * expected_std
    assert (layer.bias == 0).all()


def test_kaiming_on_a_conv_counts_the_kernel_in_the_fan_in():
    conv = nn.Conv2d(64, 128, 3)
    init_weights(conv, init("kaiming_normal"), "relu")
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)


@pytest.mark.parametrize("activation,fields,expected_gain", [("relu", {}, GAIN["relu"]), ("tanh", {"gain": 1.5}, 1.5)])
def test_orthogonal_rows_are_orthogonal_with_the_gain(activation, fields, expected_gain):
    layer = nn.Linear(256, 256)
    init_weights(layer, init("orthogonal", **fields), activation)
    weight = layer.weight.detach()
    torch.testing.assert_close(weight @ weight.T, expected_gain**2 * torch.eye(256), atol=1e-4, rtol=0)


@torch.no_grad()
def last_hidden_activation_std(init_cfg) -> float:
    model = build_model(cfg(DeepMLPConfig(name="deep_mlp", depth=10, width=512)), cfg(NormConfig(name="none")), None, MNIST, 10)
    init_weights(model, init_cfg, "relu")
    captured = {}
    model.act10.register_forward_hook(lambda m, i, out: captured.__setitem__("act10", out))
    model(torch.randn(256, *MNIST))
    return captured["act10"].std().item()


def test_kaiming_keeps_deep_relu_activations_alive_where_small_normal_collapses_them():
    """The classic study: variance-preserving init keeps a 10-layer ReLU net's signal O(1);
    N(0, 0.01^2) shrinks it by ~0.16 per layer until it vanishes."""
    assert 0.3 < last_hidden_activation_std(init("kaiming_normal")) < 3
    assert last_hidden_activation_std(init("normal", std=0.01)) < 1e-6
