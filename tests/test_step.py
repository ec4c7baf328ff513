"""train_step and TrainState on a tiny model and random data: fast, no data set, no config."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from regexp.regularizers import EarlyStopping, apply_max_norm, weights
from regexp.state import TrainState
from regexp.step import Probe, Recipe, micro_batch_weights, train_step, window_batches, window_sizes

NO_CLIP = SimpleNamespace(name="none")


def tiny_state(seed: int = 0, lr: float = 0.1, momentum: float = 0.9) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    return TrainState(model=model, net=model, optimizer=optimizer, scheduler=scheduler,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), early_stopping=EarlyStopping("val/acc", "max"),
                      params=list(model.parameters()), penalized=weights(model))


def tiny_recipe(n: int = 40, **changes) -> Recipe:
    g = torch.Generator().manual_seed(1)
    fields = dict(train_x=torch.randn(n, 1, 3, 4, generator=g), train_y=torch.randint(0, 3, (n,), generator=g),
                  criterion=nn.CrossEntropyLoss(), penalty=None, clip=NO_CLIP, max_norm=None, augment=None, precision="fp32")
    return Recipe(**{**fields, **changes})


def weights_of(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.model.state_dict().items()}


def test_windows_cover_the_epoch_once():
    sizes = window_sizes(40, 16, 2)
    assert sizes == [[16, 16], [8]]
    perm = torch.randperm(40)
    batches = [b for w, offset in zip(sizes, (0, 32)) for b in window_batches(perm, offset, w)]
    assert torch.equal(torch.cat([b.index for b in batches]), perm)
    assert [b.share for b in window_batches(perm, 0, [16, 16, 8])] == micro_batch_weights([16, 16, 8]) == [0.4, 0.4, 0.2]
    assert window_sizes(33, 16, 1, min_batch=2) == [[16], [17]] and window_sizes(33, 16, 2) == [[16, 16], [1]]


def test_a_window_of_micro_batches_equals_one_batch():
    recipe, perm = tiny_recipe(), torch.arange(40)
    whole, split = tiny_state(), tiny_state()
    train_step(whole, recipe, window_batches(perm, 0, [40]))
    result = train_step(split, recipe, window_batches(perm, 0, [16, 16, 8]))
    a, b = weights_of(whole), weights_of(split)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert result.samples == 40 and whole.step == split.step == 1
    assert result.loss_sum.shape == () and result.pre_norm is None  # device tensors; no norm asked for


def test_the_step_order_clip_then_update_then_schedule():
    state = tiny_state(momentum=0.0)
    recipe = tiny_recipe(clip=SimpleNamespace(name="norm", max_norm=1e-3, norm_type=2.0))
    before = weights_of(state)
    result = train_step(state, recipe, window_batches(torch.arange(40), 0, [40]))
    assert bool(result.clipped) and float(result.pre_norm) > 1e-3
    step_size = math.sqrt(sum(((weights_of(state)[k] - before[k]) ** 2).sum().item() for k in before))
    assert step_size == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x the clipped norm
    train_step(state, tiny_recipe(max_norm=0.05), window_batches(torch.arange(40), 0, [40]))
    assert all(w.flatten(1).norm(dim=1).max() <= 0.05 + 1e-6 for w in state.penalized)  # projected after the update
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)  # the schedule stepped after each update
    assert all(p.grad is None for p in state.params)


def test_a_probe_sees_the_step_in_order():
    seen = []

    class Recorder(Probe):
        wants_norm = True

        def grads(self, kind):
            seen.append(kind)

        def before_update(self):
            seen.append("before")

        def after_update(self):
            seen.append("after")

    result = train_step(tiny_state(), tiny_recipe(), window_batches(torch.arange(40), 0, [20, 20]), Recorder())
    assert seen == ["norm", "norm_clipped", "before", "after"]
    assert result.pre_norm is not None and torch.equal(result.pre_norm, result.post_norm)


def test_skip_leaves_a_nonfinite_window_out():
    state = tiny_state()
    x = torch.randn(40, 1, 3, 4)
    x[3] = float("nan")
    before = weights_of(state)
    result = train_step(state, tiny_recipe(train_x=x), window_batches(torch.arange(40), 0, [40]), skip_nonfinite=True)
    assert not result.applied and state.step == 0
    assert all(torch.equal(before[k], v) for k, v in weights_of(state).items())


def test_state_dict_restores_training_exactly():
    recipe, perm = tiny_recipe(augment=None), torch.randperm(40)
    state = tiny_state()
    state.perm = perm
    train_step(state, recipe, window_batches(perm, 0, [20]))
    saved = state.state_dict()
    torch.rand(3)  # RNG moves on after the save
    train_step(state, recipe, window_batches(perm, 20, [20]))
    after_two = weights_of(state)
    state.load_state_dict(saved)
    assert state.step == 1 and torch.equal(state.perm, perm)
    train_step(state, recipe, window_batches(perm, 20, [20]))
    assert all(torch.equal(after_two[k], v) for k, v in weights_of(state).items())


def test_max_norm_projection_is_per_unit():
    w = torch.ones(4, 9)
    apply_max_norm([w], 1.5)
    assert torch.allclose(w.norm(dim=1), torch.full((4,), 1.5))
