"""A run at its end stays finished: `resume=` of a completed, max_steps-ended, early-stopped or
diverged run writes nothing and exits 0 with one line; a run killed in its final test only
finishes that evaluation; raising epochs continues exactly. Fused sweeps: a member that cannot
start fails alone, a member at its end evaluates alone. Honest counters of a diverged run."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_train, copy_of, records, run_cli, snapshot

from regexp.config import job_config
from regexp.optim import schedule_warnings
from regexp.train import Plan, trained_to_end

BASE = ["logger=none", "dataset.val_size=256", "device.deterministic=true"]
SHORT = [*BASE, "dataset.limit=256", "batch_size=32", "monitor.log_every=2"]  # 8 steps an epoch


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Runs trained once for the module, by name; each test works on its own copy."""
    from conftest import require_shared_data

    data_root = require_shared_data()
    root = tmp_path_factory.mktemp("finished")
    made = {}
    for name, args in {"completed": [*SHORT, "epochs=1"], "max_steps": [*SHORT, "epochs=1", "max_steps=4"],
                       "two_epochs": [*SHORT, "epochs=2"],
                       "early_stopped": [*BASE, "dataset.limit=64", "batch_size=16", "epochs=40", "optimizer.lr=0.01",
                                         "+regularizer=early_stopping", "regularizer.early_stopping.patience=1"],
                       "diverged": [*BASE, "dataset.limit=256", "batch_size=32", "epochs=1", "monitor.log_every=1",
                                    "optimizer=sgd", "optimizer.lr=1e6"]}.items():
        out = run_cli(["train", *args, f"hydra.run.dir={root / name}"], root, data_root)
        assert out.returncode == 0, out.stderr[-2000:]
        made[name] = (root / name, out)
    return made


def assert_complete_and_untouched(out, run_dir: Path, before: dict, status: str) -> None:
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{run_dir}: {status} ") and "nothing was written" in lines[0], lines
    assert out.stderr.strip() == ""
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- nothing left to do
@pytest.mark.slow
@pytest.mark.parametrize("name, status, more", [("completed", "completed", []), ("max_steps", "completed", []),
                                                ("early_stopped", "early_stopped", []),
                                                ("early_stopped", "early_stopped", ["epochs=80"]),
                                                ("diverged", "diverged", []), ("diverged", "diverged", ["epochs=3"])])
def test_resume_of_a_run_at_its_end_twice_writes_nothing(finished, tmp_path, data_root, name, status, more):
    """Completed (epochs or max_steps reached), early-stopped (more epochs change nothing: early
    stopping decided) or diverged: exit 0, one line, every file as it was, bytes and mtimes."""
    run_dir = copy_of(finished, name, tmp_path)
    before = snapshot(run_dir)
    for _ in range(2):
        out = run_cli(["train", f"resume={run_dir}", *more], tmp_path, data_root)
        assert_complete_and_untouched(out, run_dir, before, status)
    assert not list(tmp_path.glob("outputs")) and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.slow
def test_resume_auto_of_a_finished_single_run_writes_nothing(finished, tmp_path, data_root):
    run_dir = copy_of(finished, "completed", tmp_path)
    before = snapshot(run_dir)
    out = run_cli(["train", *SHORT, "epochs=1", "resume=auto", f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    assert_complete_and_untouched(out, run_dir, before, "completed")


@pytest.mark.slow
def test_api_run_of_a_run_at_its_end_returns_its_summary_and_writes_nothing(finished, tmp_path, data_root, monkeypatch):
    import regexp

    monkeypatch.setenv("REGEXP_DATA_DIR", str(data_root))
    run_dir = copy_of(finished, "completed", tmp_path)
    before = snapshot(run_dir)
    summary = regexp.run([f"resume={run_dir}"])
    assert summary.status == "completed" and summary.metrics == summary_of(run_dir)["metrics"]
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- what is left is done, exactly
@pytest.mark.slow
def test_resume_with_epochs_raised_continues_exactly(finished, tmp_path, data_root):
    run_dir = copy_of(finished, "completed", tmp_path)
    out = run_cli(["train", f"resume={run_dir}", "epochs=2"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout and "at step 8 (epoch 2)" in out.stdout
    summary, straight = summary_of(run_dir), summary_of(finished["two_epochs"][0])
    assert summary["status"] == "completed" and summary["steps"] == 16 and summary["epochs_completed"] == 2
    assert records(run_dir) == records(finished["two_epochs"][0])
    assert {k: v for k, v in summary["metrics"].items() if "perf" not in k} == \
           {k: v for k, v in straight["metrics"].items() if "perf" not in k}


@pytest.mark.slow
def test_raising_max_steps_continues_the_epoch_it_stopped_in(finished, tmp_path, data_root):
    """max_steps=4 stopped epoch 1 at its 4th of 8 steps: max_steps=8 trains steps 5-8 of that
    epoch, and its record is the uninterrupted epoch's (the record at step 4 stays before it)."""
    run_dir = copy_of(finished, "max_steps", tmp_path)
    out = run_cli(["train", f"resume={run_dir}", "max_steps=8"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "at step 4 (epoch 1)" in out.stdout and "epoch 2" not in out.stdout
    straight = finished["completed"][0]
    assert records(run_dir)[-1] == records(straight)[-1] and records(run_dir)[-1]["step"] == 8
    summary = summary_of(run_dir)
    assert summary["steps"] == 8 and summary["epochs_completed"] == 1
    assert {k: v for k, v in summary["metrics"].items() if "perf" not in k} == \
           {k: v for k, v in summary_of(straight)["metrics"].items() if "perf" not in k}


@pytest.mark.slow
@pytest.mark.parametrize("status", ["running", "interrupted", "failed"])
def test_a_run_killed_in_its_final_test_finishes_that_evaluation(finished, tmp_path, data_root, status):
    """What a SIGKILL (running), a signal (interrupted) or a crash (failed) in the final test
    evaluation leaves: checkpoint at the last step, no test metrics. The resume trains no step:
    checkpoint.pt, best.pt and metrics.jsonl stay as they are; the summary gets the test metrics
    the uninterrupted run had, and the diagnosis is written."""
    run_dir = copy_of(finished, "completed", tmp_path)
    done = summary_of(run_dir)
    killed = {**done, "status": status, "metrics": {}, "steps": 0, "epochs_completed": 0}
    for key in ("finished_at", "findings", "wall_time_s", "train_time_s"):
        killed.pop(key, None)
    (run_dir / "summary.json").write_text(json.dumps(killed))
    (run_dir / "diagnosis.json").unlink()
    kept = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "best.pt", "metrics.jsonl")}
    out = run_cli(["train", f"resume={run_dir}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stands at the end of its training (step 8): finishing its final evaluation" in out.stdout
    assert "epoch 2" not in out.stdout
    assert kept == {name: (run_dir / name).read_bytes() for name in kept}
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["epochs_completed"] == 1
    assert {k: v for k, v in summary["metrics"].items() if "perf" not in k} == \
           {k: v for k, v in done["metrics"].items() if "perf" not in k}
    assert json.loads((run_dir / "diagnosis.json").read_text()) == {"findings": done["findings"]}


# ---------------------------------------------------------------- honest counters and header
@pytest.mark.slow
def test_a_diverged_run_counts_no_whole_epoch(finished):
    summary = summary_of(finished["diverged"][0])
    assert summary["status"] == "diverged" and summary["last_finite_step"] < 8
    assert summary["epochs_completed"] == 0
    trained = summary["metrics"]["perf/samples_per_s"] * summary["train_time_s"]
    assert trained <= 32 * (summary["last_finite_step"] + 1) * 1.2  # the samples it trained, not the epoch's 256


@pytest.mark.slow
def test_the_header_says_max_steps_ends_the_run(finished):
    out = finished["max_steps"][1]
    assert "4 steps (max_steps; 1 epoch × 8 steps would be 8)" in out.stdout
    assert "1 epoch × 8 steps · batch" in finished["completed"][1].stdout
    assert summary_of(finished["max_steps"][0])["epochs_completed"] == 0  # 4 of the epoch's 8 steps: no whole epoch


# ---------------------------------------------------------------- fused sweeps
def fused_sweep(tmp_path: Path, data_root: Path, *args: str):
    return run_cli(["train", "-m", "hydra/launcher=fused", "model.hidden=[32]", *SHORT, "seed=0,1,2",
                    f"hydra.sweep.dir={tmp_path}/sweep", *args], tmp_path, data_root)


def rewrite_job(run_dir: Path, **summary) -> None:
    """A job's records as an earlier invocation with other `epochs` would have left them."""
    import yaml

    record = {**summary_of(run_dir), **summary}
    record["overrides"] = [o.replace("epochs=1", "epochs=2") for o in record["overrides"]]
    (run_dir / "summary.json").write_text(json.dumps(record))
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([o.replace("epochs=1", "epochs=2") for o in overrides]))


@pytest.mark.slow
def test_a_fused_member_with_a_truncated_checkpoint_fails_alone(tmp_path, data_root):
    """Three jobs stopped at the end of epoch 1 of 2, job 1's checkpoint truncated: resume=auto
    refuses job 1 alone (failed, its error in its row) and fuses jobs 0 and 2, which finish."""
    assert fused_sweep(tmp_path, data_root, "epochs=1").returncode == 0
    sweep = tmp_path / "sweep"
    for n in range(3):
        rewrite_job(sweep / str(n), status="interrupted", metrics={})
    checkpoint = sweep / "1" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:4000])
    out = fused_sweep(tmp_path, data_root, "epochs=2", "resume=auto")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "fused: jobs 0, 2 train as one group of 2 models" in out.stdout
    assert "fused: job 1 runs alone: its checkpoint cannot be read" in out.stdout
    summaries = [summary_of(sweep / str(n)) for n in range(3)]
    assert [s["status"] for s in summaries] == ["completed", "interrupted", "completed"]  # job 1's record as it was
    assert summaries[0]["fused"]["models"] == 2 and summaries[0]["steps"] == 16 and summaries[0]["resumed_at_step"] == 8
    rows = json.loads((sweep / "sweep_summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]  # this invocation's job failed
    assert rows[1]["error"].startswith(f"RunError: {checkpoint}: cannot read the checkpoint")
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[1]["wall_time_s"] is None and rows[1]["test/acc"] is None  # not the earlier interrupted run's
    [line] = [line for line in out.stdout.splitlines() if ": failed · " in line]  # once, as the job ended
    assert f"job 1 (seed=1): failed · RunError: {checkpoint}: cannot read the checkpoint" in line, line
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (summary["failed"], summary["interrupted"], summary["statuses"]) == (1, 0, {"completed": 2, "failed": 1})


@pytest.mark.slow
def test_a_fused_member_killed_in_its_final_test_evaluates_alone(tmp_path, data_root):
    """Job 0 killed in its final test (summary running, checkpoint at its last step), jobs 1
    and 2 finished: resume=auto says job 0 runs alone, trains no step, and records its test."""
    assert fused_sweep(tmp_path, data_root, "epochs=1").returncode == 0
    sweep = tmp_path / "sweep"
    done = summary_of(sweep / "0")
    (sweep / "0" / "summary.json").write_text(json.dumps({**done, "status": "running", "metrics": {}}))
    kept = (sweep / "0" / "checkpoint.pt").read_bytes()
    finished_before = [snapshot(sweep / str(n)) for n in (1, 2)]
    out = fused_sweep(tmp_path, data_root, "epochs=1", "resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("fused: job 0 runs alone: its checkpoint stands at the end of its training (step 8): "
            "it only finishes its evaluation") in out.stdout
    assert "fused with" not in out.stdout and "epoch 2/1" not in out.stdout
    summary = summary_of(sweep / "0")
    assert summary["status"] == "completed" and "fused" not in summary and summary["steps"] == 8
    assert summary["metrics"]["test/acc"] == done["metrics"]["test/acc"]
    assert (sweep / "0" / "checkpoint.pt").read_bytes() == kept
    assert [{k: v for k, v in snapshot(sweep / str(n)).items() if not k.startswith(".hydra")} for n in (1, 2)] == \
           [{k: v for k, v in s.items() if not k.startswith(".hydra")} for s in finished_before]


# ---------------------------------------------------------------- fast: where a checkpoint stands
def saved_at(epoch: int, window: int, step: int, bad_evals: int = 0) -> dict:
    return {"perm": torch.arange(256), "epoch": epoch, "window": window, "step": step,
            "early_stopping": {"best": 0.5, "best_epoch": 1, "bad_evals": bad_evals}}


@pytest.mark.parametrize("args, saved, at_end", [
    (["epochs=1"], saved_at(1, 8, 8), True),  # the last epoch recorded
    (["epochs=2"], saved_at(1, 8, 8), False),  # epochs raised: one more to train
    (["epochs=1"], saved_at(1, 5, 5), False),  # mid-epoch (a signal): the epoch goes on
    (["epochs=1", "max_steps=4"], saved_at(1, 4, 4), True),  # max_steps reached mid-epoch, recorded there
    (["epochs=1", "max_steps=8"], saved_at(1, 8, 8), True),  # max_steps reached at the epoch's end
    (["epochs=1", "max_steps=6"], saved_at(1, 4, 4), False),  # max_steps raised: the epoch goes on
    (["epochs=9", "+regularizer=early_stopping", "regularizer.early_stopping.patience=2"], saved_at(3, 8, 24, 2), True),
    (["epochs=9", "+regularizer=early_stopping", "regularizer.early_stopping.patience=2"], saved_at(3, 8, 24, 1), False),
])
def test_trained_to_end_reads_the_plan_and_the_checkpoint(args, saved, at_end):
    cfg = job_config(compose_train(["batch_size=32", *args]))
    assert trained_to_end(cfg, saved) is at_end


def test_plan_last_epoch_holds_past_the_planned_epochs():
    plan = Plan([[32]] * 8, list(range(0, 256, 32)), epochs=1, max_steps=None, log_every=2, histogram_every=None,
                checkpoint_every=None, eval_every=1)
    assert plan.last_epoch(1, 8) and plan.last_epoch(2, 16) and not plan.steps_reached(10**6)


@pytest.mark.parametrize("args, total, warned", [
    (["scheduler=warmup_cosine", "scheduler.warmup_steps=100"], 50, True),
    (["scheduler=warmup_cosine", "scheduler.warmup_steps=100"], 100, True),
    (["scheduler=warmup_cosine", "scheduler.warmup_steps=100"], 101, False),
    (["scheduler=onecycle"], 1, True),
    (["scheduler=onecycle"], 10, False),
    (["scheduler=cosine"], 1, False),
])
def test_a_warmup_as_long_as_the_run_is_warned(args, total, warned):
    cfg = job_config(compose_train(args))
    warnings = schedule_warnings(cfg.scheduler, total)
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].startswith(f"scheduler={cfg.scheduler.name}: ") and "never reaches optimizer.lr" in warnings[0]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_keeps_the_time_it_trained(tmp_path, data_root):
    """A periodic checkpoint holds the samples and the training time of the epoch so far, so
    after a SIGKILL and a resume, samples/s is not that of the second part's time alone."""
    import signal
    import subprocess
    import time

    from conftest import REGEXP

    run_dir = tmp_path / "run"
    args = [*BASE, "dataset.limit=3072", "batch_size=32", "epochs=1", "checkpoint.every_steps=10", "monitor.log_every=10"]
    process = subprocess.Popen([REGEXP, "train", *args, f"hydra.run.dir={run_dir}"], env=dict(os.environ, REGEXP_DATA_DIR=str(data_root)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def saved() -> dict:
        try:
            return torch.load(run_dir / "checkpoint.pt", weights_only=True)
        except Exception:  # not there yet, or being replaced
            return {"step": -1}

    deadline = time.time() + 300
    while saved()["step"] < 30:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = saved()
    meters, step = state["meters"], state["step"]
    assert 30 <= step < 96 and meters["samples_trained"] == 32 * step
    assert meters["train_seconds"] > 0 and meters["epoch"][3] == pytest.approx(meters["train_seconds"])
    out = run_cli(["train", f"resume={run_dir}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["steps"] == 96 and summary["train_time_s"] > meters["train_seconds"]
    assert summary["metrics"]["perf/samples_per_s"] == pytest.approx(3072 / summary["train_time_s"], rel=0.01)
