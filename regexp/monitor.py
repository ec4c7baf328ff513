"""What happens inside the network (the metrics of docs/diagnostics.md), measured on log steps only.

Everything is computed as device tensors and handed to the loop, which syncs once per log
step for all of them. Between log steps the only extra work is a device-side check that
the loss (and, unless monitor=off, the gradient norm) stayed finite: `NonfiniteGuard`
remembers the first bad step without a host sync, and `trace_nonfinite` later replays that
batch with hooks to name the first layer, forward or backward, where a NaN/Inf appeared.
"""

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from regexp.state import TrainState
from regexp.step import NO_PROBE as NO_MEASURE
from regexp.step import Probe

ACTIVATION_TYPES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU)
SPARSE_BELOW = 1e-3  # |w| under this counts as zero for weight/sparsity


def parameterized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly (Linear, Conv, norms), by dotted name."""
    return [(name, m) for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)]


def _layer_grad_norms(layers: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    norms = []
    for _, module in layers:
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None)
    return norms


class Monitor(Probe):
    """Per-layer diagnostics of a log step. `probe(log_step)` hands train_step this monitor on
    log steps (when enabled) and a probe that measures nothing otherwise; the step calls
    `forward()` around the forward pass, `grads("norm")` before clipping and
    `grads("norm_clipped")` after, `before_update()` and `after_update()` around the update;
    then the loop `pop()`s the device tensors to sync them once."""

    wants_norm = True

    def __init__(self, model: nn.Module, cfg: Any):
        self.enabled = cfg.per_layer
        self.layers = parameterized_layers(model)
        self.activation_modules = activation_layers(model)
        self.histogram_every = cfg.get("histogram_every")
        self.pending: dict[str, torch.Tensor] = {}
        self.weights_before: list[Optional[torch.Tensor]] = []

    def probe(self, log_step: bool) -> Probe:
        return self if log_step and self.enabled else NO_MEASURE

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Forward hooks for this pass only: mean, std and dead fraction (units that are zero
        for every sample of the batch) of each activation layer's output."""
        handles = [m.register_forward_hook(self._activation_hook(name)) for name, m in self.activation_modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _activation_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.activation(name, output)

        return hook

    def activation(self, name: str, output: torch.Tensor) -> None:
        out = output.detach().float()
        self.pending[f"act/mean/{name}"] = out.mean()
        self.pending[f"act/std/{name}"] = out.std()
        # a unit (feature, or channel of a feature map) is dead when it is 0 for the whole batch
        per_unit = out.abs().amax(dim=0)
        if per_unit.dim() > 1:
            per_unit = per_unit.flatten(1).amax(dim=1)
        self.pending[f"act/dead_frac/{name}"] = (per_unit == 0).float().mean()

    def grads(self, kind: str) -> None:
        """grad/<kind>/<layer>: each layer's gradient norm (kind: norm, or norm_clipped)."""
        for (name, _), norm in zip(self.layers, _layer_grad_norms(self.layers)):
            if norm is not None:
                self.pending[f"grad/{kind}/{name}"] = norm

    def before_update(self) -> None:
        self.weights_before = [self._weight(m).detach().clone() if self._weight(m) is not None else None for _, m in self.layers]

    def after_update(self) -> None:
        for (name, module), before in zip(self.layers, self.weights_before):
            w = self._weight(module)
            if w is None:
                continue
            w = w.detach()
            norm = torch.linalg.vector_norm(w)
            self.pending[f"weight/norm/{name}"] = norm
            self.pending[f"weight/update_ratio/{name}"] = torch.linalg.vector_norm(w - before) / norm
            self.pending[f"weight/sparsity/{name}"] = (w.abs() < SPARSE_BELOW).float().mean()
        self.weights_before = []

    @staticmethod
    def _weight(module: nn.Module) -> Optional[torch.Tensor]:
        """The weight matrix / kernel of a Linear or Conv (norm scales are not weights here)."""
        w = getattr(module, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.ndim >= 2 else None

    def histograms(self, bins: int = 64) -> dict[str, dict[str, list]]:
        """hist/weight/<layer> and hist/grad/<layer>: counts over `bins` equal-width bins."""
        out = {}
        for name, module in self.layers:
            w = self._weight(module)
            if w is None:
                continue
            for kind, t in (("weight", w), ("grad", w.grad)):
                if t is None:
                    continue
                t = t.detach().float().flatten()
                t = t[torch.isfinite(t)]
                if t.numel() == 0:
                    continue
                lo, hi = t.min().item(), t.max().item()
                if lo == hi:
                    lo, hi = lo - 0.5, hi + 0.5
                counts = torch.histc(t, bins=bins, min=lo, max=hi)
                edges = torch.linspace(lo, hi, bins + 1)
                out[f"hist/{kind}/{name}"] = {"bins": edges.tolist(), "counts": counts.long().tolist()}
        return out

    def pop(self) -> dict[str, torch.Tensor]:
        pending, self.pending = self.pending, {}
        return pending


class NonfiniteGuard:
    """Keeps each step's loss (and pre-clip gradient norm, when clipping computed it) as
    device tensors until the loop syncs on a log step: no per-step work beyond a list
    append. `first_bad_step()` is a 0-d device tensor: the first such step, or -1."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []

    def watch(self, step: int, *values: Optional[torch.Tensor]) -> None:
        for v in values:
            if v is not None:
                self.steps.append(step)
                self.values.append(v.detach())

    def first_bad_step(self) -> torch.Tensor:
        if not self.values:
            return torch.full((), -1, dtype=torch.long, device=self.device)
        bad = ~torch.isfinite(torch.stack([v.float().reshape(()) for v in self.values]))
        steps = torch.tensor(self.steps, device=self.device)
        return torch.where(bad.any(), steps[bad.int().argmax()], torch.full_like(steps[0], -1))

    def reset(self) -> None:
        self.steps, self.values = [], []


def _nonfinite(x: Any) -> bool:
    tensors = [x] if isinstance(x, torch.Tensor) else [t for t in (x or ()) if isinstance(t, torch.Tensor)]
    return any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors)


def trace_nonfinite(model: nn.Module, run_batch: Callable[[], torch.Tensor]) -> dict[str, Any]:
    """Run `run_batch` (forward + backward of the offending batch) with hooks on every leaf
    module and name where the first NaN/Inf appeared:
    {"where": "forward"|"backward"|"loss"|"input"|"grad_norm"|None, "layer": dotted name, ...}."""
    leaves = [(name, m) for name, m in model.named_modules() if name and not any(True for _ in m.children())]
    forward_bad: list[str] = []
    backward_bad: list[str] = []
    forward_calls = [0]
    handles = []
    for name, module in leaves:
        def fwd(m, inputs, output, name=name):
            forward_calls[0] += 1
            if forward_bad:
                return
            if forward_calls[0] == 1 and _nonfinite(inputs):
                forward_bad.append("input")  # the data itself
            elif _nonfinite(output) and not _nonfinite(inputs):
                forward_bad.append(name)

        def bwd(m, grad_input, grad_output, name=name):
            if not backward_bad and _nonfinite(grad_input) and not _nonfinite(grad_output):
                backward_bad.append(name)

        handles.append(module.register_forward_hook(fwd))
        handles.append(module.register_full_backward_hook(bwd))
    try:
        with warnings.catch_warnings():  # the first layer's input needs no grad: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = run_batch()
    finally:
        for h in handles:
            h.remove()
    layers = parameterized_layers(model)
    if forward_bad:
        where, layer = ("input", None) if forward_bad[0] == "input" else ("forward", forward_bad[0])
        return {"where": where, "layer": layer, "loss": _finite_or_none(loss)}
    if loss is not None and _nonfinite(loss):
        return {"where": "loss", "layer": None, "loss": None}
    param_bad = [name for name, m in reversed(layers) if any(_nonfinite(p.grad) for p in m.parameters(recurse=False))]
    if backward_bad or param_bad:
        return {"where": "backward", "layer": (backward_bad or param_bad)[0], "loss": _finite_or_none(loss)}
    # every tensor finite: the global norm itself overflowed (sum of squares > float max)
    norms = [(n, v) for (n, _), v in zip(layers, _layer_grad_norms(layers)) if v is not None]
    if norms:
        name, largest = max(norms, key=lambda nv: nv[1].item() if torch.isfinite(nv[1]) else float("inf"))
        return {"where": "grad_norm", "layer": name, "loss": _finite_or_none(loss),
                "layer_grad_norm": largest.item() if torch.isfinite(largest) else None}
    return {"where": None, "layer": None, "loss": _finite_or_none(loss)}


def _finite_or_none(loss: Optional[torch.Tensor]) -> Optional[float]:
    if loss is None:
        return None
    value = loss.detach().float().item()
    return value if torch.isfinite(torch.tensor(value)) else None


class NonfinitePolicy:
    """The one place that acts on a non-finite loss or gradient norm (monitor.on_nonfinite):
    `stop` ends the run `diverged` at its last finite state, `skip` leaves the bad step out,
    `continue` keeps it. Either way the first bad step is replayed once from the last finite
    snapshot (same batches, same RNG) and traced to the first layer, forward or backward,
    where a NaN/Inf appeared; `report` records that event."""

    def __init__(self, action: str, replay: Callable[[dict[str, Any], int], dict[str, Any]],
                 report: Callable[[dict[str, Any], int], None]):
        self.action, self.replay, self.report = action, replay, report
        self.snapshot: Optional[dict[str, Any]] = None  # the last state known to be finite
        self.reported = False

    @property
    def skips(self) -> bool:
        return self.action == "skip"

    def keep(self, state: TrainState) -> None:
        self.snapshot = state.state_dict()

    def handle(self, state: TrainState, bad_step: int) -> bool:
        """Trace and report the first bad step (later ones are only counted); True when the run
        must stop, with `state` back at the last finite snapshot."""
        if self.reported:
            return False
        current = None if self.action == "stop" else state.state_dict()
        self.report(self.replay(self.snapshot, bad_step), bad_step)
        self.reported = True
        state.load_state_dict(self.snapshot if current is None else current)
        return current is None
