"""The training step's semantics, run in-process on small real data."""

import io
import json

import pytest
import torch
from conftest import assert_no_nonfinite_numbers, compose_train
from rich.console import Console
from torch.optim.optimizer import register_optimizer_step_post_hook

from regexp.config import validate
from regexp.data import load_data
from regexp.state import seed_everything
from regexp.step import micro_batch_weights, train_step, window_batches, window_sizes
from regexp.tracking import Reporter
from regexp.train import Plan, build_recipe, build_state, evaluate, train


def quiet() -> Reporter:
    return Reporter(Console(file=io.StringIO()))


def run(tmp_path, data_root, overrides, name="run"):
    cfg = validate(compose_train([f"dataset.root={data_root}", "dataset.val_size=500", "device=cpu", *overrides]))
    return cfg, train(cfg, tmp_path / name, reporter=quiet())


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_window_sizes_and_weights():
    assert window_sizes(232, 16, 4)[-1] == [16, 16, 8]
    assert len(window_sizes(232, 16, 4)) == 4 == len(window_sizes(232, 64, 1))
    assert [sum(w) for w in window_sizes(232, 16, 4)] == [sum(w) for w in window_sizes(232, 64, 1)]
    assert micro_batch_weights([16, 16, 8]) == [0.4, 0.4, 0.2]
    assert window_sizes(10, 4, 1) == [[4], [4], [2]]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.slow
def test_accumulation_4x16_equals_1x64(tmp_path, data_root, optimizer):
    # 232 samples: 3 full windows, then a short window [16, 16, 8] vs one batch of 40
    common = ["dataset.limit=232", "epochs=2", f"optimizer={optimizer}", "monitor.log_every=1", "seed=3"]
    run(tmp_path, data_root, [*common, "batch_size=64"], "big")
    run(tmp_path, data_root, [*common, "batch_size=16", "accumulation=steps", "accumulation.steps=4"], "accum")
    big, accum = final_weights(tmp_path / "big"), final_weights(tmp_path / "accum")
    for name in big:
        rel = ((big[name] - accum[name]).norm() / big[name].norm()).item()
        assert rel < 1e-6, (name, rel)
    assert torch.load(tmp_path / "big" / "checkpoint.pt", weights_only=True)["step"] == 8  # 4 steps per epoch
    lines = [json.loads(l) for l in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert {l["opt/effective_batch"] for l in lines if "opt/effective_batch" in l} == {64, 40}


def step_through_one_epoch(cfg, data, weighting=micro_batch_weights):
    """train_step over every window of one epoch, as fit runs it; yields the state after each step."""
    seed_everything(cfg.seed)
    plan = Plan.from_config(cfg, len(data.train_y))
    state = build_state(cfg, data, torch.device("cpu"), "fp32", plan)
    recipe = build_recipe(cfg, data, "fp32")
    perm = torch.randperm(len(data.train_y))
    for w in range(len(plan.windows)):
        train_step(state, recipe, window_batches(perm, plan.offsets[w], plan.windows[w], weighting))
        yield state


@pytest.mark.slow
def test_accumulation_differs_from_dividing_by_k(data_root):
    """Guards the test above: a short final window weighted 1/k would move the weights differently."""
    cfg = validate(compose_train([f"dataset.root={data_root}", "dataset.val_size=500", "device=cpu", "dataset.limit=232",
                                  "optimizer=sgd", "batch_size=16", "accumulation=steps", "accumulation.steps=4"]))
    data = load_data(cfg.dataset, torch.device("cpu"))
    *_, right = step_through_one_epoch(cfg, data)
    right = {k: v.clone() for k, v in right.model.state_dict().items()}
    *_, wrong = step_through_one_epoch(cfg, data, weighting=lambda sizes: [1 / 4] * len(sizes))
    wrong = wrong.model.state_dict()
    assert max(((right[k] - wrong[k]).norm() / right[k].norm()).item() for k in right) > 1e-4


@pytest.mark.slow
def test_early_stopping_stops_and_restores_best(tmp_path, data_root):
    # 64 samples and a large lr overfit at once: val loss rises after its first minimum
    cfg, summary = run(tmp_path, data_root, ["dataset.limit=64", "batch_size=16", "epochs=40", "optimizer.lr=0.01",
                                              "+regularizer=early_stopping", "regularizer.early_stopping.patience=2"])
    assert summary.status == "early_stopped"
    assert summary.epochs_completed < 40
    assert summary.epochs_completed == summary.metrics["best_epoch"] + 2
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == summary.metrics["best_epoch"]
    # the reported test metrics are those of the best weights, recomputed here independently
    from regexp.models import build_model

    data = load_data(cfg.dataset, torch.device("cpu"))
    model = build_model(cfg.model, cfg.norm, None, data.input_shape, data.num_classes)
    model.load_state_dict(best["model"])
    recomputed = evaluate(model, data.test_x, data.test_y, 1024, "fp32")
    assert recomputed["acc"] == pytest.approx(summary.metrics["test/acc"])
    assert recomputed["loss"] == pytest.approx(summary.metrics["test/loss"], rel=1e-5)
    val_losses = [json.loads(l)["val/loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val/loss" in l]
    assert min(val_losses) == pytest.approx(summary.metrics["val/loss"])


def test_max_norm_holds_after_every_step(data_root):
    cfg = validate(compose_train([f"dataset.root={data_root}", "dataset.val_size=500", "device=cpu", "dataset.limit=512",
                                  "optimizer.lr=0.05", "+regularizer=max_norm", "regularizer.max_norm.value=0.5"]))
    data = load_data(cfg.dataset, torch.device("cpu"))
    norms, optimizer_steps = [], []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: optimizer_steps.append(opt))
    try:
        for state in step_through_one_epoch(cfg, data):
            norms.append(max(p.flatten(1).norm(dim=1).max().item() for p in state.penalized))
    finally:
        hook.remove()
    assert len(norms) == len(optimizer_steps) == 4 and max(norms) <= 0.5 + 1e-5
    for name, w in state.model.state_dict().items():
        if w.ndim >= 2:
            assert (w.flatten(1).norm(dim=1) <= 0.5 + 1e-5).all(), name


def test_outputs_of_a_run(tmp_path, data_root):
    _, summary = run(tmp_path, data_root, ["dataset.limit=512", "epochs=2", "monitor.log_every=2", "+regularizer=l1", "clip=norm"])
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == summary.status == "completed"
    for key in ("test/acc", "test/loss", "val/acc", "train/loss", "perf/samples_per_s"):
        assert key in summary.metrics
    assert summary.config["regularizer"]["l1"]["coef"] == 1e-5 and summary.wall_time_s > 0
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/penalty" in r]
    assert len(steps) == 4 and all(r["train/penalty"] > 0 for r in steps)
    assert all(r["grad/global_norm_clipped"] <= 1.0 + 1e-4 and 0 <= r["grad/clip_frac"] <= 1 for r in steps)
    assert [r["epoch"] for r in records if "val/acc" in r] == [1, 2]
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "best.pt").is_file()


def test_divergence_is_a_result_and_no_nan_is_logged(tmp_path, data_root):
    _, summary = run(tmp_path, data_root, ["dataset.limit=512", "epochs=2", "optimizer=sgd", "optimizer.lr=1e6",
                                           "init=normal", "init.std=1.0", "monitor.log_every=1"])
    assert summary.status == "diverged"
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert_no_nonfinite_numbers(tmp_path / "run" / "metrics.jsonl")
    events = [json.loads(l) for l in text.splitlines() if "nonfinite/step" in l]
    assert len(events) == 1 and "test/acc" not in summary.metrics
