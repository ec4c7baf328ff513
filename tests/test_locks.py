"""One writer per run dir (regexp.lock): a live writer refuses the next one, a dead one's lock
is taken over with a line saying whose it was, the lock is re-entrant within a process and
gone after any exit, jobs whose run dirs coincide are refused in the pre-flight, readers
never lock. Holders are real processes."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from omegaconf import OmegaConf

from regexp.lock import LOCK, DirHeld, check_free, read_holder, writing
from regexp.rundir import ConfigError, RunError, Status, Summary, write_summary

HOLD = """
import sys, time
from regexp.lock import writing
with writing([sys.argv[1]], "run_dir"):
    print("held", flush=True)
    time.sleep(600)
"""

RACE = """
import sys, time
from pathlib import Path
from regexp.lock import DirHeld, writing
start = Path(sys.argv[2])
while not start.exists():
    time.sleep(0.001)
try:
    with writing([sys.argv[1]], "run_dir"):
        print("won", flush=True)
        time.sleep(3)  # long enough for every other racer to find it held
except DirHeld:
    print("refused", flush=True)
"""


@pytest.fixture
def holder():
    """Start a process that holds a dir's lock until it is killed; killed at the end."""
    started = []

    def hold(run_dir: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "start": 1, **fields}))
    return lock


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[-2000:]
    return lines[0]


# ---------------------------------------------------------------- the lock itself
def test_the_lock_is_reentrant_and_gone_after_the_block(tmp_path):
    run_dir = tmp_path / "run"
    with writing([run_dir], "run_dir"):
        record = (run_dir / LOCK).read_bytes()
        with writing([run_dir, tmp_path / "other"], "run_dir"):  # training locks again what the pre-flight holds
            assert (run_dir / LOCK).read_bytes() == record
        assert (run_dir / LOCK).read_bytes() == record and not (tmp_path / "other" / LOCK).exists()
        holder = read_holder(run_dir / LOCK)
        assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["other", "run"]  # no lock, no temp file left


def test_the_lock_is_released_after_an_exception(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with writing([tmp_path], "run_dir"):
            1 / 0
    assert not (tmp_path / LOCK).exists()
    child = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0 and child.stderr == ""  # free for the next process, nothing taken over


def test_a_holder_stopped_by_ctrl_c_removes_its_lock(tmp_path, holder):
    process = holder(tmp_path)
    process.send_signal(signal.SIGINT)  # KeyboardInterrupt: the block's finally runs
    process.wait(timeout=60)
    assert list(tmp_path.iterdir()) == []


def test_a_live_holder_refuses_another_process_and_nothing_is_written(tmp_path, holder):
    process = holder(tmp_path)
    before = files(tmp_path)
    with pytest.raises(DirHeld) as refused:
        with writing([tmp_path], "hydra.run.dir"):
            pass
    assert str(refused.value).startswith(f"hydra.run.dir={tmp_path}: another regexp process writes {tmp_path} now "
                                         f"(pid {process.pid} on host {socket.gethostname()}, since ")
    assert files(tmp_path) == before
    check_free(tmp_path.with_name(tmp_path.name + "-elsewhere"), "k", "v")  # another dir is free
    with pytest.raises(DirHeld):
        check_free(tmp_path, "hydra.sweep.dir", "sweep")


@pytest.mark.parametrize("reap", [False, True], ids=["zombie", "reaped"])
def test_a_sigkilled_holders_lock_is_taken_over_with_a_line(tmp_path, holder, capsys, reap):
    process = holder(tmp_path)
    process.send_signal(signal.SIGKILL)
    if reap:
        process.wait()
    else:
        while not Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            time.sleep(0.01)
    check_free(tmp_path, "k", "v")  # the pre-flight leaves a stale lock to the writer
    with writing([tmp_path], "run_dir"):
        assert read_holder(tmp_path / LOCK).pid == os.getpid()
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"regexp: {tmp_path}: took over the lock of pid {process.pid} "
                           f"on host {socket.gethostname()}")
    assert line.endswith("(that process has ended (a zombie))" if not reap else "(that process no longer runs)")
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, holder, capsys):
    live = holder(tmp_path / "elsewhere")
    write_lock(tmp_path, pid=live.pid, start=1)  # the pid runs, but it started after the lock was taken
    with writing([tmp_path], "run_dir"):
        pass
    assert "(that pid is another process now)" in one_line(capsys.readouterr().err)


def test_another_hosts_lock_is_not_assumed_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no squeue to ask (this machine may run a SLURM)
    lock = write_lock(tmp_path, host="node-17", pid=4242, slurm_job="991")
    before = files(tmp_path)
    with pytest.raises(DirHeld, match=rf"\(pid 4242 on host node-17, SLURM job 991\); wait for it to end, or if it "
                                      rf"no longer runs remove {lock}$"):
        with writing([tmp_path], "run_dir"):
            pass
    assert files(tmp_path) == before and capsys.readouterr().err == ""


@pytest.mark.parametrize("squeue, taken", [("exit 0", True), ("echo RUNNING", False),
                                          ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", True),
                                          ("echo 'cannot reach slurmctld' >&2; exit 1", False)],
                         ids=["not listed", "running", "unknown id", "no answer"])
def test_a_slurm_jobs_lock_is_stale_once_squeue_no_longer_lists_it(tmp_path, monkeypatch, capsys, squeue, taken):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\n{squeue}\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    write_lock(run_dir, host="node-17", pid=4242, slurm_job="991")
    if taken:
        with writing([run_dir], "run_dir"):
            pass
        assert "took over the lock of pid 4242 on host node-17, SLURM job 991 (squeue no longer lists SLURM job 991)" \
               in capsys.readouterr().err
    else:
        with pytest.raises(DirHeld, match="SLURM job 991"):
            with writing([run_dir], "run_dir"):
                pass
        assert (run_dir / LOCK).exists()


def test_two_racing_takers_of_one_stale_lock_one_wins(tmp_path):
    run_dir, start = tmp_path / "run", tmp_path / "start"
    write_lock(run_dir)
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(run_dir), str(start)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(6)]
    time.sleep(1.0)  # every racer imported and waiting
    start.touch()
    results = [racer.communicate(timeout=120) for racer in racers]
    outcomes = sorted(out.strip() for out, _ in results)
    assert outcomes == ["refused"] * 5 + ["won"], results
    winner = next(err for out, err in results if out.strip() == "won")
    assert winner.startswith(f"regexp: {run_dir}: took over the lock of pid ")  # whichever taker removed it
    assert all(err == "" for out, err in results if out.strip() != "won")
    assert sorted(p.name for p in run_dir.iterdir()) == []


def claim_of(lock: Path, **holder) -> Path:
    """A takeover claim on `lock`'s stale record, as a taker leaves it."""
    claim = lock.with_name(f"{LOCK}.{hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}.claim")
    claim.write_text(json.dumps({"host": socket.gethostname(), **holder}))
    return claim


def test_a_taker_killed_mid_way_leaves_a_claim_that_the_next_one_removes(tmp_path, capsys):
    claim_of(write_lock(tmp_path), pid=dead_pid())
    with writing([tmp_path], "run_dir"):
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]
    assert "took over the lock of pid" in capsys.readouterr().err


def test_a_live_takers_claim_is_left_to_it(tmp_path, holder):
    live = holder(tmp_path / "elsewhere")
    lock = write_lock(tmp_path)
    claim = claim_of(lock, pid=live.pid)
    before = files(tmp_path)
    with pytest.raises(DirHeld, match="other processes keep taking this dir's lock"):
        with writing([tmp_path], "run_dir"):
            pass
    assert files(tmp_path) == before and claim.exists()


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_text("not json {"), "not a lock record"),
    (lambda p: p.write_text('{"host": "h", "pid": "12"}'), "not a lock record"),
    (lambda p: p.write_text(json.dumps({"host": socket.gethostname(), "pid": 10**20})), None),  # no such process: stale
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.symlink_to(p.with_name("elsewhere")), "Too many levels of symbolic links"),
], ids=["garbage", "pid-a-string", "pid-too-large", "directory", "fifo", "symlink"])
def test_something_else_at_the_lock_path_is_refused_and_left_there(tmp_path, capsys, make, why):
    lock = tmp_path / LOCK
    make(lock)
    if why is None:
        with writing([tmp_path], "run_dir"):
            pass
        assert f"took over the lock of pid {10**20} " in capsys.readouterr().err
        return
    kind = os.lstat(lock).st_mode
    with pytest.raises(RunError) as refused:
        with writing([tmp_path], "run_dir"):
            pass
    assert str(refused.value).startswith(f"{lock}: not a regexp lock file ({why}")
    assert str(refused.value).endswith(f"if no regexp process writes {tmp_path}, remove it")
    assert os.lstat(lock).st_mode == kind and sorted(p.name for p in tmp_path.iterdir()) == [LOCK]


def test_two_runs_into_one_dir_are_refused_before_any_lock(tmp_path):
    with pytest.raises(DirHeld, match="two runs of this command would write this dir"):
        with writing([tmp_path / "a", tmp_path / "b", tmp_path / "b" / ".." / "a"], "run_dir"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_readers_work_while_a_writer_holds_the_dir(tmp_path, holder):
    import regexp

    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    write_summary(run_dir, Summary(status=Status.COMPLETED, run_dir=str(run_dir), metrics={"test/acc": 0.5}))
    holder(run_dir)
    holder(tmp_path / "sweep")
    assert regexp.load(run_dir).summary.status is Status.COMPLETED
    assert [r["run_dir"] for r in regexp.compare([tmp_path])["runs"]] == [str(run_dir)]
    assert (run_dir / LOCK).exists() and (tmp_path / "sweep" / LOCK).exists()


# ---------------------------------------------------------------- where regexp takes it
def test_training_refuses_a_held_run_dir_before_writing(tmp_path, holder, data_root):
    from regexp.compose import compose_and_validate
    from regexp.train import RunSpec, train_group

    cfg = compose_and_validate([*TINY, "logger=none", f"dataset.root={data_root}"])
    holder(tmp_path / "b")
    before = files(tmp_path)
    with pytest.raises(DirHeld, match=f"run_dir={tmp_path / 'b'}: another regexp process writes"):
        train_group([RunSpec(cfg, tmp_path / "a"), RunSpec(cfg, tmp_path / "b")])  # a fused group
    with pytest.raises(DirHeld, match="two runs of this command would write this dir"):
        train_group([RunSpec(cfg, tmp_path / "a"), RunSpec(cfg, tmp_path / "a")])
    assert files(tmp_path) == before and not (tmp_path / "a" / LOCK).exists()
    with pytest.raises(ConfigError, match="another regexp process writes"):
        import regexp

        regexp.run([*TINY, "logger=none", f"dataset.root={data_root}"], run_dir=tmp_path / "b")
    assert files(tmp_path) == before


def test_a_sweep_job_refused_by_the_lock_writes_nothing_in_its_run_dir(tmp_path, capsys):
    from hydra.types import RunMode

    from regexp.sweep import record_failure, sweep_rows

    run_dir = tmp_path / "0"
    run_dir.mkdir()
    write_summary(run_dir, Summary(status=Status.RUNNING, overrides=["seed=9"]))  # another command's live run
    hydra_cfg = OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)}, "job": {"num": 0},
                                  "runtime": {"output_dir": str(run_dir)}, "overrides": {"task": ["seed=0"]}})
    before = files(run_dir)
    record_failure(hydra_cfg, DirHeld("run_dir", str(run_dir), "another regexp process writes it now"))
    assert files(run_dir) == before
    assert [(r["status"], r["error"]) for r in sweep_rows(tmp_path)] == [
        ("refused", f"run_dir={run_dir}: another regexp process writes it now")]
    assert capsys.readouterr().err == ""  # the job's line is the sweep's (JobEnds), from its record


@pytest.mark.parametrize("overrides, allowed", [
    (["seed=0,1", "hydra.sweep.subdir=same"], "jobs 0 and 1 would both write {sweep}/same; use a subdir that differs"),
    (["seed=0,1", "hydra/launcher=fused", "hydra.sweep.subdir=same"], "jobs 0 and 1 would both write {sweep}/same;"),
    (["seed=0,1,2", "optimizer.lr=0.1", "hydra.sweep.subdir=${optimizer.lr}"],
     "jobs 0 and 1 would both write {sweep}/0.1;"),
    (["seed=0", "hydra.sweep.subdir=."], "job 0's run dir would be the sweep dir {sweep} itself;"),
    (["seed=0,1", "hydra.sweep.subdir=x/../${hydra.job.num}/.."],
     "job 0's run dir would be the sweep dir {sweep} itself;"),
], ids=["basic", "fused", "interpolated", "dot", "dotdot"])
def test_the_preflight_refuses_jobs_whose_run_dirs_coincide(tmp_path, overrides, allowed):
    from regexp.cli import precheck

    sweep = tmp_path / "sweep"
    with pytest.raises(ConfigError) as refused:
        precheck([*overrides, f"hydra.sweep.dir={sweep}", "logger=none"], multirun=True)
    assert str(refused.value).startswith("hydra.sweep.subdir=")
    assert allowed.format(sweep=sweep) in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_the_preflight_refuses_a_sweep_whose_job_dir_a_live_process_writes(tmp_path, holder):
    from regexp.cli import precheck

    sweep = tmp_path / "sweep"
    process = holder(sweep / "1")
    before = files(tmp_path)
    with pytest.raises(DirHeld, match=rf"^hydra.sweep.dir={sweep}: another regexp process writes {sweep / '1'} now "
                                      rf"\(pid {process.pid} "):
        precheck(["seed=0,1", f"hydra.sweep.dir={sweep}", "logger=none"], multirun=True)
    with pytest.raises(DirHeld, match=rf"^hydra.sweep.dir={sweep / '1'}: another regexp process writes"):
        precheck(["seed=0,1", f"hydra.sweep.dir={sweep / '1'}", "logger=none"], multirun=True)  # the sweep dir itself
    assert files(tmp_path) == before
    process.kill()
    process.wait()
    assert precheck(["seed=0,1", f"hydra.sweep.dir={sweep}", "logger=none"], multirun=True)[0] == str(sweep)  # stale


@pytest.mark.parametrize("subdir, refused", [("same", True), ("${hydra.job.name}", True), ("${hydra.job.num}", False),
                                            ("${hydra.job.override_dirname}", False), ("lr${optimizer.lr}", False)])
def test_the_preflight_refuses_a_search_whose_trials_would_share_one_dir(tmp_path, subdir, refused):
    from regexp.cli import precheck

    sweep = tmp_path / "sweep"
    overrides = ["hydra/sweeper=tune", f"hydra.sweep.dir={sweep}", f"hydra.sweep.subdir={subdir}", "logger=none"]
    if refused:
        with pytest.raises(ConfigError, match=rf"^hydra.sweep.subdir={subdir.replace('$', '[$]')}: every trial of this "
                                              rf"search would write {sweep}/"):
            precheck(overrides, multirun=True)
    else:
        precheck(overrides, multirun=True)
    assert list(tmp_path.iterdir()) == []


def test_a_drawn_job_whose_run_dir_is_an_earlier_jobs_is_refused_and_recorded(tmp_path, capsys):
    from hydra.types import RunMode

    from regexp.sweep import Refused, check_drawn_job_dir, record_failure, sweep_rows, write_job_record

    def node(number: int, run_dir: Path):
        return OmegaConf.create({"mode": RunMode.MULTIRUN, "job": {"num": number},
                                 "overrides": {"task": [f"seed={number}"]}, "runtime": {"output_dir": str(run_dir)},
                                 "sweep": {"dir": str(tmp_path), "subdir": "same"}})

    write_job_record(node(0, tmp_path / "same"))
    (tmp_path / "same").mkdir()
    write_summary(tmp_path / "same", Summary(status=Status.COMPLETED, overrides=["seed=0"], metrics={"test/acc": 0.5}))
    check_drawn_job_dir(node(1, tmp_path / "other"))
    write_job_record(node(1, tmp_path / "same"))
    before = files(tmp_path / "same")
    with pytest.raises(Refused) as refused:
        check_drawn_job_dir(node(1, tmp_path / "same"))
    assert str(refused.value) == (f"hydra.sweep.subdir=same: job 1's run dir {tmp_path / 'same'} is job 0's too: "
                                  "not trained there; use a subdir that differs between jobs "
                                  "(the default is ${hydra.job.num})")
    record_failure(node(1, tmp_path / "same"), refused.value)
    assert [(r["job"], r["status"]) for r in sweep_rows(tmp_path)] == [("0", "completed"), ("1", "refused")]
    assert files(tmp_path / "same") == before and capsys.readouterr().err == ""  # its line: JobEnds, from the record


# ---------------------------------------------------------------- the command line
@pytest.mark.slow
def test_cli_resume_of_a_held_run_is_refused_then_taken_over_once_its_holder_is_killed(tmp_path, data_root, holder):
    run_dir = tmp_path / "run"
    first = run_cli(["train", *TINY, "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    assert first.returncode == 0, first.stderr
    process = holder(run_dir)  # a sweep's job, say, still training it
    before = files(tmp_path)
    out = run_cli(["train", f"resume={run_dir}", "max_steps=8"], tmp_path, data_root)
    assert out.returncode == 2 and one_line(out.stderr).startswith(
        f"regexp: error: hydra.run.dir={run_dir}: another regexp process writes {run_dir} now (pid {process.pid} ")
    assert files(tmp_path) == before
    process.send_signal(signal.SIGKILL)
    process.wait()
    out = run_cli(["train", f"resume={run_dir}", "max_steps=8"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr
    assert f"regexp: {run_dir}: took over the lock of pid {process.pid}" in out.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8 and not (run_dir / LOCK).exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "fused"])
def test_cli_sweep_whose_jobs_share_a_run_dir_is_refused_and_writes_nothing(tmp_path, data_root, launcher):
    sweep = tmp_path / "sweep"
    out = run_cli(["train", "-m", "seed=0,1", *TINY, "logger=none", f"hydra/launcher={launcher}",
                   f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=same"], tmp_path, data_root)
    assert out.returncode == 2
    assert one_line(out.stderr) == (f"regexp: error: hydra.sweep.subdir=same: jobs 0 and 1 would both write "
                                    f"{sweep}/same; use a subdir that differs between jobs "
                                    "(the default is ${hydra.job.num})")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_search_whose_draws_share_a_run_dir_trains_only_the_first(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    drawn = "optimizer.lr,optimizer.weight_decay,regularizer.dropout.p"  # the dir names none of what the search draws
    out = run_cli(["train", "-m", *TINY, "logger=none", "hydra/sweeper=tune", "hydra.sweeper.n_trials=2",
                   f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
                   f"hydra.job.config.override_dirname.exclude_keys=[{drawn}]"], tmp_path, data_root)
    assert out.returncode == 1, out.stderr[-2000:]
    rows = json.loads((sweep / "sweep_summary.json").read_text())["rows"]
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "refused")]
    assert "job 1's run dir" in rows[1]["error"] and "is job 0's too: not trained there" in rows[1]["error"]
    run_dir = Path(rows[0]["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["overrides"][0].startswith("optimizer.lr=")
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r] == [2, 4]  # job 0's records alone


def test_a_run_dir_inside_a_sweep_dir_another_process_writes_is_refused_before_its_job_starts(tmp_path, holder):
    """`resume=SWEEP/3` while the sweep trains job 1: job 3's dir is not locked yet, but the sweep's is."""
    import regexp
    from regexp.cli import precheck

    sweep = tmp_path / "sweep"
    process = holder(sweep)
    before = files(tmp_path)
    inside = rf"{sweep / '3'} lies inside {sweep}, which another regexp process writes now \(pid {process.pid} "
    with pytest.raises(DirHeld, match=rf"^hydra.run.dir={sweep / '3'}: {inside}"):
        precheck([f"hydra.run.dir={sweep / '3'}", "logger=none"], multirun=False)
    with pytest.raises(DirHeld, match=rf"^run_dir={sweep / '3'}: {inside}"):
        regexp.run(["logger=none"], run_dir=sweep / "3")
    assert files(tmp_path) == before
    process.kill()
    process.wait()
    check_free(sweep / "3", "run_dir", str(sweep / "3"))  # its holder is gone: nothing holds it


def test_what_is_no_lock_above_a_run_dir_is_not_its_business(tmp_path):
    (tmp_path / LOCK).mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK).write_text("garbage")
    check_free(tmp_path / "a" / "run", "run_dir", "x")
    with pytest.raises(RunError, match="not a regexp lock file"):
        check_free(tmp_path / "a", "run_dir", "x")  # its own lock path is


def test_two_threads_of_one_process_are_two_writers(tmp_path):
    """The lock is re-entrant in the thread that holds it, not in another (two regexp.run at once)."""
    import threading

    refused = []

    def second_writer():
        try:
            with writing([tmp_path], "run_dir"):
                pass
        except DirHeld as e:
            refused.append(str(e))

    with writing([tmp_path], "run_dir"):
        with writing([tmp_path], "run_dir"):  # the same thread: re-entrant
            thread = threading.Thread(target=second_writer)
            thread.start()
            thread.join()
    assert refused == [f"run_dir={tmp_path}: another thread of this process writes this dir now; "
                       "wait for it to end or choose another dir"]
    assert not (tmp_path / LOCK).exists()
    second_writer()  # free again
    assert len(refused) == 1
