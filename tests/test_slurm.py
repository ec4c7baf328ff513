"""Sweeps on a real SLURM: hydra/launcher=submitit_slurm on the machine's one-node cluster
(scripts/local-slurm, started by the local_slurm fixture), through the real CLI: a sweep lands
every run and its summary, a failing job is a row and the sweep goes on, a job cancelled with
scancel and one warned of its time limit save their checkpoints and end `interrupted`, and
resume=auto finishes them. The node has 2 CPUs and no GPU: one CPU and 2 GB per job."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from conftest import REGEXP, TINY, run_cli, submitted_jobs, wait_for
from test_job_ends import JOB_LINE, job_lines

NODE = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2"]
SMALL = ["logger=none", "model.hidden=[32]", *TINY]


def sweep(tmp_path: Path, *args: str) -> list[str]:
    """`regexp train -m` on the cluster into tmp_path/sweep."""
    return ["train", "-m", *NODE, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]


def rows(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())["rows"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def cluster_job(sweep_dir: Path, job: int) -> str:
    """The SLURM id of sweep job `job` (its array task, e.g. 41_1)."""
    return submitted_jobs(sweep_dir)[job]


def start(args: list[str], cwd: Path, data_root: Path) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200", REGEXP_DATA_DIR=str(data_root))
    return subprocess.Popen([REGEXP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- through the CLI, on the cluster
@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_job_sweep_lands_each_run_and_the_sweep_summary(tmp_path, data_root, local_slurm):
    out = run_cli(sweep(tmp_path, "hydra.launcher.timeout_min=5", *SMALL, "seed=0,1"), tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    array = cluster_job(sweep_dir, 0).split("_")[0]
    assert f"submitit slurm: 2 jobs submitted ({array}_0 to {array}_1); each one's log: " in out.stdout
    runs = {n: summary(sweep_dir / n) for n in ("0", "1")}
    assert all(s["status"] == "completed" and 0 < s["metrics"]["test/acc"] <= 1 for s in runs.values())
    assert [(r["job"], r["status"], r["test/acc"], r["run_dir"]) for r in rows(sweep_dir)] == [
        (n, "completed", runs[n]["metrics"]["test/acc"], str(sweep_dir / n)) for n in ("0", "1")]
    lines = job_lines(out.stdout)  # one per job as it ended, in the order they ended
    assert sorted(JOB_LINE.match(line).group(3) for line in lines) == ["0", "1"]
    assert [line.split("] ", 1)[0] for line in lines] == ["[1/2", "[2/2"]
    for line in lines:
        job = JOB_LINE.match(line).group(3)
        assert line.split("] ", 1)[1].startswith(f"job {job} (seed={job}): completed · test/acc ")
    table = out.stdout.splitlines().index(f"sweep {sweep_dir}: 2 jobs, 0 failed (2 completed)")
    assert all(out.stdout.splitlines().index(line) < table for line in lines)
    assert "Traceback" not in out.stdout + out.stderr
    for n in ("0", "1"):  # each trained in its own SLURM job, whose log says so
        log = (sweep_dir / ".submitit" / f"{array}_{n}" / f"{array}_{n}_0_log.out").read_text()
        assert f"Starting with JobEnvironment(job_id={array}_{n}," in log


@pytest.mark.slow
@pytest.mark.slurm
def test_a_job_failing_as_it_runs_is_a_failed_row_and_the_other_completes(tmp_path, data_root, local_slurm):
    root = tmp_path / "data"  # MNIST only: the fashion_mnist job fails on its data, in its SLURM job
    root.mkdir()
    (root / "MNIST").symlink_to(data_root / "MNIST")
    out = run_cli(sweep(tmp_path, "hydra.launcher.timeout_min=5", *SMALL, "dataset=mnist,fashion_mnist",
                        f"dataset.root={root}", "dataset.download=false"), tmp_path, data_root)
    assert out.returncode == 1, out.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    assert [(r["job"], r["status"]) for r in rows(sweep_dir)] == [("0", "completed"), ("1", "failed")]
    failed = rows(sweep_dir)[1]
    assert failed["error"].startswith(f"ConfigError: dataset.root={root}: no fashion_mnist files found")
    assert summary(sweep_dir / "1")["status"] == "failed" and summary(sweep_dir / "0")["status"] == "completed"
    lines = {JOB_LINE.match(line).group(3): line for line in job_lines(out.stdout)}
    assert "job 1 (dataset=fashion_mnist): failed · ConfigError: dataset.root=" in lines["1"]
    assert "job 0 (dataset=mnist): completed · test/acc " in lines["0"]
    assert f"sweep {sweep_dir}: 2 jobs, 1 failed (1 completed, 1 failed)" in out.stdout.splitlines()
    assert f"job 1 failed: {failed['error']}" in out.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.slurm
def test_a_job_cancelled_with_scancel_saves_its_checkpoint_and_resume_auto_finishes_it(tmp_path, data_root,
                                                                                       local_slurm):
    sweep_dir = tmp_path / "sweep"
    args = sweep(tmp_path, "hydra.launcher.timeout_min=5", "logger=none", "model.hidden=[32]", "dataset.limit=512",
                 "dataset.val_size=256", "monitor.log_every=2", "epochs=1,150")
    process = start(args, tmp_path, data_root)
    try:
        wait_for(lambda: (sweep_dir / "1" / "metrics.jsonl").is_file()
                 and (sweep_dir / "1" / "metrics.jsonl").read_text().strip(), "job 1 training", process)
        subprocess.run(["scancel", cluster_job(sweep_dir, 1)], check=True)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 1, err[-3000:]  # the sweep did not complete
    assert [(r["job"], r["status"]) for r in rows(sweep_dir)] == [("0", "completed"), ("1", "interrupted")]
    cancelled = summary(sweep_dir / "1")
    assert cancelled["interrupted"] == {"signal": signal.SIGTERM, "saved": True}
    assert (sweep_dir / "1" / "checkpoint.pt").is_file()
    assert rows(sweep_dir)[1]["error"].startswith("stopped by signal 15 (SIGTERM: scancel, or the system stopping "
                                                  "it); checkpoint saved: resume=auto continues it")
    assert "Traceback" not in out + err
    completed = (sweep_dir / "0" / "summary.json").read_bytes()

    again = run_cli([*args, "resume=auto"], tmp_path, data_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitit slurm: 1 job submitted (" in again.stdout  # job 0 finished: skipped, not submitted
    assert (sweep_dir / "0" / "summary.json").read_bytes() == completed
    resumed = summary(sweep_dir / "1")
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 150
    assert resumed["resumed_from"] == str(sweep_dir / "1" / "checkpoint.pt") and resumed["resumed_at_step"] > 0
    assert [(r["job"], r["status"]) for r in rows(sweep_dir)] == [("0", "completed"), ("1", "completed")]


@pytest.mark.slow
@pytest.mark.slurm
def test_the_time_limit_warning_saves_a_checkpoint_and_resume_auto_finishes_the_job(tmp_path, data_root, local_slurm):
    """One-minute jobs warned 20 s before their limit. SLURM looks at time limits every 30 s and
    warns at the first look within 30 s of the warning time: here 10 to 40 s into a job, once it
    trains (a warning 50 s ahead could come while the job still imports). Job 1 trains on the
    full training set for 100 epochs, longer than that on this node and short enough to finish
    on resume; job 0 stops after 5 steps, before any warning, and stays as it ended."""
    sweep_dir = tmp_path / "sweep"
    args = sweep(tmp_path, "logger=none", "model.hidden=[32]", "dataset.val_size=1000", "epochs=100",
                 "max_steps=5,null")
    out = run_cli([*args, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=20"], tmp_path, data_root)
    assert out.returncode == 1, out.stderr[-3000:]
    assert [(r["job"], r["status"]) for r in rows(sweep_dir)] == [("0", "completed"), ("1", "interrupted")]
    warned = summary(sweep_dir / "1")
    assert 0 < warned["steps"] < 100 * warned["steps_per_epoch"], warned["steps"]
    assert warned["epochs_completed"] == warned["steps"] // warned["steps_per_epoch"]  # the whole epochs it trained
    from regexp.train import cluster_warnings

    assert warned["interrupted"]["signal"] in cluster_warnings() and warned["interrupted"]["saved"] is True
    assert (sweep_dir / "1" / "checkpoint.pt").is_file()
    assert "the cluster's time-limit or preemption warning): saving a checkpoint and stopping" in (
        sweep_dir / "1" / "train.log").read_text()
    assert "checkpoint saved: resume=auto continues it from its checkpoint" in rows(sweep_dir)[1]["error"]
    completed = (sweep_dir / "0" / "summary.json").read_bytes()

    again = run_cli([*args, "hydra.launcher.timeout_min=5", "resume=auto"], tmp_path, data_root)  # time to finish
    assert again.returncode == 0, again.stderr[-3000:]
    assert (sweep_dir / "0" / "summary.json").read_bytes() == completed
    resumed = summary(sweep_dir / "1")
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 100
    assert resumed["resumed_from"] == str(sweep_dir / "1" / "checkpoint.pt") and resumed["resumed_at_step"] > 0
    assert [(r["job"], r["status"]) for r in rows(sweep_dir)] == [("0", "completed"), ("1", "completed")]


# ---------------------------------------------------------------- without a cluster
def test_a_run_takes_the_clusters_warning_signals_as_it_takes_sigterm(monkeypatch, caplog):
    """SLURM's warning before a time limit or a preemption (as submitit asks for it: SIGUSR2, or
    SIGUSR1 before submitit 1.5, or $SUBMITIT_PREEMPT_SIGNAL's) saves a checkpoint and stops
    the run, and its log line says what the signal is; the handlers from before come back."""
    from regexp.train import StopSignal, cluster_warnings

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")
    assert cluster_warnings() == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP]
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL")
    assert cluster_warnings() == [signal.SIGUSR1, signal.SIGUSR2]
    before = {signum: signal.getsignal(signum) for signum in cluster_warnings()}
    with StopSignal() as stop:
        assert all(signal.getsignal(signum) == stop.handle for signum in cluster_warnings())
        with caplog.at_level("WARNING", logger="regexp"):
            os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == signal.SIGUSR2
    assert f"signal {int(signal.SIGUSR2)} (SIGUSR2: the cluster's time-limit or preemption warning): saving a " \
           "checkpoint and stopping" in caplog.text
    assert {signum: signal.getsignal(signum) for signum in cluster_warnings()} == before


SLURM_TEST = '''
import pytest

@pytest.mark.slurm
def test_on_the_cluster(local_slurm):
    pass

def test_without():
    pass
'''
UP_WHILE_TESTED = '''
import time

import pytest
from conftest import REPO

@pytest.mark.slurm
def test_on_the_cluster(local_slurm):
    time.sleep({seconds})
    assert (REPO / "scripts" / "up").exists()  # the fake cluster is up while any test runs
'''
FAKE_LOCAL_SLURM = """#!/bin/sh
# scripts/local-slurm as the fixture sees it: `start` starts a cluster unless one is up
here="$(dirname "$0")"
echo "$1" >>"$here/calls"
case "$1" in
    start) if [ -e "$here/up" ]; then echo "local-slurm: a cluster already answers (sinfo); nothing started"
           else touch "$here/up"; echo "local-slurm: up (debug 1 node(s) 2 CPUs 21694 MB idle)"; fi ;;
    stop) rm -f "$here/up"; echo "local-slurm: stopped" ;;
esac
"""


def copied_suite(tmp_path: Path, tests: dict[str, str]) -> Path:
    """A tree with a copy of conftest.py and `tests` (file name -> text): its tests dir."""
    folder = tmp_path / "repo" / "tests"
    folder.mkdir(parents=True)
    (tmp_path / "repo" / "pytest.ini").write_text("[pytest]\nmarkers =\n    slurm: on the cluster\n")
    (folder / "conftest.py").write_text(Path(conftest.__file__).read_text())
    for name, text in tests.items():
        (folder / name).write_text(text)
    return folder


def run_suite(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(folder)],
                          cwd=folder.parent, env={**clean, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_without_sbatch_the_cluster_tests_skip_in_one_summary_line(tmp_path):
    out = run_suite(copied_suite(tmp_path, {"test_cluster.py": SLURM_TEST}), PATH=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 1 skipped" in out.stdout
    assert [line for line in out.stdout.splitlines() if line.startswith("slurm:")] == [
        "slurm: 1 test skipped: sbatch not found (apt-get install slurm-wlm munge)"]


@pytest.mark.slow
def test_without_sbatch_the_cluster_tests_fail_in_ci(tmp_path):
    out = run_suite(copied_suite(tmp_path, {"test_cluster.py": SLURM_TEST}), PATH=str(tmp_path), CI="true")
    assert out.returncode == 1
    assert "1 passed, 1 error" in out.stdout and "slurm:" not in out.stdout
    assert "sbatch missing on PATH (CI=true: slurm tests may not skip" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("up_before", [False, True])
def test_the_session_that_started_the_cluster_stops_it_once_after_all_workers(tmp_path, up_before):
    """Two xdist workers each ask for the cluster (one start at a time); the controller stops it
    once, at the very end, and only when this session started it."""
    folder = copied_suite(tmp_path, {"test_one.py": UP_WHILE_TESTED.format(seconds=0),
                                     "test_two.py": UP_WHILE_TESTED.format(seconds=3)})  # one worker ends first
    scripts = folder.parent / "scripts"
    scripts.mkdir()
    (scripts / "local-slurm").write_text(FAKE_LOCAL_SLURM)
    (scripts / "local-slurm").chmod(0o755)
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "sbatch").chmod(0o755)
    if up_before:
        (scripts / "up").touch()
    out = run_suite(folder, "-n", "2", "--dist", "loadfile", PATH=f"{tmp_path}:{os.environ['PATH']}")
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout + out.stderr
    assert (scripts / "calls").read_text().split() == ["start", "start"] + ([] if up_before else ["stop"])
    assert (scripts / "up").exists() == up_before
