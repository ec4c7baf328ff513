"""`regexp lr-find`: the suggestion rules on known curves, the command's outputs, bad input,
and the fused seeds against the same seeds trained one after another."""

import json
import math
import re

import pytest
from conftest import run_cli

from regexp.cli import main
from regexp.lrfind import MAX_STEPS, MIN_STEPS, Request, diverged_at, find, lr_schedule, min10, smooth, steepest

TINY = ["dataset.limit=512", "dataset.val_size=256", "batch_size=64", "logger=none"]


# ---------------------------------------------------------------- the rules on synthetic curves
def falling_curve(lrs, middle, width=0.5):
    """A loss that falls from 2.3 to 0.3 around lr `middle` (steepest exactly there), then rises."""
    out = []
    for lr in lrs:
        x = math.log10(lr / middle)
        out.append(0.3 + 2.0 / (1 + math.exp(x / width * 4)) + (max(0.0, x - 1.5) ** 2) * 5)
    return out


@pytest.mark.parametrize("middle", [1e-4, 3e-3, 0.1])
def test_steepest_finds_the_middle_of_the_fall(middle):
    lrs = lr_schedule(1e-7, 10, 200)
    found = steepest(lrs, falling_curve(lrs, middle))
    assert middle / 1.2 < found < middle * 1.2


def test_min10_is_a_tenth_of_the_lowest_point():
    lrs = lr_schedule(1e-6, 1, 61)
    losses = [abs(math.log10(lr) + 2) for lr in lrs]  # lowest at lr 1e-2
    assert min10(lrs, losses) == pytest.approx(1e-3)


def test_a_loss_that_only_rises_suggests_the_smallest_lr():
    lrs = lr_schedule(1e-5, 1, 20)
    assert steepest(lrs, [1.0 + i for i in range(20)]) == lrs[0]


def test_smoothing_is_bias_corrected_and_divergence_is_found():
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    assert diverged_at([2.0, 1.0, 0.5, 1.9, 2.1]) == 4  # > 4 x the best so far
    assert diverged_at([2.0, 1.0, math.nan]) == 2
    assert diverged_at([2.0, 1.0, 0.9]) is None


def test_the_schedule_runs_from_start_to_end_exponentially():
    lrs = lr_schedule(1e-6, 1e-2, 5)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-2)
    assert [b / a for a, b in zip(lrs, lrs[1:])] == pytest.approx([10.0] * 4)


# ---------------------------------------------------------------- bad input
BAD = [
    (["--start", "1", "--end", "0.1"], "--end=0.1", "above --start"),
    (["--start", "0.1", "--end", "0.1"], "--end=0.1", "above --start"),
    (["--start=0"], "--start=0", ">= 1e-12"),
    (["--start=nan"], "--start=nan", ">= 1e-12"),
    (["--start", "1e-300", "--end", "1e-299"], "--start=1e-300", ">= 1e-12"),  # its suggestion would underflow
    (["--end", "1e30"], "--end=1e+30", "<= 1e+06, regexp train's largest optimizer.lr"),
    (["--start", "2e6", "--end", "3e6"], "--start=2000000.0", "<= 1e+06"),
    (["--steps", "3"], "--steps=3", f">= {MIN_STEPS}"),
    (["--steps", "100000000"], "--steps=100000000", f"<= {MAX_STEPS}"),
    (["--seeds", "0"], "--seeds=0", ">= 1"),
    (["--seeds", "100000"], "--seeds=100000", "<= 1024 (the fused launcher's hydra.launcher.max_models)"),
    (["seed=0,1"], "seed=0,1", "one value per key and draws its seeds with --seeds"),
    (["seed=range(2)"], "seed=range(2)", "one value per key and draws its seeds with --seeds"),
    (["-m", "seed=0"], "-m", "one value per key and draws its seeds with --seeds"),
    (["--seeds", "two"], "--seeds=two", "an integer"),
    (["--rule", "fast"], "--rule=fast", "steepest, min10"),
    (["--epochs", "1"], "--epochs", "not a flag of regexp lr-find"),
    (["epochs"], "epochs", "not a flag of regexp lr-find"),
    (["--steps"], "--steps", "takes a value"),
    (["--seeds", "--solo"], "--seeds", "takes a value"),
    (["optimizer.lr=0.1"], "optimizer.lr=0.1", "sets the lr"),
    (["resume=auto"], "resume=auto", "starts each seed afresh"),
    (["optimizer=nadam"], "optimizer=nadam", "adamw"),
]


@pytest.mark.parametrize("args,starts,allowed", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, args, starts, allowed):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["lr-find", *args, f"out_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"regexp: error: {starts}") and allowed in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_unwritable_out_dir_is_refused_before_training(tmp_path, monkeypatch, capsys, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["lr-find", *TINY, f"out_dir={blocker}/runs"])
    assert exit_.value.code == 2 and "is a file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_seeds_beyond_the_memory_the_fused_launcher_allows_are_refused(tmp_path, monkeypatch, capsys, data_root):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # about 1.1 GiB a model: 1024 of them fit no machine
        main(["lr-find", *TINY, "model.hidden=[8192,8192]", "--seeds", "1024", f"out_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regexp: error: --seeds=1024: 1024 models need about"), err
    assert re.search(r"at most \d+ seeds fit this config$", lines[0]), err
    assert list(tmp_path.iterdir()) == []


def test_a_crash_in_the_test_leaves_no_dir_behind(tmp_path, monkeypatch, data_root):
    import regexp.lrfind

    def crash(*_):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(regexp.lrfind, "run_seeds", crash)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_text("")  # out_dir's own: lr-find did not create it
    with pytest.raises(RuntimeError, match="forward failed"):  # the error as it is
        regexp.lrfind.main([*TINY, "--steps", "10", "--seeds", "2", f"out_dir={tmp_path}/out"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept"]


# ---------------------------------------------------------------- the test itself
@pytest.mark.slow
def test_fused_seeds_follow_the_curves_of_their_solo_runs(data_root):
    from regexp.compose import check_job, compose

    cfg = check_job(compose([*TINY, "optimizer=momentum"]))
    fused = find(cfg, Request([], start=1e-4, end=1.0, steps=12, seeds=2))
    solo = find(cfg, Request([], start=1e-4, end=1.0, steps=12, seeds=2, solo=True))
    assert fused.fused and not solo.fused and solo.why_alone == "--solo"
    for a, b in zip(fused.curves, solo.curves):
        assert a.seed == b.seed and len(a.losses) == len(b.losses) > 0
        assert a.losses == pytest.approx(b.losses, rel=1e-3)
    assert fused.curves[0].losses != pytest.approx(fused.curves[1].losses, rel=1e-3)  # two seeds, two curves


@pytest.mark.slow
def test_lr_find_writes_its_dir_and_prints_the_lr_to_paste(tmp_path, data_root):
    out = run_cli(["lr-find", *TINY, "optimizer=sgd", f"out_dir={tmp_path}/out", "--start", "1e-5", "--end", "10",
                   "--steps", "30", "--seeds", "2"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr
    found = re.findall(r"^optimizer\.lr=(\S+)$", out.stdout, re.M)
    assert len(found) == 1 and 1e-5 <= float(found[0]) <= 10
    command = out.stdout.strip().splitlines()[-1]
    assert command.startswith("regexp train dataset.limit=512") and command.endswith(f"optimizer.lr={found[0]}")
    (run_dir,) = (tmp_path / "out" / "lr-find").glob("*/*")
    assert sorted(p.name for p in run_dir.iterdir()) == ["lr_find.json", "lr_find.png"]  # and no lock left
    record = json.loads((run_dir / "lr_find.json").read_text())
    assert [s["seed"] for s in record["seeds"]] == [0, 1] and record["fused"] is True
    assert record["rule"] == "steepest" and record["config"]["optimizer"]["name"] == "sgd"
    assert f"{record['suggestion']:.2g}" == found[0]
    for seed in record["seeds"]:
        assert len(seed["lrs"]) == len(seed["losses"]) == len(seed["smoothed"]) >= 2
        assert seed["lrs"][0] == pytest.approx(1e-5) and 1e-5 <= seed["suggestion"] <= 10
    assert record["spread"] == pytest.approx(max(s["suggestion"] for s in record["seeds"]) /
                                             min(s["suggestion"] for s in record["seeds"]))
    assert (run_dir / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
