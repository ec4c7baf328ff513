"""Regularizers that act on the loss or the weights: L1/L2/elastic-net penalties, max-norm,
label smoothing and early stopping. Dropout lives in the model, augmentation in data.py,
weight decay in the optimizer."""

import math
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from regexp.optim import is_weight


def weights(model: nn.Module) -> list[torch.Tensor]:
    """The parameters penalties and max-norm act on: weights, never biases or norm params."""
    return [p for p in model.parameters() if is_weight(p)]


@dataclass(frozen=True)
class Penalty:
    """loss += l1 * sum|w| + l2 * sum w^2 over `weights(model)`.

    l1 and l2 add up the `l1`, `l2` and `elastic_net` regularizers:
    elastic_net(coef, r) = coef * (r * sum|w| + (1 - r) * sum w^2)."""

    l1: float
    l2: float

    def __call__(self, params: list[torch.Tensor]) -> torch.Tensor:
        total = params[0].new_zeros(())
        if self.l1:
            total = total + self.l1 * sum(p.abs().sum() for p in params)
        if self.l2:
            total = total + self.l2 * sum(p.pow(2).sum() for p in params)
        return total


def build_penalty(reg: DictConfig) -> Optional[Penalty]:
    l1 = (reg.l1.coef if reg.l1 is not None else 0.0)
    l2 = (reg.l2.coef if reg.l2 is not None else 0.0)
    if reg.elastic_net is not None:
        l1 += reg.elastic_net.coef * reg.elastic_net.l1_ratio
        l2 += reg.elastic_net.coef * (1 - reg.elastic_net.l1_ratio)
    return Penalty(l1, l2) if (l1 or l2) else None


@torch.no_grad()
def apply_max_norm(params: list[torch.Tensor], value: float) -> None:
    """Project each unit's incoming weight vector (a row of a Linear, a filter of a Conv) onto
    the ball of radius `value` (Srivastava et al. 2014)."""
    for w in params:
        w.copy_(torch.renorm(w, p=2, dim=0, maxnorm=value))


def build_criterion(reg: DictConfig) -> nn.Module:
    smoothing = reg.label_smoothing.smoothing if reg.label_smoothing is not None else 0.0
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


class EarlyStopping:
    """Tracks the best value of a validation metric; with a `patience`, stops after that many
    evaluations without an improvement of more than `min_delta` (None: only track the best)."""

    def __init__(self, monitor: str, mode: str, patience: Optional[int] = None, min_delta: float = 0.0):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch: Optional[int] = None
        self.bad_evals = 0

    def improved(self, value: float) -> bool:
        gain = (self.best - value) if self.mode == "min" else (value - self.best)
        return gain > self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_evals = value, epoch, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_evals = state["best"], state["best_epoch"], state["bad_evals"]
