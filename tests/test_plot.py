"""`regexp plot` and regexp.plotting: the training-health figure of a run, groups side by side
(--by), and bad input (one line, the exit code, nothing written). Fast tests draw synthesized
run dirs; the slow ones go through the real CLI on a tiny sweep logged to W&B offline."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import TINY, refused, run_cli, snapshot

from regexp import cli, plotting
from regexp.comparison import find_runs, group_runs
from regexp.wandb_logger import WandbRun

WANDB = str(Path(sys.executable).with_name("wandb"))


def log_step(step: int, layers: list[str], activations: list[str], clip: bool = True) -> dict:
    """A log-step record with a real run's keys (monitor=default)."""
    record = {"step": step, "epoch": 1, "train/loss": 2.0 / step, "train/acc": 0.1 * step, "opt/lr": 1e-3,
              "perf/step_ms": 5.0, "grad/global_norm": 1.0 + step, "grad/global_norm_clipped": 1.0}
    if clip:
        record["grad/clip_frac"] = 1.0
    for i, name in enumerate(activations):
        record |= {f"act/mean/{name}": 0.1, f"act/std/{name}": 0.5 / (i + 1), f"act/dead_frac/{name}": 0.1 * i}
    for i, name in enumerate(layers):
        record |= {f"grad/norm/{name}": 0.1 * (i + 1), f"grad/norm_clipped/{name}": 0.05,
                   f"weight/norm/{name}": 10.0 - i, f"weight/update_ratio/{name}": 1e-3 * (i + 1)}
    return record


def write_run(run_dir: Path, records: list[dict], findings: list[dict] | None = None, status: str = "completed",
              config: dict | None = None, overrides: list[str] = ("seed=0",), metrics: dict | None = None) -> Path:
    run_dir.mkdir(parents=True)
    config = config or {"seed": 0, "model": {"name": "mlp", "hidden": [64, 32], "activation": "relu"},
                        "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0},
                        "regularizer": {"dropout": {"p": 0.5, "p_input": 0.0}, "l2": None}}
    summary = {"status": status, "overrides": list(overrides), "config": config, "steps": len(records),
               "metrics": metrics if metrics is not None else {"test/acc": 0.9}, "wall_time_s": 1.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "diagnosis.json").write_text(json.dumps({"findings": findings or []}))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


MLP = (["fc1", "fc2", "fc3"], ["act1", "act2"])


def mlp_run(run_dir: Path, steps: int = 6, **kwargs) -> Path:
    records = [log_step(s, *MLP) for s in range(2, 2 * steps + 1, 2)]
    records.append({"epoch": 1, "step": 2 * steps, "val/loss": 0.5, "val/acc": 0.8, "epoch/train_loss": 0.6})
    return write_run(run_dir, records, **kwargs)


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def exits(capsys, args: list[str]) -> tuple[int, str, str]:
    """`regexp ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the figure

def test_a_monitored_run_gets_every_panel_with_its_layers_in_order(tmp_path):
    fig = plotting.health_figure(mlp_run(tmp_path / "run"))
    assert titles(fig) == ["loss", "accuracy", "learning rate", "global gradient norm",
                           "gradient norm per layer (before clipping)", "activation std per layer",
                           "dead fraction per layer", "update ratio per layer (|Δw| / |w|)", "weight norm per layer"]
    panel = {ax.get_title(): ax for ax in fig.axes}
    assert panel["gradient norm per layer (before clipping)"].get_legend_handles_labels()[1] == ["fc1", "fc2", "fc3"]
    ratio = panel["update ratio per layer (|Δw| / |w|)"]
    assert ratio.get_yscale() == "log"
    assert any(list(line.get_ydata()) == [1e-3, 1e-3] for line in ratio.get_lines())  # the guide
    labels = panel["global gradient norm"].get_legend_handles_labels()[1]
    assert labels == ["before clipping", "after clipping"]
    assert any(ax.get_ylabel() == "clipped share" for ax in fig.axes)
    suptitle = fig.get_suptitle()
    assert "mlp hidden=[64,32]" in suptitle and "adamw lr=0.001" in suptitle and "dropout(p=0.5" in suptitle
    assert "seed 0" in suptitle


def test_layer_names_come_from_the_records(tmp_path):
    records = [log_step(s, ["stem.conv", "blocks.0", "head"], ["relu_a", "relu_b"], clip=False) for s in (1, 2, 3)]
    fig = plotting.health_figure(write_run(tmp_path / "run", records))
    panel = {ax.get_title(): ax for ax in fig.axes}
    assert panel["weight norm per layer"].get_legend_handles_labels()[1] == ["stem.conv", "blocks.0", "head"]
    assert panel["dead fraction per layer"].get_legend_handles_labels()[1] == ["relu_a", "relu_b"]
    assert panel["global gradient norm"].get_legend_handles_labels()[1] == ["before clipping"]  # no clipping: no after


def test_a_deep_net_draws_its_layer_families_as_heatmaps(tmp_path):
    layers, activations = [f"fc{i}" for i in range(1, 12)], [f"act{i}" for i in range(1, 11)]
    records = [log_step(s, layers, activations) for s in range(1, 30)]
    fig = plotting.health_figure(write_run(tmp_path / "run", records))
    panel = {ax.get_title(): ax for ax in fig.axes}
    grad = panel["gradient norm per layer (before clipping)"]
    assert len(grad.images) == 1 and grad.images[0].get_array().shape == (11, 29)
    assert [t.get_text() for t in grad.get_yticklabels()] == layers
    assert all(len(panel[f.title].images) == 1 for f in plotting.LAYER_FAMILIES)
    assert not panel["loss"].images


def test_findings_are_marked_at_their_event_step_else_their_evidence_step(tmp_path):
    records = [log_step(s, *MLP) for s in range(1, 12)]
    records.insert(5, {"step": 6, "finding/rule": "dying_relu", "finding/title": "Dying ReLU"})
    records.insert(9, {"step": 9, "nonfinite/step": 9, "nonfinite/where": "loss"})
    findings = [{"rule": "dying_relu", "step": 4, "evidence": {"step": 4}},
                {"rule": "loss_flat", "step": 3, "evidence": {"step": 8}},
                {"rule": "vanishing_gradients", "step": 8, "evidence": {}},
                {"rule": "divergence", "evidence": {"step": 9}}]
    health = plotting.read_health(write_run(tmp_path / "run", records, findings))
    assert health.marks == [(6, "dying_relu"), (8, "loss_flat, vanishing_gradients"), (9, "divergence")]
    assert health.nonfinite_step == 9
    fig = plotting.figure_of(health)
    loss = next(ax for ax in fig.axes if ax.get_title() == "loss")
    texts = [t.get_text().strip() for t in loss.texts]
    assert texts == ["dying_relu", "loss_flat, vanishing_gradients", "divergence, non-finite at step 9"]
    assert [t.get_color() for t in loss.texts][-1] == "red"


def test_findings_come_from_the_summary_without_a_diagnosis_file(tmp_path):
    run_dir = mlp_run(tmp_path / "run")
    (run_dir / "diagnosis.json").unlink()
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["findings"] = [{"rule": "loss_flat", "evidence": {"step": 4}}]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert plotting.read_health(run_dir).marks == [(4, "loss_flat")]


def test_a_one_epoch_run_draws_its_curves_from_its_log_steps(tmp_path):
    fig = plotting.health_figure(mlp_run(tmp_path / "run", steps=6))
    loss = next(ax for ax in fig.axes if ax.get_title() == "loss")
    train, val = loss.get_lines()[:2]
    assert list(train.get_xdata()) == [2, 4, 6, 8, 10, 12] and list(val.get_xdata()) == [12]


def test_monitor_off_leaves_the_per_layer_panels_out(tmp_path, empty_cwd, capsys):
    records = [{"step": s, "epoch": 1, "train/loss": 1.0 / s, "train/acc": 0.5, "opt/lr": 0.01} for s in (1, 2, 3)]
    write_run(tmp_path / "run", records)
    assert exits(capsys, ["plot", str(tmp_path / "run")])[0] == 0
    assert os.listdir(empty_cwd) == ["run-health.png"]
    assert titles(plotting.health_figure(tmp_path / "run")) == ["loss", "accuracy", "learning rate"]


def test_a_long_series_is_drawn_as_min_and_max_per_bucket():
    import numpy as np

    steps = np.arange(100_000)
    values = np.sin(steps / 1000.0)
    values[54_321], values[77_777] = 9.0, -9.0
    x, y = plotting.thinned(steps, values)
    assert len(x) == len(y) == 2 * plotting.BUCKETS
    assert y.max() == 9.0 and y.min() == -9.0 and np.all(np.diff(x) >= 0)


def test_median_run_is_the_lower_middle_of_the_trained_runs(tmp_path):
    for name, acc, status in [("a", 0.4, "completed"), ("b", 0.1, "completed"), ("c", 0.3, "early_stopped"),
                              ("d", 0.2, "completed"), ("e", 0.99, "diverged")]:
        mlp_run(tmp_path / name, metrics={"test/acc": acc}, status=status, overrides=[f"seed={name}"])
    [group] = group_runs(find_runs([tmp_path]), [])
    assert plotting.median_run(group, "test/acc").run_dir.name == "d"  # 0.1 0.2 | 0.3 0.4: the lower middle
    assert plotting.median_run(group, "val/acc") is None


def test_plot_by_draws_one_column_per_group(tmp_path, empty_cwd, capsys):
    for name, optimizer, steps in [("0", "adam", 6), ("1", "adam", 6), ("2", "sgd", 10)]:
        mlp_run(tmp_path / "sweep" / name, steps=steps, overrides=[f"optimizer={optimizer}", f"seed={name}"],
                metrics={"test/acc": 0.5 + int(name) / 10})
    code, out, _ = exits(capsys, ["plot", str(tmp_path / "sweep"), "--by", "optimizer"])
    assert code == 0 and out == "health figure: sweep-by-optimizer.png (2 groups)\n"
    assert (empty_cwd / "sweep-by-optimizer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = group_runs(find_runs([tmp_path / "sweep"]), ["optimizer"])
    fig = plotting.health_columns([(g.label, plotting.median_run(g, "test/acc").run_dir) for g in groups])
    assert [t for t in titles(fig) if "=" in t] == ["optimizer=adam", "optimizer=sgd"]
    rows = {}
    for ax in fig.axes:
        rows.setdefault(ax.get_subplotspec().rowspan.start, []).append(ax)
    line_row = rows[0]
    assert line_row[0].get_shared_y_axes().joined(line_row[0], line_row[1])
    assert all(ax.get_xlim()[1] >= 20 for ax in fig.axes if ax.get_xlabel() == "step")  # the longest run's steps


def test_compare_plot_still_draws_its_curves_through_plotting(tmp_path, empty_cwd, capsys):
    for name in ("0", "1"):
        mlp_run(tmp_path / "sweep" / name, overrides=[f"seed={name}"])
    code, out, err = exits(capsys, ["compare", str(tmp_path / "sweep"), "--plot", "curves.png"])
    assert code == 0 and "curves: curves.png" in out, err
    assert (empty_cwd / "curves.png").stat().st_size > 0


def test_curves_leave_out_groups_without_the_curve_and_count_the_runs_drawn(tmp_path):
    epoch = {"epoch": 1, "step": 4, "val/acc": 0.8, "epoch/train_loss": 0.5}
    write_run(tmp_path / "a0", [epoch], overrides=["optimizer=adam", "seed=0"])
    write_run(tmp_path / "a1", [{"step": 2, "train/loss": 1.0}], overrides=["optimizer=adam", "seed=1"])  # no epoch row
    write_run(tmp_path / "s0", [{"epoch": 1, "step": 4, "epoch/train_loss": 0.7}], overrides=["optimizer=sgd"])
    groups = group_runs(find_runs([tmp_path]), ["optimizer"])
    fig = plotting.curves_figure(groups, "test/acc")
    legends = {ax.get_ylabel(): ax.get_legend_handles_labels()[1] for ax in fig.axes}
    assert legends == {"val/acc": ["optimizer=adam (n=1)"], "epoch/train_loss": ["optimizer=adam (n=1)",
                                                                                 "optimizer=sgd (n=1)"]}
    fig.canvas.draw()  # one epoch: its own tick, not 0.96..1.04
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())


def test_curves_hand_an_unreadable_run_to_the_caller(tmp_path, capsys):
    mlp_run(tmp_path / "ok", overrides=["seed=0"])
    (mlp_run(tmp_path / "bad", overrides=["seed=1"]) / "metrics.jsonl").write_text("{bad\n{}\n")
    groups = group_runs(find_runs([tmp_path]), [])
    told = []
    assert plotting.curves_figure(groups, "test/acc", lambda run_dir, e: told.append((run_dir.name, str(e))))
    assert told == [("bad", f"{tmp_path / 'bad' / 'metrics.jsonl'}:1: not a JSON record; the file is corrupted")]
    assert capsys.readouterr().err == ""  # the caller's words, not compare's "--plot: leaving out"


# ---------------------------------------------------------------- bad input: one line, nothing written

def test_a_path_without_a_run_is_refused(tmp_path, empty_cwd, capsys):
    (tmp_path / "empty").mkdir()
    assert "no runs found" in refused(capsys, ["plot", str(tmp_path / "empty")])
    assert "no such directory" in refused(capsys, ["plot", str(tmp_path / "missing")])
    assert os.listdir(empty_cwd) == []


def test_several_runs_or_a_metric_without_by_are_refused(tmp_path, empty_cwd, capsys):
    mlp_run(tmp_path / "sweep" / "0")
    mlp_run(tmp_path / "sweep" / "1", overrides=["seed=1"])
    assert "holds 2 runs" in refused(capsys, ["plot", str(tmp_path / "sweep")])
    assert "2 paths" in refused(capsys, ["plot", str(tmp_path / "sweep" / "0"), str(tmp_path / "sweep" / "1")])
    only_with_by = refused(capsys, ["plot", str(tmp_path / "sweep" / "0"), "--metric", "val/acc"])
    assert "--metric val/acc: only with --by" in only_with_by
    assert os.listdir(empty_cwd) == []


def test_a_by_key_or_metric_that_no_run_has_is_refused(tmp_path, empty_cwd, capsys):
    mlp_run(tmp_path / "sweep" / "0")
    assert "--by optimzer: no run has this key" in refused(
        capsys, ["plot", str(tmp_path / "sweep"), "--by", "optimzer"])
    assert "--metric test/acx: no run has this metric" in refused(
        capsys, ["plot", str(tmp_path / "sweep"), "--by", "seed", "--metric", "test/acx"])
    assert os.listdir(empty_cwd) == []


def test_groups_where_no_run_recorded_a_step_leave_nothing_to_draw(tmp_path, empty_cwd, capsys):
    write_run(tmp_path / "sweep" / "0", [], status="failed", metrics={})
    error = refused(capsys, ["plot", str(tmp_path / "sweep"), "--by", "seed"])
    assert "--by seed: no run recorded a step; nothing written" in error and os.listdir(empty_cwd) == []


def diverged_run(run_dir: Path, last: int, **kwargs) -> Path:
    """A run that went non-finite at step `last` (its event record and its summary say so)."""
    records = [log_step(s, *MLP) for s in range(1, last)] + [{"step": last, "nonfinite/step": last}]
    run_dir = write_run(run_dir, records, status="diverged", metrics={}, **kwargs)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "nonfinite": {"nonfinite/step": last}}))
    return run_dir


def test_a_group_without_a_completed_run_shows_the_run_that_recorded_the_most_steps(tmp_path, empty_cwd, capsys):
    mlp_run(tmp_path / "sweep" / "ok", overrides=["optimizer=adam", "seed=0"])
    diverged_run(tmp_path / "sweep" / "short", 5, overrides=["optimizer=sgd", "seed=0"])
    diverged_run(tmp_path / "sweep" / "long", 9, overrides=["optimizer=sgd", "seed=1"],
                 findings=[{"rule": "lr_too_high", "evidence": {"step": 4}}])
    (tmp_path / "sweep" / "none").mkdir()
    write_run(tmp_path / "sweep" / "none" / "0", [], status="failed", metrics={}, overrides=["optimizer=rmsprop"])
    groups = {g.label: g for g in group_runs(find_runs([tmp_path / "sweep"]), ["optimizer"])}
    run, why = plotting.shown_run(groups["optimizer=sgd"], "test/acc")
    assert run.run_dir.name == "long" and why == "no completed run; shown: the longest run (diverged at step 9)"
    run, why = plotting.shown_run(groups["optimizer=adam"], "test/acc")
    assert run.run_dir.name == "ok" and why == "median run by test/acc (0.9, of 1 completed)"
    assert plotting.shown_run(groups["optimizer=rmsprop"], "test/acc") == (
        None, "no completed run, and no run recorded a step")
    code, out, err = exits(capsys, ["plot", str(tmp_path / "sweep"), "--by", "optimizer"])
    assert code == 0 and out == "health figure: sweep-by-optimizer.png (2 groups)\n"
    assert err == ("regexp: warning: optimizer=rmsprop: no completed run, and no run recorded a step; "
                   "left out of the figure\n")
    fig = plotting.health_columns([(f"{label}\n{why}", run.run_dir) for label, g in groups.items()
                                   for run, why in [plotting.shown_run(g, "test/acc")] if run is not None])
    assert "optimizer=sgd\nno completed run; shown: the longest run (diverged at step 9)" in titles(fig)
    loss = [ax for ax in fig.axes if ax.get_ylabel() == "loss"][-1]  # the sgd column's first panel
    assert [t.get_text().strip() for t in loss.texts] == ["lr_too_high", "non-finite at step 9"]


def test_plot_by_draws_a_rows_legend_on_the_first_column_that_has_the_panel(tmp_path):
    off = [{"step": s, "epoch": 1, "train/loss": 1.0 / s, "train/acc": 0.5, "opt/lr": 0.01} for s in (1, 2, 3)]
    fig = plotting.health_columns([("off", write_run(tmp_path / "off", off)), ("on", mlp_run(tmp_path / "on"))])
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes
               if ax.get_legend() is not None}
    assert legends["gradient norm per layer (before clipping)"] == ["fc1", "fc2", "fc3"]  # the second column's
    assert legends["dead fraction per layer"] == ["act1", "act2"]


def test_a_run_without_log_steps_draws_its_epoch_train_values_at_integer_steps(tmp_path):
    """monitor=off, 8 steps, log_every=50: only the epoch row."""
    row = {"epoch": 1, "step": 8, "epoch/train_loss": 1.2, "epoch/train_acc": 0.6, "epoch/lr": 1e-3,
           "epoch/samples_per_s": 100.0, "val/loss": 1.1, "val/acc": 0.62}
    fig = plotting.health_figure(write_run(tmp_path / "run", [row]))
    panel = {ax.get_title(): ax for ax in fig.axes}
    assert list(panel) == ["loss", "accuracy", "learning rate"]
    assert panel["loss"].get_legend_handles_labels()[1] == ["train (epoch mean)", "val"]
    assert [list(line.get_xdata()) for line in panel["learning rate"].get_lines()] == [[8]]
    fig.canvas.draw()
    assert all(float(t).is_integer() for ax in panel.values() for t in ax.get_xticks())
    with_log_steps = plotting.health_figure(mlp_run(tmp_path / "logged"))  # its epoch row's epoch/train_loss
    assert next(ax for ax in with_log_steps.axes if ax.get_title() == "loss").get_legend_handles_labels()[1] == [
        "train", "val"]


@pytest.mark.parametrize("out, message", [("health.bmpx", "unknown image format .bmpx"),
                                          ("health", "unknown image format (none)"),
                                          (".", "is a directory")])
def test_an_out_that_is_no_image_file_is_refused(tmp_path, empty_cwd, capsys, out, message):
    mlp_run(tmp_path / "run")
    assert message in refused(capsys, ["plot", str(tmp_path / "run"), "--out", out])
    assert os.listdir(empty_cwd) == []


def test_a_figure_never_goes_into_a_run_dir(tmp_path, monkeypatch, capsys):
    run_dir = mlp_run(tmp_path / "run")
    before = snapshot(run_dir)
    assert "inside the run dir" in refused(capsys, ["plot", str(run_dir), "--out", str(run_dir / "sub" / "h.png")])
    (tmp_path / "link").symlink_to(run_dir)
    assert "inside the run dir" in refused(capsys, ["plot", str(run_dir), "--out", str(tmp_path / "link" / "h.png")])
    monkeypatch.chdir(run_dir)  # the default --out lands in the current directory: here, the run dir
    assert f"inside the run dir {run_dir}" in refused(capsys, ["plot", "."])
    assert snapshot(run_dir) == before


def test_an_unwritable_out_is_exit_1_in_one_line(tmp_path, empty_cwd, capsys):
    mlp_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    code, out, err = exits(capsys, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "h.png")])
    assert code == 1 and out == "" and err.count("\n") == 1 and "cannot be created" in err
    assert os.listdir(empty_cwd) == [] and (tmp_path / "file").read_text() == "x"


def test_a_corrupted_metrics_line_is_exit_1_in_one_line(tmp_path, empty_cwd, capsys):
    run_dir = mlp_run(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join([*lines[:2], "{garbage\n", *lines[2:]]))
    code, out, err = exits(capsys, ["plot", str(run_dir)])
    assert code == 1 and out == "" and err.count("\n") == 1 and "metrics.jsonl:3: not a JSON record" in err
    assert os.listdir(empty_cwd) == []


def test_a_run_without_log_steps_has_nothing_to_draw(tmp_path, empty_cwd, capsys):
    write_run(tmp_path / "run", [])
    assert "nothing to draw (metrics.jsonl holds no metric values)" in refused(capsys, ["plot", str(tmp_path / "run")])
    assert os.listdir(empty_cwd) == []
    assert plotting.health_figure(tmp_path / "run").get_suptitle()  # as a figure (W&B, report): a titled blank
    (tmp_path / "run" / "metrics.jsonl").unlink()
    assert refused(capsys, ["plot", str(tmp_path / "run")]).endswith(
        "run: nothing to draw (no metrics.jsonl: the run recorded no metrics); nothing written")
    assert os.listdir(empty_cwd) == []


@pytest.mark.parametrize("step", [2**64, 2**63, -1, -1_000_000, 1.5, 1e30, None, "3"])
def test_a_record_without_a_usable_step_is_left_out(tmp_path, empty_cwd, capsys, step):
    records = [log_step(s, *MLP) for s in (1, 2, 3)] + [{"step": step, "epoch": 2**70, "train/loss": 1.0}]
    run_dir = write_run(tmp_path / "run", records, findings=[{"rule": "exploding", "evidence": {"step": step}}])
    health = plotting.read_health(run_dir)
    assert list(health.series["train/loss"].steps) == [1, 2, 3] and health.marks == []
    assert exits(capsys, ["plot", str(run_dir)])[0] == 0 and os.listdir(empty_cwd) == ["run-health.png"]


@pytest.mark.parametrize("big", [1.7e308, -1e300, 10**300, 1e101])
def test_values_too_large_to_draw_are_left_out(tmp_path, big):
    """An axis over ~1e300 overflows in matplotlib (figures and curves would be a traceback)."""
    layers = [f"fc{i}" for i in range(1, 11)]  # deep: the heatmaps too
    records = [log_step(s, layers, ["act1"]) for s in range(1, 6)]
    for record in records[::2]:
        record.update({k: big for k in record if k not in ("step", "epoch")})
    records += [{"epoch": e, "step": 5 + e, "val/acc": v, "epoch/train_loss": v} for e, v in ((1, big), (2, 0.5))]
    run_dir = write_run(tmp_path / "run", records)
    health = plotting.read_health(run_dir)
    assert list(health.series["train/loss"].steps) == [2, 4] and list(health.series["val/acc"].steps) == [7]
    assert plotting.png_bytes(plotting.health_figure(run_dir)).startswith(b"\x89PNG")
    curves = plotting.curves_figure(group_runs(find_runs([run_dir]), []), "test/acc")
    assert plotting.png_bytes(curves).startswith(b"\x89PNG")


def test_marks_outside_the_recorded_steps_are_not_drawn_but_named_in_a_note(tmp_path):
    records = [log_step(s, *MLP) for s in range(10, 20)]
    findings = [{"rule": "far", "evidence": {"step": 10**30}}, {"rule": "late", "evidence": {"step": 10**6}},
                {"rule": "before", "evidence": {"step": 5}}, {"rule": "negative", "evidence": {"step": -5}},
                {"rule": "inside", "evidence": {"step": 12}}]
    run_dir = write_run(tmp_path / "run", records, findings)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "nonfinite": {"nonfinite/step": 10**6}}))
    health = plotting.read_health(run_dir)
    assert health.marks == [(12, "inside")] and health.nonfinite_step is None
    assert health.outside == [(5, "before"), (10**6, "late"), (10**6, "non-finite")]  # 1e30 and -5: no steps
    fig = plotting.figure_of(health)
    assert all(9 <= ax.get_xlim()[0] and ax.get_xlim()[1] <= 20 for ax in fig.axes if ax.get_xlabel() == "step")
    assert [t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle()] == [
        "not drawn, outside the recorded steps: before at step 5; late at step 1000000; non-finite at step 1000000"]


def test_nan_text_missing_keys_and_odd_steps_draw_what_is_there(tmp_path, empty_cwd, capsys):
    records = [log_step(s, *MLP) for s in range(1, 9)]
    records[1]["train/loss"] = math.nan
    records[2]["train/loss"] = "1.5"
    records[3]["grad/norm/fc2"] = 10**400
    records[4]["train/acc"] = [0.5]
    del records[5]["grad/norm/fc1"]
    records += [{"step": "9", "train/loss": 1.0}, {"step": True, "train/loss": 1.0}, {"train/loss": 1.0}, [], 7]
    run_dir = tmp_path / "run"
    write_run(run_dir, [r for r in records if isinstance(r, dict)])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 10, "train/lo')  # a half-written last line
    health = plotting.read_health(run_dir)
    assert list(health.series["train/loss"].steps) == [1, 4, 5, 6, 7, 8]
    assert list(health.series["grad/norm/fc2"].steps) == [1, 2, 3, 5, 6, 7, 8]
    assert exits(capsys, ["plot", str(run_dir)])[0] == 0 and os.listdir(empty_cwd) == ["run-health.png"]


def test_user_text_is_drawn_as_typed(tmp_path):
    records = [log_step(s, ["$x$", "fc2"], ["act1"]) for s in (1, 2)]
    config = {"seed": 0, "model": {"name": "$\\alpha$"}, "optimizer": {"name": "sgd", "lr": 0.1}}
    fig = plotting.health_figure(write_run(tmp_path / "run", records, config=config))
    fig.canvas.draw()  # mathtext would fail on, or render, a `$...$`
    assert r"\$\alpha\$" in fig.get_suptitle()


def test_a_health_figure_that_cannot_be_drawn_is_one_warning_and_the_run_still_finishes(tmp_path):
    run_dir = mlp_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{bad\n{"step": 2}\n')
    finished, warnings = [], []
    fake = types.SimpleNamespace(define_metric=lambda *a, **k: None, log=lambda *a, **k: None,
                                 finish=lambda exit_code: finished.append(exit_code))
    WandbRun(fake, run_dir, warnings.append).close(0)
    assert finished == [0] and len(warnings) == 1 and "health figure was not logged (RunError" in warnings[0]


# ---------------------------------------------------------------- the real CLI

@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """clip=none,norm on TINY runs, trained by the real `regexp train -m` with W&B offline."""
    from conftest import require_shared_data

    data_root = require_shared_data()
    root = tmp_path_factory.mktemp("plot")
    home = root / "wandb-home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("REGEXP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "regexp-cache"))
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            env.setenv(var, str(home / var.lower()))
        env.setenv("NETRC", str(home / "netrc"))
        out = run_cli(["train", "-m", *TINY, "max_steps=6", "clip=none,norm", "clip.max_norm=0.1",
                       f"hydra.sweep.dir={root / 'sweep'}"], root, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "health figure was not logged" not in out.stdout + out.stderr
    return root / "sweep"


@pytest.mark.slow
def test_plot_draws_a_real_run_into_the_current_directory(sweep, tmp_path):
    run_dir = next(p.parent for p in sorted(sweep.rglob("summary.json")) if "clip=norm" in p.parent.joinpath(
        ".hydra/overrides.yaml").read_text())
    before = snapshot(run_dir)
    out = run_cli(["plot", str(run_dir)], tmp_path)
    assert out.returncode == 0 and out.stdout == f"health figure: {run_dir.name}-health.png\n", out.stderr
    assert (tmp_path / f"{run_dir.name}-health.png").stat().st_size < 300_000
    assert snapshot(run_dir) == before
    fig = plotting.health_figure(run_dir)
    assert "clip=norm 0.1" in fig.get_suptitle() and len(titles(fig)) == 9
    out = run_cli(["plot", str(sweep), "--by", "clip", "--out", "by-clip.svg"], tmp_path)
    assert out.returncode == 0 and out.stdout == "health figure: by-clip.svg (2 groups)\n", out.stderr
    assert (tmp_path / "by-clip.svg").read_text().count("clip=") >= 2


@pytest.mark.slow
def test_each_wandb_run_gets_its_health_figure(sweep):
    for run_dir in sorted(p.parent for p in sweep.rglob("summary.json")):
        [wandb_run] = (run_dir / "wandb").glob("offline-run-*")
        images = list(wandb_run.glob("files/media/images/health_*.png"))
        assert len(images) == 1 and images[0].read_bytes()[:4] == b"\x89PNG"
        [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        records = subprocess.run([WANDB, "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
        history = [json.loads(line)["history"]["item"] for line in records if '"type":"history"' in line]
        assert any(item.get("health._type") == "image-file" for item in history)


def test_a_single_log_step_is_a_visible_dot(tmp_path):
    fig = plotting.health_figure(write_run(tmp_path / "run", [log_step(5, *MLP)]))
    panel = {ax.get_title(): ax for ax in fig.axes}
    assert panel["loss"].get_lines()[0].get_marker() == "o"
    assert {line.get_marker() for line in panel["weight norm per layer"].get_lines()[:3]} == {"o"}


def test_plot_and_plotting_import_nothing_heavy():
    code = ("import sys, regexp.plot, regexp.plotting; "
            "print([m for m in ('torch', 'matplotlib', 'wandb', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
