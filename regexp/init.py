"""Weight initialization schemes, applied by layer type.

Every scheme but `default` sets the weight of each nn.Linear and convolution (the output
layer included), zeroes their biases and resets norm layers to the identity (weight 1, bias
0), wherever they sit in the model (a custom model's own layers too). `default` keeps
PyTorch's own init (kaiming_uniform with a=sqrt(5), fan-in-scaled biases).
"""

from typing import Callable

import torch
from torch import nn

from regexp.config import builder

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)

# torch's name for the nonlinearity whose gain suits each activation; GELU ~ ReLU for x >> 0.
_GAIN_NONLINEARITY = {"relu": "relu", "gelu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def gain(init_cfg, activation: str) -> float:
    """init.gain when set, else the gain that keeps the activation's output variance steady."""
    if init_cfg.gain is not None:
        return init_cfg.gain
    return nn.init.calculate_gain(_GAIN_NONLINEARITY[activation])


def _xavier_uniform(weight: torch.Tensor, init_cfg, activation: str) -> None:
    nn.init.xavier_uniform_(weight, gain=gain(init_cfg, activation))


def _xavier_normal(weight: torch.Tensor, init_cfg, activation: str) -> None:
    nn.init.xavier_normal_(weight, gain=gain(init_cfg, activation))


def _kaiming_uniform(weight: torch.Tensor, init_cfg, activation: str) -> None:
    nn.init.kaiming_uniform_(weight, mode=init_cfg.mode, nonlinearity=_GAIN_NONLINEARITY[activation])


def _kaiming_normal(weight: torch.Tensor, init_cfg, activation: str) -> None:
    nn.init.kaiming_normal_(weight, mode=init_cfg.mode, nonlinearity=_GAIN_NONLINEARITY[activation])


def _orthogonal(weight: torch.Tensor, init_cfg, activation: str) -> None:
    nn.init.orthogonal_(weight, gain=gain(init_cfg, activation))


def _normal(weight: torch.Tensor, init_cfg, activation: str) -> None:
    nn.init.normal_(weight, mean=0.0, std=init_cfg.std)


def by_layer_type(init_weight: Callable[[torch.Tensor, object, str], None]) -> Callable[[nn.Module, object, str], None]:
    """A model-wide scheme from a per-weight one: weights by `init_weight`, biases 0, norms identity."""

    @torch.no_grad()
    def apply(model: nn.Module, init_cfg, activation: str) -> None:
        for module in model.modules():
            if isinstance(module, WEIGHTED_LAYERS):
                init_weight(module.weight, init_cfg, activation)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, NORM_LAYERS) and module.weight is not None:  # affine norms
                module.weight.fill_(1.0)
                if module.bias is not None:  # LayerNorm(bias=False) has none
                    module.bias.zero_()

    return apply


# ---------------------------------------------------------------- schemes (REGISTRY["init"])
def keep_pytorch_default(model: nn.Module, init_cfg, activation: str) -> None:
    """Leave every parameter as the layer constructors set it."""


xavier_uniform = by_layer_type(_xavier_uniform)
xavier_normal = by_layer_type(_xavier_normal)
kaiming_uniform = by_layer_type(_kaiming_uniform)
kaiming_normal = by_layer_type(_kaiming_normal)
orthogonal = by_layer_type(_orthogonal)
normal = by_layer_type(_normal)


def init_weights(model: nn.Module, init_cfg, activation: str) -> None:
    """Initialize `model` in place with the scheme of option `init_cfg.name`, tuned to `activation`."""
    builder("init", init_cfg.name)(model, init_cfg, activation)
