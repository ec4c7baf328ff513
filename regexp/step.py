"""One optimizer step: the order below, for one accumulation window.

    for each micro-batch:  loss = criterion(model(x), y) + penalty;  (loss * share).backward()
    then:  unscale (fp16) -> pre-clip norm -> clip -> post-clip norm
           -> optimizer.step -> max-norm -> scheduler.step -> zero_grad

`train_step` returns device tensors (no host sync) unless the non-finite policy `skip`
must decide on this very step. What a log step measures (activations, per-layer norms,
weight updates) is taken by a `Probe` handed in; other steps get `NO_PROBE`, which does
nothing. Nothing here holds state between steps: everything lives in the TrainState.
"""

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch

from regexp.data import augment_batch
from regexp.optim import clip_gradients, global_grad_norm
from regexp.regularizers import apply_max_norm
from regexp.state import TrainState


def window_sizes(n: int, batch_size: int, k: int, min_batch: int = 1) -> list[list[int]]:
    """One epoch's micro-batch sizes, grouped into accumulation windows of k micro-batches.
    The last micro-batch and the last window may be short; a last micro-batch under
    `min_batch` samples (BatchNorm cannot train on one) joins the one before it."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < min_batch:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return [sizes[i : i + k] for i in range(0, len(sizes), k)]


def micro_batch_weights(sizes: list[int]) -> list[float]:
    """Each micro-batch's share of its window's samples. Scaling each mean loss by it makes
    the summed gradients equal one batch of sum(sizes), also for a short window (dividing
    by k, as Lightning does, over-weights the samples of a short final window)."""
    total = sum(sizes)
    return [n / total for n in sizes]


@dataclass(frozen=True)
class MicroBatch:
    index: torch.Tensor  # sample indices into the training set
    size: int
    share: float  # of its window's samples


def window_batches(perm: torch.Tensor, offset: int, sizes: list[int],
                   weighting: Callable[[list[int]], list[float]] = micro_batch_weights) -> list[MicroBatch]:
    """The micro-batches of one window that starts at sample `offset` of the epoch's order."""
    batches = []
    for size, share in zip(sizes, weighting(sizes)):
        batches.append(MicroBatch(perm[offset : offset + size], size, share))
        offset += size
    return batches


def autocast(device_type: str, precision: str) -> ContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class Recipe:
    """What every step applies, as plain values (a DictConfig read costs microseconds)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    penalty: Optional[Callable[[list[torch.Tensor]], torch.Tensor]]
    clip: Any  # the plain ClipConfig dataclass
    max_norm: Optional[float]
    augment: Optional[tuple[int, bool]]  # (crop padding, flip)
    precision: str

    def __post_init__(self) -> None:
        self.zero = torch.zeros((), device=self.train_y.device)  # where each window's sums start, made once


class Probe:
    """What a log step measures around the step; the base class measures nothing."""

    wants_norm = False  # the pre-clip global norm, even when clipping does not compute it

    def forward(self) -> ContextManager:
        return contextlib.nullcontext()

    def activation(self, name: str, output: torch.Tensor) -> None:
        """An activation layer's output on this step (a fused forward hands them in one by one)."""

    def grads(self, kind: str) -> None:
        """kind: "norm" before clipping, "norm_clipped" after."""

    def before_update(self) -> None:
        pass

    def after_update(self) -> None:
        pass


NO_PROBE = Probe()


@dataclass
class StepResult:
    """Device tensors: sums over the window's samples, and the gradient norms."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    penalty_sum: torch.Tensor
    pre_norm: Optional[torch.Tensor]  # pre-clip global norm, when measured or computed by clipping
    post_norm: Optional[torch.Tensor]  # after clipping (== pre_norm without clipping), when measured
    clipped: Optional[torch.Tensor]  # whether clipping changed the gradients
    samples: int
    applied: bool = True  # False: skipped as non-finite (on_nonfinite=skip)


def forward_backward(state: TrainState, recipe: Recipe, batches: list[MicroBatch], net: torch.nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward of one window's micro-batches, each loss weighted by its share of
    the window's samples. Returns the window's (loss, correct, penalty) sums."""
    loss_sum = correct = penalty_sum = recipe.zero
    device_type = recipe.train_y.device.type
    for batch in batches:
        x, y = recipe.train_x[batch.index], recipe.train_y[batch.index]
        if recipe.augment is not None:
            x = augment_batch(x, *recipe.augment)
        with autocast(device_type, recipe.precision):
            logits = net(x)
        loss = recipe.criterion(logits.float(), y)
        total = loss
        if recipe.penalty is not None:
            penalty = recipe.penalty(state.penalized)
            total = loss + penalty
            penalty_sum = penalty_sum + penalty.detach() * batch.size
        state.scaler.scale(total * batch.share if batch.share != 1.0 else total).backward()
        loss_sum = loss_sum + loss.detach() * batch.size
        correct = correct + (logits.argmax(1) == y).sum()
    return loss_sum, correct, penalty_sum


def unscale_and_clip(state: TrainState, recipe: Recipe, probe: Probe, measure: bool
                     ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Unscale (fp16) and clip: (pre-clip global norm when measured or computed anyway, clipped?)."""
    state.scaler.unscale_(state.optimizer)
    probe.grads("norm")
    pre = global_grad_norm(state.params) if measure else None
    clip_norm, clipped = clip_gradients(state.params, recipe.clip)
    probe.grads("norm_clipped")
    return (clip_norm if clip_norm is not None else pre), clipped


def apply_update(state: TrainState, recipe: Recipe, optimizer_step: bool = True) -> None:
    """The update after clipping; `optimizer_step=False` when a fused group's optimizers stepped at once."""
    if optimizer_step:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    if recipe.max_norm is not None:
        apply_max_norm(state.penalized, recipe.max_norm)
    with warnings.catch_warnings():
        if not optimizer_step:  # torch cannot see that the stack stepped this optimizer's parameters
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def check_and_clip(state: TrainState, recipe: Recipe, probe: Probe, skip_nonfinite: bool, sums: tuple, samples: int
                   ) -> StepResult:
    """After the window's backward: unscale and clip; with `skip_nonfinite`, a window whose loss
    or gradient norm is not finite is left out (not applied, gradients dropped)."""
    loss_sum, correct, penalty_sum = sums
    pre_norm, clipped = unscale_and_clip(state, recipe, probe, measure=probe.wants_norm or skip_nonfinite)
    result = StepResult(loss_sum, correct, penalty_sum, pre_norm, None, clipped, samples)
    if skip_nonfinite and not torch.isfinite(torch.stack([loss_sum, pre_norm])).all().item():
        state.optimizer.zero_grad(set_to_none=True)
        result.applied = False
    elif probe.wants_norm:
        result.post_norm = global_grad_norm(state.params) if clipped is not None else pre_norm
    return result


def train_step(state: TrainState, recipe: Recipe, batches: list[MicroBatch], probe: Probe = NO_PROBE,
               skip_nonfinite: bool = False) -> StepResult:
    """One window: forward/backward, clip, update. With `skip_nonfinite` a window whose loss
    or gradient norm is not finite is not applied (one host sync per step)."""
    with probe.forward():
        sums = forward_backward(state, recipe, batches, state.net if probe is NO_PROBE else state.model)
    result = check_and_clip(state, recipe, probe, skip_nonfinite, sums, sum(b.size for b in batches))
    if result.applied:
        probe.before_update()
        apply_update(state, recipe)
        probe.after_update()
    return result
