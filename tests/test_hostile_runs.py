"""Hostile and careless use of resume, the run-dir lock and the fused launcher, through the real
CLI: each case asserts the exit code, the one line said, and what is (or is not) on disk after.
A finished run's records never get worse; a refusal writes nothing."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_cli, snapshot

from regexp.lock import LOCK

RUN = [*TINY, "logger=none"]  # 4 steps of a 256-sample MNIST run
SWEEP = ["-m", "hydra/launcher=fused", "model.hidden=[32]", *RUN, "seed=0,1,2"]


def without_hydra(files: dict) -> dict:
    return {k: v for k, v in files.items() if not k.startswith(".hydra") and "/.hydra/" not in k}


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def assert_refused(out, code: int, start: str, root: Path, before: dict) -> str:
    """Exit `code`, one line on stderr starting `start`, nothing on stdout, every file as it was."""
    assert out.returncode == code, (out.stdout[-2000:], out.stderr[-2000:])
    line = one_line(out.stderr)
    assert line.startswith(start), line
    assert out.stdout.strip() == ""
    assert snapshot(root) == before
    return line


def assert_finished_and_untouched(out, run_dir: Path, root: Path, before: dict) -> None:
    assert out.returncode == 0, out.stderr[-2000:]
    line = one_line(out.stdout)
    assert line.startswith(f"{run_dir}: completed at step ") and "nothing was written" in line, line
    assert out.stderr.strip() == ""
    assert snapshot(root) == before


def trained(tmp_path_factory, name: str, args: list[str], key: str) -> Path:
    """`regexp train ARGS key=<a fresh dir>/name`, finished; the dir it wrote."""
    from conftest import require_shared_data

    data_root = require_shared_data()
    root = tmp_path_factory.mktemp(name)
    out = run_cli(["train", *args, f"{key}={root / name}"], root, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    return root / name


def copied(source: Path, tmp_path: Path) -> Path:
    shutil.copytree(source, tmp_path / source.name)
    return tmp_path / source.name


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run trained to its end (max_steps=4); each test works on its own copy."""
    return trained(tmp_path_factory, "run", RUN, "hydra.run.dir")


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return copied(finished, tmp_path)


def edit_summary(run_dir: Path, **fields) -> None:
    (run_dir / "summary.json").write_text(json.dumps({**summary_of(run_dir), **fields}))


# ---------------------------------------------------------------- resume: spellings
@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["run/", "./run/../run", "ABSOLUTE"])
def test_a_finished_run_resumed_by_any_spelling_of_its_dir_writes_nothing(run_copy, tmp_path, data_root, spelling):
    before = snapshot(tmp_path)
    value = str(run_copy) if spelling == "ABSOLUTE" else spelling
    out = run_cli(["train", f"resume={value}"], tmp_path, data_root)
    assert_finished_and_untouched(out, run_copy, tmp_path, before)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["run/checkpoint.pt", "nope", "", "./x/../run"])
def test_resume_of_what_is_no_run_dir_is_refused_in_one_line(run_copy, tmp_path, data_root, value):
    """A checkpoint file, a missing dir, an empty value, a path through a missing folder: exit 2,
    the value named, nothing written (no outputs/ either)."""
    before = snapshot(tmp_path)
    out = run_cli(["train", f"resume={value}"], tmp_path, data_root)
    assert_refused(out, 2, f"regexp: error: resume={value}: must be a run directory holding checkpoint.pt", tmp_path,
                   before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------- resume: missing, extra and edited files
@pytest.mark.slow
def test_a_finished_run_without_its_checkpoint_is_refused_and_kept(run_copy, tmp_path, data_root):
    (run_copy / "checkpoint.pt").unlink()
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert_refused(out, 2, "regexp: error: resume=run: must be a run directory holding checkpoint.pt", tmp_path, before)


@pytest.mark.slow
def test_extra_files_in_a_finished_run_dir_change_nothing(run_copy, tmp_path, data_root):
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / "plots").mkdir()
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert_finished_and_untouched(out, run_copy, tmp_path, before)


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["missing", "running", "interrupted"])
def test_a_run_at_its_end_without_a_finished_record_only_evaluates(run_copy, tmp_path, data_root, edit):
    """summary.json removed, or edited to say running or interrupted, the checkpoint at the
    run's end: no step is trained, the summary says completed at step 4 with the test metrics
    the run had, the checkpoint and metrics.jsonl stay as they were."""
    done = summary_of(run_copy)
    if edit == "missing":
        (run_copy / "summary.json").unlink()
    else:
        edit_summary(run_copy, status=edit, metrics={})
    kept = {name: (run_copy / name).read_bytes() for name in ("checkpoint.pt", "best.pt", "metrics.jsonl")}
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stands at the end of its training (step 4): finishing its final evaluation, no step is trained" in out.stdout
    summary = summary_of(run_copy)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["metrics"]["test/acc"] == done["metrics"]["test/acc"]
    assert {name: (run_copy / name).read_bytes() for name in kept} == kept
    assert not (run_copy / LOCK).exists()


@pytest.mark.slow
@pytest.mark.parametrize("make, why", [
    (lambda p: edit_summary(p.parent, status="bogus"), "not a regexp run summary ('bogus' is not a valid Status)"),
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: (p.unlink(), p.mkdir()), "not a regular file (a directory)"),
])
def test_a_summary_that_is_no_summary_is_named_and_kept(run_copy, tmp_path, data_root, make, why):
    make(run_copy / "summary.json")
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert_refused(out, 1, f"regexp: error: {run_copy / 'summary.json'}: {why}", tmp_path, before)
    assert (run_copy / "summary.json").exists() and not (run_copy / LOCK).exists()


@pytest.mark.slow
def test_a_hand_edited_step_count_trains_nothing(run_copy, tmp_path, data_root):
    """The checkpoint says where training stands; a larger step count in summary.json trains nothing."""
    edit_summary(run_copy, steps=999)
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert_finished_and_untouched(out, run_copy, tmp_path, before)


# ---------------------------------------------------------------- resume: changed plan or config
@pytest.mark.slow
def test_lowering_max_steps_below_the_runs_end_writes_nothing(run_copy, tmp_path, data_root):
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run", "max_steps=2"], tmp_path, data_root)
    assert_finished_and_untouched(out, run_copy, tmp_path, before)


@pytest.mark.slow
@pytest.mark.parametrize("override, start", [
    ("optimizer.lr=0.5", "optimizer.lr=0.5: the run in run was trained with optimizer.lr=0.001; "),
    ("+regularizer=early_stopping", "regularizer.early_stopping.min_delta=0.0: the run in run was trained without "
                                    "regularizer.early_stopping.min_delta; "),
])
def test_a_resume_that_changes_the_training_is_refused_truthfully(run_copy, tmp_path, data_root, override, start):
    """Adding early stopping names a key the run was trained without (it never had it as None)."""
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run", override], tmp_path, data_root)
    line = assert_refused(out, 2, f"regexp: error: {start}", tmp_path, before)
    assert line.endswith("a resumed run may change only epochs, max_steps, eval_every, eval_batch_size, out_dir, "
                         "resume, checkpoint, logger, monitor, prune, device, dataset.root, dataset.download, dataset.cache")


# ---------------------------------------------------------------- the lock
def lock_of(run_dir: Path, text: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(text)
    return run_dir / LOCK


def start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.fixture
def sleeper():
    """A live process that is not regexp."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("with_start", [True, False])
def test_a_lock_naming_a_live_process_refuses_and_is_left(tmp_path, sleeper, with_start):
    """However the lock came there, its pid runs (and, when recorded, started then): the dir is
    refused in the pre-flight, exit 2, the lock and the dir as they were."""
    record = {"host": socket.gethostname(), "pid": sleeper.pid}
    if with_start:
        record["start"] = start_time(sleeper.pid)
    lock = lock_of(tmp_path / "run", json.dumps(record))
    before = snapshot(tmp_path)
    out = run_cli(["train", *RUN, "hydra.run.dir=run"], tmp_path)
    line = assert_refused(out, 2, f"regexp: error: hydra.run.dir=run: another regexp process writes {tmp_path / 'run'} "
                                  f"now (pid {sleeper.pid} on host {socket.gethostname()})", tmp_path, before)
    assert line.endswith("wait for it to end or choose another dir") and lock.is_file()


@pytest.mark.parametrize("text, why", [
    ('{"host": "h", "pid": 0}', "not a lock record: no host, pid and start time"),
    ("", "not a lock record: Expecting value"),
    ('{"host": "h", "pid": 1, "start": "yesterday"}', "not a lock record: no host, pid and start time"),
])
def test_a_hand_edited_lock_is_named_and_left(tmp_path, text, why):
    lock = lock_of(tmp_path / "run", text)
    before = snapshot(tmp_path)
    out = run_cli(["train", *RUN, "hydra.run.dir=run"], tmp_path)
    line = assert_refused(out, 1, f"regexp: error: {lock}: not a regexp lock file ({why}", tmp_path, before)
    assert line.endswith(f"if no regexp process writes {tmp_path / 'run'}, remove it")


def test_another_hosts_lock_names_the_file_to_remove(tmp_path):
    lock = lock_of(tmp_path / "run", json.dumps({"host": "node-9", "pid": 12}))
    before = snapshot(tmp_path)
    out = run_cli(["train", *RUN, "hydra.run.dir=run"], tmp_path)
    line = assert_refused(out, 2, "regexp: error: hydra.run.dir=run: another regexp process writes", tmp_path, before)
    assert line.endswith(f"(pid 12 on host node-9); wait for it to end, or if it no longer runs remove {lock}")


@pytest.mark.slow
def test_a_stale_lock_on_a_finished_run_is_taken_over_and_nothing_else_changes(run_copy, tmp_path, data_root):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_of(run_copy, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": 1}))
    before = snapshot(tmp_path)
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert one_line(out.stdout).startswith(f"{run_copy}: completed at step 4 ")
    assert one_line(out.stderr) == (f"regexp: {run_copy}: took over the lock of pid {dead.pid} on host "
                                    f"{socket.gethostname()} (that process no longer runs)")
    del before[f"run/{LOCK}"]
    assert snapshot(tmp_path) == before  # the stale lock gone, every record as it was


@pytest.mark.slow
def test_two_resumes_racing_by_relative_and_absolute_path_train_once(run_copy, tmp_path, data_root):
    """One continues the run to step 8; the other is refused (exit 2, one line) and writes nothing."""
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root), COLUMNS="200")
    from conftest import REGEXP

    racers = [subprocess.Popen([REGEXP, "train", f"resume={spelling}", "max_steps=8"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for spelling in ("run", str(run_copy))]
    results = [(p.wait(timeout=300), *p.communicate()) for p in racers]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert one_line(refused).startswith(f"regexp: error: hydra.run.dir={run_copy}: another regexp process writes {run_copy}")
    summary = summary_of(run_copy)
    assert (summary["status"], summary["steps"], summary["resumed_at_step"]) == ("completed", 8, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not (run_copy / LOCK).exists()


HOLD = """
import sys, time
from pathlib import Path
from regexp.lock import writing
with writing([Path(sys.argv[1])], "k"):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_a_symlink_to_a_held_run_dir_is_refused_naming_the_real_dir(run_copy, tmp_path, data_root):
    (tmp_path / "link").symlink_to(run_copy)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        out = run_cli(["train", "resume=link", "max_steps=8"], tmp_path, data_root)
        assert_refused(out, 2, f"regexp: error: hydra.run.dir={run_copy}: another regexp process writes {run_copy} now "
                               f"(pid {holder.pid} ", tmp_path, before)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- the fused launcher
@pytest.fixture(scope="module")
def fused_done(tmp_path_factory):
    """Three seeds trained as one fused group to their end (max_steps=4)."""
    return trained(tmp_path_factory, "sweep", SWEEP, "hydra.sweep.dir")


@pytest.fixture
def sweep_copy(fused_done, tmp_path) -> Path:
    return copied(fused_done, tmp_path)


def resume_sweep(tmp_path: Path, data_root: Path, *args: str):
    return run_cli(["train", *SWEEP, "resume=auto", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], tmp_path, data_root)


def assert_kept_and_placed(out, sweep: Path, kept: dict[int, dict], moved: str) -> None:
    """Exit 0, the console's one line of moved jobs, the `kept` dirs' files as they were."""
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines().count(f"resume=auto: run dirs by overrides (job->dir): {moved}") == 1, out.stdout[-2000:]
    assert {n: snapshot(sweep / str(n)) for n in kept} == kept


@pytest.mark.slow
def test_resume_auto_of_a_sweep_with_another_max_steps_trains_new_dirs_beside_the_runs_it_keeps(sweep_copy, tmp_path,
                                                                                              data_root):
    """max_steps=8 makes other runs: the jobs train as one group in dirs 3-5 (past the highest),
    the max_steps=4 runs of dirs 0-2 stay byte for byte."""
    kept = {n: snapshot(sweep_copy / str(n)) for n in range(3)}
    out = resume_sweep(tmp_path, data_root, "max_steps=8")
    assert_kept_and_placed(out, sweep_copy, kept, "0->3 1->4 2->5")
    assert [(summary_of(sweep_copy / str(n))["status"], summary_of(sweep_copy / str(n))["steps"]) for n in (3, 4, 5)] == [
        ("completed", 8)] * 3


@pytest.mark.slow
def test_a_members_dir_holding_another_run_is_kept_and_the_member_trains_in_a_new_dir(sweep_copy, finished, tmp_path,
                                                                                       data_root):
    shutil.rmtree(sweep_copy / "1")
    shutil.copytree(finished, sweep_copy / "1")  # a run of another model and seed
    kept = {n: snapshot(sweep_copy / str(n)) for n in range(3)}
    out = resume_sweep(tmp_path, data_root)
    assert_kept_and_placed(out, sweep_copy, kept, "1->3")
    summary = summary_of(sweep_copy / "3")
    assert summary["status"] == "completed" and "seed=1" in summary["overrides"]


@pytest.mark.slow
def test_resume_auto_trains_only_the_missing_member_and_says_why_it_runs_alone(sweep_copy, tmp_path, data_root):
    """Jobs 0 and 1 finished, job 2's dir gone: 0 and 1 are skipped with their records as they
    were, job 2 trains alone, and the line saying why is true (the others are finished)."""
    shutil.rmtree(sweep_copy / "2")
    kept = [without_hydra(snapshot(sweep_copy / str(n))) for n in (0, 1)]
    out = resume_sweep(tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "fused: jobs 0-1 finished earlier: resume=auto skips them" in lines  # they do not run: no "runs alone"
    assert ("fused: job 2 runs alone: no other job trains beside it (the others are finished or run alone)"
            in lines), [line for line in lines if line.startswith("fused:")]
    assert [without_hydra(snapshot(sweep_copy / str(n))) for n in (0, 1)] == kept
    summary = summary_of(sweep_copy / "2")
    assert summary["status"] == "completed" and summary["steps"] == 4 and "fused" not in summary
    rows = json.loads((sweep_copy / "sweep_summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["completed"] * 3


@pytest.mark.slow
def test_a_fused_member_whose_data_are_missing_fails_alone(tmp_path, data_root):
    """Only MNIST there: the Fashion-MNIST job fails with its reason in one stderr line and its
    record; the MNIST job completes; exit 1."""
    only = tmp_path / "data"
    only.mkdir()
    (only / "MNIST").symlink_to(data_root / "MNIST")
    sweep = tmp_path / "sweep"
    out = run_cli(["train", "-m", "hydra/launcher=fused", "model.hidden=[32]", *RUN, "dataset=mnist,fashion_mnist",
                   "dataset.download=false", f"hydra.sweep.dir={sweep}"], tmp_path, only)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    failed = [line for line in out.stdout.splitlines() if ": failed · " in line]  # the job's line as it ended, once
    assert len(failed) == 1 and failed[0].startswith("[2/2] job 1 (dataset=fashion_mnist): failed · ConfigError: dataset."), failed
    assert summary_of(sweep / "0")["status"] == "completed"
    assert summary_of(sweep / "1")["status"] == "failed" and not (sweep / "1" / "checkpoint.pt").exists()
    rows = json.loads((sweep / "sweep_summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["completed", "failed"] and "fashion_mnist" in rows[1]["error"]


@pytest.mark.slow
def test_a_held_sweep_refuses_a_second_sweep_and_a_resume_of_its_member(sweep_copy, tmp_path, data_root):
    """While another process writes the sweep dir: resume=auto of the sweep and a resume of one of
    its job dirs are refused in one line each, exit 2, nothing written."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(sweep_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        out = resume_sweep(tmp_path, data_root)
        assert_refused(out, 2, f"regexp: error: hydra.sweep.dir={sweep_copy}: another regexp process writes {sweep_copy} "
                               f"now (pid {holder.pid} ", tmp_path, before)
        out = run_cli(["train", "resume=sweep/1", "max_steps=8"], tmp_path, data_root)
        assert_refused(out, 2, f"regexp: error: hydra.run.dir={sweep_copy / '1'}: {sweep_copy / '1'} lies inside "
                               f"{sweep_copy}, which another regexp process writes now (pid {holder.pid} ", tmp_path, before)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_member_resumed_by_hand_with_other_overrides_is_kept_by_the_sweeps_resume(sweep_copy, tmp_path, data_root):
    """Job 1 continued alone to max_steps=6 is a run of other overrides: resume=auto of the
    sweep (max_steps=4) leaves it as it is and trains job 1 anew in dir 3."""
    out = run_cli(["train", "resume=sweep/1", "max_steps=6"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert summary_of(sweep_copy / "1")["steps"] == 6
    kept = {n: snapshot(sweep_copy / str(n)) for n in range(3)}
    out = resume_sweep(tmp_path, data_root)
    assert_kept_and_placed(out, sweep_copy, kept, "1->3")
    assert (summary_of(sweep_copy / "3")["status"], summary_of(sweep_copy / "3")["steps"]) == ("completed", 4)


@pytest.mark.slow
def test_a_fused_sweep_stopped_by_sigterm_resumes_in_groups_of_max_models(tmp_path, data_root):
    """SIGTERM once the first metrics are logged: every job interrupted with a checkpoint at one
    step, exit 143; resume=auto with max_models=2 fuses jobs 0-1, runs job 2 alone (saying
    why), and every job completes the epoch from the step it stopped at."""
    from conftest import REGEXP, signal_once_logged

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=fused", "model.hidden=[32]", "logger=none", "dataset.limit=2048",
            "dataset.val_size=256", "batch_size=32", "epochs=1", "monitor.log_every=2", "seed=0,1,2",
            f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root), COLUMNS="200")
    code, _, err = signal_once_logged([REGEXP, *args], tmp_path, env, sweep / "0" / "metrics.jsonl", 15)
    assert code == 143, err[-2000:]
    stopped = [summary_of(sweep / str(n)) for n in range(3)]
    assert {s["status"] for s in stopped} == {"interrupted"} and len({s["steps"] for s in stopped}) == 1
    assert all((sweep / str(n) / "checkpoint.pt").is_file() for n in range(3))
    out = run_cli([*args, "resume=auto", "hydra.launcher.max_models=2"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "fused: jobs 0-1 train as one group of 2 models" in lines
    assert "fused: job 2 runs alone: hydra.launcher.max_models=2 caps a group (jobs 0-2 share its config)" in lines
    done = [summary_of(sweep / str(n)) for n in range(3)]
    assert [(s["status"], s["steps"], s["resumed_at_step"]) for s in done] == [("completed", 64, stopped[0]["steps"])] * 3
    assert [s.get("fused", {}).get("models") for s in done] == [2, 2, None]


# ---------------------------------------------------------------- killed before its first checkpoint
@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_told_the_way_that_works(run_copy, tmp_path, data_root):
    """What a SIGKILL before the first checkpoint leaves (summary running at step 0, .hydra/, no
    checkpoint): a new run there is refused with advice that works (resume=DIR cannot: there is
    no checkpoint), resume=DIR is refused, and resume=auto trains it from the start."""
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl", "diagnosis.json"):
        (run_copy / name).unlink()
    edit_summary(run_copy, status="running", steps=0, metrics={}, finished_at=None)
    before = snapshot(tmp_path)
    out = run_cli(["train", *RUN, "hydra.run.dir=run"], tmp_path, data_root)
    assert_refused(out, 2, "regexp: error: hydra.run.dir=run: holds a run already; it saved no checkpoint: start it "
                           "again there with resume=auto, or choose another run dir", tmp_path, before)
    out = run_cli(["train", "resume=run"], tmp_path, data_root)
    assert_refused(out, 2, "regexp: error: resume=run: must be a run directory holding checkpoint.pt", tmp_path, before)
    out = run_cli(["train", *RUN, "hydra.run.dir=run", "resume=auto"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = summary_of(run_copy)
    assert summary["status"] == "completed" and summary["steps"] == 4 and (run_copy / "checkpoint.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("resume", [[], ["resume=auto"]])
def test_a_finished_run_without_its_checkpoint_is_not_sent_to_resume(run_copy, tmp_path, data_root, resume):
    (run_copy / "checkpoint.pt").unlink()
    before = snapshot(tmp_path)
    out = run_cli(["train", *RUN, "hydra.run.dir=run", *resume], tmp_path, data_root)
    assert_refused(out, 2, "regexp: error: hydra.run.dir=run: holds a run already; it saved no checkpoint to continue "
                           "from: choose another run dir", tmp_path, before)
