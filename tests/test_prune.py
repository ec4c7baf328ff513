"""Pruning in sweeps (prune=median|asha): the ranking at a rung, the peers read from a sweep
dir, the bad input refused before anything is written, and small sweeps that prune (fused
and basic launchers) and continue their pruned jobs with resume=auto prune=none."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY, refused, run_cli
from omegaconf import OmegaConf

import regexp
from regexp import cli
from regexp.prune import (
    MIN_PEERS,
    badness,
    check_one_run,
    kept,
    maximizes,
    peer_values,
    prune_at_rung,
    pruned_members,
    prunes_alone,
)
from regexp.rundir import ConfigError, Status, Summary, write_summary
from regexp.sweep import already_finished

QUIET = [*TINY, "logger=none"]


# ---------------------------------------------------------------- the ranking
@pytest.mark.parametrize("metric, mode, larger", [("val/loss", "auto", False), ("val/acc", "auto", True),
                                                  ("epoch/train_acc", "auto", True), ("val/acc", "min", False),
                                                  ("val/loss", "max", True)])
def test_auto_mode_maximizes_accuracies_only_and_an_explicit_mode_wins(metric, mode, larger):
    assert maximizes(metric, mode) is larger


def test_asha_keeps_the_best_third_of_six_by_loss():
    scores = [badness(v, False) for v in (0.9, 0.2, 0.5, 0.3, 1.4, 0.7)]
    chosen, limit = pruned_members("asha", scores, 3)
    assert chosen == [0, 2, 4, 5] and limit == 0.3


def test_asha_by_accuracy_keeps_the_largest():
    scores = [badness(v, True) for v in (0.91, 0.50, 0.95, 0.10)]
    chosen, limit = pruned_members("asha", scores, 2)
    assert chosen == [1, 3] and -limit == 0.91


@pytest.mark.parametrize("n, factor, expected", [(6, 3, 2), (7, 3, 3), (3, 3, 1), (2, 5, 1), (1, 2, 1), (10, 4, 3)])
def test_asha_keeps_ceil_n_over_the_reduction_factor_and_at_least_one(n, factor, expected):
    assert kept(n, factor) == expected


def test_a_tie_with_the_last_kept_member_is_kept():
    chosen, _ = pruned_members("asha", [0.1, 0.4, 0.4, 0.9, 0.4, 0.8], 3)
    assert chosen == [3, 5]  # the best two are 0.1 and 0.4; the other two at 0.4 are no worse


def test_median_keeps_the_members_no_worse_than_the_groups_median():
    assert pruned_members("median", [1.0, 2.0, 3.0], 3) == ([2], 2.0)
    assert pruned_members("median", [4.0, 1.0, 3.0, 2.0], 3) == ([0, 2], 2.5)


def test_a_non_finite_or_missing_value_ranks_last():
    scores = [badness(v, True) for v in (0.8, math.nan, None, 0.7)]
    assert scores[1] == scores[2] == math.inf
    assert pruned_members("median", scores, 3)[0] == [1, 2]


def test_no_member_is_pruned_against_fewer_than_min_peers():
    assert MIN_PEERS == 2
    assert pruned_members("asha", [0.1, 9.0], 3) == ([], math.inf)
    assert prunes_alone("median", 9.0, [0.1], 3) == (False, math.inf)
    assert prunes_alone("median", 9.0, [0.1, 0.3], 3) == (True, 0.2)


def test_a_job_alone_meets_the_kept_fraction_of_its_peers():
    peers = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert prunes_alone("asha", 0.25, peers, 3) == (True, 0.2)  # the best third of the peers: 0.1 and 0.2
    assert prunes_alone("asha", 0.2, peers, 3) == (False, 0.2)
    assert prunes_alone("median", 0.35, peers, 3) == (False, 0.35)


# ---------------------------------------------------------------- the hook in the loop
class Lines:
    def __init__(self):
        self.lines = []

    def line(self, text, style=""):
        self.lines.append(text)


def fake_loop(name, value, epoch=1, status=Status.COMPLETED, rule="asha", sweep_dir=None, run_dir=None, epochs=3):
    cfg = OmegaConf.create({"prune": {"name": rule, "rungs": [1, 2], "reduction_factor": 3, "metric": "val/loss",
                                      "mode": "auto"}})
    return SimpleNamespace(cfg=cfg, state=SimpleNamespace(epoch=epoch, step=epoch * 8), status=status,
                           plan=SimpleNamespace(last_epoch=lambda e, s: e >= epochs), row={"val/loss": value},
                           summary=Summary(), reporter=Lines(), label=name, run_dir=run_dir or Path(name),
                           sweep_dir=sweep_dir)


def test_a_fused_group_prunes_at_a_rung_and_says_why_once_per_member():
    loops = [fake_loop(str(i), v) for i, v in enumerate((0.9, 0.2, 0.5, 0.3, 1.4, 0.7))]
    prune_at_rung(loops, fused=True)
    assert [loop.status for loop in loops] == [Status.PRUNED, Status.COMPLETED, Status.PRUNED, Status.COMPLETED,
                                               Status.PRUNED, Status.PRUNED]
    assert loops[0].summary.ended_by == {"epoch": 1, "metric": "val/loss", "value": 0.9, "threshold": 0.3, "rule": "asha"}
    assert loops[0].reporter.lines == ["0: pruned at epoch 1: val/loss 0.9, worse than 0.3 (asha, 2 of 6 kept); "
                                       "resume=auto prune=none trains it on"]
    assert loops[1].reporter.lines == [] and loops[1].summary.ended_by is None


def test_a_member_that_diverged_or_stopped_is_no_peer_and_a_non_rung_or_last_epoch_prunes_nothing():
    ended = [fake_loop("d", 0.01, status=Status.DIVERGED), fake_loop("s", 0.01, status=Status.STOPPED)]
    loops = [*ended, fake_loop("a", 0.5), fake_loop("b", 0.9)]
    prune_at_rung(loops, fused=True)  # two ranked: fewer than MIN_PEERS + 1
    assert [loop.status for loop in loops] == [Status.DIVERGED, Status.STOPPED, Status.COMPLETED, Status.COMPLETED]
    early = [fake_loop("e", 0.01, status=Status.EARLY_STOPPED, rule="median"), fake_loop("a", 0.5, rule="median"),
             fake_loop("b", 0.9, rule="median")]
    prune_at_rung(early, fused=True)  # early stopping ended one at the rung: ranked, never pruned
    assert [loop.status for loop in early] == [Status.EARLY_STOPPED, Status.COMPLETED, Status.PRUNED]
    assert early[2].reporter.lines[0].endswith("(median, 2 of 3 kept); resume=auto prune=none trains it on")
    for epoch, epochs in ((3, 4), (2, 2)):  # epoch 3 is no rung; epoch 2 is the last: nothing left to save
        loops = [fake_loop(str(i), v, epoch=epoch, epochs=epochs) for i, v in enumerate((0.1, 0.5, 0.9))]
        prune_at_rung(loops, fused=True)
        assert all(loop.status == Status.COMPLETED for loop in loops)


def write_rows(run_dir: Path, rows: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def epoch_row(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "step": 8 * epoch, "val/loss": loss, "epoch/lr": 0.001}


def test_peers_are_the_other_jobs_of_the_sweep_dir_that_reached_the_rung(tmp_path):
    write_rows(tmp_path / "0", [{"epoch": 1, "step": 4, "val/loss": 9.0}, epoch_row(1, 0.4)])  # a log step is no epoch row
    write_rows(tmp_path / "1", [epoch_row(1, 0.6)], tail='{"epoch": 2, "step"')  # still writing: its last line is half
    write_rows(tmp_path / "2", [{"step": 4, "train/loss": 2.0}])  # not at the rung yet
    write_rows(tmp_path / "3", [epoch_row(1, 0.1)], tail="not json\n{}\n")  # corrupted: skipped
    write_rows(tmp_path / "own", [epoch_row(1, 5.0)])
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "metrics.jsonl").mkdir()  # not a file: skipped
    assert peer_values(tmp_path, tmp_path / "own", 1, "val/loss") == [0.4, 0.6]
    assert peer_values(tmp_path, tmp_path / "own", 2, "val/loss") == []


def test_a_job_alone_is_pruned_against_its_peers_on_disk(tmp_path):
    for name, loss in (("0", 0.4), ("1", 0.6), ("2", 0.5)):
        write_rows(tmp_path / name, [epoch_row(1, loss)])
    worse = fake_loop("x", 0.8, rule="median", sweep_dir=tmp_path, run_dir=tmp_path / "3")
    better = fake_loop("y", 0.45, rule="median", sweep_dir=tmp_path, run_dir=tmp_path / "4")
    single = fake_loop("z", 9.0, rule="median", sweep_dir=None)  # no sweep: no peers
    for loop in (worse, better, single):
        prune_at_rung([loop], fused=False)
    assert (worse.status, better.status, single.status) == (Status.PRUNED, Status.COMPLETED, Status.COMPLETED)
    assert worse.summary.ended_by == {"epoch": 1, "metric": "val/loss", "value": 0.8, "threshold": 0.5, "rule": "median"}
    assert worse.reporter.lines == ["x: pruned at epoch 1: val/loss 0.8, worse than 0.5 (median of 3 other jobs at this "
                                    "epoch); resume=auto prune=none trains it on"]
    asha = fake_loop("w", 0.45, sweep_dir=tmp_path, run_dir=tmp_path / "5")
    prune_at_rung([asha], fused=False)
    assert asha.status == Status.PRUNED and "(asha: the best 1 of 3 other jobs at this epoch)" in asha.reporter.lines[0]


def test_resume_auto_matches_a_pruned_run_whatever_its_prune_and_continues_it_only_with_prune_none(tmp_path):
    write_summary(tmp_path, Summary(status=Status.PRUNED, overrides=["prune=asha", "seed=1"]))
    cfg = lambda name: OmegaConf.create({"prune": {"name": name}, "monitor": {"on_finding": "warn"}})  # noqa: E731
    assert already_finished(tmp_path, ["seed=1", "prune=asha"], cfg("asha")).status == Status.PRUNED
    assert already_finished(tmp_path, ["seed=1", "prune=none"], cfg("none")) is None
    with pytest.raises(ConfigError, match="other overrides"):
        already_finished(tmp_path, ["seed=2", "prune=none"], cfg("none"))


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("option", ["median", "asha", "'asha'"])
def test_prune_for_a_single_run_is_refused(capsys, empty_cwd, option):
    err = refused(capsys, ["train", *QUIET, f"prune={option}", "hydra.run.dir=run"])
    assert err.startswith(f"regexp: error: prune={option.strip(chr(39))}: prunes the jobs of a sweep") and "-m" in err
    assert list(empty_cwd.iterdir()) == []


def test_prune_typed_beside_a_resume_is_refused_and_prune_none_is_not(capsys, empty_cwd):
    err = refused(capsys, ["train", "resume=elsewhere/3", "prune=asha"])  # refused before the run dir is read
    assert err.startswith("regexp: error: prune=asha: prunes the jobs of a sweep")
    assert list(empty_cwd.iterdir()) == []
    check_one_run(["prune=none", "prune.rungs=[9]", "+experiment=x", "seed=1"])  # no refusal


def test_the_config_of_a_pruned_sweeps_job_prints_without_m(capsys, empty_cwd):
    """--cfg job runs nothing: it prints the job's config, prune and all (with -m it is refused as
    ever, so without -m is the way to see it)."""
    try:  # Hydra may end the command by SystemExit or return
        code = cli.main(["train", "--cfg", "job", "prune=median"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "prune:\n  name: median" in out and list(empty_cwd.iterdir()) == []


def test_prune_for_a_single_run_from_python_is_refused(empty_cwd):
    with pytest.raises(ConfigError, match=r"^prune=median: prunes the jobs of a sweep"):
        regexp.run([*QUIET, "prune=median"], run_dir=str(empty_cwd / "run"))
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("args, line", [
    (["epochs=2", "prune.rungs=[1,3]"], "prune.rungs=[1, 3]: epoch 3 is beyond epochs=2"),
    (["epochs=2", "prune.metric=val/accuracy"], "prune.metric=val/accuracy: must be a metric of the epoch record: "
                                                "val/loss, val/acc, epoch/train_loss, epoch/train_acc"),
    (["epochs=2", "prune.metric=train/loss"], "prune.metric=train/loss: must be a metric of the epoch record"),
    (["epochs=2", "prune.metric=val/acc", "dataset.val_size=0"], "prune.metric=val/acc: needs validation, which "
                                                                 "dataset.val_size=0 turns off"),
    (["epochs=4", "eval_every=2"], "prune.metric=val/loss: validation runs every eval_every=2 epochs, not at rung 1"),
    (["epochs=2", "prune.rungs=[2,1]"], "prune.rungs=[2, 1]: must be a non-empty list of increasing epochs"),
    (["epochs=2", "prune.reduction_factor=1"], "prune.reduction_factor=1: must be an integer >= 2"),
    (["epochs=2", "prune.mode=up"], "prune.mode=up: "),
    (["epochs=2", "hydra.sweep.subdir=lr_${optimizer.lr}/${hydra.job.num}"],  # its peers would not be found
     "hydra.sweep.subdir=lr_${optimizer.lr}/${hydra.job.num}: prune=asha meets a job's peers in the sweep dir's own"),
])
def test_a_sweep_with_a_rung_or_metric_the_run_does_not_have_is_refused(capsys, empty_cwd, args, line):
    err = refused(capsys, ["train", "-m", *QUIET, "max_steps=null", "prune=asha", "seed=0,1", *args,
                           "hydra.sweep.dir=sweep"])
    assert err.startswith(f"regexp: error: {line}"), err
    assert list(empty_cwd.iterdir()) == []


def test_a_rung_or_metric_is_not_checked_without_pruning():
    from regexp.compose import compose_and_validate

    cfg = compose_and_validate([*QUIET, "prune.rungs=[5]", "eval_every=1"])
    assert cfg.prune.name == "none"
    assert compose_and_validate([*QUIET, "epochs=3", "eval_every=2", "prune=median", "prune.rungs=[2]",
                                 "prune.metric=val/acc"]).prune.rungs == [2]


# ---------------------------------------------------------------- small sweeps that prune (slow)
def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def epoch_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "epoch/lr" in r]


GRID = ["dataset.limit=512", "dataset.val_size=256", "batch_size=32", "monitor.log_every=4", "logger=none", "epochs=3"]


@pytest.mark.slow
def test_a_fused_grid_with_asha_prunes_the_worst_at_the_first_rung_and_continues_them_with_prune_none(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *GRID, "hydra/launcher=fused", "optimizer.lr=1e-4,1e-3,1e-2", "seed=0,1",
            f"hydra.sweep.dir={sweep}"]
    result = run_cli([*args, "prune=asha"], tmp_path, data_root)
    assert result.returncode == 0, result.stderr
    firsts = {i: epoch_rows(sweep / str(i))[0]["val/loss"] for i in range(6)}
    best_two = sorted(firsts, key=firsts.get)[:2]
    limit = max(firsts[i] for i in best_two)
    for i in range(6):
        summary = summary_of(sweep / str(i))
        if i in best_two:
            assert summary["status"] == "completed" and summary["steps"] == 48, summary
            continue
        assert summary["status"] == "pruned" and summary["steps"] == 16 and summary["epochs_completed"] == 1
        assert summary["ended_by"] == {"epoch": 1, "metric": "val/loss", "value": firsts[i], "threshold": limit,
                                       "rule": "asha"}
        assert "test/acc" in summary["metrics"] and (sweep / str(i) / "checkpoint.pt").is_file()
        assert [r["epoch"] for r in epoch_rows(sweep / str(i))] == [1]  # it left the stack: no step after the rung
        assert f"{i}: pruned at epoch 1: val/loss {firsts[i]:.4g}, worse than {limit:.4g} (asha, 2 of 6 kept)" in result.stdout
    rows = json.loads((sweep / "sweep_summary.json").read_text())["rows"]
    assert sorted(r["status"] for r in rows) == ["completed"] * 2 + ["pruned"] * 4
    # a pruned member's time ends when it left the stack, before the group trained its last 2 epochs
    times = {i: summary_of(sweep / str(i)) for i in range(6)}
    kept_end = min(times[i]["finished_at"] for i in best_two)
    for i in set(range(6)) - set(best_two):
        assert times[i]["finished_at"] < kept_end
        assert times[i]["wall_time_s"] < min(times[k]["wall_time_s"] for k in best_two)
    unpruned = tmp_path / "unpruned"  # the members that stay follow the same curve in the smaller stack
    assert run_cli([*args[:-1], f"hydra.sweep.dir={unpruned}"], tmp_path, data_root).returncode == 0
    for i in best_two:
        assert [r["val/loss"] for r in epoch_rows(sweep / str(i))] == pytest.approx(
            [r["val/loss"] for r in epoch_rows(unpruned / str(i))], rel=1e-5)

    pruned = sorted(set(range(6)) - set(best_two))
    before = {i: (sweep / str(i) / "metrics.jsonl").read_bytes() for i in range(6)}
    again = run_cli([*args, "prune=asha", "resume=auto"], tmp_path, data_root)
    assert again.returncode == 0, again.stderr
    assert {i: (sweep / str(i) / "metrics.jsonl").read_bytes() for i in range(6)} == before
    skipped = [line for line in again.stdout.splitlines() if line.endswith("finished earlier, skipped (resume=auto)")]
    assert len(skipped) == 6, again.stdout  # each job once, the pruned ones as pruned
    assert sorted(int(re.search(r"\] job (\d+)", line)[1]) for line in skipped if ": pruned · " in line) == pruned

    on = run_cli([*args, "prune=none", "resume=auto"], tmp_path, data_root)
    assert on.returncode == 0, on.stderr
    assert f"fused: jobs {pruned[0]}" in on.stdout
    for i in range(6):
        summary = summary_of(sweep / str(i))
        assert summary["status"] == "completed" and summary["steps"] == 48
        assert summary.get("resumed_at_step") == (16 if i in pruned else None)
        assert [r["epoch"] for r in epoch_rows(sweep / str(i))] == [1, 2, 3]


@pytest.mark.slow
def test_the_basic_launcher_with_median_prunes_a_clearly_worse_later_job(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *QUIET, "max_steps=null", "epochs=2", "prune.rungs=[1]", "optimizer.lr=0.001,0.002,0.003,0.00001",
            f"hydra.sweep.dir={sweep}"]
    result = run_cli([*args, "prune=median"], tmp_path, data_root)
    assert result.returncode == 0, result.stderr
    firsts = [epoch_rows(sweep / str(i))[0]["val/loss"] for i in range(4)]
    statuses = [summary_of(sweep / str(i))["status"] for i in range(4)]
    assert statuses[:2] == ["completed"] * 2  # fewer than MIN_PEERS before them: the first jobs always train
    assert statuses[2] == ("pruned" if firsts[2] > (firsts[0] + firsts[1]) / 2 else "completed")
    assert statuses[3] == "pruned"
    median = sorted(firsts[:3])[1]
    assert summary_of(sweep / "3")["ended_by"] == {"epoch": 1, "metric": "val/loss", "value": firsts[3],
                                                   "threshold": median, "rule": "median"}
    assert f"{sweep / '3'}: pruned at epoch 1: val/loss {firsts[3]:.4g}, worse than {median:.4g} (median of 3 other jobs" \
        in result.stdout

    before = (sweep / "3" / "metrics.jsonl").read_bytes()
    alone = run_cli(["train", f"resume={sweep / '3'}"], tmp_path, data_root)  # its recorded prune=median is no refusal
    assert alone.returncode == 0 and "pruned at step 8 by pruning at epoch 1" in alone.stdout, alone.stderr
    again = run_cli([*args, "prune=median", "resume=auto"], tmp_path, data_root)
    assert again.returncode == 0 and (sweep / "3" / "metrics.jsonl").read_bytes() == before, again.stderr
    on = run_cli([*args, "prune=none", "resume=auto"], tmp_path, data_root)
    assert on.returncode == 0, on.stderr
    summary = summary_of(sweep / "3")
    assert summary["status"] == "completed" and summary["resumed_at_step"] == 8 and summary["epochs_completed"] == 2
