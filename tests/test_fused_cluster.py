"""Fused groups as cluster jobs (hydra/launcher=fused_local, fused_slurm) and regexp's submitit
launchers when a job gives no result back, through the real CLI: the plan, one submitted job
per group, a line per job as it ends, resume=auto submitting only the unfinished groups, a
cancelled or killed job recorded instead of a crash, and a signal to the launching host
cancelling the jobs it started."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REGEXP, TINY, answer_sigint, run_cli, submitted_jobs, wait_for
from test_job_ends import JOB_LINE, job_lines

pytestmark = pytest.mark.slow
LOCAL = ["hydra/launcher=fused_local", "hydra.launcher.timeout_min=10"]
SLURM_NODE = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
              "hydra.launcher.timeout_min=10"]
LONG = ["dataset.limit=20000", "dataset.val_size=512", "epochs=40", "model.hidden=[32]"]  # tens of seconds: time to act


def sweep_rows(sweep: Path) -> list[tuple[str, str]]:
    return [(r["job"], r["status"]) for r in json.loads((sweep / "sweep_summary.json").read_text())["rows"]]


def submitted(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("submitit ")]


def start_sweep(tmp_path: Path, data_root: Path, launcher: str, seeds: str, **popen) -> tuple[Path, subprocess.Popen]:
    """A long sweep through the real CLI in the background: (its sweep dir, its process)."""
    sweep = tmp_path / "sweep"
    command = [REGEXP, "train", "-m", f"hydra/launcher={launcher}", "logger=none", *LONG, f"seed={seeds}",
               f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root), COLUMNS="200")
    return sweep, subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, **popen)


def training(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and len(metrics.read_text().splitlines()) >= 2


# ---------------------------------------------------------------- fused_local
def test_fused_local_submits_one_job_per_group_and_resume_submits_only_the_unfinished(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *LOCAL, "hydra.launcher.max_models=2", "logger=none", "model.hidden=[32]", *TINY,
            f"hydra.sweep.dir={sweep}"]
    out = run_cli([*args, "seed=0,1,2"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "fused: jobs 0-1 train as one group of 2 models" in lines
    assert submitted(out.stdout) == [f"submitit local: 2 jobs submitted for 3 sweep jobs ({submitted_jobs(sweep)[0]} to "
                                     f"{submitted_jobs(sweep)[-1]}); each one's log: {sweep}/.submitit/<job id>"]
    assert sorted(JOB_LINE.match(line)[3] for line in job_lines(out.stdout)) == ["0", "1", "2"]  # groups end in any order
    assert sweep_rows(sweep) == [("0", "completed"), ("1", "completed"), ("2", "completed")]
    fused = [json.loads((sweep / str(n) / "summary.json").read_text()).get("fused") for n in range(3)]
    assert fused[0]["models"] == fused[1]["models"] == 2 and fused[2] is None
    group_log = next((sweep / ".submitit" / submitted_jobs(sweep)[0]).glob("*_log.out")).read_text()
    assert "fused group of 2 models" in group_log and "┃ run ┃ epoch" in group_log  # the group's table: in its job's log

    again = run_cli([*args, "seed=0,1,2,3", "resume=auto"], tmp_path, data_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fused: jobs 0-2 finished earlier: resume=auto skips them" in again.stdout.splitlines()
    assert len(submitted(again.stdout)) == 1 and submitted(again.stdout)[0].startswith("submitit local: 1 job submitted (")
    assert sweep_rows(sweep) == [(str(n), "completed") for n in range(4)]
    assert sum("finished earlier, skipped (resume=auto)" in line for line in job_lines(again.stdout)) == 3


def test_a_killed_local_job_is_a_failed_row_and_the_sweep_goes_on(tmp_path, data_root):
    """SIGKILL to a job's process: no result comes back; its row says so, the other job completes."""
    sweep, process = start_sweep(tmp_path, data_root, "submitit_local", "0,1")
    try:
        wait_for(lambda: training(sweep / "1"), "job 1 training", process)
        victim = submitted_jobs(sweep)[1]  # a local job's id: the process id of submitit's wrapper, whose child trains
        subprocess.run(["pkill", "-KILL", "-P", victim], check=True)
        out, err = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 1, err[-3000:]
    assert sweep_rows(sweep) == [("0", "completed"), ("1", "failed")]
    row = json.loads((sweep / "sweep_summary.json").read_text())["rows"][1]
    assert row["error"].startswith(f"JobLost: local job {victim} ended without a result (")
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "failed"  # no longer "running"
    assert "Traceback" not in out + err
    assert any(line.startswith("[") and "job 1 (seed=1): failed · JobLost: local job" in line for line in job_lines(out))


def test_a_signal_to_the_launching_process_cancels_its_local_jobs_which_save_their_checkpoints(tmp_path, data_root):
    sweep, process = start_sweep(tmp_path, data_root, "submitit_local", "0,1", preexec_fn=answer_sigint)
    try:
        wait_for(lambda: training(sweep / "0") and training(sweep / "1"), "both jobs training", process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "submitit local: cancelling 2 jobs not ended yet (a running one saves its checkpoint as it stops)" in out
    written = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["status"], r["error"].split(";")[1].strip()) for r in written["rows"]] == [
        ("interrupted", "checkpoint saved: resume=auto continues it from its checkpoint")] * 2
    for n in range(2):  # each job ended, having saved: nothing trains on
        summary = json.loads((sweep / str(n) / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["interrupted"]["saved"] is True
    steps = [(sweep / str(n) / "metrics.jsonl").stat().st_mtime_ns for n in range(2)]
    time.sleep(3)
    assert [(sweep / str(n) / "metrics.jsonl").stat().st_mtime_ns for n in range(2)] == steps


# ---------------------------------------------------------------- fused_slurm on the local cluster
@pytest.mark.slurm
def test_fused_slurm_a_failed_and_a_cancelled_group_then_resume_submits_only_those(tmp_path, data_root, local_slurm):
    """Four groups of two (max_models=2): the fashion_mnist groups fail (no such data), one
    mnist group is cancelled with scancel while it trains, the other completes; resume=auto
    (with the data there now) submits the three unfinished groups only, and all complete."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "MNIST").symlink_to(data_root / "MNIST")
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=fused_slurm", *SLURM_NODE, "hydra.launcher.max_models=2", "logger=none",
            *LONG, "dataset=fashion_mnist,mnist", "seed=0,1,2,3", f"dataset.root={root}", "dataset.download=false",
            f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, COLUMNS="200")
    process = subprocess.Popen([REGEXP, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for(lambda: training(sweep / "4"), "job 4 training", process)
        cancelled = submitted_jobs(sweep)[2]  # the group of jobs 4 and 5
        subprocess.run(["scancel", cancelled], check=True)
        out, err = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 1, err[-3000:]
    assert submitted(out)[0].startswith("submitit slurm: 4 jobs submitted for 8 sweep jobs (")
    assert sweep_rows(sweep) == [("0", "failed"), ("1", "failed"), ("2", "failed"), ("3", "failed"),
                                 ("4", "interrupted"), ("5", "interrupted"), ("6", "completed"), ("7", "completed")]
    rows = json.loads((sweep / "sweep_summary.json").read_text())["rows"]
    assert "no fashion_mnist files found" in rows[0]["error"]
    assert rows[4]["error"].startswith("stopped by signal 15 (SIGTERM: scancel, or the system stopping it); "
                                       "checkpoint saved: resume=auto continues it from its checkpoint")
    assert "Traceback" not in out + err

    (root / "FashionMNIST").symlink_to(data_root / "FashionMNIST")
    again = run_cli([*args, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fused: jobs 6-7 finished earlier: resume=auto skips them" in again.stdout.splitlines()
    assert submitted(again.stdout)[0].startswith("submitit slurm: 3 jobs submitted for 6 sweep jobs (")
    assert sweep_rows(sweep) == [(str(n), "completed") for n in range(8)]
    for n in (4, 5):
        summary = json.loads((sweep / str(n) / "summary.json").read_text())
        assert summary["resumed_from"] and summary["resumed_at_step"] > 0


@pytest.mark.slurm
def test_fused_slurm_refuses_a_request_the_cluster_cannot_hold_before_writing(tmp_path, local_slurm):
    out = run_cli(["train", "-m", "hydra/launcher=fused_slurm", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["regexp: error: hydra.launcher.gpus_per_node=1: partition debug's nodes have no "
                                       "GPUs; set hydra.launcher.gpus_per_node=0"]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_joblib_worker_ends_the_sweep_with_its_table_not_a_traceback(tmp_path, data_root):
    """joblib stops every worker when one dies: the started jobs are failed (not left running), the
    others not run, and the table says so (exit 1)."""
    sweep, process = start_sweep(tmp_path, data_root, "joblib", "0,1,2")
    try:
        wait_for(lambda: training(sweep / "0") and training(sweep / "1"), "two jobs training", process)
        subprocess.run(["pkill", "-KILL", "-f", "-P", str(process.pid), "LokyProcess-2"], check=True)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 1, err[-3000:]
    assert sweep_rows(sweep) == [("0", "failed"), ("1", "failed"), ("2", "not run")]
    assert "Traceback" not in out + err
    assert f"sweep {sweep}: 3 jobs, 2 failed (2 failed, 1 not run)" in out
    assert "job 2 not run: the sweep ended before it started; resume=auto runs it" in out
    for n in range(2):
        summary = json.loads((sweep / str(n) / "summary.json").read_text())
        assert summary["status"] == "failed" and "joblib worker was killed (SIGKILL(-9))" in summary["error"]
