"""Fused training (regexp.stack, train_group): each model of a group behaves as it would alone."""

import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from regexp.compose import compose_and_validate, initialized
from regexp.config import job_config
from regexp.models import build_model
from regexp.rundir import Status, Summary, read_metrics, read_summary
from regexp.stack import Stack
from regexp.tracking import Reporter, Tracker
from regexp.train import Run, RunSpec, StopSignal, begin_epoch, start_group, train, train_group

# CPU, deterministic, no dropout or augmentation: a fused model must retrace its solo run
SMALL = ["dataset.limit=512", "dataset.val_size=256", "batch_size=32", "model.hidden=[32]", "device=cpu",
         "device.threads=1", "device.deterministic=true", "logger=none"]


@pytest.fixture
def data_env(data_root, monkeypatch):
    monkeypatch.setenv("REGEXP_DATA_DIR", str(data_root))


def jobs(*per_job: list[str], common: tuple[str, ...] = ()) -> list:
    with initialized():
        return [job_config(compose_and_validate([*SMALL, *common, *overrides])) for overrides in per_job]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


# ---------------------------------------------------------------- the stacked forward
@pytest.mark.parametrize("model", [
    {"name": "mlp", "activation": "relu", "hidden": [16, 8]},
    {"name": "deep_mlp", "activation": "tanh", "depth": 3, "width": 8},
    {"name": "cnn", "activation": "relu", "channels": [4, 8], "fc": 16},
    {"name": "resnet", "activation": "gelu", "widths": [4, 8]},
])
@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm"])
def test_stacked_forward_backward_and_running_stats_equal_each_model_alone(model, norm):
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.create(model)
    norm_cfg = OmegaConf.create({"name": norm, "eps": 1e-5, "momentum": 0.1, "affine": True, "placement": "before"})
    shape = (3, 32, 32) if model["name"] == "resnet" else (1, 28, 28)
    no_dropout = SimpleNamespace(p=0.0, p_input=0.0)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(model_cfg, norm_cfg, no_dropout, shape, 10))
    alone = copy.deepcopy(members)
    with torch.device("meta"):
        template = build_model(model_cfg, norm_cfg, SimpleNamespace(p=0.5, p_input=0.5), shape, 10)
    recipe = SimpleNamespace(criterion=torch.nn.CrossEntropyLoss(), penalty=None)
    stack = Stack(template, members, [0.0] * 3, [0.0] * 3, [recipe] * 3)
    x = torch.randn(3, 8, *shape)
    fused = stack.forward(x, training=True)
    solo = [m(x[i]) for i, m in enumerate(alone)]
    torch.testing.assert_close(fused, torch.stack(solo), rtol=1e-4, atol=1e-5)
    fused.sum().backward()
    stack.share_grads()
    sum(out.sum() for out in solo).backward()
    for member, ref in zip(members, alone):
        for name, p in ref.named_parameters():
            torch.testing.assert_close(member.get_parameter(name).grad, p.grad, rtol=1e-3, atol=1e-5)
        for name, b in ref.named_buffers():  # BatchNorm's running stats, each member's own
            torch.testing.assert_close(member.get_buffer(name), b)
    for m in alone:
        m.eval()
    x_eval = torch.randn(8, *shape)
    torch.testing.assert_close(stack.forward(x_eval, training=False), torch.stack([m(x_eval) for m in alone]),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- each model as alone
def test_four_seeds_fused_start_from_their_solo_init_and_data_order(tmp_path, data_env):
    cfgs = jobs(*[[f"seed={s}"] for s in range(4)])
    runs = [Run(cfg, tmp_path / str(i), Summary(), Tracker([]), Reporter(), None) for i, cfg in enumerate(cfgs)]
    with StopSignal() as stop:
        group = start_group(runs, stop, fuse=True)
    for loop in group.loops:
        begin_epoch(loop)
    for loop in group.loops:  # a member's random stream is its own: drawn after the others, still the solo draw
        torch.manual_seed(loop.cfg.seed)
        alone = build_model(loop.cfg.model, loop.cfg.norm, None, loop.data.input_shape, loop.data.num_classes)
        from regexp.init import init_weights

        init_weights(alone, loop.cfg.init, loop.cfg.model.activation)
        order = torch.randperm(len(loop.data.train_y))
        for name, p in alone.state_dict().items():
            assert torch.equal(loop.state.model.state_dict()[name], p), name  # bitwise the solo init
        assert torch.equal(loop.state.perm, order)


@pytest.mark.slow
def test_fused_losses_equal_each_solo_run(tmp_path, data_env):
    """4 seeds fused: every logged loss (the first one included) and each run's diagnostics
    equal the solo run's; each summary says it was fused."""
    per_job = [[f"seed={s}"] for s in range(4)]
    common = ("epochs=2", "monitor.log_every=4")
    fused = train_group([RunSpec(cfg, tmp_path / "fused" / str(i)) for i, cfg in enumerate(jobs(*per_job, common=common))])
    for i, cfg in enumerate(jobs(*per_job, common=common)):
        alone = train(cfg, tmp_path / "solo" / str(i))
        assert fused[i].status == alone.status == Status.COMPLETED
        assert fused[i].fused["models"] == 4 and alone.fused is None
        fused_records, solo_records = step_records(tmp_path / "fused" / str(i)), step_records(tmp_path / "solo" / str(i))
        assert len(fused_records) == len(solo_records) > 2
        for f, s in zip(fused_records, solo_records):
            assert f["step"] == s["step"]
            assert f["train/loss"] == pytest.approx(s["train/loss"], rel=1e-4)
            assert f["act/mean/act1"] == pytest.approx(s["act/mean/act1"], rel=1e-3, abs=1e-6)
            assert f["grad/norm/fc1"] == pytest.approx(s["grad/norm/fc1"], rel=1e-3)
        assert fused[i].metrics["test/acc"] == pytest.approx(alone.metrics["test/acc"], abs=0.01)
        assert (tmp_path / "fused" / str(i) / "checkpoint.pt").is_file() and (tmp_path / "fused" / str(i) / "best.pt").is_file()
        samples = fused[i].metrics["perf/samples_per_s"] * fused[i].train_time_s
        assert samples == pytest.approx(fused[i].train_samples * 2, rel=1e-2)  # its own samples, of the group's time (train_time_s: ms)


@pytest.mark.slow
def test_members_keep_their_own_hyperparameters(tmp_path, data_env):
    """lr, dropout p (0 included), penalties, label smoothing, clipping and max-norm differ per
    member: each member without dropout retraces its solo run."""
    per_job = [
        ["optimizer.lr=0.003", "+regularizer=[l2,label_smoothing]", "regularizer.l2.coef=0.001"],
        ["optimizer.lr=0.0003", "+regularizer=[dropout]", "regularizer.dropout.p=0.0"],
        ["optimizer.lr=0.001", "+regularizer=[dropout]", "regularizer.dropout.p=0.5"],
        ["optimizer.lr=0.001", "+regularizer=[l1]", "regularizer.l1.coef=0.0001"],
    ]
    common = ("clip=norm", "monitor.log_every=2", "max_steps=6")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = train_group([RunSpec(cfg, tmp_path / "fused" / str(i)) for i, cfg in enumerate(jobs(*per_job, common=common))])
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # the stack stepped the optimizers: no false warning
    assert [s.status for s in fused] == [Status.COMPLETED] * 4
    for i, cfg in enumerate(jobs(*per_job, common=common)):
        if i == 2:
            continue  # dropout masks are drawn for the whole group: not the solo run's
        train(cfg, tmp_path / "solo" / str(i))
        for f, s in zip(step_records(tmp_path / "fused" / str(i)), step_records(tmp_path / "solo" / str(i)), strict=True):
            for key in ("train/loss", "train/penalty", "grad/global_norm", "opt/lr"):
                if key in s:
                    assert f[key] == pytest.approx(s[key], rel=1e-4), (i, key)


@pytest.mark.slow
def test_a_diverging_member_ends_diverged_and_the_others_train_on(tmp_path, data_env):
    per_job = [["seed=0"], ["seed=1", "optimizer.lr=1e5"], ["seed=2"]]
    common = ("optimizer=sgd", "epochs=2", "monitor.log_every=2")
    fused = train_group([RunSpec(cfg, tmp_path / "fused" / str(i)) for i, cfg in enumerate(jobs(*per_job, common=common))])
    assert fused[1].status == Status.DIVERGED
    assert fused[1].nonfinite["nonfinite/layer"] and fused[1].nonfinite["nonfinite/kind"] in ("forward", "backward", "loss", "grad_norm")
    assert "test/acc" not in fused[1].metrics
    for i in (0, 2):
        alone = train(jobs(per_job[i], common=common)[0], tmp_path / "solo" / str(i))
        assert fused[i].status == Status.COMPLETED
        assert fused[i].metrics["test/acc"] == pytest.approx(alone.metrics["test/acc"], abs=0.01)
        assert fused[i].metrics["val/acc"] == pytest.approx(alone.metrics["val/acc"], abs=0.01)


@pytest.mark.slow
def test_early_stopping_is_each_members_own(tmp_path, data_env):
    per_job = [["+regularizer=early_stopping", "regularizer.early_stopping.patience=1",
                "regularizer.early_stopping.min_delta=0.5"], ["seed=1"]]
    fused = train_group([RunSpec(cfg, tmp_path / str(i)) for i, cfg in enumerate(jobs(*per_job, common=("epochs=3",)))])
    assert fused[0].status == Status.EARLY_STOPPED and fused[0].epochs_completed == 2
    assert fused[1].status == Status.COMPLETED and fused[1].epochs_completed == 3
    assert fused[0].metrics["best_epoch"] == 1 and (tmp_path / "0" / "best.pt").is_file()


@pytest.mark.slow
def test_fused_runs_resume_alone_or_fused_as_if_never_stopped(tmp_path, data_env):
    """Epoch 1 fused, then epoch 2 resumed (one member alone, the others fused again) equals
    two solo epochs: checkpoints hold each member's own random stream."""
    per_job = [[f"seed={s}"] for s in range(3)]
    train_group([RunSpec(cfg, tmp_path / str(i)) for i, cfg in enumerate(jobs(*per_job, common=("epochs=1",)))])
    resumed = jobs(*[[*o, f"resume={tmp_path / str(i)}"] for i, o in enumerate(per_job)], common=("epochs=2",))
    alone = train(resumed[0], tmp_path / "0")
    again = train_group([RunSpec(cfg, tmp_path / str(i)) for i, cfg in zip((1, 2), resumed[1:])])
    assert alone.fused is None and again[0].fused["models"] == 2
    for i, cfg in enumerate(jobs(*per_job, common=("epochs=2",))):
        train(cfg, tmp_path / "solo" / str(i))
        resumed_summary = read_summary(tmp_path / str(i))
        assert resumed_summary.status == Status.COMPLETED and resumed_summary.resumed_at_step > 0
        epoch_rows = [r for r in read_metrics(tmp_path / str(i)) if "epoch/train_loss" in r]
        solo_rows = [r for r in read_metrics(tmp_path / "solo" / str(i)) if "epoch/train_loss" in r]
        assert [r["epoch/train_loss"] for r in epoch_rows] == pytest.approx([r["epoch/train_loss"] for r in solo_rows], rel=1e-4)


def test_a_crash_in_a_group_is_recorded_on_every_member(tmp_path, data_env, monkeypatch):
    import regexp.train

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(regexp.train, "fused_step", broken)
    specs = [RunSpec(cfg, tmp_path / str(i)) for i, cfg in enumerate(jobs(["seed=0"], ["seed=1"]))]
    with pytest.raises(RuntimeError, match="simulated"):
        train_group(specs)
    for i in range(2):
        summary = json.loads((tmp_path / str(i) / "summary.json").read_text())
        assert summary["status"] == "failed" and "simulated" in summary["error"] and "Traceback" in summary["traceback"]


@pytest.mark.parametrize("kind,settings", [
    ("adamw", [{"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.999)}, {"lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]),
    ("adam", [{"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-6}, {"lr": 1e-2, "weight_decay": 0.0}]),
    ("sgd", [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, {"lr": 0.05, "momentum": 0.0}]),
    ("nesterov", [{"lr": 0.1, "momentum": 0.9, "nesterov": True}, {"lr": 0.01, "momentum": 0.5, "nesterov": True}]),
])
def test_stacked_update_equals_each_members_own_optimizer(kind, settings):
    """The members' optimizer steps taken at once equal each torch optimizer stepping alone, and
    leave each optimizer's own state as its own steps would (a checkpoint reads it)."""
    from regexp.stack import StackedUpdate

    make = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "nesterov": torch.optim.SGD}[kind]
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)) for _ in settings]
    alone = copy.deepcopy(members)

    def optimizers(models):
        return [make([{"params": [m[0].weight, m[2].weight]}, {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}],
                     **{k: v for k, v in s.items() if k != "weight_decay"}, weight_decay=s.get("weight_decay", 0.0))
                for m, s in zip(models, settings)]

    with torch.device("meta"):
        template = copy.deepcopy(alone[0]).to("meta")
    recipe = SimpleNamespace(criterion=torch.nn.CrossEntropyLoss(), penalty=None)
    stack = Stack(template, members, [0.0] * 2, [0.0] * 2, [recipe] * 2)
    fused_opts, solo_opts = optimizers(members), optimizers(alone)
    update = StackedUpdate(stack, fused_opts)
    assert StackedUpdate.fits(fused_opts, scalers_enabled=False) and not StackedUpdate.fits(fused_opts, scalers_enabled=True)
    for step in range(1, 4):
        x = torch.randn(2, 4, 6)
        stack.forward(x, training=True).pow(2).sum().backward()
        stack.share_grads()
        update.step([step, step])
        stack.zero_grad()
        for i, (model, opt) in enumerate(zip(alone, solo_opts)):
            model(x[i]).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for member, model, fused_opt, solo_opt in zip(members, alone, fused_opts, solo_opts):
        for (name, p), q in zip(member.named_parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        for p, q in zip(member.parameters(), model.parameters()):
            for key, value in solo_opt.state[q].items():
                torch.testing.assert_close(fused_opt.state[p][key], value, rtol=1e-5, atol=1e-7)
