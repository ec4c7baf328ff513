"""A sweep's console while it runs: one line per job as it ends (regexp.sweep.JobEnds), and a
fused group as one table instead of lines and panels per member (regexp.tracking.GroupConsole)."""

import io
import json
import logging
import os
import pickle
import re
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from omegaconf import OmegaConf
from rich.console import Console

from regexp.rundir import SWEEP_RECORDS, Status, Summary, write_summary
from regexp.sweep import PLAN, JobEnds, SweepSummary, has_ended, start_records, write_job_record
from regexp.tracking import GroupConsole

JOB_LINE = re.compile(r"^\[(\d+)/(\d+)\] job (\d+) ")


def job_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if JOB_LINE.match(line)]


def table_start(stdout: str, sweep_dir: Path) -> int:
    """The index of the sweep table's title line."""
    return next(i for i, line in enumerate(stdout.splitlines()) if line.startswith(f"sweep {sweep_dir}: "))


# ---------------------------------------------------------------- through the CLI
@pytest.mark.slow
def test_a_basic_sweep_prints_each_job_as_it_ends_the_failed_one_with_its_error(tmp_path, data_root):
    root = tmp_path / "data"  # MNIST only: the fashion_mnist job fails on its data
    root.mkdir()
    (root / "MNIST").symlink_to(data_root / "MNIST")
    sweep = tmp_path / "sweep"
    out = run_cli(["train", "-m", "logger=none", "dataset=mnist,fashion_mnist,mnist", f"dataset.root={root}",
                   "dataset.download=false", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = job_lines(out.stdout)
    assert [JOB_LINE.match(line).groups() for line in lines] == [("1", "3", "0"), ("2", "3", "1"), ("3", "3", "2")]
    assert lines[0].startswith("[1/3] job 0 (dataset=mnist): completed · test/acc 0.")
    assert lines[1].startswith("[2/3] job 1 (dataset=fashion_mnist): failed · ConfigError: dataset.root=")
    assert "no fashion_mnist files found" in lines[1]
    all_lines = out.stdout.splitlines()
    assert all(all_lines.index(line) < table_start(out.stdout, sweep) for line in lines)  # each before the table
    # each as its job ended: job 0's line before job 1 started (Hydra's "#1 :" line)
    assert all_lines.index(lines[0]) < next(i for i, line in enumerate(all_lines) if "\t#1 : " in line)


@pytest.mark.slow
def test_a_fused_group_is_one_table_and_a_line_per_member_not_lines_and_panels_per_member(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    out = run_cli(["train", "-m", "hydra/launcher=fused", "logger=none", "seed=0,1,2,3", "epochs=2", *TINY[:3],
                   "monitor.log_every=2", f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    stdout = out.stdout
    assert "fused: jobs 0-3 train as one group of 4 models" in stdout.splitlines()
    assert not re.search(r"epoch \d/2 ", stdout) and "regexp · " not in stdout and "diagnosis" not in stdout
    assert "fused group of 4 models" in stdout and stdout.count("│ 2/2 ") == 4  # the group's table: a row per member
    lines = job_lines(stdout)
    assert sorted(JOB_LINE.match(line).group(3) for line in lines) == ["0", "1", "2", "3"]  # each once
    assert all(": completed · test/acc " in line for line in lines)
    # before: a header, an epoch line per epoch and two panels (14 lines) per member, then the table: 81 lines
    assert len(stdout.splitlines()) < 40, stdout
    for job in range(4):  # each run's train.log keeps what the console leaves out
        log = (sweep / str(job) / "train.log").read_text()
        assert f"{job} · epoch 1/2 " in log and f"{job} · epoch 2/2 " in log
        assert "regexp · completed: " in log and f"run_dir={sweep / str(job)}" in log


# ---------------------------------------------------------------- the pieces
def test_a_group_console_off_a_terminal_prints_its_table_once_and_logs_every_line(caplog):
    out = io.StringIO()
    group = GroupConsole(Console(file=out, width=200), ["0", "1"])
    members = [group.member(0), group.member(1)]
    with caplog.at_level(logging.INFO, logger="regexp"), group.showing():
        for i, member in enumerate(members):
            member.header(f"mnist · run dir {i}")
            member.warn("scheduler.warmup_steps=10 is longer than the run")
            member.epoch_line(1, 2, {"train/loss": 0.5 + i, "val/acc": 0.8}, str(i))
        members[1].line("1: pruned at epoch 1: val/loss 2, worse than 1 (asha, 1 of 2 kept)")
        members[1].left_group("pruned")
        members[0].epoch_line(2, 2, {"train/loss": 0.25, "val/acc": 0.9}, "0")
        members[0].run_ended("completed", {"test/acc": 0.9, "run_dir": "0"}, "green")
        members[1].run_ended("pruned", {"test/acc": 0.7, "run_dir": "1"}, "yellow")
        members[0].diagnosis([])
        assert out.getvalue().count("\n") == 2  # the shared warning once, the pruning: no table until the end
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["warning: scheduler.warmup_steps=10 is longer than the run",
                         "1: pruned at epoch 1: val/loss 2, worse than 1 (asha, 1 of 2 kept)"]
    rows = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    assert [[cell.strip() for cell in row] for row in rows] == [["0", "2/2", "0.25", "0.9", "completed"],
                                                                ["1", "1/2", "1.5", "0.8", "pruned"]]
    logged = [r.getMessage() for r in caplog.records]
    assert "mnist · run dir 0" in logged and "1 · epoch 1/2  train/loss 1.5  val/acc 0.8" in logged
    assert logged.count("scheduler.warmup_steps=10 is longer than the run") == 2  # each run's train.log has it
    assert "regexp · pruned: test/acc=0.7  run_dir=1" in logged


def test_a_group_that_crashes_shows_its_members_still_training_as_failed():
    out = io.StringIO()
    group = GroupConsole(Console(file=out, width=200), ["0", "1"])
    with pytest.raises(RuntimeError), group.showing():
        group.member(0).left_group("stopped")
        raise RuntimeError("out of memory")
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.getvalue().splitlines() if line.startswith("│")]
    assert [row[-1] for row in rows] == ["stopped", "failed"]


def test_a_job_has_ended_only_by_a_final_summary_written_after_its_record(tmp_path):
    sweep = tmp_path / "sweep"
    run_dir = sweep / "0"
    run_dir.mkdir(parents=True)
    write_summary(run_dir, Summary(status=Status.INTERRUPTED, run_dir=str(run_dir)))  # an earlier invocation's
    os.utime(run_dir / "summary.json", ns=(1, 1))
    start_records(sweep, [["seed=0"]])
    write_job_record(OmegaConf.create({"sweep": {"dir": str(sweep)}, "job": {"num": 0}, "overrides": {"task": ["seed=0"]},
                                       "runtime": {"output_dir": str(run_dir)}}))
    record = json.loads((sweep / SWEEP_RECORDS / "0.json").read_text())
    assert not has_ended(sweep, record)  # the run it continues: not this job's end
    write_summary(run_dir, Summary(status=Status.RUNNING, run_dir=str(run_dir)))
    assert not has_ended(sweep, record)
    write_summary(run_dir, Summary(status=Status.COMPLETED, run_dir=str(run_dir)))
    assert has_ended(sweep, record)
    assert has_ended(sweep, {**record, "error": "RuntimeError: boom"}) and (sweep / SWEEP_RECORDS / PLAN).is_file()


def test_the_sweep_callback_goes_to_a_jobs_process_without_its_job_lines(tmp_path):
    callback = SweepSummary()
    callback.job_ends = JobEnds(tmp_path, [["seed=0"], ["seed=1"]])
    callback.job_ends.watch()
    try:
        copy = pickle.loads(pickle.dumps(callback))  # as joblib and submitit send Hydra's callbacks
    finally:
        callback.job_ends.close()
    assert copy.job_ends is None and callback.job_ends is not None
    copy.jobs_ended()  # a job's process announces nothing: the launching one does


def test_a_group_taller_than_the_terminal_ends_with_every_row_and_its_title_counts_them():
    """Live, a table taller than the terminal shows its top rows; its end prints the whole table."""
    import time

    buf = io.StringIO()
    group = GroupConsole(Console(file=buf, force_terminal=True, height=12, width=100), [str(i) for i in range(30)])
    with group.showing():
        group.rows[29]["status"] = "pruned"
        time.sleep(0.5)  # a live refresh or two
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    end = plain[plain.rindex("fused group of 30 models"):]
    assert end.startswith("fused group of 30 models (29 training, 1 pruned)")
    assert [line.split("│")[1].strip() for line in end.splitlines() if line.startswith("│")] == [str(i) for i in range(30)]


def test_a_searchs_job_lines_leave_out_the_overrides_every_job_shares(tmp_path):
    """A search draws its jobs as it goes: the command's own overrides are the shared ones."""
    assert JobEnds(tmp_path, None, ["epochs=1", "logger=none"]).shared == {"epochs=1", "logger=none"}
    assert JobEnds(tmp_path, [["seed=0", "epochs=1"], ["seed=1", "epochs=1"]], ["epochs=1"]).shared == {"epochs=1"}
