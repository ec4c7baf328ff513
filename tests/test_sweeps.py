"""Sweeps: experiment presets, launchers (joblib, submitit), the Optuna search, failing jobs
and resume=auto, through the real `regexp` command."""

import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REGEXP, REPO, TINY, run_cli, signal_once_logged, summaries

from regexp.config import config_dir, validate
from regexp.synthetic import write_cifar10

PRESETS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
CIFAR_PRESETS = [p for p in PRESETS if p.endswith("cifar10")]
SINGLE_RUNS = {"cnn_cifar10", "resnet_cifar10"}  # every other preset is a comparison


def compose_hydra(overrides: list[str]):
    """The composed config with Hydra's own node (launcher, sweeper), as `regexp train -m` sees it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def preset_jobs(preset: str) -> list[list[str]]:
    """The override list of each job of `regexp train -m +experiment=PRESET` (Hydra's basic sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose_hydra([f"+experiment={preset}"]).hydra.sweeper.params or {}
    overrides = [f"{key}={value}" for key, value in params.items()] + [f"+experiment={preset}"]
    return [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
            for job in batch]


def sweep_cli(args: list[str], cwd: Path, data_root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return run_cli(["train", "-m", "logger=none", f"hydra.sweep.dir={cwd}/sweep", *args], cwd, data_root, timeout)


def job_summaries(sweep_dir: Path) -> dict[str, dict]:
    """Job number -> summary.json."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def fingerprint(run_dir: Path) -> dict[str, tuple[str, int]]:
    """(hash, mtime) of each result file of a run (Hydra rewrites .hydra/ for every job it launches)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in run_dir.iterdir() if p.is_file() and p.name != "train.log"}


def trial_overrides(run_dir: Path) -> list[str]:
    """A job's overrides as the sweeper chose them (without the resume=auto of a re-run)."""
    return [o for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) if o != "resume=auto"]


def data_with(tmp_path: Path, data_root: Path, *folders: str) -> Path:
    """A data root holding only `folders` of the real data (links)."""
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    for folder in folders:
        if not (root / folder).exists():
            (root / folder).symlink_to(data_root / folder)
    return root


# ---------------------------------------------------------------- experiment presets

@pytest.mark.parametrize("preset", [p if p == "clip_deep_relu" else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_preset_is_documented_and_every_job_composes(preset):  # one preset in the fast tier; each job composes in ~0.5 s
    path = Path(config_dir()) / "experiment" / f"{preset}.yaml"
    header = path.read_text().splitlines()
    assert header[0] == "# @package _global_"
    assert header[1].startswith("# ") and any("Expected" in line for line in header[:6]), "a description and the expected outcome"
    presets_page = (REPO / "docs" / "experiments.md").read_text()
    assert f"`{preset}`" in presets_page, "listed in the Experiment presets (docs/experiments.md)"
    assert "docs/experiments.md" in (REPO / "README.md").read_text(), "README links to them"

    jobs = preset_jobs(preset)
    assert len(jobs) == 1 if preset in SINGLE_RUNS else len(jobs) >= 2
    for job in jobs:
        validate(compose_hydra(job))  # types, ranges and cross-field rules of every job


def test_comparison_presets_compose_to_what_they_compare():
    def config(preset, *overrides):
        return validate(compose_hydra([f"+experiment={preset}", *overrides]))

    arms = {arm: config("accumulation_mnist", f"+experiment/accumulation_arm={arm}") for arm in ("4x16", "1x64")}
    assert [(c.accumulation.steps, c.batch_size) for c in arms.values()] == [(4, 16), (1, 64)]
    assert arms["4x16"].optimizer == arms["1x64"].optimizer and arms["4x16"].regularizer.dropout is None

    dropout = config("dropout_mnist", "regularizer.dropout.p=0.0")
    assert list(dropout.model.hidden) == [1024, 1024] and dropout.dataset.name == "mnist"

    clip = config("clip_deep_relu")
    assert (clip.model.depth, clip.model.width, clip.init.name, clip.init.std, clip.optimizer.lr) == (20, 256, "normal", 0.1, 0.1)

    cnn = config("cnn_cifar10")
    assert (cnn.model.name, cnn.optimizer.name, cnn.optimizer.lr, cnn.optimizer.weight_decay) == ("cnn", "adamw", 1e-4, 1e-2)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in CIFAR_PRESETS])
@pytest.mark.slow
def test_preset_sweep_runs_a_few_steps(tmp_path, data_root, preset):
    """`regexp train -m +experiment=PRESET` runs the preset's whole sweep."""
    out = sweep_cli([f"+experiment={preset}", *TINY, "dataset.val_size=64"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    results = summaries(tmp_path / "sweep")
    assert len(results) == len(preset_jobs(preset))
    for summary in results:
        # clip_deep_relu without clipping is meant to diverge: a result, not a failure
        assert summary["status"] in ("completed", "diverged"), summary.get("error")
        assert summary["steps"] >= 1


@pytest.mark.slow
def test_cifar_presets_run_a_few_steps(tmp_path, data_root):
    cifar = write_cifar10(tmp_path / "cifar", per_batch=40, n_test=40)
    for preset in CIFAR_PRESETS:
        out = sweep_cli([f"+experiment={preset}", *TINY, "dataset.val_size=40", "eval_batch_size=64",
                         f"dataset.root={cifar}", "dataset.download=false"], tmp_path / preset, data_root)
        assert out.returncode == 0, out.stderr[-3000:]
        [summary] = summaries(tmp_path / preset / "sweep")
        assert summary["status"] == "completed" and summary["choices"]["dataset"] == "cifar10"


# ---------------------------------------------------------------- launchers and search

@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
@pytest.mark.slow
def test_launcher_runs_a_two_job_sweep(tmp_path, data_root, launcher):
    extra = ["hydra.launcher.timeout_min=10"] if launcher.startswith("submitit") else []
    out = sweep_cli([f"hydra/launcher={launcher}", *extra, "optimizer=adam,adamw", *TINY], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_summaries(tmp_path / "sweep")
    assert sorted(jobs) == ["0", "1"]
    assert [jobs[n]["choices"]["optimizer"] for n in ("0", "1")] == ["adam", "adamw"]
    assert all(s["status"] == "completed" and "test/acc" in s["metrics"] for s in jobs.values())
    rows = sweep_rows(tmp_path / "sweep")  # the jobs recorded themselves in the launcher's workers
    assert [(r["job"], r["status"], r["test/acc"]) for r in rows] == [(n, "completed", jobs[n]["metrics"]["test/acc"]) for n in ("0", "1")]
    if launcher.startswith("submitit"):
        assert (tmp_path / "sweep" / ".submitit").is_dir()  # the jobs really went through submitit
    # each job's line, once, printed by the launching process as the job ended in its worker, before the table
    lines = out.stdout.splitlines()
    ends = [i for i, line in enumerate(lines) if line.startswith(("[1/2] job ", "[2/2] job "))]
    assert len(ends) == 2 and ends[-1] < next(i for i, line in enumerate(lines) if line.startswith("sweep "))
    jobs = sorted(lines[i].split(":")[0].split("] ")[1] for i in ends)
    assert jobs == ["job 0 (optimizer=adam)", "job 1 (optimizer=adamw)"]
    assert all(": completed · test/acc " in lines[i] for i in ends)


def test_launcher_presets_compose():
    launcher = compose_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min >= 60
    joblib = compose_hydra(["hydra/launcher=joblib"]).hydra.launcher
    assert joblib.n_jobs == 2


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-0", "0")])
def test_a_zero_joblib_n_jobs_is_refused_by_the_pre_flight(tmp_path, monkeypatch, value, shown):
    """joblib's own error came after Hydra wrote multirun.yaml, as a traceback (a value that is
    no integer is refused by the launcher's schema already)."""
    from regexp.cli import precheck
    from regexp.config import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        precheck(["seed=0,1", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={value}"], multirun=True)
    assert str(refused.value) == (f"hydra.launcher.n_jobs={shown}: must be a non-zero integer: jobs at once "
                                  "(-1: one per core, -2: all cores but one)")
    assert list(tmp_path.iterdir()) == []
    precheck(["seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"], multirun=True)  # every core: taken


@pytest.mark.slow
def test_optuna_search_tunes_lr_decay_and_dropout_for_val_acc_and_resumes(tmp_path, data_root):
    search = ["hydra/sweeper=tune", *TINY]
    out = sweep_cli([*search, "hydra.sweeper.n_trials=2"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    first = {n: fingerprint(tmp_path / "sweep" / n) for n in ("0", "1")}
    trials = {n: trial_overrides(tmp_path / "sweep" / n) for n in ("0", "1")}

    # the seeded sampler proposes the same trials again: resume=auto skips them and adds a third
    out = sweep_cli([*search, "hydra.sweeper.n_trials=3", "resume=auto"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {n: fingerprint(tmp_path / "sweep" / n) for n in ("0", "1")} == first
    assert {n: trial_overrides(tmp_path / "sweep" / n) for n in ("0", "1")} == trials
    jobs = job_summaries(tmp_path / "sweep")
    assert len(jobs) == 3 and all(s["status"] == "completed" for s in jobs.values())
    for summary in jobs.values():
        config = summary["config"]
        assert 1e-4 <= config["optimizer"]["lr"] <= 1e-2
        assert 1e-5 <= config["optimizer"]["weight_decay"] <= 1e-1
        assert 0.0 <= config["regularizer"]["dropout"]["p"] <= 0.7
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "++regularizer.dropout.p"}
    # each job returned its val/acc (skipped ones too); the study maximized it
    assert result["best_value"] == max(s["metrics"]["val/acc"] for s in jobs.values())


# ---------------------------------------------------------------- failures and resume

@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, data_root):
    root = data_with(tmp_path, data_root, "MNIST")  # Fashion-MNIST is missing, and no download
    out = sweep_cli(["dataset=fashion_mnist,mnist", f"dataset.root={root}", "dataset.download=false", *TINY],
                    tmp_path, data_root)
    assert out.returncode == 1, out.stderr[-3000:]
    jobs = job_summaries(tmp_path / "sweep")
    assert [jobs[n]["status"] for n in ("0", "1")] == ["failed", "completed"]  # the job after the failure ran
    assert "fashion_mnist" in jobs["0"]["error"] and "Traceback" in jobs["0"]["traceback"]

    sweep_summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    rows = {row["job"]: row for row in sweep_summary["rows"]}
    assert [rows[n]["status"] for n in ("0", "1")] == ["failed", "completed"]
    assert "dataset=fashion_mnist" in rows["0"]["overrides"] and rows["0"]["error"]
    assert rows["1"]["test/acc"] == jobs["1"]["metrics"]["test/acc"] and rows["1"]["wall_time_s"] > 0
    assert "failed" in out.stdout  # the table on the console


@pytest.mark.slow
def test_resume_auto_skips_completed_jobs_and_reruns_the_rest(tmp_path, data_root):
    root = data_with(tmp_path, data_root, "MNIST")
    command = ["dataset=mnist,fashion_mnist", f"dataset.root={root}", "dataset.download=false", *TINY]
    assert sweep_cli(command, tmp_path, data_root).returncode == 1
    completed = fingerprint(tmp_path / "sweep" / "0")

    data_with(tmp_path, data_root, "MNIST", "FashionMNIST")  # the missing data arrives
    out = sweep_cli([*command, "resume=auto"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert fingerprint(tmp_path / "sweep" / "0") == completed  # skipped: no result file rewritten
    jobs = job_summaries(tmp_path / "sweep")
    assert jobs["1"]["status"] == "completed" and "test/acc" in jobs["1"]["metrics"]
    rows = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["completed", "completed"]


@pytest.mark.slow
def test_resume_auto_continues_a_killed_job_from_its_checkpoint(tmp_path, data_root):
    """Kill the sweep mid-way through its second (long) job, then re-run it with resume=auto."""
    sweep_dir = tmp_path / "sweep"
    command = [REGEXP, "train", "-m", "logger=none", f"hydra.sweep.dir={sweep_dir}", "dataset.limit=256",
               "dataset.val_size=64", "batch_size=32", "epochs=1,60"]
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root))
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (sweep_dir / "1" / "checkpoint.pt").is_file():  # job 1 finished an epoch
            assert process.poll() is None and time.monotonic() < deadline, "job 1 never saved a checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = fingerprint(sweep_dir / "0")
    assert json.loads((sweep_dir / "1" / "summary.json").read_text())["status"] == "running"  # killed mid-run

    out = subprocess.run([*command, "resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert fingerprint(sweep_dir / "0") == done
    resumed = json.loads((sweep_dir / "1" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 60
    assert resumed["resumed_at_step"] > 0  # continued from its checkpoint, not from scratch
    records = [json.loads(line) for line in (sweep_dir / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val/acc" in r] == list(range(1, 61))  # each epoch's row once
    assert math.isfinite(resumed["metrics"]["test/acc"])


SMALL = ["dataset.limit=512", "dataset.val_size=256", "epochs=1", "batch_size=64"]


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """(hash, mtime) of every file under `root`, .hydra/ and train.log included."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def sweep_rows(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())["rows"]


@pytest.mark.slow
def test_resume_auto_over_other_values_places_jobs_by_their_overrides_and_rows_are_this_sweeps_jobs(tmp_path, data_root):
    """A re-run sweep whose values differ: the job of a new value trains in a dir past the
    highest, the run of the value left out stays as it was; a longer sweep finds each run in its
    own dir; a shorter one lists only its own jobs; each row is its own job's overrides, run dir
    and result."""
    sweep_dir = tmp_path / "sweep"
    out = sweep_cli(["seed=0,1", *SMALL], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    first = {n: tree(sweep_dir / n) for n in ("0", "1")}

    out = sweep_cli(["seed=0,2", *SMALL, "resume=auto"], tmp_path, data_root)  # seed=1 left out, seed=2 new
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resume=auto: run dirs by overrides (job->dir): 1->2" in out.stdout.splitlines()
    assert {n: tree(sweep_dir / n) for n in ("0", "1")} == first  # skipped, and left out: every file as it was
    assert [(r["job"], r["run_dir"]) for r in sweep_rows(sweep_dir)] == [("0", str(sweep_dir / "0")), ("1", str(sweep_dir / "2"))]

    out = sweep_cli(["seed=0,1,2", *SMALL, "resume=auto"], tmp_path, data_root)  # each run where it is
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resume=auto: run dirs" not in out.stdout and "run dir ┃" not in out.stdout  # no job moved: no line, no column
    assert {n: tree(sweep_dir / n) for n in ("0", "1")} == first
    jobs = job_summaries(sweep_dir)
    rows = sweep_rows(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed"), ("2", "completed")]
    for row in rows:
        seed = f"seed={row['job']}"
        assert seed in row["overrides"] and seed in jobs[row["job"]]["overrides"]
        assert row["test/acc"] == jobs[row["job"]]["metrics"]["test/acc"] and row["error"] is None

    out = sweep_cli(["seed=0,1", *SMALL, "resume=auto"], tmp_path, data_root)  # one job fewer
    assert out.returncode == 0, out.stderr[-3000:]
    assert [(r["job"], [o for o in r["overrides"] if o.startswith("seed=")]) for r in sweep_rows(sweep_dir)] == [
        ("0", ["seed=0"]), ("1", ["seed=1"])]
    assert "None" not in out.stdout and "2 jobs, 0 failed" in out.stdout


@pytest.mark.slow
def test_a_signal_to_a_sweep_reports_what_is_on_disk_and_resume_auto_finishes_it(tmp_path, data_root):
    """SIGTERM to `regexp train -m` (basic launcher, one process) while its first job trains:
    exit 143; that job is interrupted with its checkpoint saved, the others are listed as not
    run, and the advice (resume=auto, the same sweep dir) finishes the sweep."""
    sweep_dir = tmp_path / "sweep"
    command = [REGEXP, "train", "-m", "logger=none", f"hydra.sweep.dir={sweep_dir}", *SMALL, "epochs=30",
               "monitor.log_every=2", "seed=0,1,2"]
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root), COLUMNS="200")
    code, out, err = signal_once_logged(command, tmp_path, env, sweep_dir / "0" / "metrics.jsonl", signal.SIGTERM)  # job 0 logged
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    assert json.loads((sweep_dir / "0" / "summary.json").read_text())["status"] == "interrupted"
    assert (sweep_dir / "0" / "checkpoint.pt").is_file() and not (sweep_dir / "1").exists()
    written = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert (written["status"], written["signal"], written["not_run"]) == ("interrupted", 15, 2)
    assert [(r["job"], r["status"]) for r in written["rows"]] == [("0", "interrupted"), ("1", "not run"), ("2", "not run")]
    assert written["rows"][0]["error"].startswith("stopped by signal 15 (SIGTERM: scancel, or the system stopping it); checkpoint saved")
    assert (f"sweep {sweep_dir}: job 0 interrupted (checkpoint saved), 2 jobs not run (1, 2); to continue, run the same "
            f"command again with resume=auto hydra.sweep.dir={sweep_dir}") in err
    assert "1 interrupted, 2 not run" in out

    out = subprocess.run([*command, "resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] > 0
    assert [r["status"] for r in sweep_rows(sweep_dir)] == ["completed"] * 3
