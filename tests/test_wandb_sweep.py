"""W&B Sweeps: the shipped sweep configs, and `regexp train` started the way `wandb agent`
starts it (its environment and its `${args_no_hyphens}` arguments), read back offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, compose_train
from omegaconf import OmegaConf
from test_wandb import inspect, of_type, wandb_env  # noqa: F401  (wandb_env: a fixture)
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib import config_util

from regexp.config import OPTIONAL_GROUPS
from regexp.wandb_sweeps import sweep_configs

CONFIGS = sweep_configs()


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def agent_command(command: list[str], args: dict) -> list[str]:
    """The command line `wandb agent` builds from a sweep config's `command` for one run
    (wandb_agent.Agent._command_run): each `${macro}` item replaced by its list."""
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    macros["env"] = ["/usr/bin/env"]
    line = []
    for item in map(str, sweep_utils.create_sweep_command(command)):
        line += macros.get(item[2:-1]) or [] if item.startswith("${") and item.endswith("}") else [item]
    return line


def run_as_agent(tmp_path: Path, data_root: Path, name: str, args: dict, sweep_id: str, run_id: str):
    """One run of sweep `name`, as `wandb agent <entity>/regexp-sweeps/<sweep_id>` starts it
    (it also writes the run's parameters where WANDB_SWEEP_PARAM_PATH says; wandb.init reads
    them). TINY is appended to keep the run short."""
    param_path = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in args.items()})
    env = dict(os.environ, WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id, WANDB_PROJECT="regexp-sweeps",
               WANDB_SWEEP_PARAM_PATH=str(param_path), WANDB_MODE="offline", REGEXP_DATA_DIR=str(data_root),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = agent_command(load(name)["command"], args)
    out = subprocess.run([*command, *TINY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "wandb-sweeps" / sweep_id / run_id
    return command, json.loads((run_dir / "summary.json").read_text()), inspect(run_dir)


def test_sweep_configs_are_shipped_in_the_package_and_listed(tmp_path):
    assert set(CONFIGS) == {"lr_wd_random", "regularizers_grid"}
    assert all(path.parent == Path(sys.modules["regexp.wandb_sweeps"].__file__).parent for path in CONFIGS.values())
    # from another folder: `python -m` puts the working dir first on sys.path, and the checkout's
    # regexp/ is not the installed package CI tests
    listed = subprocess.run([sys.executable, "-m", "regexp.wandb_sweeps", "regularizers_grid"], capture_output=True,
                            text=True, check=True, cwd=tmp_path).stdout
    assert listed == f"{CONFIGS['regularizers_grid']}\n"
    unknown = subprocess.run([sys.executable, "-m", "regexp.wandb_sweeps", "nope"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert unknown.returncode == 2 and "shipped: lr_wd_random, regularizers_grid" in unknown.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_parameter_is_a_hydra_override_of_regexp_train(name):
    config = load(name)
    assert config["command"][:3] == ["${env}", "regexp", "train"] and config["command"][-1] == "${args_no_hyphens}"
    assert config["project"] == "regexp" and config["metric"]["name"] == "val/acc"
    composed = compose_train([])
    for parameter in config["parameters"]:
        assert not parameter.startswith("+")  # W&B refuses such names; `regularizer=NAME` adds one
        assert parameter in OPTIONAL_GROUPS or OmegaConf.select(composed, parameter) is not None, parameter


@pytest.mark.slow
def test_an_agents_run_is_the_agents_run_with_the_swept_values(tmp_path, data_root, wandb_env):  # noqa: F811
    args = {"optimizer.lr": 0.003, "optimizer.weight_decay": 0.01}
    command, summary, (records, run) = run_as_agent(tmp_path, data_root, "lr_wd_random", args, "swp123", "run456")
    assert command[1:] == ["regexp", "train", "hydra.run.dir=outputs/wandb-sweeps/${oc.env:WANDB_SWEEP_ID}/"
                           "${oc.env:WANDB_RUN_ID}", "optimizer.lr=0.003", "optimizer.weight_decay=0.01"]
    # in effect in the run: its summary.json
    assert summary["status"] == "completed" and summary["wandb_id"] == "run456"
    assert summary["config"]["optimizer"]["lr"] == 0.003 and summary["config"]["optimizer"]["weight_decay"] == 0.01
    # the W&B run is the agent's: its id, its sweep, its project, the swept values in its config
    [meta] = of_type(records, "run")
    assert meta["run_id"] == run["run_id"] == "run456" and meta["sweep_id"] == "swp123"
    assert run["project"] == "regexp-sweeps" and run["state"] == "finished"
    assert run["config"]["optimizer"]["lr"] == 0.003 and run["config"]["optimizer"]["weight_decay"] == 0.01
    assert run["config"]["optimizer.lr"] == 0.003  # the agent's own record of the parameter
    assert 0 <= run["summary"]["val/acc"] <= 1  # the sweep's metric


@pytest.mark.slow
def test_a_grid_run_adds_regularizers_without_a_plus(tmp_path, data_root, wandb_env):  # noqa: F811
    args = {"regularizer": "[dropout,l2]", "seed": 1}
    command, summary, (_, run) = run_as_agent(tmp_path, data_root, "regularizers_grid", args, "grid1", "run7")
    assert "regularizer=[dropout,l2]" in command
    assert summary["config"]["seed"] == 1
    assert summary["config"]["regularizer"]["dropout"]["p"] > 0 and summary["config"]["regularizer"]["l2"]["coef"] > 0
    assert summary["config"]["regularizer"]["l1"] is None
    assert run["run_id"] == "run7" and run["config"]["choices/regularizer"] == "dropout,l2"
