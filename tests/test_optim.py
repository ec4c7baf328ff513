"""Optimizer parameter groups, lr schedules (pure functions) and gradient clipping."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from regexp.config import AdamConfig, ClipConfig, SchedulerConfig, SGDConfig
from regexp.optim import build_optimizer, clip_gradients, global_grad_norm, lr_factor, param_groups, scaled_lr


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_no_decay_on_biases_and_norm_params_by_default():
    model = net()
    decayed, kept = param_groups(model, 0.1, decay_norm_and_bias=False)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(kept["params"]) == 4 and kept["weight_decay"] == 0.0
    everything, rest = param_groups(model, 0.1, decay_norm_and_bias=True)
    assert len(everything["params"]) == 6 and rest["params"] == []


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_decay_leaves_biases_untouched(name):
    model = net()
    cfg = OmegaConf.structured(SGDConfig(name="sgd", lr=1.0, weight_decay=0.5) if name == "sgd"
                               else AdamConfig(name="adamw", lr=1.0, weight_decay=0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, cfg, cfg.lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only decay can move anything
    opt.step()
    after = model.state_dict()
    assert torch.allclose(after["0.weight"], before["0.weight"] * 0.5)
    for key in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert torch.equal(after[key], before[key]), key


def test_optimizer_kinds():
    model = net()
    make = lambda **kw: build_optimizer(model, OmegaConf.structured(SGDConfig(**kw)), 0.1)
    assert make(name="sgd").param_groups[0]["momentum"] == 0.0
    assert make(name="momentum", momentum=0.9).param_groups[0]["nesterov"] is False
    assert make(name="nesterov", momentum=0.9).param_groups[0]["nesterov"] is True
    adam = build_optimizer(model, OmegaConf.structured(AdamConfig(name="adam")), 1e-3)
    assert type(adam) is torch.optim.Adam
    assert type(build_optimizer(model, OmegaConf.structured(AdamConfig(name="adamw")), 1e-3)) is torch.optim.AdamW


def test_scaled_lr():
    assert scaled_lr(0.1, 4, "off") == 0.1
    assert scaled_lr(0.1, 4, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 4, "sqrt") == pytest.approx(0.2)


def factor(name, step, total=100, per_epoch=10, base=0.1, **kw):
    return lr_factor(OmegaConf.structured(SchedulerConfig(name=name, **kw)), step, total, per_epoch, base)


def test_schedules():
    assert factor("none", 57) == 1.0
    assert [factor("step", s, step_size=2, gamma=0.5) for s in (0, 19, 20, 39, 40)] == [1, 1, 0.5, 0.5, 0.25]
    assert factor("cosine", 0) == 1.0 and factor("cosine", 50) == pytest.approx(0.5) and factor("cosine", 100) == pytest.approx(0.0)
    assert factor("cosine", 100, min_lr=0.01) == pytest.approx(0.1)  # min_lr / base lr
    assert factor("warmup_cosine", 0, warmup_steps=9) == pytest.approx(0.1)
    assert factor("warmup_cosine", 8, warmup_steps=9) == pytest.approx(0.9)
    assert factor("warmup_cosine", 9, warmup_steps=9) == pytest.approx(1.0)
    assert factor("warmup_cosine", 100, warmup_steps=9) == pytest.approx(0.0)
    assert factor("onecycle", 0) == pytest.approx(1 / 25)
    assert factor("onecycle", 30) == pytest.approx(1.0)
    assert factor("onecycle", 100) == pytest.approx(1 / 25 / 1e4)


def grads(*values):
    params = [torch.zeros(len(v), requires_grad=True) for v in values]
    for p, v in zip(params, values):
        p.grad = torch.tensor(v, dtype=torch.float32)
    return params


def test_clip_norm_reports_pre_and_post():
    params = grads([3.0, 0.0], [0.0, 4.0])  # global norm 5
    pre, clipped = clip_gradients(params, OmegaConf.structured(ClipConfig(name="norm", max_norm=1.0)))
    post = global_grad_norm(params)
    assert pre.item() == pytest.approx(5.0) and post.item() == pytest.approx(1.0) and clipped.item()
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.0])


def test_clip_value_clamps_elements():
    params = grads([3.0, -0.5], [-4.0, 0.2])
    pre = global_grad_norm(params)
    norm, clipped = clip_gradients(params, OmegaConf.structured(ClipConfig(name="value", clip_value=1.0)))
    assert norm is None and clipped.item() and pre.item() == pytest.approx(math.sqrt(9 + 0.25 + 16 + 0.04))
    assert params[0].grad.tolist() == pytest.approx([1.0, -0.5]) and params[1].grad.tolist() == pytest.approx([-1.0, 0.2])
    unclipped = grads([0.5, -0.5])
    assert not clip_gradients(unclipped, OmegaConf.structured(ClipConfig(name="value", clip_value=1.0)))[1].item()


def test_no_clip_leaves_gradients():
    params = grads([3.0, 4.0])
    assert clip_gradients(params, OmegaConf.structured(ClipConfig(name="none"))) == (None, None)
    assert global_grad_norm(params).item() == pytest.approx(5.0)
