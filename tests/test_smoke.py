"""`smoke=true`: a couple of steps, one validation and one test batch through the whole pipeline
(the real CLI on MNIST, W&B offline), marked smoke; compare, report, plot and the sweep summary
count smoke runs and never average them with real ones."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REGEXP, TINY, compose_train, refused, require_shared_data, run_cli, snapshot
from test_compare import make_run
from test_report import regularized_run
from test_sweep_summary import end_of_sweep, job, rows_of
from test_wandb import inspect

from regexp import comparison as compare
from regexp import plotting
from regexp.comparison import comparison, group_rows
from regexp.config import validate
from regexp.report import report_page
from regexp.rundir import Status, Summary
from regexp.sweep import SWEEP_SUMMARY, start_records
from regexp.train import SMOKE_STEPS, Plan


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """One smoke run of the default config through the real CLI, W&B offline (no account, its
    files in the temp dir), with max_steps and epochs set: smoke wins. (run dir, its console)."""
    data_root, root = require_shared_data(), tmp_path_factory.mktemp("smoke")
    home = root / "wandb-home"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update({var: str(home / var.lower()) for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                                          "WANDB_DATA_DIR")})
    env.update(NETRC=str(home / "netrc"), REGEXP_DATA_DIR=str(data_root), COLUMNS="300",
               REGEXP_CACHE_DIR=str(root / "cache"))
    out = subprocess.run([REGEXP, "train", "smoke=true", "max_steps=100", "epochs=3", "out_dir=runs"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    [summary] = list((root / "runs").rglob("summary.json"))
    return summary.parent, out.stdout


def test_a_smoke_run_goes_through_the_whole_pipeline(smoke_run):
    run_dir, console = smoke_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["smoke"] is True and summary["config"]["smoke"] is True
    assert summary["steps"] == SMOKE_STEPS == 2 and summary["epochs_completed"] == 0  # two steps of an epoch of 430
    assert {"train/loss", "val/acc", "test/acc"} <= set(summary["metrics"]) and "findings" in summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # each step a record
    assert [r["epoch"] for r in rows if "val/acc" in r] == [1]  # one evaluation
    for name in ("checkpoint.pt", "diagnosis.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert "55000 train / 1024 val / 1024 test" in console  # one validation and one test batch (eval_batch_size)
    assert "2 steps (smoke)" in console and "set aside: epochs=3, max_steps=100," in console
    assert "smoke run (smoke=true): 2 optimizer steps" in console


def test_a_smoke_run_is_tagged_smoke_in_wandb_with_it_in_its_config(smoke_run):
    _, run = inspect(smoke_run[0])
    assert "smoke" in run["tags"] and run["config"]["smoke"] is True and run["summary"]["smoke"] is True


def test_smoke_is_far_shorter_than_the_run_it_tries(data_root):
    """The default config's plan against its smoke run's: steps and evaluations, not seconds."""
    real, smoke = (validate(compose_train([f"dataset.root={data_root}", *extra])) for extra in ([], ["smoke=true"]))
    full, tried = Plan.from_config(real, 55000), Plan.from_config(smoke, 55000)
    assert (full.total_steps, full.epochs, full.log_every) == (4300, 10, 50)
    assert (tried.total_steps, tried.epochs, tried.log_every, tried.eval_every) == (2, 1, 1, 1)


@pytest.mark.parametrize("extra, train_samples, epochs", [
    (["accumulation=steps", "accumulation.steps=3"], 55000, 1),  # 2 windows of 3 micro-batches
    (["max_steps=1", "checkpoint.every_steps=1"], 100, 2),  # an epoch of one window: two epochs
])
def test_smoke_takes_two_optimizer_steps_whatever_the_epoch_holds(data_root, extra, train_samples, epochs):
    cfg = validate(compose_train([f"dataset.root={data_root}", "smoke=true", *extra]))
    plan = Plan.from_config(cfg, train_samples)
    assert plan.total_steps == 2 and plan.epochs == epochs and plan.checkpoint_every is None


def test_smoke_with_resume_auto_is_refused_and_nothing_written(capsys, empty_cwd):
    line = refused(capsys, ["train", "smoke=true", "resume=auto", "out_dir=runs"])
    assert line.startswith("regexp: error: resume=auto: smoke=true") and "never continued" in line
    assert list(empty_cwd.iterdir()) == []


def test_a_smoke_runs_dir_is_never_resumed(smoke_run, capsys, empty_cwd):
    """resume= takes the run's recorded overrides, smoke=true among them."""
    run_dir = smoke_run[0]
    before = snapshot(run_dir)
    line = refused(capsys, ["train", f"resume={run_dir}"])
    assert line.startswith(f"regexp: error: resume={run_dir}: smoke=true") and snapshot(run_dir) == before


def test_an_old_summary_without_smoke_reads_as_a_real_run(tmp_path):
    assert Summary.from_dict({"status": "completed"}).smoke is None
    assert "smoke" not in Summary().to_dict() and Summary(smoke=True).to_dict()["smoke"] is True


# ---------------------------------------------------------------- compare, report, plot
def two_real_one_smoke(root: Path) -> None:
    """Group l2: two real runs (0.90, 0.80) and a smoke run (0.10); group dropout: a smoke run alone."""
    regularized_run(root, "a", "l2", 0, 0.90)
    regularized_run(root, "b", "l2", 1, 0.80)
    regularized_run(root, "c", "l2", 2, 0.10, smoke=True)
    regularized_run(root, "d", "dropout", 0, 0.20, smoke=True)


def test_compare_averages_real_runs_only_and_counts_smoke_runs(tmp_path, capsys):
    two_real_one_smoke(tmp_path)
    result = comparison([tmp_path], None, "test/acc")
    l2, dropout = result.groups  # a group of smoke runs alone has no mean: last
    assert l2.label == "regularizer=l2" and dropout.label == "regularizer=dropout"
    assert l2.stat("test/acc").mean == pytest.approx(0.85) and l2.stat("test/acc").n == 2
    assert l2.stat("test/acc").std == pytest.approx(0.0707107, rel=1e-5)
    assert l2.statuses() == {"completed": 2, "smoke": 1} and dropout.statuses() == {"smoke": 1}
    assert dropout.stat("test/acc").n == 0 and dropout.stat("test/acc").mean is None
    columns, rows = group_rows(result, "test/acc")
    by_group = {row[0]: dict(zip(columns, row)) for row in rows}
    assert by_group["l2"]["statuses"] == "2 completed; 1 smoke (not averaged)" and by_group["l2"]["n"] == 2
    assert by_group["dropout"]["mean"] is None and by_group["dropout"]["statuses"] == "1 smoke (not averaged)"

    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(others and smoke runs counted, not averaged)" in out and "0.8500 ± 0.0707 (n=2)" in out
    assert "1 smoke (not averaged)" in out
    assert f"  smoke, completed: {tmp_path / 'c'}  (a smoke run: never averaged)" in out

    assert compare.main([str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    runs = {Path(r["run_dir"]).name: r for r in data["runs"]}
    assert [runs[n]["in_means"] for n in "abcd"] == [True, True, False, False]
    assert runs["c"]["smoke"] is True and "smoke" not in runs["a"]


def test_a_smoke_run_joins_its_configs_group(tmp_path):
    """smoke=true is no experiment key: the smoke try of a config sits in that config's group."""
    make_run(tmp_path, "real", ["seed=0"], metrics={"test/acc": 0.9}, config={"seed": 0, "smoke": False})
    make_run(tmp_path, "smoke", ["seed=0", "smoke=true"], metrics={"test/acc": 0.1}, config={"seed": 0, "smoke": True})
    summary = tmp_path / "smoke" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "smoke": True}))
    [group] = comparison([tmp_path], None, "test/acc").groups
    assert group.stat("test/acc").mean == 0.9 and group.statuses() == {"completed": 1, "smoke": 1}


def test_report_and_plots_never_average_or_show_a_smoke_run(tmp_path):
    two_real_one_smoke(tmp_path)
    result = comparison([tmp_path], None, "test/acc")
    l2, dropout = result.groups
    page = report_page(result, "test/acc", [tmp_path])
    assert "0.8500 ± 0.0707 (n=2)" in page and "1 smoke (not averaged)</span>" in page
    assert "completed (smoke)" in page and "a smoke run: never averaged" in page
    curves = plotting.trained_curves(result.groups, ["val/acc"], lambda run_dir, e: None)
    assert sorted(path.name for path in curves) == ["a", "b"]
    assert plotting.median_run(l2, "test/acc").run_dir.name == "b" and plotting.median_run(dropout, "test/acc") is None
    run, why = plotting.shown_run(dropout, "test/acc")
    assert run.run_dir.name == "d" and why.startswith("no completed run but smoke runs; shown: the longest run")


# ---------------------------------------------------------------- the sweep summary
def test_the_sweep_summary_marks_and_counts_smoke_runs(tmp_path, capsys):
    start_records(tmp_path, None)
    for n in (0, 1):
        job(tmp_path, n, [f"seed={n}", "smoke=true"],
            Summary(status=Status.COMPLETED, metrics={"test/acc": 0.4}, wall_time_s=3.0, smoke=True))
    job(tmp_path, 2, ["seed=2", "smoke=false"], Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9}))
    end_of_sweep(tmp_path)
    written = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert written["smoke"] == 2 and [r["smoke"] for r in rows_of(tmp_path)] == [True, True, False]
    out = capsys.readouterr().out
    assert "3 jobs, 0 failed (3 completed; 2 smoke runs, not averaged)" in out
    assert out.count("completed (smoke)") == 2


# ---------------------------------------------------------------- through the real CLI, at length
@pytest.mark.slow
def test_compare_of_two_real_runs_and_a_smoke_run_through_the_cli(tmp_path, data_root):
    for seed, extra in ((0, []), (1, []), (2, ["smoke=true"])):
        out = run_cli(["train", *TINY, "logger=none", f"hydra.run.dir=runs/{seed}", f"seed={seed}", *extra], tmp_path,
                      data_root)
        assert out.returncode == 0, out.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")}
    assert summaries["2"]["smoke"] is True and summaries["2"]["steps"] == 2 and "smoke" not in summaries["0"]
    real = [summaries[s]["metrics"]["test/acc"] for s in ("0", "1")]
    before = snapshot(tmp_path / "runs")
    out = run_cli(["train", f"resume={tmp_path / 'runs' / '0'}", "smoke=true"], tmp_path)  # a real run's dir
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"regexp: error: resume={tmp_path / 'runs' / '0'}: smoke=true (given, or recorded by the smoke run resumed) "
        "always starts afresh: a smoke run is never continued; drop resume=, or leave out smoke=true"]
    assert snapshot(tmp_path / "runs") == before
    out = run_cli(["compare", "runs", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    [group] = json.loads(out.stdout)["groups"]
    assert group["runs"] == 3 and group["statuses"] == {"completed": 2, "smoke": 1}
    assert group["stats"]["test/acc"]["n"] == 2 and group["stats"]["test/acc"]["mean"] == pytest.approx(sum(real) / 2)


@pytest.mark.slow
def test_a_fused_smoke_sweep_is_marked_in_its_summary(tmp_path, data_root):
    sweep_dir = tmp_path / "sweep"
    out = run_cli(["train", "-m", "smoke=true", "logger=none", "hydra/launcher=fused", f"hydra.sweep.dir={sweep_dir}",
                   "seed=0,1"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused: jobs 0-1 train as one group of 2 models" in out.stdout
    written = json.loads((sweep_dir / SWEEP_SUMMARY).read_text())
    assert written["smoke"] == 2 and all(r["smoke"] and r["status"] == "completed" for r in written["rows"])
    for n in (0, 1):
        summary = json.loads((sweep_dir / str(n) / "summary.json").read_text())
        assert summary["smoke"] is True and summary["steps"] == 2 and summary["fused"]["models"] == 2
    assert "2 smoke runs, not averaged" in out.stdout
