"""`hydra/launcher=fused` (issue 14): the partition of a sweep's jobs into stacks (fast, on
composed configs), the plugin's torch-free import and Hydra's discovery of it, the
pre-flight of hydra.launcher.max_models, and end-to-end sweeps through the CLI (slow)."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, compose_train, run_cli

from regexp import fusion
from regexp.config import ConfigError, job_config, recorded_container
from regexp.fusion import Candidate, partition
from regexp.rundir import Status, Summary, write_summary

BASE = ["model.hidden=[32]", "+regularizer=dropout"]


@pytest.fixture(scope="module")
def base() -> dict:
    """A resolved job config as the launcher sees it."""
    return recorded_container(job_config(compose_train(BASE)))


def jobs_of(configs: list[dict], steps=None, memory: int = 0) -> list[Candidate]:
    return [Candidate(n, c, memory, 0 if steps is None else steps[n]) for n, c in enumerate(configs)]


def with_value(config: dict, dotted: str, value) -> dict:
    changed = copy.deepcopy(config)
    *path, last = dotted.split(".")
    node = changed
    for part in path:
        node = node[part]
    node[last] = value
    return changed


# ---------------------------------------------------------------- what fuses
FREE_CHANGES = [
    ("seed", 7), ("init.name", "orthogonal"), ("init.std", 0.5), ("optimizer.lr", 0.1),
    ("optimizer.weight_decay", 0.01), ("optimizer.betas", [0.8, 0.9]), ("optimizer.eps", 1e-6),
    ("scheduler.gamma", 0.5), ("clip.max_norm", 0.3), ("regularizer.dropout.p", 0.1),
    ("regularizer.dropout", None), ("regularizer.l2", {"coef": 0.1}), ("regularizer.label_smoothing", {"smoothing": 0.2}),
    ("regularizer.early_stopping", {"monitor": "val/acc", "mode": "max", "patience": 2, "min_delta": 0.0}),
    ("out_dir", "elsewhere"), ("logger.tags", ["a"]),
]


def test_jobs_that_differ_only_in_free_keys_form_one_group(base):
    configs = [base] + [with_value(base, key, value) for key, value in FREE_CHANGES]
    result = partition(jobs_of(configs), max_models=64)
    assert result.groups == [list(range(len(configs)))] and result.alone == {}
    assert result.lines(jobs_of(configs)) == [f"fused: jobs 0-{len(configs) - 1} train as one group of {len(configs)} models"]


@pytest.mark.parametrize("key, value, shown", [
    ("model.hidden", [64], "[64] where jobs 0-2 have [32]"),
    ("optimizer.name", "adam", "adam where jobs 0-2 have adamw"),  # the kind, under a free prefix
    ("scheduler.name", "cosine", "cosine where jobs 0-2 have none"),
    ("batch_size", 64, "64 where jobs 0-2 have 128"),
    ("dataset.val_size", 100, "100 where jobs 0-2 have 5000"),
    ("norm.momentum", 0.2, "0.2 where jobs 0-2 have 0.1"),
    ("monitor.log_every", 7, "7 where jobs 0-2 have 50"),
    ("device.precision", "bf16", "bf16 where jobs 0-2 have auto"),
    ("regularizer.max_norm", {"value": 3.0}, '{"value": 3.0} where jobs 0-2 have null'),  # on vs off
])
def test_a_job_that_differs_in_another_key_runs_alone_and_says_why(base, key, value, shown):
    configs = [base, with_value(base, "seed", 1), with_value(base, "seed", 2), with_value(base, key, value)]
    result = partition(jobs_of(configs), max_models=64)
    assert result.groups == [[0, 1, 2], [3]]
    assert result.alone == {3: f"{key} is {shown}"}
    assert result.lines(jobs_of(configs))[1] == f"fused: job 3 runs alone: {key} is {shown}"


def test_max_norm_on_in_every_job_fuses_whatever_its_value(base):
    on = with_value(base, "regularizer.max_norm", {"value": 3.0})
    assert partition(jobs_of([on, with_value(on, "regularizer.max_norm.value", 1.0)]), 64).groups == [[0, 1]]


def test_groups_keep_launch_order(base):
    wide = with_value(base, "model.hidden", [64])
    configs = [base, wide, with_value(base, "seed", 1), with_value(wide, "seed", 1)]
    assert partition(jobs_of(configs), 64).groups == [[0, 2], [1, 3]]


def test_max_models_chunks_a_group(base):
    configs = [with_value(base, "seed", s) for s in range(5)]
    result = partition(jobs_of(configs), max_models=2)
    assert result.groups == [[0, 1], [2, 3], [4]]
    assert result.alone == {4: "hydra.launcher.max_models=2 caps a group (jobs 0-4 share its config)"}


def test_the_memory_estimate_splits_a_group_that_would_not_fit(base):
    configs = [with_value(base, "seed", s) for s in range(5)]
    result = partition(jobs_of(configs, memory=2**20), max_models=64, memory_budget=2 * 2**20 + 1)
    assert result.groups == [[0, 1], [2, 3], [4]]
    assert "about 1 MiB a model and 2 MiB to spend fit 2 models a group" in result.alone[4]
    assert partition(jobs_of(configs, memory=2**20), max_models=64, memory_budget=2**30).groups == [[0, 1, 2, 3, 4]]


def test_the_memory_estimate_counts_state_and_activations():
    cfg = job_config(compose_train(["model.hidden=[100]", "batch_size=10"]))
    parameters = 784 * 100 + 100 + 100 * 10 + 10
    assert fusion.model_memory(cfg) == (parameters * 4 + 10 * (784 + 100 + 10) * 3) * 4
    conv = job_config(compose_train(["model=cnn"]))
    assert fusion.model_memory(conv) > fusion.model_parameters(conv) * 16


def test_a_model_the_engine_does_not_stack_runs_alone(base):
    jobs = jobs_of([base, with_value(base, "seed", 1), with_value(base, "seed", 2)])
    jobs[0] = dataclasses.replace(jobs[0], alone="model.target=m.Net is not an nn.Sequential")  # regexp.custom's answer
    result = partition(jobs, 64)
    assert result.groups == [[0], [1, 2]]
    assert result.alone == {0: "model.target=m.Net is not an nn.Sequential"}


def test_every_model_regexp_builds_stacks(base):
    for model in ("mlp", "deep_mlp", "cnn", "resnet"):
        assert fusion.model_alone(job_config(compose_train([f"model={model}"]))) is None


def test_resume_auto_fuses_jobs_at_the_same_step(base):
    resumed = with_value(base, "resume", "auto")
    configs = [with_value(resumed, "seed", s) for s in range(4)]
    result = partition(jobs_of(configs, steps=[0, 120, 0, 120]), 64)
    assert result.groups == [[0, 2], [1, 3]]
    result = partition(jobs_of(configs, steps=[0, 0, 120, None]), 64)
    assert result.groups == [[0, 1], [2], [3]]
    assert result.alone == {2: "step (resume=auto) is 120 where jobs 0-1 have 0",
                            3: "its run is finished (resume=auto skips it)"}


def fake_checkpoint(path: Path, step: int, window: int) -> None:
    """A checkpoint as resume_point reads it (a batch of 32 over 256 samples: 8 windows an epoch)."""
    import torch

    from regexp.train import CHECKPOINT_KEYS

    state = {key: None for key in CHECKPOINT_KEYS}
    state.update(epoch=1, window=window, step=step, perm=torch.arange(256),
                 early_stopping={"best": 0.0, "best_epoch": None, "bad_evals": 0}, config={})
    torch.save(state, path)


@pytest.mark.parametrize("status, checkpoint, point", [
    (None, None, (0, None)), (Status.INTERRUPTED, (5, 5), (5, None)), (Status.FAILED, (5, 5), (5, None)),
    (Status.RUNNING, (5, 5), (5, None)), (Status.INTERRUPTED, None, (0, None)), (Status.COMPLETED, (8, 8), (None, None)),
    (Status.DIVERGED, None, (None, None)),
    (Status.RUNNING, (8, 8), (8, "its checkpoint stands at the end of its training (step 8): it only finishes its evaluation")),
])
def test_resume_point_reads_the_run_dir_and_its_checkpoint(tmp_path, status, checkpoint, point):
    """The step is the checkpoint's (a killed run's summary still says 0), and a run killed in
    its final test (checkpoint at its last step) runs alone."""
    job = job_config(compose_train(["batch_size=32", "epochs=1", "dataset.limit=256"]))
    if status is not None:
        write_summary(tmp_path, Summary(status=status, steps=0))
    if checkpoint is not None:
        fake_checkpoint(tmp_path / "checkpoint.pt", *checkpoint)
    assert fusion.resume_point(tmp_path, job) == point


def test_an_unreadable_checkpoint_makes_its_job_run_alone(tmp_path):
    job = job_config(compose_train(["batch_size=32", "epochs=1", "dataset.limit=256"]))
    write_summary(tmp_path, Summary(status=Status.INTERRUPTED, steps=4))
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    step, alone = fusion.resume_point(tmp_path, job)
    assert step == 0 and alone == "its checkpoint cannot be read, the job fails on its own (its line says why)"
    result = partition([Candidate(0, recorded_container(job)), Candidate(1, recorded_container(job), step=0, alone=alone),
                        Candidate(2, recorded_container(job))], 64)
    assert result.groups == [[0, 2], [1]] and result.alone == {1: alone}


def test_job_numbers_are_ranges():
    assert fusion.job_numbers([3]) == "job 3"
    assert fusion.job_numbers([8, 0, 1, 2, 3, 5, 9]) == "jobs 0-3, 5, 8-9"


# ---------------------------------------------------------------- the plugin
def test_the_plugin_imports_no_torch():
    code = "import hydra_plugins.regexp_fused_launcher.fused_launcher, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_hydra_discovers_the_launcher():
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; import sys; "
            "names = [c.__name__ for c in Plugins.instance().discover(Launcher)]; "
            "assert 'FusedLauncher' in names, names; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


RANGE = "must be an integer from 1 to 1024 (models trained side by side)"


@pytest.mark.parametrize("launcher", ["fused", "fused_local", "fused_slurm"])
@pytest.mark.parametrize("value, reason", [("0", RANGE), ("-3", RANGE), ("1025", RANGE), ("abc", "must be an integer"),
                                           ("1.5", "must be an integer"), ("true", "must be an integer"),
                                           ("null", "must be an integer")])
def test_a_bad_max_models_is_refused_by_the_pre_flight(tmp_path, monkeypatch, launcher, value, reason):
    """Not an integer: the launcher's schema refuses it; out of range: the pre-flight."""
    from regexp.cli import precheck

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        precheck(["seed=0,1", f"hydra/launcher={launcher}", f"hydra.launcher.max_models={value}"], multirun=True)
    assert str(refused.value) == f"hydra.launcher.max_models={value}: {reason}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("launcher", ["fused_local", "fused_slurm", "submitit_local", "submitit_slurm"])
def test_a_requeue_count_is_refused_by_the_pre_flight(tmp_path, monkeypatch, launcher):
    """regexp's submitit launchers requeue nothing: a job out of time ends interrupted, for resume=auto."""
    from regexp.cli import precheck

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^hydra.launcher.max_num_timeout=3: must be 0: regexp requeues no job; "):
        precheck(["seed=0,1", f"hydra/launcher={launcher}", f"{'+' * launcher.endswith('local')}hydra.launcher.max_num_timeout=3"],
                 multirun=True)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_launcher_key_is_refused(tmp_path, monkeypatch):
    from regexp.cli import precheck

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^hydra.launcher.max_modles=3: unknown key; the fused launcher takes max_models$"):
        precheck(["seed=0,1", "hydra/launcher=fused", "+hydra.launcher.max_modles=3"], multirun=True)


def test_deleting_max_models_is_refused(tmp_path, monkeypatch):
    from regexp.cli import precheck

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^hydra.launcher.max_models=\(deleted\): cannot be deleted, its schema requires"):
        precheck(["seed=0,1", "hydra/launcher=fused", "~hydra.launcher.max_models"], multirun=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("value, reason", [("0", RANGE), ("abc", "must be an integer")])
def test_bad_max_models_exits_2_with_one_line_and_writes_nothing(tmp_path, value, reason):
    out = run_cli(["train", "-m", "seed=0,1", "hydra/launcher=fused", f"hydra.launcher.max_models={value}"], tmp_path)
    assert out.returncode == 2, out.stderr
    refusal = f"regexp: error: hydra.launcher.max_models={value}: {reason}"
    assert out.stderr.splitlines() == [refusal]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- end to end
def fused_sweep(tmp_path: Path, data_root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(["train", "-m", "hydra/launcher=fused", "logger=none", "model.hidden=[32]", *TINY,
                    f"hydra.sweep.dir={tmp_path}/sweep", *args], tmp_path, data_root)


@pytest.mark.slow
def test_a_fused_sweep_trains_its_jobs_as_one_group(tmp_path, data_root):
    out = fused_sweep(tmp_path, data_root, "seed=0,1", "optimizer.lr=1e-3,3e-3")
    assert out.returncode == 0, out.stderr
    assert "fused: jobs 0-3 train as one group of 4 models" in out.stdout.splitlines()
    sweep = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert sweep["jobs"] == 4 and [r["status"] for r in sweep["rows"]] == ["completed"] * 4
    for job in range(4):
        run_dir = tmp_path / "sweep" / str(job)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert (run_dir / "metrics.jsonl").stat().st_size > 0
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()
        assert summary["fused"]["models"] == 4


@pytest.mark.slow
def test_jobs_that_cannot_fuse_say_why_and_complete(tmp_path, data_root):
    out = fused_sweep(tmp_path, data_root, "model.hidden=[32],[64]")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "fused: job 0 runs alone: model.hidden is [32] where job 1 has [64]" in lines
    assert "fused: job 1 runs alone: model.hidden is [64] where job 0 has [32]" in lines
    rows = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["completed"] * 2
    assert all("fused" not in json.loads((tmp_path / "sweep" / str(n) / "summary.json").read_text()) for n in range(2))



# ---------------------------------------------------------------- a group that crashes
def member(sweep_dir: Path, number: int, searching: bool = False):
    from omegaconf import OmegaConf

    from regexp.cli import GroupMember
    from regexp.train import RunSpec

    (sweep_dir / str(number)).mkdir(parents=True, exist_ok=True)  # as Hydra's run_job made it
    hydra_cfg = OmegaConf.create({"runtime": {"output_dir": str(sweep_dir / str(number))}, "job": {"num": number},
                                  "overrides": {"task": [f"seed={number}"]}, "sweep": {"dir": str(sweep_dir)}})
    return GroupMember(hydra_cfg, searching, spec=RunSpec(cfg=None, run_dir=sweep_dir / str(number)))


def test_a_crashed_group_fails_each_member_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import math

    import regexp.train
    from regexp.cli import GroupMember, run_group

    def crash(specs, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(regexp.train, "train_group", crash)
    skipped = GroupMember(member(tmp_path, 9).hydra_cfg, False, value=0.75)  # resume=auto found it finished
    values = run_group([member(tmp_path, 0), skipped, member(tmp_path, 1, searching=True)], wandb_server=None)
    assert math.isnan(values[0]) and values[1] == 0.75
    assert isinstance(values[2], RuntimeError)  # a search sweeper's failed trial
    for number in (0, 1):
        summary = json.loads((tmp_path / str(number) / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["error"] == "RuntimeError: out of memory"
        assert "out of memory" in summary["traceback"]
        record = json.loads((tmp_path / ".sweep" / f"{number}.json").read_text())
        assert record["error"] == "RuntimeError: out of memory"


# ---------------------------------------------------------------- a signal, then resume=auto
@pytest.mark.slow
def test_a_signal_to_a_fused_sweep_then_resume_auto_fuses_the_group_again(tmp_path, data_root):
    """SIGTERM while a fused group trains: every member saves its checkpoint (the same step),
    exit 143; the same command with resume=auto fuses them again and finishes each from there."""
    import os
    import signal

    from conftest import REGEXP, signal_once_logged

    sweep_dir = tmp_path / "sweep"
    command = [REGEXP, "train", "-m", "logger=none", f"hydra.sweep.dir={sweep_dir}", "dataset.limit=512",
               "dataset.val_size=256", "batch_size=32", "model.hidden=[32]", "epochs=30", "monitor.log_every=2",
               "seed=0,1,2", "hydra/launcher=fused"]
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root), COLUMNS="200")
    code, _, err = signal_once_logged(command, tmp_path, env, sweep_dir / "2" / "metrics.jsonl", signal.SIGTERM)  # the group logged
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    stopped = [json.loads((sweep_dir / str(n) / "summary.json").read_text()) for n in range(3)]
    assert [s["status"] for s in stopped] == ["interrupted"] * 3
    assert len({s["steps"] for s in stopped}) == 1 and all((sweep_dir / str(n) / "checkpoint.pt").is_file() for n in range(3))

    again = subprocess.run([*command, "resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fused: jobs 0-2 train as one group of 3 models" in again.stdout + again.stderr
    resumed = [json.loads((sweep_dir / str(n) / "summary.json").read_text()) for n in range(3)]
    assert [s["status"] for s in resumed] == ["completed"] * 3
    assert {s["resumed_at_step"] for s in resumed} == {stopped[0]["steps"]} and all(s["fused"]["models"] == 3 for s in resumed)
