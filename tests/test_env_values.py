"""Values from the environment are text, resolved once, and never recorded: summary.json, the
checkpoint, `.hydra/` and W&B's config hold `${oc.env:NAME}` as written, whatever the variable's
name; the run dir's path is resolved once (the dir locked, written and recorded are one); the
W&B agent's WANDB_SWEEP_ID / WANDB_RUN_ID are checked in the pre-flight."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import REGEXP, TINY, compose_train, run_cli, summaries
from test_wandb import inspect, wandb_env  # noqa: F401  (wandb_env: a fixture)

from regexp.compose import compose, compose_and_validate, hydra_quoted, initialized
from regexp.config import ConfigError, check_wandb_ids, recorded_container, validate

# Variables whose names say nothing of a secret, but whose values are
SECRETS = {"DATABASE_URL": "postgres://u:dbVALUE1@db/x", "SLACK_WEBHOOK_URL": "https://hooks/slackVALUE2",
           "MY_PW": "pwVALUE3", "SESSION_COOKIE": "cookieVALUE4"}
VALUES = ["dbVALUE1", "slackVALUE2", "pwVALUE3", "cookieVALUE4"]  # a part of each value, to look for
SWEEP_DIR = "hydra.run.dir=outputs/wandb-sweeps/${oc.env:WANDB_SWEEP_ID}/${oc.env:WANDB_RUN_ID}"  # the shipped sweeps'


@pytest.fixture
def secrets(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def leaks(text: str) -> list[str]:
    return [v for v in VALUES if v in text]


# ---------------------------------------------------------------- recorded as written, resolved in memory
def test_records_hold_environment_interpolations_as_written_whatever_the_name(secrets):
    cfg = compose_and_validate(["logger.project=p-${oc.env:SESSION_COOKIE}", "logger.tags=[${oc.env:MY_PW},plain]",
                                "logger.entity='${oc.env:NOPE_UNSET,${oc.env:DATABASE_URL}}'",
                                "dataset.root=${oc.env:SLACK_WEBHOOK_URL}", "eval_batch_size=${batch_size}"])
    recorded = recorded_container(cfg)
    assert not leaks(json.dumps(recorded))
    assert recorded["logger"]["project"] == "p-${oc.env:SESSION_COOKIE}"
    assert recorded["logger"]["tags"] == ["${oc.env:MY_PW}", "plain"]
    assert recorded["logger"]["entity"] == "${oc.env:NOPE_UNSET,${oc.env:DATABASE_URL}}"
    assert recorded["dataset"]["root"] == "${oc.env:SLACK_WEBHOOK_URL}"
    assert recorded["eval_batch_size"] == 128  # other interpolations resolve, typed
    assert cfg.logger.project == "p-cookieVALUE4" and cfg.dataset.root == SECRETS["SLACK_WEBHOOK_URL"]  # in memory


def test_a_value_reached_through_another_key_is_recorded_as_its_interpolation(monkeypatch):
    monkeypatch.setenv("REGEXP_SEED", "7")
    cfg = compose_and_validate(["seed=${oc.env:REGEXP_SEED}", "logger.tags=[s${seed}]"])
    assert cfg.seed == 7 and list(cfg.logger.tags) == ["s7"]
    recorded = recorded_container(cfg)
    assert recorded["seed"] == "${oc.env:REGEXP_SEED}" and recorded["logger"]["tags"] == ["s${oc.env:REGEXP_SEED}"]


def test_a_value_from_the_environment_is_text_resolved_once(monkeypatch):
    """A variable holding `${oc.env:OTHER}` is that text, never OTHER's value."""
    monkeypatch.setenv("REGEXP_OTHER", "otherVALUE")
    monkeypatch.setenv("REGEXP_TEXT", "${oc.env:REGEXP_OTHER}")
    cfg = compose_and_validate(["logger.project=${oc.env:REGEXP_TEXT}"])
    assert cfg.logger.project == "${oc.env:REGEXP_OTHER}"
    assert recorded_container(cfg)["logger"]["project"] == "${oc.env:REGEXP_TEXT}"


@pytest.mark.parametrize("text", ["out/${oc.env:REGEXP_OTHER}", "a\\${x}", "a\\\\${oc.env:HOME}", "it's ${now:%Y}\\"])
def test_a_path_resolved_once_is_handed_to_hydra_as_its_text(monkeypatch, text):
    """The pre-flight resolves the run dir once and passes it quoted: Hydra must not resolve it again."""
    monkeypatch.setenv("REGEXP_OTHER", "otherVALUE")
    with initialized():
        assert compose([f"hydra.run.dir={hydra_quoted(text)}"], with_hydra=True).hydra.run.dir == text


def test_a_jobs_override_lines_and_run_name_are_read_as_given(secrets):
    """Hydra keeps the override lines as config strings: read plainly, they would resolve."""
    from omegaconf import OmegaConf

    from regexp.compose import run_name, task_overrides

    hydra_cfg = OmegaConf.create({"overrides": {"task": ["logger.tags=[${oc.env:MY_PW}]"]},
                                  "job": {"override_dirname": "logger.tags=[${oc.env:MY_PW}]"}})
    assert list(hydra_cfg.overrides.task) == ["logger.tags=[pwVALUE3]"]  # what a plain read gives
    assert task_overrides(hydra_cfg) == ["logger.tags=[${oc.env:MY_PW}]"]
    assert run_name(hydra_cfg) == "logger.tags=[${oc.env:MY_PW}]"


def test_a_secret_named_variable_outside_the_recorded_values_is_allowed_and_not_recorded(monkeypatch):
    """Only where a value is recorded as a value (the run dir's path, W&B's names) does a name matter."""
    monkeypatch.setenv("REGEXP_API_TOKEN", "tokenVALUE")
    cfg = compose_and_validate(["dataset.root=${oc.env:REGEXP_API_TOKEN}"])
    assert cfg.dataset.root == "tokenVALUE"
    assert "tokenVALUE" not in json.dumps(recorded_container(cfg))


def test_resume_compares_the_interpolation_as_written_and_takes_the_new_value(monkeypatch):
    from regexp.train import check_checkpoint_fits

    monkeypatch.setenv("REGEXP_WD", "0.01")
    state = {"config": recorded_container(compose_and_validate(["optimizer.weight_decay=${oc.env:REGEXP_WD}"]))}
    monkeypatch.setenv("REGEXP_WD", "0.02")
    cfg = compose_and_validate(["optimizer.weight_decay=${oc.env:REGEXP_WD}"])
    check_checkpoint_fits(Path("run/checkpoint.pt"), state, cfg)  # the same as written: it fits
    assert cfg.optimizer.weight_decay == 0.02
    with pytest.raises(ConfigError, match=r"^optimizer\.weight_decay=0\.02: the run in run was trained with "
                                          r"optimizer\.weight_decay=\$\{oc\.env:REGEXP_WD\}"):
        check_checkpoint_fits(Path("run/checkpoint.pt"), state, compose_and_validate(["optimizer.weight_decay=0.02"]))


# ---------------------------------------------------------------- the W&B agent's ids
BAD_IDS = [("../../x", "../../x"), ("a/b", "a/b"), ("", ""), ("x" * 300, "x" * 32 + "... (300 characters)"),
           ("${oc.env:HOME}", "${oc.env:HOME}"), ("..", ".."), (" run1", " run1"), ("a\\b", "a\\b"),
           ("run\x1b[31m", "'run\\x1b[31m'"), ("50%", "50%")]


@pytest.mark.parametrize("variable", ["WANDB_RUN_ID", "WANDB_SWEEP_ID"])
@pytest.mark.parametrize("value,shown", BAD_IDS)
def test_a_wandb_id_that_w_and_b_or_a_path_part_refuses_is_one_line(monkeypatch, variable, value, shown):
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp1")
    monkeypatch.setenv("WANDB_RUN_ID", "run1")
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("HOME", "/home/homeVALUE")
    with pytest.raises(ConfigError) as refused:
        check_wandb_ids()
    message = str(refused.value)
    assert message.startswith(f"{variable}={shown}: a W&B id must be 1 to 128 printable characters")
    assert "\n" not in message and "homeVALUE" not in message


@pytest.mark.parametrize("value", ["run456", "a1b2c3d4", "my-run_7.x", "x" * 128])
def test_w_and_b_ids_stay_allowed(monkeypatch, value):
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp123")
    monkeypatch.setenv("WANDB_RUN_ID", value)
    with initialized():
        cfg = compose([SWEEP_DIR], with_hydra=True)
        compose_and_validate([])
    assert cfg.hydra.run.dir == f"outputs/wandb-sweeps/swp123/{value}"


# ---------------------------------------------------------------- W&B offline: one line, where and how to sync
def test_an_offline_wandb_run_says_where_it_is_and_how_to_sync_it(tmp_path, monkeypatch):
    from regexp.wandb_logger import wandb_sinks

    sync_dir = str(tmp_path / "wandb" / "offline-run-1-abc")
    run = types.SimpleNamespace(offline=True, settings=types.SimpleNamespace(sync_dir=sync_dir), id="abc",
                                define_metric=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run, Settings=dict))
    monkeypatch.setenv("WANDB_MODE", "offline")
    lines, warnings = [], []
    cfg = validate(compose_train([]))
    [sink] = wandb_sinks(cfg, {}, tmp_path, "name", "group", types.SimpleNamespace(line=lines.append, warn=warnings.append))
    assert sink.run is run and warnings == []
    assert lines == [f"W&B logged offline to {sync_dir}; upload it with: wandb sync {sync_dir}"]


# ---------------------------------------------------------------- end to end: the CLI, its files, W&B
def tree_leaks(root: Path, skip: str = "/wandb/") -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and skip not in str(p) and leaks(p.read_bytes().decode("latin-1"))]


@pytest.mark.slow
def test_cli_records_no_environment_value_whatever_the_name(tmp_path, data_root, wandb_env, secrets, monkeypatch):  # noqa: F811
    import torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = run_cli(["train", *TINY, "logger.project=${oc.env:SESSION_COOKIE}", "hydra.run.dir=run",
                   "logger.tags=[${oc.env:SLACK_WEBHOOK_URL},${oc.env:MY_PW},${oc.env:DATABASE_URL}]"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    [sync_dir] = (run_dir / "wandb").glob("offline-run-*")
    assert f"W&B logged offline to {sync_dir}; upload it with: wandb sync {sync_dir}" in out.stdout
    assert not leaks(out.stdout + out.stderr)
    # summary.json, checkpoint.pt, best.pt, .hydra/*, train.log, metrics: none holds a value
    assert {"summary.json", "checkpoint.pt", "train.log"} <= {p.name for p in run_dir.iterdir()}
    assert tree_leaks(tmp_path) == []
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]
    assert checkpoint["logger"]["tags"] == ["${oc.env:SLACK_WEBHOOK_URL}", "${oc.env:MY_PW}", "${oc.env:DATABASE_URL}"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["logger"]["project"] == "${oc.env:SESSION_COOKIE}"
    assert "logger.project=${oc.env:SESSION_COOKIE}" in summary["overrides"]
    # W&B's config record: as written; the project and tags are W&B's uses of the values
    _, run = inspect(run_dir)
    assert not leaks(json.dumps(run["config"])) and run["config"]["logger"]["project"] == "${oc.env:SESSION_COOKIE}"
    assert run["project"] == "cookieVALUE4" and SECRETS["MY_PW"] in run["tags"]


@pytest.mark.slow
@pytest.mark.parametrize("run_id", ["../../x", "a/b", "", "x" * 300, "${oc.env:REGEXP_SECRET_OTHER}"])
def test_cli_refuses_a_bad_wandb_run_id_and_writes_nothing(tmp_path, data_root, run_id):
    env = dict(os.environ, WANDB_SWEEP_ID="swp1", WANDB_RUN_ID=run_id, REGEXP_SECRET_OTHER="otherVALUE",
               REGEXP_DATA_DIR=str(data_root))
    out = subprocess.run([REGEXP, "train", SWEEP_DIR, *TINY, "logger=none"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.splitlines()
    assert line.startswith("regexp: error: WANDB_RUN_ID=") and "a W&B id must be" in line and "otherVALUE" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_locks_writes_and_records_one_run_dir_resolved_once(tmp_path, data_root, monkeypatch):
    """A run dir name holding `${` is refused (Hydra would resolve it again); a plain one is
    the dir locked, written and recorded."""
    monkeypatch.setenv("REGEXP_OTHER", "otherVALUE")
    monkeypatch.setenv("REGEXP_NAME", "${oc.env:REGEXP_OTHER}")
    out = run_cli(["train", *TINY, "logger=none", "hydra.run.dir=out/${oc.env:REGEXP_NAME}"], tmp_path, data_root)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert out.stderr.startswith("regexp: error: hydra.run.dir=out/${oc.env:REGEXP_OTHER}: resolves to ")
    assert "otherVALUE" not in out.stderr
    monkeypatch.setenv("REGEXP_NAME", "named")
    out = run_cli(["train", *TINY, "logger=none", "hydra.run.dir=out/${oc.env:REGEXP_NAME}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s["run_dir"] for s in summaries(tmp_path)] == [str(tmp_path / "out" / "named")]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["named"]


@pytest.mark.slow
def test_cli_resume_with_a_changed_variable_continues_with_its_new_value(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("REGEXP_WD", "0.0")
    first = [*TINY, "logger=none", "max_steps=2", "optimizer.weight_decay=${oc.env:REGEXP_WD}", "hydra.run.dir=run"]
    assert run_cli(["train", *first], tmp_path, data_root).returncode == 0
    monkeypatch.setenv("REGEXP_WD", "0.01")
    out = run_cli(["train", f"resume={tmp_path / 'run'}", "max_steps=4"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    [summary] = summaries(tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["config"]["optimizer"]["weight_decay"] == "${oc.env:REGEXP_WD}"


@pytest.mark.slow
def test_cli_fused_sweep_records_no_environment_value_and_says_where_each_offline_run_is(
        tmp_path, data_root, wandb_env, secrets, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = run_cli(["train", "-m", *TINY, "hydra/launcher=fused", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep",
                   "logger.tags=[${oc.env:MY_PW}]"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not leaks(out.stdout + out.stderr) and tree_leaks(tmp_path) == []  # summaries, job records, .hydra, logs
    assert out.stdout.count("W&B logged offline to ") == 3  # each job's run, and the sweep's compare table
    for summary in summaries(tmp_path / "sweep"):
        assert summary["fused"]["models"] == 2 and summary["config"]["logger"]["tags"] == ["${oc.env:MY_PW}"]
