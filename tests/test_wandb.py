"""Weights & Biases: offline runs of the real CLI, read back from their .wandb files with
`wandb leet inspect`. No network and no account are needed (or used)."""

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import TINY, compose_train, run_cli, summaries
from rich.console import Console

from regexp.comparison import comparison, group_rows
from regexp.config import validate
from regexp.tracking import Reporter
from regexp.train import train
from regexp.wandb_logger import wandb_sinks

WANDB = str(Path(sys.executable).with_name("wandb"))
FAKE_KEY = "fake-secret-key-123"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B on with logger.mode=auto's default outcome here (offline: no credentials), and
    every file it writes outside the run dir kept under tmp_path."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    home = tmp_path / "wandb-home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # a developer's own `wandb login` must not send test runs online
    monkeypatch.setenv("WANDB_SILENT", "true")  # set by regexp when unset; restored after the test


def tiny_config(overrides: list[str]):
    return validate(compose_train([*TINY, "device=cpu", *overrides]))


def quiet() -> Reporter:
    return Reporter(Console(file=io.StringIO()))


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json"))


def wandb_file(run_dir: Path) -> Path:
    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # one W&B run per job
    return path


def inspect(run_dir: Path) -> tuple[list[dict], dict]:
    """(the .wandb file's records, leet's summary of the run)."""
    path = str(wandb_file(run_dir))
    records = subprocess.run([WANDB, "leet", "inspect", "--json", path], capture_output=True, text=True, check=True)
    summary = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", path], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in records.stdout.splitlines()], json.loads(summary.stdout)


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


@pytest.mark.slow
def test_offline_run_logs_history_summary_config_and_names(tmp_path, data_root, wandb_env):
    overrides = [*TINY, "out_dir=runs", "optimizer=adam", "+regularizer=dropout"]
    out = run_cli(["train", *overrides], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wandb:" not in out.stdout + out.stderr  # quiet: no wandb banners or sync hints
    [run_dir] = run_dirs(tmp_path / "runs")
    records, run = inspect(run_dir)

    history = [h["item"] for h in of_type(records, "history")]
    steps = [h for h in history if "train/loss" in h and "grad/global_norm" in h]
    assert steps and all("step" in h for h in steps)
    assert any("val/acc" in h and "epoch" in h for h in history)
    assert not any("NaN" in json.dumps(h) or "Infinity" in json.dumps(h) for h in history)
    axes = {m.get("glob_name") or m.get("name"): m.get("step_metric") for m in of_type(records, "metric")}
    assert axes["*"] == "step" and axes["val/*"] == "epoch"

    assert run["state"] == "finished" and run["exit_code"] == 0
    assert run["summary"]["status"] == "completed" and 0 <= run["summary"]["test/acc"] <= 1
    assert run["project"] == "regexp"
    config = run["config"]
    assert config["choices/model"] == "mlp" and config["choices/optimizer"] == "adam"
    assert config["choices/regularizer"] == "dropout" and config["optimizer"]["name"] == "adam"
    assert {"model=mlp", "optimizer=adam", "+regularizer=dropout"} <= set(run["tags"])
    [meta] = of_type(records, "run")
    assert meta["display_name"] == ",".join(sorted(overrides))  # Hydra's override_dirname
    assert meta["run_group"] == meta["display_name"]  # a single run is its own group


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_in_the_sweep_group(tmp_path, data_root, wandb_env):
    sweep_dir = tmp_path / "sweep"
    out = run_cli(["train", "-m", *TINY, f"hydra.sweep.dir={sweep_dir}", "optimizer=adam,adamw"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [of_type(inspect(d)[0], "run")[0] for d in run_dirs(sweep_dir)]
    assert [r["run_group"] for r in runs] == [str(sweep_dir)] * 2
    names = [r["display_name"].split(",") for r in runs]
    assert "optimizer=adam" in names[0] and "optimizer=adamw" in names[1]
    assert len({r["run_id"] for r in runs}) == 2
    # and one more run in the group: the sweep's compare table
    records, run = inspect(sweep_dir)
    [meta] = of_type(records, "run")
    assert meta["run_group"] == str(sweep_dir) and meta["job_type"] == "sweep-summary" and run["state"] == "finished"
    assert compare_table(sweep_dir, run) == list(group_rows(comparison(run_dirs(sweep_dir), None, "test/acc"), "test/acc"))
    assert out.stdout.count(f"the sweep's compare table: W&B logged offline to {sweep_dir / 'wandb'}") == 1
    assert "warning" not in out.stdout


def compare_table(sweep_dir: Path, run: dict) -> list:
    """[columns, rows] of the wandb.Table `compare` that an offline run logged, read from its file."""
    [sync_dir] = (sweep_dir / "wandb").glob("offline-run-*")
    table = json.loads((sync_dir / "files" / run["summary"]["compare"]["path"]).read_text())
    return [table["columns"], table["data"]]


@pytest.mark.slow
def test_a_fused_sweep_gives_each_job_its_own_run_open_side_by_side(tmp_path, data_root, wandb_env):
    sweep_dir = tmp_path / "sweep"
    out = run_cli(["train", "-m", *TINY, f"hydra.sweep.dir={sweep_dir}", "seed=0,1", "hydra/launcher=fused"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    inspected = [inspect(d) for d in run_dirs(sweep_dir)]
    runs = [of_type(records, "run")[0] for records, _ in inspected]
    assert [r["run_group"] for r in runs] == [str(sweep_dir)] * 2 and len({r["run_id"] for r in runs}) == 2
    for (records, run), seed in zip(inspected, ("seed=0", "seed=1")):
        assert run["state"] == "finished" and run["summary"]["fused"]["models"] == 2
        assert seed in of_type(records, "run")[0]["display_name"].split(",")
    assert inspected[0][1]["summary"]["train/loss"] != inspected[1][1]["summary"]["train/loss"]  # each its own metrics


@pytest.mark.slow
def test_crashed_job_finishes_its_run_with_a_failure_exit_code(tmp_path, wandb_env):
    empty = tmp_path / "no-data"
    empty.mkdir()
    with pytest.raises(Exception):
        train(tiny_config([f"dataset.root={empty}", "dataset.download=false"]), tmp_path / "run", reporter=quiet())
    _, run = inspect(tmp_path / "run")
    assert run["exit_code"] == 1 and run["state"] == "failed"
    assert run["summary"]["status"] == "failed" and run["summary"]["error"]


@pytest.mark.parametrize("off", ["logger=none", "logger.mode=disabled"])
def test_logger_off_writes_no_wandb_files(tmp_path, data_root, wandb_env, off):
    train(tiny_config([f"dataset.root={data_root}", off]), tmp_path / "run", reporter=quiet())
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize("logger", [["logger=none"], ["logger.mode=disabled"], []])  # [] : WANDB_MODE=disabled (conftest)
def test_wandb_off_never_imports_it(monkeypatch, logger):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would raise
    cfg = validate(compose_train(logger))
    silent = types.SimpleNamespace(warn=pytest.fail, line=pytest.fail)
    assert wandb_sinks(cfg, {}, Path("unused"), "name", "group", silent) == []


@pytest.mark.slow
def test_no_secret_reaches_the_run_dir(tmp_path, data_root, wandb_env, monkeypatch):
    """With a key in the environment: offline, and auto, which tries online with it, is
    refused (the key is fake) and falls back to offline with a warning."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    out = run_cli(["train", "-m", *TINY, f"hydra.sweep.dir={tmp_path}/sweep", "logger.mode=offline,auto"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s["status"] for s in summaries(tmp_path / "sweep")] == ["completed"] * 2
    assert "W&B could not go online" in out.stdout and FAKE_KEY not in out.stdout + out.stderr
    for run_dir in run_dirs(tmp_path / "sweep"):
        assert inspect(run_dir)[1]["exit_code"] == 0
        assert not list((run_dir / "wandb").glob("run-*"))  # the refused online attempt left nothing to sync
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 10
    assert [p for p in files if FAKE_KEY.encode() in p.read_bytes()] == []


def test_an_unreachable_server_is_tried_once_per_shared_server_state(tmp_path, monkeypatch):
    """The jobs that share a WandbServer pay the online timeout once; a fresh one tries again."""
    from regexp.wandb_logger import WandbServer, init_run

    attempts = []

    def init(mode, settings, **kwargs):
        attempts.append(mode)
        if mode == "online":
            raise TimeoutError("timed out")
        return f"{mode} run"

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Settings=lambda **kwargs: kwargs))
    warnings = []
    server = WandbServer()
    assert init_run("online", {}, tmp_path, warnings.append, server) == "offline run" and server.unreachable
    assert init_run("online", {}, tmp_path, warnings.append, server) == "offline run"
    assert attempts == ["online", "offline", "offline"]
    assert "could not go online (timed out)" in warnings[0] and "could not go online earlier" in warnings[1]
    init_run("online", {}, tmp_path, warnings.append, WandbServer())
    assert attempts[3:] == ["online", "offline"]


def test_the_wandb_summary_is_the_typed_summary_without_the_config():
    from regexp.rundir import Status, Summary
    from regexp.wandb_logger import WandbRun

    run = types.SimpleNamespace(define_metric=lambda *args, **kwargs: None, summary={})
    summary = Summary(status=Status.DIVERGED, config={"seed": 0}, choices={"model": "mlp"}, overrides=["seed=0"],
                      metrics={"test/acc": 0.1, "train/loss": float("inf")}, findings=[{"rule": "divergence"}],
                      wall_time_s=2.0, threads=1, extra={"fused": {"models": 2}})
    WandbRun(run).summary(summary)
    assert run.summary == {"test/acc": 0.1, "nonfinite": ["train/loss"], "status": "diverged", "run_dir": "",
                           "findings": [{"rule": "divergence"}], "steps": 0, "epochs_completed": 0, "wall_time_s": 2.0,
                           "skipped_steps": 0, "threads": 1, "fused": {"models": 2}}


# ---------------------------------------------------------------- the sweep's compare table (hand-made jobs)

def finished_sweep(sweep_dir: Path, statuses: tuple[str, ...] = ("completed",) * 4) -> None:
    """Jobs of this invocation, `+regularizer=dropout|l2 seed=i`, as the sweep callback records them."""
    from test_sweep_summary import job

    from regexp.rundir import Status, Summary

    for n, status in enumerate(statuses):
        reg, seed = ("dropout", "l2")[n % 2], n // 2
        overrides = [f"+regularizer={reg}", f"seed={seed}"]
        job(sweep_dir, n, overrides, Summary(status=Status(status), overrides=overrides, choices={"regularizer": reg},
                                             config={"seed": seed}, metrics={"test/acc": 0.9 - n / 100}, wall_time_s=1.0))


def end_of_sweep(sweep_dir: Path, *logger: str) -> None:
    from regexp.sweep import SweepSummary

    from omegaconf import OmegaConf

    logger_node = OmegaConf.to_container(compose_train(list(logger)).logger)  # as the user chose it
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "logger": logger_node}))


@pytest.mark.parametrize("failed", [False, True])
def test_a_wandb_error_at_the_sweeps_end_is_one_warning_and_keeps_the_exit(tmp_path, capsys, monkeypatch, failed):
    from regexp import wandb_logger
    from regexp.sweep import SweepFailed

    def refuse(*args, **kwargs):
        raise RuntimeError("upload refused\ntraceback...")

    monkeypatch.setattr(wandb_logger, "init_run", refuse)
    finished_sweep(tmp_path / "sweep", ("completed", "failed" if failed else "completed"))
    if failed:  # the failed job still fails the sweep (exit 1), as without W&B
        with pytest.raises(SweepFailed):
            end_of_sweep(tmp_path / "sweep", "logger.mode=offline")
    else:
        end_of_sweep(tmp_path / "sweep", "logger.mode=offline")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning" in line]
    assert warnings == ["warning: W&B: the sweep's compare table was not logged (upload refused)"]
    assert not (tmp_path / "sweep" / "wandb").exists()


@pytest.mark.parametrize("logger", [["logger=none"], ["logger.mode=disabled"], []])  # [] : WANDB_MODE=disabled (conftest)
def test_no_sweep_table_when_wandb_is_off(tmp_path, capsys, monkeypatch, logger):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would raise
    finished_sweep(tmp_path / "sweep")
    end_of_sweep(tmp_path / "sweep", *logger)
    out = capsys.readouterr().out
    assert "4 completed" in out and "W&B" not in out and "warning" not in out
    assert not (tmp_path / "sweep" / "wandb").exists()
