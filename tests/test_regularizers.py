"""Penalties equal their formula, max-norm projects, early stopping counts patience."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from regexp.config import ElasticNetConfig, PenaltyConfig, RegularizerConfig
from regexp.regularizers import EarlyStopping, Penalty, apply_max_norm, build_penalty, weights


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.Conv2d(1, 2, 3))


def test_penalties_act_on_weights_only():
    m = model()
    assert [p.shape for p in weights(m)] == [(4, 5), (3, 4), (2, 1, 3, 3)]


def reg(**kw):
    return OmegaConf.structured(RegularizerConfig(**kw))


def test_l1_l2_elastic_net_equal_their_formula():
    ws = weights(model())
    l1 = sum(w.abs().sum() for w in ws)
    l2 = sum((w ** 2).sum() for w in ws)
    assert build_penalty(reg(l1=PenaltyConfig(coef=0.01)))(ws).item() == pytest.approx(0.01 * l1.item(), rel=1e-6)
    assert build_penalty(reg(l2=PenaltyConfig(coef=0.02)))(ws).item() == pytest.approx(0.02 * l2.item(), rel=1e-6)
    net = build_penalty(reg(elastic_net=ElasticNetConfig(coef=0.1, l1_ratio=0.3)))
    assert net == Penalty(l1=pytest.approx(0.03), l2=pytest.approx(0.07))
    assert net(ws).item() == pytest.approx(0.1 * (0.3 * l1.item() + 0.7 * l2.item()), rel=1e-6)
    both = build_penalty(reg(l1=PenaltyConfig(coef=0.01), l2=PenaltyConfig(coef=0.02)))
    assert both(ws).item() == pytest.approx(0.01 * l1.item() + 0.02 * l2.item(), rel=1e-6)
    assert build_penalty(reg()) is None


def test_penalty_gradient_is_the_formulas():
    w = torch.tensor([[1.0, -2.0]], requires_grad=True)
    Penalty(l1=0.5, l2=0.25)([w]).backward()
    assert w.grad.tolist() == [[0.5 + 0.25 * 2 * 1.0, -0.5 + 0.25 * 2 * -2.0]]


def test_max_norm_projects_each_unit():
    m = model()
    with torch.no_grad():
        m[0].weight.mul_(10)
    small_row = m[2].weight[0].clone() / m[2].weight[0].norm() * 0.1
    with torch.no_grad():
        m[2].weight[0] = small_row
    apply_max_norm(weights(m), 0.5)
    for w in weights(m):
        assert (w.flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()
    assert torch.allclose(m[2].weight[0], small_row)  # inside the ball: untouched


def test_early_stopping_patience_and_best():
    es = EarlyStopping("val/loss", "min", patience=2, min_delta=0.01)
    assert es.update(1.0, 1) and not es.should_stop
    assert not es.update(0.995, 2)  # within min_delta: no improvement
    assert es.update(0.9, 3)
    assert not es.update(0.95, 4) and not es.should_stop
    assert not es.update(0.91, 5) and es.should_stop
    assert es.best == 0.9 and es.best_epoch == 3
    tracker = EarlyStopping("val/acc", "max")  # no patience: only tracks the best
    for epoch, acc in enumerate([0.5, 0.4, 0.3, 0.2]):
        tracker.update(acc, epoch)
    assert tracker.best == 0.5 and not tracker.should_stop
