"""regexp.sweep on hand-made job dirs, in the fast tier: the end-of-sweep table and
sweep_summary.json (the jobs of this invocation, each with its own overrides, status and
error), a failed or refused job's record, the report of a sweep stopped by a signal, and
which jobs `resume=auto` skips or refuses. (The same paths through real sweeps are the slow
tests in test_sweeps.py.)"""

import hashlib
import json
import signal
from pathlib import Path

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from regexp.compose import compose, initialized
from regexp.rundir import ConfigError, Interrupted, Status, Summary, read_summary, write_summary
from regexp.sweep import (
    SWEEP_SUMMARY,
    Refused,
    SweepFailed,
    SweepSummary,
    already_finished,
    check_sweep_job,
    planned_jobs,
    record_failure,
    report_interruption,
    start_records,
)

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
DEFAULTS = OmegaConf.create({"monitor": {"on_finding": "warn"}, "prune": {"name": "none"}})  # what already_finished reads


def hydra_node(sweep_dir: Path, number: int, overrides: list[str]):
    """The `hydra` node of job `number`, as Hydra hands it to callbacks and to the task."""
    return OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep_dir)}, "job": {"num": number},
                             "runtime": {"output_dir": str(sweep_dir / str(number))}, "overrides": {"task": overrides}})


def job(sweep_dir: Path, number: int, overrides: list[str], summary: Summary | None) -> Path:
    """Job `number` of this invocation, launched with `overrides` (recorded as Hydra's launcher
    starts it), whose run dir holds `summary`."""
    SweepSummary().on_job_start(OmegaConf.create({"hydra": hydra_node(sweep_dir, number, overrides)}), task_function=None)
    run_dir = sweep_dir / str(number)
    run_dir.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        write_summary(run_dir, summary)
    return run_dir


def end_of_sweep(sweep_dir: Path) -> None:
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "logger": {"name": "none"}}))


def rows_of(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / SWEEP_SUMMARY).read_text())["rows"]


@pytest.fixture
def signal_handlers():
    """The report of an interrupted sweep ignores further signals while it writes: put them back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_sweep_of_finished_jobs_writes_its_table_and_ends_quietly(tmp_path, capsys):
    start_records(tmp_path, None)
    job(tmp_path, 0, ["seed=0", "optimizer=adam"], Summary(status=Status.COMPLETED, metrics={"test/acc": 0.91}, wall_time_s=2.0))
    job(tmp_path, 1, ["seed=0", "optimizer=sgd"], Summary(status=Status.DIVERGED))  # a result, not a failure
    end_of_sweep(tmp_path)
    written = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert (written["jobs"], written["failed"], written["status"]) == (2, 0, "completed")
    assert [(r["job"], r["status"], r["test/acc"]) for r in written["rows"]] == [("0", "completed", 0.91), ("1", "diverged", None)]
    out = capsys.readouterr().out
    assert "2 jobs, 0 failed" in out and "0.9100" in out and "all jobs: seed=0" in out


def test_a_failed_or_dead_job_fails_the_sweep_after_the_table(tmp_path, capsys):
    start_records(tmp_path, None)
    for n in (0, 2, 10):  # job-number order, not string order
        job(tmp_path, n, [f"seed={n}"], Summary(status=Status.COMPLETED, metrics={"test/acc": 0.5}))
    job(tmp_path, 3, ["seed=3"], Summary(status=Status.RUNNING))  # its process ended mid-run
    job(tmp_path, 4, ["seed=4"], None)  # died before writing anything
    with pytest.raises(SweepFailed) as failed:
        end_of_sweep(tmp_path)
    assert (failed.value.failed, failed.value.jobs) == (2, 5)
    rows = rows_of(tmp_path)
    assert [r["job"] for r in rows] == ["0", "2", "3", "4", "10"]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed", "completed"]
    assert "died before starting" in rows[3]["error"]
    assert "job 4 failed" in capsys.readouterr().out


def test_rows_are_the_jobs_of_this_invocation_with_their_own_overrides(tmp_path):
    """A job dir of an earlier, longer sweep into the same dir is no row; each row's overrides
    are those its job was launched with, not what a job dir's .hydra/ says."""
    start_records(tmp_path, None)
    job(tmp_path, 0, ["seed=0"], Summary(status=Status.COMPLETED, overrides=["seed=0"]))
    job(tmp_path, 1, ["seed=1"], Summary(status=Status.COMPLETED, overrides=["seed=1"]))
    start_records(tmp_path, None)  # the next invocation: two jobs of other values
    (tmp_path / "1" / ".hydra").mkdir()
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- seed=7\n")
    job(tmp_path, 0, ["seed=0", "resume=auto"], None)
    end_of_sweep(tmp_path)
    assert [(r["job"], r["overrides"], r["status"]) for r in rows_of(tmp_path)] == [("0", ["seed=0", "resume=auto"], "completed")]


def test_record_failure_writes_a_failed_summary_unless_the_run_wrote_its_own(tmp_path, capsys):
    start_records(tmp_path, None)
    crashed, finished = tmp_path / "0", tmp_path / "1"
    crashed.mkdir()
    finished.mkdir()
    write_summary(finished, Summary(status=Status.COMPLETED))
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as e:  # inside the handler, as the launcher calls it: the traceback is recorded
        record_failure(hydra_node(tmp_path, 0, ["seed=1"]), e)
        record_failure(hydra_node(tmp_path, 1, ["seed=2"]), e)
    summary = read_summary(crashed)
    assert summary.status is Status.FAILED and summary.overrides == ["seed=1"]
    assert summary.error == "RuntimeError: out of memory" and "out of memory" in summary.traceback
    assert read_summary(finished).status is Status.COMPLETED
    assert capsys.readouterr().err == ""  # the job's line is JobEnds', from its record


def test_a_job_refused_by_resume_auto_is_a_row_and_its_run_dir_keeps_its_run(tmp_path, capsys):
    """Its run dir holds a run of other overrides (a search's other draw): that run's records stay
    byte for byte; the row shows this job's overrides and the refusal, never another job's error."""
    start_records(tmp_path, None)
    earlier = Summary(status=Status.COMPLETED, overrides=["optimizer.lr=0.1"], metrics={"test/acc": 0.8})
    job(tmp_path, 0, ["optimizer.lr=0.2", "resume=auto"], None)
    write_summary(tmp_path / "0", earlier)
    before = hashlib.sha256((tmp_path / "0" / "summary.json").read_bytes()).hexdigest()
    job(tmp_path, 1, ["optimizer.lr=0.3", "resume=auto"], Summary(status=Status.FAILED, error="RuntimeError: boom"))
    try:
        already_finished(tmp_path / "0", ["optimizer.lr=0.2", "resume=auto"], DEFAULTS)
    except Refused as e:
        record_failure(hydra_node(tmp_path, 0, ["optimizer.lr=0.2", "resume=auto"]), e)
    with pytest.raises(SweepFailed):
        end_of_sweep(tmp_path)
    assert hashlib.sha256((tmp_path / "0" / "summary.json").read_bytes()).hexdigest() == before
    rows = rows_of(tmp_path)
    assert (rows[0]["status"], rows[0]["overrides"], rows[0]["test/acc"]) == ("refused", ["optimizer.lr=0.2", "resume=auto"], None)
    assert rows[0]["error"].startswith(f"resume=auto: {tmp_path / '0'} holds a run of other overrides (optimizer.lr=0.1 ")
    assert (rows[1]["status"], rows[1]["error"]) == ("failed", "RuntimeError: boom")
    captured = capsys.readouterr()
    assert "job 0 was refused: resume=auto:" in captured.out and "job 1 failed: RuntimeError: boom" in captured.out
    assert "None" not in captured.out + captured.err


def test_resume_auto_skips_only_finished_runs_of_the_same_overrides(tmp_path):
    assert already_finished(tmp_path, ["seed=0"], DEFAULTS) is None  # nothing there yet
    write_summary(tmp_path, Summary(status=Status.FAILED, overrides=["seed=0"]))
    assert already_finished(tmp_path, ["seed=0", "resume=auto"], DEFAULTS) is None  # run it again
    write_summary(tmp_path, Summary(status=Status.COMPLETED, overrides=["seed=0"]))
    assert already_finished(tmp_path, ["resume=auto", "seed=0"], DEFAULTS).status is Status.COMPLETED
    with pytest.raises(ConfigError, match=r"other overrides \(seed=0 where this job has seed=1\)"):
        already_finished(tmp_path, ["seed=1", "resume=auto"], DEFAULTS)


def test_the_pre_flight_refuses_a_sweep_job_whose_run_dir_holds_other_overrides(tmp_path):
    (tmp_path / "1").mkdir()
    write_summary(tmp_path / "1", Summary(status=Status.COMPLETED, overrides=["seed=1", "epochs=1"]))
    with initialized():
        def check(number, overrides):
            check_sweep_job(tmp_path, compose(overrides, with_hydra=True), number, [*overrides, f"hydra.sweep.dir={tmp_path}"], {})

        check(1, ["seed=1", "epochs=1", "resume=auto"])  # the same run: it will be skipped
        check(0, ["seed=2", "epochs=1", "resume=auto"])  # nothing there yet
        check(1, ["seed=2", "epochs=1"])  # not resume=auto: the sweep dir check refuses it (regexp.cli)
        with pytest.raises(Refused, match=f"resume=auto: {tmp_path / '1'} holds a run of other overrides"):
            check(1, ["seed=2", "epochs=1", "resume=auto"])


def test_planned_jobs_are_split_as_hydras_basic_sweeper_splits_them():
    hydra_cfg = OmegaConf.create({"sweeper": {"_target_": BASIC, "params": {"optimizer": "adam,sgd"}},
                                  "overrides": {"task": ["seed=0,1", "epochs=1"]}})
    assert planned_jobs(hydra_cfg) == [["optimizer=adam", "seed=0", "epochs=1"], ["optimizer=adam", "seed=1", "epochs=1"],
                                       ["optimizer=sgd", "seed=0", "epochs=1"], ["optimizer=sgd", "seed=1", "epochs=1"]]
    search = OmegaConf.create({"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"},
                               "overrides": {"task": ["epochs=1"]}})
    assert planned_jobs(search) is None  # a search draws its jobs as it goes


def test_an_interrupted_sweep_names_what_is_on_disk_and_how_to_continue(tmp_path, capsys, signal_handlers):
    start_records(tmp_path, [["seed=0"], ["seed=1"], ["seed=2"]])
    job(tmp_path, 0, ["seed=0"], Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9}))
    (job(tmp_path, 1, ["seed=1"], Summary(status=Status.INTERRUPTED, error="Interrupted: stopped by signal 15"))
     / "checkpoint.pt").write_bytes(b"saved")
    advice = report_interruption(tmp_path, Interrupted(signal.SIGTERM, saved=True))
    assert advice == (f"sweep {tmp_path}: job 1 interrupted (checkpoint saved), 1 job not run (2); to continue, run the "
                      f"same command again with resume=auto hydra.sweep.dir={tmp_path}")
    written = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert (written["status"], written["signal"], written["failed"], written["interrupted"], written["not_run"]) == (
        "interrupted", 15, 0, 1, 1)
    assert [(r["job"], r["overrides"], r["status"]) for r in written["rows"]] == [
        ("0", ["seed=0"], "completed"), ("1", ["seed=1"], "interrupted"), ("2", ["seed=2"], "not run")]
    assert written["rows"][1]["error"] == "stopped by signal 15 (SIGTERM: scancel, or the system stopping it); checkpoint saved: resume=auto continues it from its checkpoint"
    assert "resume=auto hydra.sweep.dir=" in written["advice"]
    assert "1 completed, 1 interrupted, 1 not run" in capsys.readouterr().out.replace("\n", " ")


def test_an_interrupted_sweep_says_saved_only_what_was_saved(tmp_path, signal_handlers):
    start_records(tmp_path, [["seed=0"], ["seed=1"]])
    job(tmp_path, 0, ["seed=0"], Summary(status=Status.INTERRUPTED))  # a second signal: stopped at once, nothing saved
    job(tmp_path, 1, ["seed=1"], None)  # the signal came while Hydra set it up: it never started
    assert "job 0 interrupted (no checkpoint saved), 1 job not run (1)" in report_interruption(tmp_path, KeyboardInterrupt())
    rows = rows_of(tmp_path)
    assert rows[0]["error"] == "stopped by signal 2 (SIGINT: Ctrl-C); no checkpoint saved: resume=auto starts it again"
    assert rows[1]["status"] == "not run"
    (tmp_path / "0" / "checkpoint.pt").write_bytes(b"an earlier epoch's")
    assert "(no checkpoint of its last step, the one before is kept)" in report_interruption(tmp_path, Interrupted(2))


def test_a_sweep_stopped_before_it_started_claims_no_job(tmp_path, signal_handlers):
    assert "nothing was run" in report_interruption(tmp_path, Interrupted(signal.SIGTERM))
    assert not (tmp_path / SWEEP_SUMMARY).exists()
