"""regexp.sweep on hand-made job dirs, in the fast tier: the end-of-sweep table and
sweep_summary.json, a failed job's record, and which jobs `resume=auto` skips.
(The same paths through real sweeps are the slow tests in test_sweeps.py.)"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from regexp.rundir import ConfigError, Status, Summary, read_summary, write_summary
from regexp.sweep import SWEEP_SUMMARY, SweepFailed, SweepSummary, already_finished, record_failure


def job(sweep_dir: Path, name: str, overrides: list[str], summary: Summary | None) -> Path:
    run_dir = sweep_dir / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        write_summary(run_dir, summary)
    return run_dir


def end_of_sweep(sweep_dir: Path) -> None:
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))


def test_a_sweep_of_finished_jobs_writes_its_table_and_ends_quietly(tmp_path, capsys):
    job(tmp_path, "0", ["seed=0", "optimizer=adam"], Summary(status=Status.COMPLETED, metrics={"test/acc": 0.91}, wall_time_s=2.0))
    job(tmp_path, "1", ["seed=0", "optimizer=sgd"], Summary(status=Status.DIVERGED))  # a result, not a failure
    end_of_sweep(tmp_path)
    written = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert (written["jobs"], written["failed"]) == (2, 0)
    assert [(r["job"], r["status"], r["test/acc"]) for r in written["rows"]] == [("0", "completed", 0.91), ("1", "diverged", None)]
    out = capsys.readouterr().out
    assert "2 jobs, 0 failed" in out and "0.9100" in out and "all jobs: seed=0" in out


def test_a_failed_or_dead_job_fails_the_sweep_after_the_table(tmp_path, capsys):
    for n in (0, 2, 10):  # job-number order, not string order
        job(tmp_path, str(n), [f"seed={n}"], Summary(status=Status.COMPLETED, metrics={"test/acc": 0.5}))
    job(tmp_path, "3", ["seed=3"], Summary(status=Status.RUNNING))  # its process ended mid-run
    job(tmp_path, "4", ["seed=4"], None)  # died before writing anything
    with pytest.raises(SweepFailed) as failed:
        end_of_sweep(tmp_path)
    assert (failed.value.failed, failed.value.jobs) == (2, 5)
    rows = json.loads((tmp_path / SWEEP_SUMMARY).read_text())["rows"]
    assert [r["job"] for r in rows] == ["0", "2", "3", "4", "10"]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed", "completed"]
    assert "died before starting" in rows[3]["error"]
    assert "job 4 failed" in capsys.readouterr().out


def test_record_failure_writes_a_failed_summary_unless_the_run_wrote_its_own(tmp_path, capsys):
    crashed, finished = tmp_path / "a", tmp_path / "b"
    crashed.mkdir()
    finished.mkdir()
    write_summary(finished, Summary(status=Status.COMPLETED))
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as e:  # inside the handler, as the launcher calls it: the traceback is recorded
        record_failure(crashed, e, ["seed=1"])
        record_failure(finished, e, ["seed=2"])
    summary = read_summary(crashed)
    assert summary.status is Status.FAILED and summary.overrides == ["seed=1"]
    assert summary.error == "RuntimeError: out of memory" and "out of memory" in summary.traceback
    assert read_summary(finished).status is Status.COMPLETED
    assert f"regexp: job {crashed} failed: RuntimeError: out of memory" in capsys.readouterr().err


def test_resume_auto_skips_only_finished_runs_of_the_same_overrides(tmp_path):
    assert already_finished(tmp_path, ["seed=0"]) is None  # nothing there yet
    write_summary(tmp_path, Summary(status=Status.FAILED, overrides=["seed=0"]))
    assert already_finished(tmp_path, ["seed=0", "resume=auto"]) is None  # run it again
    write_summary(tmp_path, Summary(status=Status.COMPLETED, overrides=["seed=0"]))
    assert already_finished(tmp_path, ["resume=auto", "seed=0"]).status is Status.COMPLETED
    with pytest.raises(ConfigError, match="other overrides"):
        already_finished(tmp_path, ["seed=1", "resume=auto"])
