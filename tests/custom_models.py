"""Models of a user's own for tests/test_custom_model.py and scripts/bench_custom_model.py
(model=custom model.target=custom_models.NAME, with tests/ on PYTHONPATH)."""

from collections import OrderedDict

import torch
from torch import nn


def SmallCNN(channels: int = 1, classes: int = 10, widths: tuple = (32, 64), fc: int = 128,  # noqa: N802 (a class to the user)
             side: int = 28, dropout: float = 0.0) -> nn.Sequential:
    """The built-in cnn's layers (conv -> relu -> pool per width, flatten, fc -> relu -> fc), named as it names them."""
    layers = []
    in_channels = channels
    for k, width in enumerate(widths, 1):
        layers += [(f"conv{k}", nn.Conv2d(in_channels, width, 3, padding=1)), (f"act{k}", nn.ReLU()),
                   (f"pool{k}", nn.MaxPool2d(2))]
        in_channels, side = width, side // 2
    k = len(widths) + 1
    layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(in_channels * side * side, fc)), (f"act{k}", nn.ReLU())]
    layers += [(f"drop{k}", nn.Dropout(dropout))] if dropout else []
    layers.append(("fc2", nn.Linear(fc, classes)))
    return nn.Sequential(OrderedDict(layers))


class Nested(nn.Sequential):
    """A Sequential subclass (its own type: not replayed by the stack)."""


def NestedMLP(hidden: int = 16, classes: int = 10) -> nn.Sequential:  # noqa: N802
    """Sequentials inside a Sequential: fuses."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("body", nn.Sequential(OrderedDict([("fc", nn.Linear(784, hidden)), ("act", nn.Tanh())]))),
        ("head", nn.Linear(hidden, classes)),
    ]))


class TwoPath(nn.Module):
    """Not a Sequential: runs alone in a fused sweep."""

    def __init__(self, hidden: int = 16, classes: int = 10):
        super().__init__()
        self.encoder = nn.Linear(784, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.encoder(x.flatten(1))))


class WrongShape(TwoPath):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :3]


class IntLogits(TwoPath):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).long()


class NaNLogits(TwoPath):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


class NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 10)


NOT_CALLABLE = 3


def NotAModule() -> dict:  # noqa: N802
    return {}


def Exits() -> nn.Module:  # noqa: N802
    raise SystemExit(0)  # a script's exit in the user's code: must not end regexp as a success


class FixedBatch(TwoPath):
    """Right for the pre-flight's first batch of two only (its output keeps two rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:2]
