"""The statuses `stopped` (a decisive finding ended the run) and `pruned` (a sweep's pruning
ended it at a rung) in every consumer, on crafted run and sweep dirs (fast tier): `regexp
compare` counts and lists them, never averages them; the sweep summary counts them as
results (exit 0); W&B's summary carries them; the tune preset records them as failed trials;
resume=auto leaves them unless the setting that ended them is off; the help says so."""

import hashlib
import json
import math
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from conftest import run_cli
from test_sweep_summary import end_of_sweep, job, rows_of

from regexp import comparison as compare
from regexp.cli import sweep_objective, usage
from regexp.rundir import Status, Summary, write_summary
from regexp.sweep import SWEEP_SUMMARY, SweepFailed, already_finished, start_records
from regexp.tracking import why_ended

FINDING = {"rule": "no_progress", "title": "loss flat", "step": 40}
RUNG = {"epoch": 1, "metric": "val/loss", "value": 2.0, "threshold": 0.5}


def run_dir(root: Path, name: str, optimizer: str, seed: int, status: str, acc: float, **summary) -> Path:
    """A run dir as `regexp train` leaves it, with its final metrics whatever its status (a
    stopped or pruned run is evaluated, so it has test/acc)."""
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    overrides = [f"optimizer={optimizer}", f"seed={seed}"]
    record = {"status": status, "overrides": overrides, "choices": {"optimizer": optimizer}, "config": {"seed": seed},
              "metrics": {"test/acc": acc, "train/loss": 1 - acc}, "wall_time_s": 10.0, **summary}
    (path / "summary.json").write_text(json.dumps(record))
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    """adam: completed 0.9 and stopped 0.1; sgd: completed 0.8, pruned 0.2, completed 0.7."""
    run_dir(tmp_path, "0", "adam", 0, "completed", 0.9)
    run_dir(tmp_path, "1", "adam", 1, "stopped", 0.1, ended_by=FINDING, wall_time_s=1.0)
    run_dir(tmp_path, "2", "sgd", 0, "completed", 0.8)
    run_dir(tmp_path, "3", "sgd", 1, "pruned", 0.2, ended_by=RUNG, wall_time_s=1.0)
    run_dir(tmp_path, "4", "sgd", 2, "completed", 0.7)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` and its content's hash: what a reader must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- regexp compare
def test_compare_counts_stopped_and_pruned_runs_per_group_and_never_averages_them(runs):
    data = compare.table_data([runs])
    groups = {g["label"]: g for g in data["groups"]}
    assert groups["optimizer=adam"]["statuses"] == {"completed": 1, "stopped": 1}
    assert groups["optimizer=sgd"]["statuses"] == {"completed": 2, "pruned": 1}
    assert groups["optimizer=adam"]["stats"]["test/acc"] == {"mean": 0.9, "std": None, "n": 1, "ci_low": None, "ci_high": None}
    assert groups["optimizer=sgd"]["stats"]["test/acc"]["mean"] == pytest.approx(0.75)
    assert groups["optimizer=sgd"]["stats"]["wall_time_s"]["mean"] == 10.0  # the pruned run's 1 s is not in it
    cut_short = {r["status"]: r for r in data["runs"] if r["status"] in ("stopped", "pruned")}
    assert not cut_short["stopped"]["in_means"] and not cut_short["pruned"]["in_means"]
    assert (cut_short["stopped"]["ended_by"], cut_short["pruned"]["ended_by"]) == (FINDING, RUNG)


def test_compare_lists_each_stopped_or_pruned_run_with_why_it_ended(runs, capsys):
    before = snapshot(runs)
    assert compare.main([str(runs)]) == 0
    out = capsys.readouterr().out
    assert "1 completed, 1 stopped" in out and "2 completed, 1 pruned" in out
    assert f"  stopped: {runs / '1'}  (loss flat at step 40)" in out.splitlines()
    assert f"  pruned: {runs / '3'}  (at epoch 1, val/loss 2 vs threshold 0.5)" in out.splitlines()
    assert snapshot(runs) == before  # a reader writes nothing


def test_a_group_of_only_stopped_and_pruned_runs_has_no_mean_and_ranks_last(tmp_path):
    """Their test/acc of 0.99 would make the best group of a model cut short: it is no mean."""
    run_dir(tmp_path, "0", "adam", 0, "completed", 0.5)
    run_dir(tmp_path, "1", "sgd", 0, "stopped", 0.99, ended_by=FINDING)
    run_dir(tmp_path, "2", "sgd", 1, "pruned", 0.99, ended_by=RUNG)
    groups = compare.table_data([tmp_path])["groups"]
    assert [g["label"] for g in groups] == ["optimizer=adam", "optimizer=sgd"]
    assert groups[1]["stats"]["test/acc"] == {"mean": None, "std": None, "n": 0, "ci_low": None, "ci_high": None}
    assert groups[1]["statuses"] == {"stopped": 1, "pruned": 1}


def test_compare_help_names_stopped_and_pruned_among_the_runs_never_averaged():
    text = " ".join(compare.parser().format_help().split())
    assert "Failed, diverged, stopped, pruned, interrupted and running runs are counted and listed, never averaged" in text


def test_compare_skips_a_stopped_run_whose_ended_by_is_not_an_object_in_one_warning(runs, capsys):
    """Hostile: a summary.json whose ended_by is a string is not a summary: one warning line naming
    the file, the other runs compared, exit 0, nothing written."""
    bad = run_dir(runs, "5", "adam", 2, "stopped", 0.5, ended_by="loss flat")
    before = snapshot(runs)
    assert compare.main([str(runs)]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert warnings == [f"regexp: warning: skipping {bad}: {bad / 'summary.json'}: not a regexp run summary "
                        "(ended_by is a str, not a dict)"]
    assert "1 completed, 1 stopped" in captured.out and str(bad) not in captured.out
    assert snapshot(runs) == before


def test_compare_prints_a_recorded_finding_as_text_never_as_markup(tmp_path, capsys):
    """Hostile: the title in ended_by holds rich markup; it is printed as written, in one line."""
    run_dir(tmp_path, "0", "adam", 0, "completed", 0.5)
    run_dir(tmp_path, "1", "adam", 1, "stopped", 0.5, ended_by={"title": "[bold red]flat[/] [link=x]", "step": 3})
    assert compare.main([str(tmp_path)]) == 0
    assert f"  stopped: {tmp_path / '1'}  ([bold red]flat[/] [link=x] at step 3)" in capsys.readouterr().out.splitlines()


def test_compare_lists_a_stopped_run_without_ended_by_without_a_reason(tmp_path, capsys):
    """Hostile: ended_by missing, or holding keys this version does not know: the line names the
    run and claims no reason."""
    run_dir(tmp_path, "0", "adam", 0, "completed", 0.5)
    run_dir(tmp_path, "1", "adam", 1, "stopped", 0.5)
    run_dir(tmp_path, "2", "adam", 2, "pruned", 0.5, ended_by={"why": "unknown"})
    assert compare.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"  stopped: {tmp_path / '1'}" in lines and f"  pruned: {tmp_path / '2'}" in lines


def test_cli_compare_of_only_a_hostile_stopped_run_is_one_warning_and_exit_2(tmp_path):
    """Hostile: the only run is a stopped one whose ended_by is a list: named in one warning, then
    the one-line error (no runs), exit 2, nothing written in the dir."""
    bad = run_dir(tmp_path / "runs", "0", "adam", 0, "stopped", 0.5, ended_by=["loss flat", 40])
    before = snapshot(tmp_path)
    out = run_cli(["compare", str(tmp_path / "runs")], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"regexp: warning: skipping {bad}: {bad / 'summary.json'}: not a regexp run summary (ended_by is a list, not a dict)",
        f"regexp: error: {tmp_path / 'runs'}: no runs found (no readable summary.json in it or below it)"]
    assert snapshot(tmp_path) == before


def test_a_recorded_finding_with_line_breaks_is_one_line_in_compare_and_the_sweep(tmp_path, capsys):
    """Hostile: a title holding line breaks (a hand-edited summary.json) never splits the line
    that names the run, in compare and under the sweep table; the files stay as they were."""
    title = {"title": "loss\nflat\r\n  again", "step": 7}
    run_dir(tmp_path / "runs", "0", "adam", 0, "completed", 0.5)
    run_dir(tmp_path / "runs", "1", "adam", 1, "stopped", 0.5, ended_by=title)
    before = snapshot(tmp_path / "runs")
    assert compare.main([str(tmp_path / "runs")]) == 0
    assert f"  stopped: {tmp_path / 'runs' / '1'}  (loss flat again at step 7)" in capsys.readouterr().out.splitlines()
    assert snapshot(tmp_path / "runs") == before
    sweep_of(tmp_path / "sweep", Summary(status=Status.STOPPED, ended_by=title))
    end_of_sweep(tmp_path / "sweep")
    assert "job 0 stopped: loss flat again at step 7" in capsys.readouterr().out.splitlines()


def test_why_ended_says_only_what_the_record_holds():
    assert why_ended(FINDING) == "loss flat at step 40"
    assert why_ended({"rule": "vanishing_gradients"}) == "vanishing_gradients"
    assert why_ended(RUNG) == "at epoch 1, val/loss 2 vs threshold 0.5"
    assert why_ended({"metric": "val/loss", "value": 0.25}) == "val/loss 0.25"
    assert why_ended(None) is None and why_ended("loss flat") is None and why_ended({}) is None


# ---------------------------------------------------------------- the sweep summary
def sweep_of(sweep_dir: Path, *summaries: Summary) -> None:
    start_records(sweep_dir, None)
    for n, summary in enumerate(summaries):
        job(sweep_dir, n, [f"seed={n}"], summary)


def test_a_sweep_whose_jobs_stopped_or_were_pruned_completes_and_counts_each_status(tmp_path, capsys):
    sweep_of(tmp_path, Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9}, wall_time_s=4.0),
             Summary(status=Status.STOPPED, metrics={"test/acc": 0.1}, ended_by=FINDING),
             Summary(status=Status.PRUNED, metrics={"test/acc": 0.5}, ended_by=RUNG),
             Summary(status=Status.DIVERGED))
    end_of_sweep(tmp_path)  # no SweepFailed: the CLI exits 0
    written = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert (written["status"], written["jobs"], written["failed"]) == ("completed", 4, 0)
    assert written["statuses"] == {"completed": 1, "stopped": 1, "pruned": 1, "diverged": 1}
    assert [(r["status"], r["ended_by"]) for r in written["rows"]] == [
        ("completed", None), ("stopped", FINDING), ("pruned", RUNG), ("diverged", None)]
    out = capsys.readouterr().out
    assert "4 jobs, 0 failed (1 completed, 1 stopped, 1 pruned, 1 diverged)" in out
    assert "job 1 stopped: loss flat at step 40" in out and "job 2 pruned: at epoch 1, val/loss 2 vs threshold 0.5" in out


def test_stopped_and_pruned_rows_are_yellow_like_diverged(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    sweep_of(tmp_path, Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9}), Summary(status=Status.STOPPED),
             Summary(status=Status.PRUNED), Summary(status=Status.DIVERGED))
    end_of_sweep(tmp_path)
    rows = [line for line in capsys.readouterr().out.splitlines() if "seed=" in line]
    yellow = [line for line in rows if "\x1b[33m" in line]
    assert len(rows) == 4 and len(yellow) == 3 and "completed" in rows[0] and rows[0] not in yellow
    assert [status for line in yellow for status in ("stopped", "pruned", "diverged") if status in line] == [
        "stopped", "pruned", "diverged"]


def test_a_failed_job_fails_the_sweep_and_a_stopped_one_is_not_counted_failed(tmp_path, capsys):
    sweep_of(tmp_path, Summary(status=Status.STOPPED, ended_by=FINDING), Summary(status=Status.FAILED, error="RuntimeError: boom"),
             Summary(status=Status.PRUNED, ended_by=RUNG))
    with pytest.raises(SweepFailed) as failed:
        end_of_sweep(tmp_path)
    assert (failed.value.failed, failed.value.jobs) == (1, 3)
    written = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert (written["status"], written["failed"], written["statuses"]) == ("failed", 1, {"stopped": 1, "failed": 1, "pruned": 1})
    out = capsys.readouterr().out
    assert "job 1 failed: RuntimeError: boom" in out and "3 jobs, 1 failed" in out


def test_a_job_whose_ended_by_is_garbage_is_a_failed_row_not_a_result(tmp_path, capsys):
    """Hostile: a pruned job's summary.json with a list for ended_by is unreadable: its row is
    failed (exit 1), its file left as it was."""
    sweep_of(tmp_path, Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9}), None)
    (tmp_path / "1" / "summary.json").write_text(json.dumps({"status": "pruned", "ended_by": [1, 2]}))
    before = (tmp_path / "1" / "summary.json").read_bytes()
    with pytest.raises(SweepFailed):
        end_of_sweep(tmp_path)
    assert [r["status"] for r in rows_of(tmp_path)] == ["completed", "failed"]
    assert (tmp_path / "1" / "summary.json").read_bytes() == before
    assert f"job 1 failed: no readable summary.json in {tmp_path / '1'}" in capsys.readouterr().out


# ---------------------------------------------------------------- resume=auto
def settings(on_finding: str = "warn", prune: str = "none"):
    return OmegaConf.create({"monitor": {"on_finding": on_finding}, "prune": {"name": prune}})


@pytest.mark.parametrize("status, cfg, skipped", [
    (Status.PRUNED, settings(prune="asha"), True),
    (Status.PRUNED, settings(prune="median"), True),
    (Status.PRUNED, settings(prune="none"), False),  # prune=none continues it from its checkpoint
    (Status.PRUNED, settings(on_finding="stop", prune="asha"), True),
    (Status.STOPPED, settings(on_finding="stop"), True),
    (Status.STOPPED, settings(on_finding="warn"), False),  # on_finding=warn continues it
    (Status.STOPPED, settings(on_finding="warn", prune="asha"), False),
    (Status.DIVERGED, settings(), True),
])
def test_resume_auto_leaves_a_stopped_or_pruned_run_unless_its_setting_is_off(tmp_path, status, cfg, skipped):
    write_summary(tmp_path, Summary(status=status, overrides=["seed=0"], ended_by=FINDING))
    before = (tmp_path / "summary.json").read_bytes()
    found = already_finished(tmp_path, ["seed=0", "resume=auto"], cfg)
    assert (found.status if found else None) == (status if skipped else None)
    assert (tmp_path / "summary.json").read_bytes() == before


# ---------------------------------------------------------------- the tune preset's trials
@pytest.mark.parametrize("status, ended_by, why", [
    (Status.STOPPED, FINDING, "stopped before its planned end (loss flat at step 40)"),
    (Status.PRUNED, RUNG, "pruned before its planned end (at epoch 1, val/loss 2 vs threshold 0.5)"),
    (Status.PRUNED, None, "pruned before its planned end: a failed trial"),
])
def test_a_search_records_a_stopped_or_pruned_trial_as_failed_like_a_diverged_one(status, ended_by, why):
    """Its val/acc is that of a model cut short: Optuna gets the exception (a FAIL trial), as for
    a diverged run; the basic sweeper gets NaN, as for a diverged run."""
    summary = Summary(status=status, run_dir="/runs/3", metrics={"val/acc": 0.97}, ended_by=ended_by)
    with pytest.raises(RuntimeError, match="failed trial") as raised:
        sweep_objective(summary, searching=True)
    assert str(raised.value).startswith(f"/runs/3: the run ended {why}")
    assert math.isnan(sweep_objective(summary, searching=False))
    diverged = Summary(status=Status.DIVERGED, run_dir="/runs/4")
    with pytest.raises(RuntimeError, match="the run ended diverged without val/acc: a failed trial"):
        sweep_objective(diverged, searching=True)
    assert math.isnan(sweep_objective(diverged, searching=False))
    assert sweep_objective(Summary(status=Status.COMPLETED, metrics={"val/acc": 0.9}), searching=True) == 0.9


def test_the_tune_preset_says_stopped_and_pruned_trials_fail():
    text = (Path(__file__).resolve().parents[1] / "conf" / "hydra" / "sweeper" / "tune.yaml").read_text()
    assert "a failed, diverged, stopped or pruned trial is recorded as FAIL" in text


# ---------------------------------------------------------------- W&B and the help
def test_the_wandb_summary_of_a_pruned_run_has_its_status_and_why():
    from regexp.wandb_logger import WandbRun

    run = types.SimpleNamespace(define_metric=lambda *args, **kwargs: None, summary={})
    WandbRun(run).summary(Summary(status=Status.PRUNED, metrics={"val/acc": 0.1}, ended_by=RUNG, steps=40, config={"seed": 0}))
    assert run.summary == {"val/acc": 0.1, "status": "pruned", "run_dir": "", "steps": 40, "epochs_completed": 0,
                           "ended_by": RUNG, "skipped_steps": 0, "findings": []}


def test_the_help_lists_stopped_and_pruned_among_the_exit_0_statuses():
    text = " ".join(usage().split())
    assert "Exit codes: 0 finished (completed, early_stopped, diverged, stopped by a finding or pruned by a sweep)" in text


def test_readme_lists_the_statuses_and_stays_short():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flat = " ".join(readme.split())
    assert "`stopped`: a decisive finding ended it" in flat and "`pruned`: a sweep's pruning ended it" in flat
    assert len(readme.splitlines()) <= 250


# ---------------------------------------------------------------- scripts/bench.py --live-stop and --prune
@pytest.fixture(scope="module")
def bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def value_of(cmd: list[str], key: str) -> str:
    return next(arg.split("=", 1)[1] for arg in cmd if arg.startswith(f"{key}="))


def fake_live_run(cmd: list[str], log: Path, env: dict) -> tuple[float, int]:
    """What `regexp train` leaves once merged: the stop run ends at step 120 on the finding that
    first held at step 100 (its `finding` event in the warn run), the warn run trains 1290 steps."""
    run_dir, stop = Path(value_of(cmd, "hydra.run.dir")), value_of(cmd, "monitor.on_finding") == "stop"
    run_dir.mkdir(parents=True)
    finding = {"rule": "no_progress", "title": "loss flat", "step": 100}
    summary = {"status": "stopped" if stop else "completed", "steps": 120 if stop else 1290, "findings": [finding],
               "config": {"monitor": {"log_every": 10}}, **({"ended_by": finding} if stop else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    events = [{"step": 50, "train/loss": 2.3}, {"finding/rule": "dead_units", "step": 90}, {"finding/rule": "no_progress", "step": 100}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (events if not stop else events[:2])))
    return (1.0 if stop else 10.0), 0


def test_bench_live_stop_reports_the_stop_step_the_finding_and_how_much_sooner(bench, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "timed_command", fake_live_run)
    args = bench.parse_args(["--live-stop", "--data-root", str(data_root)])
    assert (args.epochs, args.repeats, args.mode) == (3, 1, "live_stop")
    live = bench.run_live_stop(args, bench.torch.device("cpu"), tmp_path)
    row = live["rows"]["mlp_lr10"]
    assert (row["status"], row["finding"], row["stopped_step"], row["first_held_step"], row["log_steps_late"]) == (
        "stopped", "no_progress", 120, 100, 2)  # the warn run's no_progress event, not the first event of another rule
    assert (row["ratio"], row["sooner_pct"], row["warn_steps"]) == (0.1, 90, 1290)
    assert "monitor.on_finding=stop|warn" in live["commands"]["deep_sigmoid"] and "optimizer.lr=10" in live["commands"]["mlp_lr10"]
    assert not list(tmp_path.glob("*-stop-0"))  # each run dir removed once read
    bench.render_live_stop(live)
    out = capsys.readouterr().out
    assert "| MNIST MLP, AdamW lr 10 | stopped | no_progress | 120 | 100 | 2 | 1290 | 1.00 s | 10.00 s | 0.10 | 90 % |" in out


def fake_sweep(cmd: list[str], log: Path, env: dict) -> tuple[float, int]:
    """A 27-job sweep once merged: pruning leaves 9 to epoch 2 and 3 to epoch 4 (42 model-epochs)."""
    sweep_dir, prune = Path(value_of(cmd, "hydra.sweep.dir")), value_of(cmd, "prune")
    rows = []
    for n in range(27):
        epochs = 4 if prune == "none" or n < 3 else 2 if n < 9 else 1
        acc = 0.97 - n / 1000 if prune == "none" else 0.965 - n / 1000
        (sweep_dir / str(n)).mkdir(parents=True)
        summary = {"status": "completed" if epochs == 4 else "pruned", "epochs_completed": epochs, "metrics": {"val/acc": acc}}
        (sweep_dir / str(n) / "summary.json").write_text(json.dumps(summary))
        rows.append({"job": str(n), "status": summary["status"], "run_dir": str(sweep_dir / str(n))})
    (sweep_dir / "sweep_summary.json").write_text(json.dumps({"status": "completed", "rows": rows}))
    return (40.0 if prune != "none" else 100.0), 0


def test_bench_prune_compares_each_pruned_grid_with_the_same_grid_unpruned(bench, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "timed_command", fake_sweep)
    args = bench.parse_args(["--prune", "--data-root", str(data_root)])
    assert (args.epochs, args.repeats, args.limit) == (4, 1, bench.PRUNE_LIMIT)
    result = bench.run_prune(args, bench.torch.device("cpu"), tmp_path)
    fused, basic = result["rows"]
    assert (fused["launcher"], fused["prune"], basic["launcher"], basic["prune"]) == ("fused", "asha", "basic", "median")
    assert fused["jobs"] == 27 and fused["speedup"] == 2.5
    assert fused["model_epochs"] == {"pruned": 42, "unpruned": 108}
    assert fused["statuses"] == {"completed": 3, "pruned": 24}
    assert fused["best_val_acc"] == {"pruned": 0.965, "unpruned": 0.97} and fused["best_gap_points"] == pytest.approx(0.5)
    commands = result["commands"]
    assert "hydra/launcher=fused" in commands["fused prune=asha"] and "prune=median" in commands["basic prune=median"]
    assert "hydra/launcher=fused" not in commands["basic prune=none"] and "epochs=4" in commands["fused prune=none"]
    assert "optimizer.lr=1e-4,1e-3,1e-2" in commands["fused prune=asha"] and "+regularizer=dropout" in commands["fused prune=asha"]
    bench.render_prune(result)
    out = capsys.readouterr().out
    assert "| fused | asha | 40.00 s | 100.00 s | 2.50× | 42 of 108 | 3 completed, 24 pruned | 96.50 % | 97.00 % | 0.50 |" in out


def test_bench_refuses_two_modes_at_once_and_a_failed_command_names_it(bench, data_root, tmp_path, monkeypatch, capsys):
    """Hostile: --live-stop with --prune is one usage line (exit 2); a run that exits 1 raises
    with the command, not a table of made-up numbers."""
    with pytest.raises(SystemExit) as usage_error:
        bench.parse_args(["--live-stop", "--prune"])
    assert usage_error.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(": error: --live-stop and --prune: one mode at a time")

    def crash(cmd, log, env):
        log.write_text("regexp: error: boom\n")
        return 0.5, 1

    monkeypatch.setattr(bench, "timed_command", crash)
    args = bench.parse_args(["--live-stop", "--data-root", str(data_root)])
    with pytest.raises(RuntimeError, match=r"exited 1: regexp: error: boom"):
        bench.run_live_stop(args, bench.torch.device("cpu"), tmp_path)
