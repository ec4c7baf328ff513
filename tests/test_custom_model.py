"""model=custom: the user's own nn.Module (regexp/custom.py), through the real CLI: it trains
and records like a built-in model, a bad target or kwargs is refused in the pre-flight, norm=
and dropout are refused, a Sequential fuses and any other model runs alone with the reason, and
a resume never imports a class named only in its run dir. The models: tests/custom_models.py."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, refused, run_cli, summaries
from regexp import custom
from regexp.compose import compose_and_validate, with_resumed_run
from regexp.init import init_weights
from regexp.models import build_model
from regexp.rundir import ConfigError, read_metrics
from regexp.stack import Stack

TESTS = Path(__file__).resolve().parent
SMALL_CNN = ["model=custom", "model.target=custom_models.SmallCNN", "model.kwargs={widths:[4,8],fc:16}"]
NOT_SEQUENTIAL = ["model=custom", "model.target=custom_models.TwoPath"]


@pytest.fixture
def models_on_path(monkeypatch) -> None:
    """tests/ importable, in this process and in the commands it starts (as PYTHONPATH=. would be for a user)."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def train(args: list[str], cwd: Path) -> dict:
    done = run_cli(["train", *args, "logger=none", "device=cpu"], cwd)
    assert done.returncode == 0, done.stderr
    return done


# ---------------------------------------------------------------- it trains like a built-in model
@pytest.mark.slow
def test_a_custom_model_trains_records_and_the_monitor_names_its_own_layers(models_on_path, data_root, tmp_path):
    train([*SMALL_CNN, *TINY, "init=kaiming_normal", "+regularizer=[l2,max_norm,label_smoothing]", "clip=norm",
           "accumulation=steps", "accumulation.steps=2", "hydra.run.dir=run"], tmp_path)
    summary, = summaries(tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["config"]["model"] == {"name": "custom", "activation": "relu", "target": "custom_models.SmallCNN",
                                          "kwargs": {"widths": [4, 8], "fc": 16}}
    assert summary["parameters"] == sum(p.numel() for p in custom_models().SmallCNN(widths=[4, 8], fc=16).parameters())
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {key for record in steps for key in record}
    assert {"grad/norm/conv1", "grad/norm/fc2", "weight/norm/conv2", "act/dead_frac/act1", "act/mean/act3"} <= logged
    assert (tmp_path / "run" / "diagnosis.json").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()


def custom_models():
    import custom_models

    return custom_models


def test_init_schemes_set_a_custom_models_own_layers(models_on_path):
    torch.manual_seed(0)
    cfg = compose_and_validate([*NOT_SEQUENTIAL, "init=normal", "init.std=0.5", "model.kwargs={hidden:256}"])  # a std of 2560 draws and more
    model = build_model(cfg.model, cfg.norm, None, (1, 28, 28), 10)
    init_weights(model, cfg.init, cfg.model.activation)
    for layer in (model.encoder, model.head):
        assert layer.weight.std().item() == pytest.approx(0.5, rel=0.1)
        assert torch.count_nonzero(layer.bias) == 0
    cfg = compose_and_validate([*NOT_SEQUENTIAL, "init=kaiming_normal", "model.kwargs={hidden:2000}"])
    model = build_model(cfg.model, cfg.norm, None, (1, 28, 28), 10)
    init_weights(model, cfg.init, cfg.model.activation)  # model.activation=relu: the gain sqrt(2), fan in 784
    assert model.encoder.weight.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.05)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
@pytest.mark.parametrize("overrides, key, says", [
    (["model.target=no_such_module.Net"], "model.target=no_such_module.Net", "no module named no_such_module"),
    (["model.target=custom_models.Missing"], "model.target=custom_models.Missing", "has no Missing"),
    (["model.target=custom_models.NOT_CALLABLE"], "model.target=custom_models.NOT_CALLABLE", "not a class"),
    (["model.target=custom_models.NotAModule"], "model.target=custom_models.NotAModule", "not a torch.nn.Module"),
    (["model.target=custom_models.TwoPath", "model.kwargs={width:3}"], "model.kwargs=", "unexpected keyword argument 'width'"),
    (["model.target=custom_models.WrongShape"], "model.target=custom_models.WrongShape", "must be [2, 10]"),
    (["model.target=custom_models.Exits"], "model.target=custom_models.Exits",
     "custom_models.Exits(**model.kwargs) failed: SystemExit: 0"),
    (["model.target=custom_models.FixedBatch"], "model.target=custom_models.FixedBatch", "for 3 images of mnist"),
    (["model.target=custom_models.IntLogits"], "model.target=custom_models.IntLogits", "must be floating point"),
    (["model.target=custom_models.NaNLogits"], "model.target=custom_models.NaNLogits", "non-finite logits"),
    (["model.target=custom_models.NoParameters"], "model.target=custom_models.NoParameters", "no parameters"),
    (["model.target=custom_models.TwoPath", "model.kwargs.hidden=2000000"], "model.kwargs=", "at most 2**30"),
    (["model.target=SmallCNN"], "model.target=SmallCNN", "package.module.Class"),
    ([], "model.target=???", "must be set"),
    (["model.target=custom_models.SmallCNN", "norm=batchnorm"], "norm=batchnorm", "put the norm in your model"),
    (["model.target=custom_models.SmallCNN", "+regularizer=dropout"], "regularizer=dropout",
     "put the dropout in your model"),
])
def test_a_bad_custom_model_is_refused_before_anything_is_written(models_on_path, empty_cwd, capsys, overrides, key, says):
    line = refused(capsys, ["train", "model=custom", *overrides, "dataset.limit=64", "logger=none"])
    assert line.startswith(f"regexp: error: {key}") and says in line, line
    assert list(empty_cwd.iterdir()) == []


def test_a_sweeps_pre_flight_tries_each_distinct_custom_model_once(models_on_path, empty_cwd):
    from regexp.cli import precheck

    custom._inspect.cache_clear()
    precheck([*NOT_SEQUENTIAL, "seed=0,1,2", "model.kwargs.hidden=4,8", "logger=none"], multirun=True)
    assert (custom._inspect.cache_info().misses, custom._inspect.cache_info().hits) == (2, 4)


# ---------------------------------------------------------------- fusing
def stack_reason(model: nn.Module, shape=(1, 28, 28)):
    return custom.stack_refusal(model, "m.Net", shape)


def test_a_sequential_of_stacked_layers_fuses_and_any_other_model_says_why_not(models_on_path):
    models = custom_models()
    assert stack_reason(models.SmallCNN()) is None
    assert stack_reason(models.NestedMLP()) is None
    assert "is a TwoPath, not an nn.Sequential" in stack_reason(models.TwoPath())
    assert "is a Nested, a subclass of nn.Sequential" in stack_reason(models.Nested(nn.Flatten(), nn.Linear(784, 10)))
    assert "its layer 1 is a LeakyReLU" in stack_reason(nn.Sequential(nn.Flatten(), nn.LeakyReLU(), nn.Linear(784, 10)))
    # a Linear on the image itself (no Flatten): the layer kinds stack, the replay does not match
    assert "replay" in stack_reason(nn.Sequential(nn.Linear(28, 10), nn.Flatten(), nn.Linear(280, 10)))


def test_a_stacked_custom_model_keeps_its_own_dropout_rate(models_on_path):
    models = [custom_models().SmallCNN(widths=[2], fc=64, dropout=0.75) for _ in range(3)]
    no_loss_terms = type("Recipe", (), {"criterion": nn.CrossEntropyLoss(), "penalty": None})()
    stack = Stack(models[0], models[1:], [0.0, 0.0], [0.0, 0.0], [no_loss_terms] * 2, own_dropout=True)
    assert stack._rate(models[0].drop2, "drop2").tolist() == [0.75, 0.75]
    built_in = Stack(models[0], models[1:], [0.0, 0.5], [0.0, 0.0], [no_loss_terms] * 2)
    assert built_in._rate(models[0].drop2, "drop2").tolist() == [0.0, 0.5]


@pytest.mark.slow
def test_a_fused_sweep_fuses_a_sequential_custom_model_and_runs_another_alone_with_the_reason(models_on_path, data_root,
                                                                                              tmp_path):
    common = ["-m", "hydra/launcher=fused", *TINY, "seed=0,1"]
    train([*SMALL_CNN, *common, "hydra.sweep.dir=seq"], tmp_path)
    fused = summaries(tmp_path / "seq")
    assert [s["fused"]["models"] for s in fused] == [2, 2] and all(s["status"] == "completed" for s in fused)
    done = train([*NOT_SEQUENTIAL, *common, "hydra.sweep.dir=alone"], tmp_path)
    assert done.stdout.count("runs alone: model.target=custom_models.TwoPath is a TwoPath, not an nn.Sequential") == 2
    assert [s.get("fused") for s in summaries(tmp_path / "alone")] == [None, None]


@pytest.mark.slow
def test_a_fused_custom_model_retraces_each_solo_run(models_on_path, data_root, tmp_path):
    from regexp.config import job_config
    from regexp.train import RunSpec, train as train_alone, train_group

    common = [*SMALL_CNN, "dataset.limit=256", "dataset.val_size=256", "batch_size=32", "epochs=1", "device=cpu",
              "device.threads=1", "device.deterministic=true", "logger=none", "monitor.log_every=2"]
    cfgs = [job_config(compose_and_validate([*common, f"seed={seed}"])) for seed in range(2)]
    fused = train_group([RunSpec(cfg, tmp_path / "fused" / str(i)) for i, cfg in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        alone = train_alone(cfg, tmp_path / "solo" / str(i))
        assert fused[i].fused["models"] == 2 and alone.fused is None
        steps = [[r for r in read_metrics(tmp_path / mode / str(i)) if "train/loss" in r] for mode in ("fused", "solo")]
        assert len(steps[0]) == len(steps[1]) > 2
        for f, s in zip(*steps):
            assert f["train/loss"] == pytest.approx(s["train/loss"], rel=1e-4)
            assert f["grad/norm/conv1"] == pytest.approx(s["grad/norm/conv1"], rel=1e-3)


# ---------------------------------------------------------------- resume
def recorded_run(run_dir: Path, overrides: list[str]) -> Path:
    """What a resume reads first: checkpoint.pt and .hydra/overrides.yaml (as a shared run dir may hold them)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


def test_a_resume_never_imports_a_class_named_only_in_its_run_dir(tmp_path):
    run_dir = recorded_run(tmp_path / "shared", ["model=custom", "model.target=evil.Payload", "epochs=1"])
    with pytest.raises(ConfigError) as refusal:
        with_resumed_run([f"resume={run_dir}", "epochs=2"])
    assert refusal.value.key == "model.target" and "name it again" in str(refusal.value)
    args = with_resumed_run([f"resume={run_dir}", "model.target=mine.Net"])
    assert "model.target=evil.Payload" not in args and "model.target=mine.Net" in args


@pytest.mark.slow
def test_a_custom_run_resumes_when_its_target_is_named_again(models_on_path, data_root, tmp_path):
    train([*SMALL_CNN, *TINY[:-2], "hydra.run.dir=run"], tmp_path)
    done = run_cli(["train", "resume=run", "epochs=2"], tmp_path)
    assert done.returncode == 2 and "model.target=(not given)" in done.stderr and done.stderr.count("\n") == 1
    train(["resume=run", "epochs=2", "model.target=custom_models.SmallCNN"], tmp_path)
    summary, = summaries(tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
