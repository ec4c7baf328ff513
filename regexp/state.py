"""TrainState: everything that makes training continue exactly where it is.

Model, optimizer, scheduler, loss scaler, early stopping, every RNG, the counters (epoch,
next window, optimizer steps) and the epoch's data order. One `state_dict` /
`load_state_dict` serves checkpoints (saved with torch.save, loaded with
weights_only=True) and the in-memory snapshot that a non-finite step is replayed from.
"""

import copy
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from regexp.regularizers import EarlyStopping


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values (weights_only loads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    np.random.seed(seed)


def move_to(state: Any, device: torch.device) -> Any:
    """A saved state's tensors on `device`, except RNG states, which stay on the CPU."""
    if isinstance(state, dict):
        return {k: v if k == "rng" else move_to(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [move_to(v, device) for v in state]
    return state.to(device) if isinstance(state, torch.Tensor) else state


def clone_tree(state: Any) -> Any:
    """A copy of nested dicts/lists whose tensors are compact clones (a fused member's state
    tensors are slices of its group's: a deepcopy would copy every member's)."""
    if isinstance(state, dict):
        return {k: clone_tree(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_tree(v) for v in state)
    return state.detach().clone() if isinstance(state, torch.Tensor) else copy.deepcopy(state)


@dataclass
class TrainState:
    model: nn.Module
    net: nn.Module  # the model as called on ordinary steps (compiled when device.compile)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler over a plain function of the step
    scaler: torch.amp.GradScaler
    early_stopping: EarlyStopping
    params: list[torch.Tensor]  # trainable parameters
    penalized: list[torch.Tensor]  # the weights that penalties and max-norm act on
    epoch: int = 1  # the epoch in progress (1-based)
    window: int = 0  # its next accumulation window
    step: int = 0  # optimizer steps done
    perm: Optional[torch.Tensor] = field(default=None, repr=False)  # the epoch's data order
    # a fused group's member draws its data order from a stream of its own (None: the process's)
    rng: Optional[dict[str, Any]] = field(default=None, repr=False)

    @contextmanager
    def own_random(self) -> Iterator[None]:
        """The random generators as this run's own stream, for one draw (a no-op without one)."""
        if self.rng is None:
            yield
            return
        shared = rng_state()
        set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = rng_state()
            set_rng_state(shared)

    def state_dict(self) -> dict[str, Any]:
        """A copy (on the device) that later training does not change."""
        return {"model": {n: t.detach().clone() for n, t in self.model.state_dict().items()},
                "optimizer": clone_tree(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "early_stopping": self.early_stopping.state_dict(),
                "rng": copy.deepcopy(self.rng) if self.rng is not None else rng_state(),
                "epoch": self.epoch, "window": self.window, "step": self.step, "perm": self.perm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(clone_tree(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        if self.rng is not None:
            self.rng = copy.deepcopy(state["rng"])
        else:
            set_rng_state(state["rng"])
        self.epoch, self.window, self.step, self.perm = state["epoch"], state["window"], state["step"], state["perm"]
        self.optimizer.zero_grad(set_to_none=True)
