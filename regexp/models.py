"""Models: MLP, deep MLP, a small two-convolution SimpleCNN and a small ResNet, with norm and dropout by config.

Every model is an nn.Sequential of named layers (nested for the ResNet), so
`model.named_modules()` yields the dotted names diagnostics report by ("exploding gradients
from fc3") and a forward hook on any of them sees that layer's output. Naming:

  mlp, deep_mlp  flatten, drop_input, fc1, norm1, act1, drop1, ..., fc{L+1} (the output layer)
  cnn            drop_input, conv1, norm1, act1, pool1, ..., flatten, fc1, norm{k}, act{k},
                 drop{k}, fc2 -- norm/act/drop{k} belong to the k-th hidden layer, so the
                 head's are numbered after the convs' (norm3 after conv1, conv2)
  resnet         drop_input, stem.{conv,norm,act}, stage{i}.{conv,pool,norm,act},
                 stage{i}.res.{conv1,norm1,act1,conv2,norm2,act2}, pool, flatten, drop, fc

Forward passes have no data-dependent Python branches: they compile and run channels_last.
"""

from collections import OrderedDict
from math import prod
from typing import Callable, Optional

import torch
from torch import nn

from regexp.config import builder

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}

Layers = list[tuple[str, nn.Module]]


# ---------------------------------------------------------------- norms (REGISTRY["norm"])
def no_norm(norm_cfg, features: int, spatial: bool) -> None:
    return None


def batch_norm(norm_cfg, features: int, spatial: bool) -> nn.Module:
    batchnorm = nn.BatchNorm2d if spatial else nn.BatchNorm1d
    return batchnorm(features, eps=norm_cfg.eps, momentum=norm_cfg.momentum, affine=norm_cfg.affine)


def layer_norm(norm_cfg, features: int, spatial: bool) -> nn.Module:
    if spatial:  # one group = LayerNorm over (C, H, W) of each sample, whatever H and W are
        return nn.GroupNorm(1, features, eps=norm_cfg.eps, affine=norm_cfg.affine)
    return nn.LayerNorm(features, eps=norm_cfg.eps, elementwise_affine=norm_cfg.affine)


def make_norm(norm_cfg, features: int, spatial: bool) -> Optional[nn.Module]:
    """The configured norm over `features` units (channels of a feature map when `spatial`)."""
    return builder("norm", norm_cfg.name)(norm_cfg, features, spatial)


def keeps_bias(norm: Optional[nn.Module], norm_cfg) -> bool:
    """A norm right after a layer subtracts the mean anyway; its shift replaces the layer's bias."""
    return norm is None or norm_cfg.placement == "after"


def norm_and_activation(suffix: int | str, norm: Optional[nn.Module], activation: str, norm_cfg) -> Layers:
    """`norm{suffix}` then `act{suffix}` (placement=before), or the other way round (after)."""
    act = (f"act{suffix}", ACTIVATIONS[activation]())
    if norm is None:
        return [act]
    named_norm = (f"norm{suffix}", norm)
    return [named_norm, act] if norm_cfg.placement == "before" else [act, named_norm]


def dropout(name: str, p: float) -> Layers:
    """A Dropout module only when it drops something, so p=0 leaves no trace in the model."""
    return [(name, nn.Dropout(p))] if p > 0 else []


def dense_block(name: str, k: int, in_features: int, out_features: int, activation: str, norm_cfg, p: float) -> Layers:
    """The k-th hidden layer as a Linear `name` -> norm -> activation -> dropout."""
    norm = make_norm(norm_cfg, out_features, False)  # (norms draw no random numbers: init order is kept)
    linear = nn.Linear(in_features, out_features, bias=keeps_bias(norm, norm_cfg))
    return [(name, linear)] + norm_and_activation(k, norm, activation, norm_cfg) + dropout(f"drop{k}", p)


def conv3x3(in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


def conv_block(suffix: int | str, in_channels: int, out_channels: int, activation: str, norm_cfg) -> Layers:
    """`conv{suffix}` (3x3, same size) -> norm -> activation."""
    norm = make_norm(norm_cfg, out_channels, True)
    conv = conv3x3(in_channels, out_channels, keeps_bias(norm, norm_cfg))
    return [(f"conv{suffix}", conv)] + norm_and_activation(suffix, norm, activation, norm_cfg)


# ---------------------------------------------------------------- models (REGISTRY["model"])
def _mlp(widths: list[int], activation: str, norm_cfg, input_shape, num_classes: int, p: float, p_input: float) -> nn.Sequential:
    layers = [("flatten", nn.Flatten())] + dropout("drop_input", p_input)
    in_features = prod(input_shape)
    for k, width in enumerate(widths, 1):
        layers += dense_block(f"fc{k}", k, in_features, width, activation, norm_cfg, p)
        in_features = width
    layers.append((f"fc{len(widths) + 1}", nn.Linear(in_features, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def mlp(model_cfg, norm_cfg, input_shape, num_classes, p, p_input) -> nn.Sequential:
    return _mlp(list(model_cfg.hidden), model_cfg.activation, norm_cfg, input_shape, num_classes, p, p_input)


def deep_mlp(model_cfg, norm_cfg, input_shape, num_classes, p, p_input) -> nn.Sequential:
    widths = [model_cfg.width] * model_cfg.depth
    return _mlp(widths, model_cfg.activation, norm_cfg, input_shape, num_classes, p, p_input)


def cnn(model_cfg, norm_cfg, input_shape, num_classes, p, p_input) -> nn.Sequential:
    """SimpleCNN, a small two-convolution net: (conv -> norm -> act -> maxpool 2) per channel width, then fc -> fc."""
    channels, height, width = input_shape
    layers = dropout("drop_input", p_input)
    for k, out_channels in enumerate(model_cfg.channels, 1):
        layers += conv_block(k, channels, out_channels, model_cfg.activation, norm_cfg)
        layers.append((f"pool{k}", nn.MaxPool2d(2)))
        channels, height, width = out_channels, height // 2, width // 2
    if height < 1 or width < 1:
        raise ValueError(
            f"model.channels={list(model_cfg.channels)}: {len(model_cfg.channels)} 2x2 poolings shrink "
            f"a {input_shape[1]}x{input_shape[2]} input to nothing; use fewer conv layers"
        )
    layers.append(("flatten", nn.Flatten()))
    k = len(model_cfg.channels) + 1
    layers += dense_block("fc1", k, channels * height * width, model_cfg.fc, model_cfg.activation, norm_cfg, p)
    layers.append(("fc2", nn.Linear(model_cfg.fc, num_classes)))
    return nn.Sequential(OrderedDict(layers))


class Residual(nn.Sequential):
    """x + layers(x): the identity path carries signal and gradient past the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def resnet(model_cfg, norm_cfg, input_shape, num_classes, p, p_input) -> nn.Sequential:
    """A ResNet-9 / airbench-style CIFAR net: per stage conv -> maxpool -> norm -> act -> residual
    block, so the norms and the residual convs work on the pooled, 4x smaller map."""
    widths, activation = list(model_cfg.widths), model_cfg.activation
    layers = dropout("drop_input", p_input)
    layers.append(("stem", nn.Sequential(OrderedDict(conv_block("", input_shape[0], widths[0], activation, norm_cfg)))))
    for i, (in_channels, out_channels) in enumerate(zip(widths, widths[1:]), 1):
        residual = Residual(OrderedDict(
            conv_block(1, out_channels, out_channels, activation, norm_cfg)
            + conv_block(2, out_channels, out_channels, activation, norm_cfg)
        ))
        norm = make_norm(norm_cfg, out_channels, True)
        stage = (
            [("conv", conv3x3(in_channels, out_channels, keeps_bias(norm, norm_cfg))), ("pool", nn.MaxPool2d(2))]
            + norm_and_activation("", norm, activation, norm_cfg)
            + [("res", residual)]
        )
        layers.append((f"stage{i}", nn.Sequential(OrderedDict(stage))))
    layers += [("pool", nn.AdaptiveMaxPool2d(1)), ("flatten", nn.Flatten())]
    layers += dropout("drop", p) + [("fc", nn.Linear(widths[-1], num_classes))]
    return nn.Sequential(OrderedDict(layers))


def dropout_rates(dropout_cfg) -> tuple[float, float]:
    """(hidden p, input p); both 0 without +regularizer=dropout (`dropout_cfg` None)."""
    return (dropout_cfg.p, dropout_cfg.p_input) if dropout_cfg is not None else (0.0, 0.0)


def build_model(model_cfg, norm_cfg, dropout_cfg, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The model of option `model_cfg.name`; `dropout_cfg` is None without +regularizer=dropout."""
    p, p_input = dropout_rates(dropout_cfg)
    return builder("model", model_cfg.name)(model_cfg, norm_cfg, tuple(input_shape), num_classes, p, p_input)
