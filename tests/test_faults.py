"""Nothing lost: exact resume after a kill, signals, bad files, a full or read-only disk."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REGEXP, answer_sigint, records, run_cli

RUN = ["logger=none", "dataset.limit=6000", "dataset.val_size=1000", "epochs=2", "+regularizer=dropout",
       "device.deterministic=true", "checkpoint.every_steps=5", "monitor.log_every=10"]


def checkpoint_step(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    except Exception:  # not there yet, or being replaced
        return -1


def start(run_dir: Path, data_root: Path, extra=()) -> subprocess.Popen:
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root))
    return subprocess.Popen([REGEXP, "train", *RUN, *extra, f"hydra.run.dir={run_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=answer_sigint)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 120
    while checkpoint_step(run_dir) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from conftest import require_shared_data

    data_root = require_shared_data()
    run_dir = tmp_path_factory.mktemp("full") / "run"
    out = run_cli(["train", *RUN, f"hydra.run.dir={run_dir}"], run_dir.parent, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise
    ma, mb = (json.loads((d / "summary.json").read_text())["metrics"] for d in (a, b))
    assert {k: v for k, v in ma.items() if "perf" not in k} == {k: v for k, v in mb.items() if "perf" not in k}
    assert records(a) == records(b)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, data_root, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(run_dir, data_root)
    wait_for_step(proc, run_dir, 20)  # epoch 1 has 40 steps
    proc.kill()
    proc.wait()
    assert 20 <= checkpoint_step(run_dir) < 40
    out = run_cli(["train", f"resume={run_dir}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert_same_run(uninterrupted, run_dir)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_saves_marks_interrupted_and_exits(tmp_path, data_root, uninterrupted, signum, code):
    run_dir = tmp_path / "run"
    proc = start(run_dir, data_root)
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-2000:]
    assert "interrupted" in stderr and "resume=" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert checkpoint_step(run_dir) == summary["steps"] >= 10
    out = run_cli(["train", f"resume={run_dir}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same_run(uninterrupted, run_dir)


def snapshot_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, data_root) -> Path:
    run_dir = tmp_path / "run"
    out = run_cli(["train", "logger=none", "dataset.limit=1000", "dataset.val_size=500", "epochs=1", f"hydra.run.dir={run_dir}"],
                  tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


def assert_one_line_error(out, *needles):
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode != 0 and len(lines) == 1, out.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_corrupted_checkpoint_is_named_and_nothing_changes(tmp_path, data_root, finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])  # truncated mid-write by something else
    before = snapshot_files(finished_run)
    out = run_cli(["train", f"resume={finished_run}", "epochs=2"], tmp_path, data_root)
    assert_one_line_error(out, str(ckpt), "truncated or corrupted")
    assert out.returncode == 1 and snapshot_files(finished_run) == before


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path, data_root, finished_run):
    before = snapshot_files(finished_run)
    out = run_cli(["train", f"resume={finished_run}", "model.hidden=[64]"], tmp_path, data_root)
    assert_one_line_error(out, "checkpoint.pt", "another model")
    assert out.returncode == 1 and snapshot_files(finished_run) == before


@pytest.mark.slow
def test_resume_of_a_dir_without_checkpoint_is_bad_input(tmp_path, data_root):
    out = run_cli(["train", f"resume={tmp_path}"], tmp_path, data_root)
    assert_one_line_error(out, f"resume={tmp_path}", "checkpoint.pt")
    assert out.returncode == 2


@pytest.mark.slow
def test_truncated_data_file_is_named(tmp_path, data_root):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_root / "MNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    with open(raw / "train-labels-idx1-ubyte", "r+b") as fh:
        fh.truncate(1000)
    out = run_cli(["train", "logger=none", f"dataset.root={tmp_path / 'data'}", "dataset.download=false", f"out_dir={tmp_path}/out"], tmp_path)
    assert_one_line_error(out, str(raw / "train-labels-idx1-ubyte"), "truncated or corrupted")
    assert out.returncode == 1


@pytest.mark.parametrize("target,reason", [("/dev/full", "No space left"), ("/proc/version", "")])
@pytest.mark.slow
def test_disk_full_or_read_only_mid_run(tmp_path, data_root, finished_run, target, reason):
    """The next checkpoint write fails (full disk / unwritable): a clear error, the old one intact."""
    old_checkpoint = (finished_run / "checkpoint.pt").read_bytes()
    (finished_run / ".checkpoint.pt.tmp").symlink_to(target)
    out = run_cli(["train", f"resume={finished_run}", "epochs=2"], tmp_path, data_root)
    assert_one_line_error(out, str(finished_run / "checkpoint.pt"), "cannot write", reason, "intact")
    assert out.returncode == 1
    assert (finished_run / "checkpoint.pt").read_bytes() == old_checkpoint
    # the finished run's record stays; the failed continuation is recorded beside it (issue 12)
    assert json.loads((finished_run / "summary.json").read_text())["status"] == "completed"
    assert json.loads((finished_run / "continuation.json").read_text())["status"] == "failed"
    assert not list(finished_run.glob(".*.tmp"))


def test_second_signal_stops_at_once():
    from regexp.rundir import Interrupted
    from regexp.train import StopSignal

    before = signal.getsignal(signal.SIGINT)  # pytest's, or SIG_IGN when pytest was started ignoring SIGINT
    with StopSignal() as stop:
        stop.handle(signal.SIGINT, None)  # the first: noted, the loop saves and stops at the next step
        assert stop.received == signal.SIGINT
        with pytest.raises(Interrupted) as again:
            stop.handle(signal.SIGINT, None)  # the second: right now
        assert again.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # the handler from before is back


def test_an_ignored_sigint_stays_ignored():
    """Started ignoring SIGINT (a script's `regexp train &`): the run leaves it so, and takes SIGTERM."""
    from regexp.train import StopSignal

    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop.handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved)
