"""A run dir is a record nobody can corrupt: one writer, no new run over a recorded one, a
resume checked before it writes, a finished summary never replaced by a worse one."""

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REGEXP, run_cli

from regexp.rundir import (
    CONTINUATION,
    Interrupted,
    Status,
    Summary,
    SummaryRecord,
    load_summary,
    read_metrics,
)

SMALL = ["logger=none", "dataset.limit=512", "dataset.val_size=256", "epochs=1", "batch_size=64"]


def fingerprint(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------- fast: the records' rules
def test_a_finished_summary_is_replaced_only_by_one_as_good(tmp_path):
    earlier = Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9})
    record = SummaryRecord(tmp_path, earlier)
    record.write(earlier, final=True)  # what the run dir held
    running = Summary(status=Status.RUNNING)
    record.write(running)
    assert load_summary(tmp_path).status == "completed" and (tmp_path / CONTINUATION).is_file()
    record.write(Summary(status=Status.FAILED, error="boom"), final=True)
    assert load_summary(tmp_path).metrics == {"test/acc": 0.9}
    assert (tmp_path / CONTINUATION).read_text().count('"failed"') == 1
    record.write(Summary(status=Status.COMPLETED, metrics={"test/acc": 0.95}), final=True)
    assert load_summary(tmp_path).metrics == {"test/acc": 0.95} and not (tmp_path / CONTINUATION).exists()


def test_a_new_run_dir_writes_summary_json_from_the_start(tmp_path):
    record = SummaryRecord(tmp_path, None)
    record.write(Summary(status=Status.RUNNING))
    assert load_summary(tmp_path).status == "running"
    record.write(Summary(status=Status.FAILED, error="x"), final=True)
    assert load_summary(tmp_path).status == "failed"


def test_interruption_advice_says_what_is_on_disk(tmp_path):
    from regexp.cli import interruption_advice

    assert "checkpoint saved" in interruption_advice(Interrupted(2, saved=True), str(tmp_path))
    assert "before any checkpoint" in interruption_advice(Interrupted(2), str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert "last one saved" in interruption_advice(Interrupted(15), str(tmp_path))


# ---------------------------------------------------------------- slow: through the CLI
@pytest.fixture
def finished(tmp_path, data_root) -> Path:
    run_dir = tmp_path / "run"
    out = run_cli(["train", *SMALL, f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_refused_commands_leave_a_finished_run_as_it_was(tmp_path, data_root, finished):
    before = fingerprint(finished)
    cases = [
        (["train", *SMALL, f"hydra.run.dir={finished}"], 2, "holds a run already"),  # a new run into it
        (["train", f"resume={finished}", "optimizer=sgd"], 2, "optimizer.name=sgd"),  # an override that does not fit
        (["train", f"resume={finished}", "optimizer.lr=0.5", "epochs=2"], 2, "optimizer.lr=0.5"),  # would not take effect
    ]
    for args, code, needle in cases:
        out = run_cli(args, tmp_path, data_root)
        assert out.returncode == code and needle in one_line(out), (args, out.stderr[-1000:])
        assert fingerprint(finished) == before, args
    (finished / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    broken = fingerprint(finished)
    out = run_cli(["train", f"resume={finished}", "epochs=2"], tmp_path, data_root)
    assert out.returncode == 1 and "metrics.jsonl:2" in one_line(out) and fingerprint(finished) == broken


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, data_root):
    import os

    run_dir = tmp_path / "run"
    args = ["train", "logger=none", "dataset.limit=8192", "dataset.val_size=256", "epochs=3", "batch_size=32", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root))
    first = subprocess.Popen([REGEXP, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        second = run_cli(args, tmp_path, data_root)
        assert second.returncode == 2 and f"another regexp process writes {run_dir} now" in one_line(second)
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one writer: no interleaved records
