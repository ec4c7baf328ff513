"""What a new user trips on: flags where Hydra wants overrides, flags after the overrides, a
launcher or sweeper whose extra is not installed, a sweep without its data, and the docs'
examples and lists against what the program really prints and writes."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from conftest import REGEXP, REPO, TINY, refused, run_cli, summaries

from regexp import cli
from regexp.compose import PLUGIN_EXTRAS


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("args,line", [
    (["--epochs", "1"], "--epochs 1: not a flag of regexp train; write it as an override: epochs=1"),
    (["--lr=3"], "--lr=3: not a flag of regexp train; write it as an override: lr=3"),
    (["seed=0", "--max-steps", "5", "-m"], "--max-steps 5: not a flag of regexp train; write it as an override: max_steps=5"),
    (["--epochs", "seed=1"], "--epochs: not a flag of regexp train; write it as an override: epochs=VALUE"),
    (["--cfg", "foo"], "--cfg foo: --cfg takes one of job, hydra, all (regexp train --help)"),
    (["seed=0", "--cfg"], "--cfg: --cfg takes one of job, hydra, all (regexp train --help)"),
    (["--multirun=1"], "--multirun=1: --multirun takes no value (regexp train --help)"),
    (["-m", "seed=0,1", "--cfg", "job"], "-m --cfg: one of these at most (regexp train --help); to print a sweep "
     "job's config, drop -m and give one value of each swept key (e.g. regexp train --cfg job seed=0)"),
    (["seed=1", "foo"], "foo: neither an override nor a flag; overrides are key=value or group=option (regexp train --help)"),
    (["--", "seed=1"], "--: not a flag of regexp train (regexp train --help)"),
])
def test_a_word_that_is_no_flag_is_one_line_and_nothing_is_written(capsys, empty_cwd, args, line):
    assert refused(capsys, ["train", *args]) == f"regexp: error: {line}"
    assert not any(empty_cwd.iterdir())  # no outputs/<date>/<time>/ left behind


def test_flags_go_first_with_their_values_wherever_they_stand():
    assert cli.flags_first(["seed=0", "-m", "optimizer.lr=1,2"]) == ["-m", "seed=0", "optimizer.lr=1,2"]
    assert cli.flags_first(["seed=0", "--cfg=job", "--resolve"]) == ["--cfg", "job", "--resolve", "seed=0"]
    assert cli.flags_first(["--info", "seed=1"]) == ["--info", "seed=1"]  # --info's value is optional
    assert cli.flags_first(["seed=1", "--info", "defaults"]) == ["--info", "defaults", "seed=1"]


def test_cfg_after_the_overrides_prints_the_config_and_writes_nothing(tmp_path):
    out = run_cli(["train", "seed=3", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "seed: 3\n" in out.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_sweep_with_its_flag_after_an_override_runs(tmp_path, data_root):
    out = run_cli(["train", "seed=0", "-m", "optimizer.lr=1e-3,2e-3", *TINY, "logger=none",
                   f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(s["status"] for s in summaries(tmp_path / "sweep")) == ["completed", "completed"]


# ---------------------------------------------------------------- plugins of the extras
@pytest.mark.parametrize("args,plugin,extra", [
    (["-m", "seed=0,1", "hydra/launcher=joblib"], "hydra_plugins.hydra_joblib_launcher", "launchers"),
    (["-m", "seed=0,1", "hydra/launcher=submitit_local"], "hydra_plugins.hydra_submitit_launcher", "launchers"),
    (["-m", "seed=0,1", "hydra/launcher=fused_slurm"], "hydra_plugins.hydra_submitit_launcher", "launchers"),
    (["-m", "hydra/sweeper=tune", "regularizer=dropout"], "hydra_plugins.hydra_optuna_sweeper", "search"),
    (["hydra/sweeper=tune"], "hydra_plugins.hydra_optuna_sweeper", "search"),  # not even a sweep
])
def test_a_preset_without_its_plugin_names_the_extra(capsys, empty_cwd, monkeypatch, args, plugin, extra):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == plugin else find_spec(name, *a))
    choice = next(a for a in args if a.startswith("hydra/"))
    assert refused(capsys, ["train", *args]) == (f"regexp: error: {choice}: needs the Hydra plugin {plugin}, which is "
                                                 f"not installed; pip install 'regexp[{extra}]'")
    assert not any(empty_cwd.iterdir())


def test_each_plugin_preset_names_the_extra_that_installs_it():
    """PLUGIN_EXTRAS against pyproject.toml (the extra lists the plugin's distribution) and
    conf/hydra (every third-party plugin a preset names has its extra)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for plugin, extra in PLUGIN_EXTRAS.items():
        distribution = plugin.split(".")[1].replace("_", "-")  # hydra_plugins.hydra_x_y: the hydra-x-y distribution
        assert any(req.startswith(distribution) for req in extras[extra]), (plugin, extra)
    for preset in sorted((REPO / "conf" / "hydra").glob("*/*.yaml")):
        target = re.search(r"^_target_: (hydra_plugins\.\w+)", preset.read_text(), re.M)
        if preset.parent.name in ("launcher", "sweeper") and target and target[1] != "hydra_plugins.regexp_fused_launcher":
            assert target[1] in PLUGIN_EXTRAS, preset


BLOCKER = '''import os, pkgutil, sys
blocked = os.environ["REGEXP_TEST_BLOCK"].split(",")
def is_blocked(name):
    return any(name == b or name.startswith(b + ".") for b in blocked)
class Block:  # as if the package were not installed: no import, and Hydra's plugin scan does not see it
    def find_spec(self, name, path=None, target=None):
        if is_blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
walk = pkgutil.walk_packages
pkgutil.walk_packages = lambda *a, **k: (m for m in walk(*a, **k) if not is_blocked(m.name))
'''


@pytest.mark.slow
@pytest.mark.parametrize("choice,blocked,extra", [
    ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher,joblib", "launchers"),
    ("hydra/sweeper=tune", "hydra_plugins.hydra_optuna_sweeper,optuna", "search"),
])
def test_a_missing_extra_in_a_real_command_is_one_line(tmp_path, data_root, choice, blocked, extra):
    """The extra uninstalled for the command's process only (a sitecustomize hides it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root), REGEXP_TEST_BLOCK=blocked,
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([REGEXP, "train", "-m", "seed=0,1", *TINY, choice], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    plugin = blocked.split(",")[0]
    assert out.stderr == (f"regexp: error: {choice}: needs the Hydra plugin {plugin}, which is not installed; "
                          f"pip install 'regexp[{extra}]'\n")
    assert not any(cwd.iterdir())  # no sweep dir, no .sweep/plan.json


# ---------------------------------------------------------------- a sweep's data
def test_a_sweep_whose_every_job_lacks_its_data_is_refused_once(tmp_path, empty_cwd):
    from regexp.rundir import ConfigError

    nothing = tmp_path / "no-data"
    nothing.mkdir()
    with pytest.raises(ConfigError) as refusal:
        cli.precheck(["seed=0,1,2", "dataset=mnist,fashion_mnist", f"dataset.root={nothing}", "dataset.download=false"],
                     multirun=True)
    assert str(refusal.value).startswith(f"dataset.root={nothing}: no mnist files found at {nothing}")
    assert not any(empty_cwd.iterdir()) and not any(nothing.iterdir())


def test_a_sweep_in_which_some_jobs_have_their_data_passes_the_preflight(tmp_path, empty_cwd, data_root):
    some = tmp_path / "some-data"
    some.mkdir()
    (some / "MNIST").symlink_to(data_root / "MNIST")
    out_dir, *_ = cli.precheck([*TINY, "dataset=fashion_mnist,mnist", f"dataset.root={some}", "dataset.download=false"],
                               multirun=True)
    assert out_dir is not None  # the jobs run; the one without its data fails alone
    assert not any(empty_cwd.iterdir())


@pytest.mark.slow
def test_a_sweep_without_its_data_is_one_line_exit_2_and_nothing_written(tmp_path):
    nothing = tmp_path / "no-data"
    nothing.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = run_cli(["train", "-m", "seed=0,1,2,3,4,5,6,7", *TINY, "dataset.download=false"], cwd, nothing)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (f"regexp: error: dataset.root={nothing}: no mnist files found at {nothing} (expected e.g. "
                          f"{nothing}/MNIST/raw/train-images-idx3-ubyte) and dataset.download=false; copy the data set "
                          "there, or point REGEXP_DATA_DIR or dataset.root at a copy, or set dataset.download=true\n")
    assert not any(cwd.iterdir()) and not any(nothing.iterdir())


@pytest.mark.slow
def test_a_job_without_its_data_fails_alone(tmp_path, data_root):
    some = tmp_path / "some-data"
    some.mkdir()
    (some / "MNIST").symlink_to(data_root / "MNIST")
    out = run_cli(["train", "-m", "dataset=mnist,fashion_mnist", *TINY, "logger=none", "dataset.download=false",
                   f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, some)
    assert out.returncode == 1, out.stderr[-3000:]
    statuses = {s["overrides"][0]: s["status"] for s in summaries(tmp_path / "sweep")}
    assert statuses == {"dataset=mnist": "completed", "dataset=fashion_mnist": "failed"}
    assert "no fashion_mnist files found" not in out.stderr  # once in its job's line as it fails, once under the table
    assert out.stdout.count("no fashion_mnist files found") == 2, out.stdout[-3000:]
    assert "[2/2] job 1 (dataset=fashion_mnist): failed · ConfigError: dataset.root=" in out.stdout


# ---------------------------------------------------------------- the docs against the program
def console_examples() -> list[tuple[str, str, str]]:
    """(page, command, its printed lines) of each `$ regexp ...` line of the console blocks of
    README.md and docs/*.md."""
    examples = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```console\n(.*?)```", page.read_text(), re.S):
            for command, printed in re.findall(r"^\$ (regexp .*)\n((?:(?!\$ ).*\n)*)", block, re.M):
                examples.append((page.name, command, printed))
    return examples


@pytest.mark.slow
@pytest.mark.parametrize("page,command,printed", console_examples(), ids=lambda x: x if "\n" not in x else "")
def test_each_console_example_prints_what_the_program_prints(tmp_path, page, command, printed):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "12-00-00"  # the run dir docs/configuration.md shows refused
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- +hydra.callbacks.x._target_=builtins.open\n")
    env = {k: v for k, v in os.environ.items() if k != "NOPE"}
    out = subprocess.run([REGEXP, *shlex.split(command)[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout + out.stderr == printed, f"{page}: $ {command}"


@pytest.mark.slow
def test_the_metric_names_page_lists_every_name_a_run_writes(tmp_path, data_root):
    """docs/diagnostics.md's table against metrics.jsonl and summary.json of a real run with
    every optional series on (a penalty, clipping)."""
    out = run_cli(["train", *TINY, "epochs=2", "max_steps=16", "logger=none", "+regularizer=l2", "clip=norm",
                   f"hydra.run.dir={tmp_path}/run"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    written = {k for row in rows for k in row} | set(json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"])
    assert {"epoch/train_loss", "train/penalty", "grad/clip_frac"} <= written  # the run wrote what it was meant to
    table = (REPO / "docs" / "diagnostics.md").read_text().split("## Metric names", 1)[1].split("\n## ", 1)[0]
    listed = [name for line in table.splitlines() if line.startswith("| `")
              for name in re.findall(r"`([^`]+)`", line.split(" | ")[0])]
    patterns = [re.compile(re.escape(name).replace(re.escape("<layer>"), ".+") + "$") for name in listed]
    unlisted = sorted(k for k in written - {"step", "epoch"} if not any(p.match(k) for p in patterns))
    assert unlisted == []


# ---------------------------------------------------------------- scripts
def test_reproduce_list_speaks_of_nothing_users_do_not_have():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "--list"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cnn_cifar10" in out.stdout
    assert not re.search(r"\bseed'?s'? (SimpleCNN|recipe|loop)", out.stdout), out.stdout


def test_bench_quick_says_it_is_a_smoke_run_and_shows_no_ratio(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "scripts"))
    loop = {"label": "tensor_loop", "samples_per_s": 9000.0, "min": 8000.0, "max": 9500.0, "ratio_vs_dataloader": 35.0,
            "ratio_vs_tensor_loop": 1.0}
    case = {"title": "MNIST MLP", "loops": {"tensor_loop": loop},
            "data": {"dataset": "mnist", "synthetic": False, "train_samples": 256, "epochs": 1, "repeats": 2,
                     "warm_up_samples": 0, "parameters": 1000},
            "overheads": {k: {"paired_time_ratios": [1.5], "time_ratio": 1.5, "overhead_pct": 50.0}
                          for k in ("monitor_default_vs_off", "monitor_full_vs_off")}}
    result = {"command": "bench.py --quick", "quick": True, "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0],
              "oversubscribed": False, "cases": {"mnist_mlp": case},
              "machine": {"cpu": "cpu", "usable_cores": 2, "logical_cores": 2, "torch": "2", "torch_threads": 1, "device": "cpu"}}
    bench.render(result)
    shown = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "smoke run" in shown and "no ratios are shown" in shown
    assert "35" not in shown and "×" not in shown and "vs tensor_loop" not in shown and "compare ratios" not in shown
    bench.render({**result, "quick": False})  # a measurement shows them
    assert "35.00×" in capsys.readouterr().out
