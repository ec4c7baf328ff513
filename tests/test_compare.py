"""`regexp compare`: the pure functions on hand-made run dirs, then the real command on a
real sweep trained through the real CLI."""

import json
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from conftest import REGEXP, TINY, refused, require_shared_data, run_cli, snapshot, summaries

from regexp import comparison as compare  # the module; regexp.compare is the Python API's function
from regexp import plotting
from regexp.comparison import Stat
from regexp.rundir import UsageError, read_metrics


def make_run(root: Path, name: str, overrides: list[str], metrics: dict | None = None, status: str = "completed",
             config: dict | None = None, choices: dict | None = None, curve: list[dict] | None = None,
             hydra_dir: bool = True) -> Path:
    """A run dir as `regexp train` leaves it: summary.json, .hydra/overrides.yaml, metrics.jsonl."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    summary = {"status": status, "overrides": overrides, "choices": choices or {}, "config": config or {},
               "metrics": metrics or {}, "wall_time_s": 1.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if hydra_dir:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if curve:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return run_dir


def sweep_run(root: Path, name: str, optimizer: str, seed: int, acc: float | None, lr: float = 1e-3, **kwargs) -> Path:
    return make_run(root, name, [f"optimizer={optimizer}", f"seed={seed}", "epochs=2"],
                    metrics={"test/acc": acc, "train/loss": 1 - acc} if acc is not None else None,
                    choices={"optimizer": optimizer}, config={"seed": seed, "epochs": 2, "optimizer": {"name": optimizer, "lr": lr}},
                    **kwargs)


# ---------------------------------------------------------------- pure functions

def test_swept_keys_are_the_differing_overrides_seed_and_paths_aside(tmp_path):
    for i, (optimizer, seed) in enumerate([("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)]):
        make_run(tmp_path, str(i), [f"optimizer={optimizer}", f"seed={seed}", "epochs=2", f"out_dir=o{i}", f"dataset.root=/d{i}"],
                 choices={"optimizer": optimizer}, config={"seed": seed})
    assert compare.swept_keys(compare.find_runs([tmp_path])) == ["optimizer"]


def test_swept_keys_compare_resolved_values(tmp_path):
    """1e-2 and 0.01 are one value; a run without the override has the config's default."""
    make_run(tmp_path, "a", ["optimizer.lr=1e-2"], config={"optimizer": {"lr": 0.01}})
    make_run(tmp_path, "b", ["optimizer.lr=0.01"], config={"optimizer": {"lr": 0.01}})
    runs = compare.find_runs([tmp_path])
    assert compare.swept_keys(runs) == []
    make_run(tmp_path, "c", [], config={"optimizer": {"lr": 0.001}})
    runs = compare.find_runs([tmp_path])
    assert compare.swept_keys(runs) == ["optimizer.lr"]
    assert sorted(compare.key_value(run, "optimizer.lr") for run in runs) == ["0.001", "0.01", "0.01"]


def test_appended_group_and_list_values(tmp_path):
    make_run(tmp_path, "a", ["+regularizer=dropout"], choices={"regularizer": "dropout"}, config={"regularizer": {"dropout": {"p": 0.5}}})
    make_run(tmp_path, "b", ["+regularizer=[dropout,l2]"], choices={"regularizer": None},
             config={"regularizer": {"dropout": {"p": 0.5}, "l2": {"coef": 1e-4}}})
    make_run(tmp_path, "c", [], config={"model": {"hidden": [512, 256]}})
    runs = {run.run_dir.name: run for run in compare.find_runs([tmp_path])}
    assert compare.swept_keys(list(runs.values())) == ["regularizer"]
    assert [compare.key_value(runs[n], "regularizer") for n in "abc"] == ["dropout", "[dropout,l2]", None]
    assert compare.key_value(runs["c"], "model.hidden") == "[512,256]"


def test_overrides_yaml_first_summary_as_fallback(tmp_path):
    make_run(tmp_path, "a", ["optimizer=sgd"])
    (tmp_path / "a" / ".hydra" / "overrides.yaml").write_text("- optimizer=adam\n")
    make_run(tmp_path, "b", ["optimizer=nesterov"], hydra_dir=False)
    runs = {run.run_dir.name: run for run in compare.find_runs([tmp_path])}
    assert runs["a"].overrides == {"optimizer": "adam"} and runs["b"].overrides == {"optimizer": "nesterov"}


def test_grouping_mean_std_and_failed_runs(tmp_path):
    sweep_run(tmp_path, "0", "adam", 0, 0.90)
    sweep_run(tmp_path, "1", "adam", 1, 0.80)
    sweep_run(tmp_path, "2", "adam", 2, None, status="failed")
    sweep_run(tmp_path, "3", "sgd", 0, 0.70)
    sweep_run(tmp_path, "4", "momentum", 0, None, status="diverged")
    runs = compare.find_runs([tmp_path])
    groups = {g.label: g for g in compare.group_runs(runs, ["optimizer"])}
    assert {label: len(g.runs) for label, g in groups.items()} == {"optimizer=adam": 3, "optimizer=sgd": 1, "optimizer=momentum": 1}
    adam = groups["optimizer=adam"].stat("test/acc")
    assert (adam.mean, adam.n) == (pytest.approx(0.85), 2) and adam.std == pytest.approx(0.0707107, rel=1e-5)  # ddof=1
    assert groups["optimizer=adam"].statuses() == {"completed": 2, "failed": 1}
    assert groups["optimizer=sgd"].stat("test/acc") == Stat(pytest.approx(0.70), None, 1)
    assert groups["optimizer=momentum"].stat("test/acc") == Stat(None, None, 0)
    assert compare.fmt_stat(groups["optimizer=adam"].stat("test/acc"), 3) == "0.8500 ± 0.0707 (n=2)"
    assert compare.fmt_stat(groups["optimizer=sgd"].stat("test/acc"), 1) == "0.7000 ±—"
    assert compare.fmt_stat(Stat(None, None, 0), 1) == "—"


def test_mean_std_is_the_sample_std():
    values = [0.1, 0.4, 0.35, 0.2]
    stat = compare.mean_std(values)
    assert stat.mean == pytest.approx(statistics.mean(values)) and stat.std == pytest.approx(statistics.stdev(values))
    assert compare.mean_std([]) == Stat(None, None, 0) and compare.mean_std([2.0]) == Stat(2.0, None, 1)


def test_ranking_direction_and_groups_without_the_metric_last(tmp_path):
    for i, (optimizer, acc) in enumerate([("sgd", 0.7), ("adam", 0.9), ("adamw", 0.8)]):
        sweep_run(tmp_path, str(i), optimizer, 0, acc)
    sweep_run(tmp_path, "3", "momentum", 0, None, status="failed")
    groups = compare.group_runs(compare.find_runs([tmp_path]), ["optimizer"])

    def order(metric: str, higher: bool) -> list[str]:
        return [g.values["optimizer"] for g in compare.rank_groups(groups, metric, higher)]

    assert order("test/acc", True) == ["adam", "adamw", "sgd", "momentum"]
    assert order("train/loss", False) == ["adam", "adamw", "sgd", "momentum"]  # loss = 1 - acc
    assert order("test/acc", False) == ["sgd", "adamw", "adam", "momentum"]
    assert compare.lower_is_better("test/loss") and compare.lower_is_better("wall_time_s")
    assert not compare.lower_is_better("val/acc")


def test_bad_input_errors(tmp_path):
    sweep_run(tmp_path, "0", "adam", 0, 0.9)
    runs = compare.find_runs([tmp_path])
    with pytest.raises(UsageError, match="no such directory"):
        compare.find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no runs found"):
        compare.find_runs([tmp_path / "empty"])
    with pytest.raises(UsageError, match="available: override keys optimizer, seed, epochs; config groups optimizer"):
        compare.check_keys(runs, ["lr"])
    compare.check_keys(runs, ["optimizer", "optimizer.lr", "seed"])
    with pytest.raises(UsageError, match="available: test/acc, train/loss, wall_time_s"):
        compare.check_metric(runs, "test/accuracy")


def test_unknown_metric_is_fine_when_no_run_finished(tmp_path):
    sweep_run(tmp_path, "0", "adam", 0, None, status="failed")
    compare.check_metric(compare.find_runs([tmp_path]), "test/acc")


def test_curves_take_each_epochs_last_record(tmp_path):
    run_dir = make_run(tmp_path, "0", [], curve=[
        {"step": 2, "epoch": 1, "train/loss": 2.0}, {"step": 4, "epoch": 1, "train/loss": 1.5, "val/acc": 0.5},
        {"step": 4, "nonfinite/step": 4}, {"step": 6, "epoch": 2, "train/loss": 1.0, "val/acc": 0.6}])
    (run_dir / "metrics.jsonl").open("a").write('{"step": 8, "epoch": 3, "train/lo')  # a run still writing
    records = read_metrics(run_dir)
    assert plotting.curve_of(records, "train/loss") == {1: 1.5, 2: 1.0}
    assert plotting.curve_of(records, plotting.curve_metric("test/acc")) == {1: 0.5, 2: 0.6}


# ---------------------------------------------------------------- the real command on a real sweep

OPTIMIZERS = ("adam", "sgd")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """2 optimizers × 2 seeds, 2 epochs of 8 steps each, trained by the real `regexp train -m`."""
    data_root = require_shared_data()
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    with pytest.MonkeyPatch.context() as env:  # conftest's isolation, for this module-scoped fixture
        env.setenv("WANDB_MODE", "disabled")
        env.setenv("REGEXP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "regexp-cache"))
        out = run_cli(["train", "-m", f"optimizer={','.join(OPTIMIZERS)}", "seed=0,1", *TINY,
                       "epochs=2", "max_steps=null", f"hydra.sweep.dir={sweep_dir}"], sweep_dir.parent, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s["status"] for s in summaries(sweep_dir)] == ["completed"] * 4
    return sweep_dir


def expected_groups(sweep_dir: Path) -> dict[str, dict]:
    """Mean and sample std per optimizer, computed here from the summaries."""
    by_optimizer: dict[str, list[dict]] = {}
    for s in summaries(sweep_dir):
        by_optimizer.setdefault(s["choices"]["optimizer"], []).append(s)
    return {name: {"runs": len(runs),
                   "acc": (statistics.mean(r["metrics"]["test/acc"] for r in runs), statistics.stdev(r["metrics"]["test/acc"] for r in runs)),
                   "loss": (statistics.mean(r["metrics"]["train/loss"] for r in runs), statistics.stdev(r["metrics"]["train/loss"] for r in runs))}
            for name, runs in by_optimizer.items()}


def table_rows(stdout: str) -> dict[str, str]:
    """The table's body rows, keyed by their first cell."""
    rows = [line.strip("│ ") for line in stdout.splitlines() if line.startswith("│")]
    return {row.split("│")[0].strip(): row for row in rows}


@pytest.mark.slow
def test_table_shows_groups_best_first_with_mean_and_std(sweep, tmp_path):
    out = run_cli(["compare", str(sweep)], tmp_path)
    assert out.returncode == 0, out.stderr
    expected = expected_groups(sweep)
    rows = table_rows(out.stdout)
    assert list(rows) == sorted(expected, key=lambda name: -expected[name]["acc"][0])
    for name, group in expected.items():
        cells = [c.strip() for c in rows[name].split("│")]
        assert cells[1] == str(group["runs"]) == "2"
        assert cells[2] == f"{group['acc'][0]:.4f} ± {group['acc'][1]:.4f}"
        assert cells[4] == f"{group['loss'][0]:.4f} ± {group['loss'][1]:.4f}"
        assert cells[6] == "2 completed"
    assert "optimizer" in out.stdout.splitlines()[2] and "best test/acc first (higher is better)" in out.stdout
    assert not out.stderr


@pytest.mark.slow
def test_json_output(sweep, tmp_path):
    out = run_cli(["compare", str(sweep), "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # stdout is the JSON and nothing else
    expected = expected_groups(sweep)
    assert result["keys"] == ["optimizer"] and result["metric"] == "test/acc" and result["higher_is_better"]
    assert [g["values"]["optimizer"] for g in result["groups"]] == sorted(expected, key=lambda n: -expected[n]["acc"][0])
    for group in result["groups"]:
        want = expected[group["values"]["optimizer"]]
        assert group["runs"] == 2 and group["statuses"] == {"completed": 2}
        assert (group["stats"]["test/acc"]["mean"], group["stats"]["test/acc"]["std"]) == pytest.approx(want["acc"])
        assert (group["stats"]["train/loss"]["mean"], group["stats"]["train/loss"]["std"]) == pytest.approx(want["loss"])
        mean, std = want["acc"]
        half = 12.706205 * std / 2 ** 0.5  # t(0.975; 1), from a printed table: 2 seeds a group
        assert (group["stats"]["test/acc"]["ci_low"], group["stats"]["test/acc"]["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-5)
        assert group["vs_baseline"] is None and result["baseline"] is None
    assert sorted((r["values"]["optimizer"], r["seed"]) for r in result["runs"]) == [(o, s) for o in sorted(OPTIMIZERS) for s in (0, 1)]
    on_disk = {s["run_dir"]: s["metrics"]["test/acc"] for s in summaries(sweep)}
    assert {r["run_dir"]: r["metrics"]["test/acc"] for r in result["runs"]} == on_disk


@pytest.mark.slow
def test_csv_against_a_baseline_of_two_seeds_says_too_few_runs(sweep, tmp_path):
    import csv
    import io

    out = run_cli(["compare", str(sweep), "--baseline", "sgd", "--csv"], tmp_path)
    assert out.returncode == 0 and not out.stderr
    rows = {r["optimizer"]: r for r in csv.DictReader(io.StringIO(out.stdout))}
    expected = expected_groups(sweep)
    assert rows["sgd"]["note"] == "baseline" and rows["adam"]["note"] == "too few runs" and rows["adam"]["p_value"] == ""
    assert float(rows["adam"]["diff"]) == pytest.approx(expected["adam"]["acc"][0] - expected["sgd"]["acc"][0])
    assert [int(rows[o]["n"]) for o in OPTIMIZERS] == [2, 2]


@pytest.mark.slow
def test_plot_writes_a_png(sweep, tmp_path):
    from PIL import Image

    png = tmp_path / "plots" / "curves.png"
    out = run_cli(["compare", str(sweep), "--plot", str(png)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300
    assert f"curves: {png}" in out.stdout


@pytest.mark.slow
def test_group_by_other_keys(sweep, tmp_path):
    out = run_cli(["compare", str(sweep), "--by", "seed", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)["groups"]
    assert sorted(g["values"]["seed"] for g in groups) == ["0", "1"] and [g["runs"] for g in groups] == [2, 2]
    out = run_cli(["compare", str(sweep), "--by", "optimizer", "--by", "seed"], tmp_path)
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert out.returncode == 0 and len(rows) == 4 and all("±—" in row for row in rows)
    out = run_cli(["compare", str(sweep), "--by", "optimizer.lr", "--json"], tmp_path)
    assert sorted(g["values"]["optimizer.lr"] for g in json.loads(out.stdout)["groups"]) == ["0.001", "0.1"]


@pytest.mark.slow
def test_failed_runs_are_marked_and_left_out_of_the_statistics(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    by_job = {p.parent.name: json.loads(p.read_text()) for p in copy.glob("*/summary.json")}
    failed = next(job for job, s in by_job.items() if s["choices"]["optimizer"] == "adam")
    edit_summary(copy / failed, fail)
    (copy / failed / "metrics.jsonl").unlink()
    # a group of failed runs only: job 9, as if `optimizer=nesterov` had crashed
    shutil.copytree(copy / failed, copy / "9")
    edit_summary(copy / "9", lambda s: s["choices"].update(optimizer="nesterov"))
    (copy / "9" / ".hydra" / "overrides.yaml").write_text("- optimizer=nesterov\n- seed=0\n")

    out = run_cli(["compare", str(copy), "--plot", str(tmp_path / "curves.png")], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = table_rows(out.stdout)
    assert list(rows)[-1] == "nesterov"  # no metric: last
    nesterov = [c.strip() for c in rows["nesterov"].split("│")]
    assert nesterov[1:4] == ["1", "—", "—"] and nesterov[6] == "1 failed"
    remaining = next(s["metrics"]["test/acc"] for job, s in by_job.items() if s["choices"]["optimizer"] == "adam" and job != failed)
    adam = [c.strip() for c in rows["adam"].split("│")]
    assert adam[1] == "2" and adam[2] == f"{remaining:.4f} ±— (n=1)" and adam[6] == "1 completed, 1 failed"
    assert f"failed: {copy / failed}  (RuntimeError: boom)" in out.stdout
    assert (tmp_path / "curves.png").is_file()


def edit_summary(run_dir: Path, edit) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    edit(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def fail(summary: dict) -> None:
    """What train() records for a crash: no final metrics, the error."""
    del summary["metrics"]
    summary.update(status="failed", error="RuntimeError: boom")


@pytest.mark.parametrize("args,message", [
    (["{empty}"], "no runs found"),
    (["{sweep}", "--by", "optimiser"], "--by optimiser: no run has this key; available: override keys optimizer, seed,"),
    (["{sweep}", "--metric", "test/accuracy"], "--metric test/accuracy: no run has this metric; available: "),
    (["{sweep}", "--plot", "curves.xyz"], "unknown image format"),
    ([], "the following arguments are required: PATH"),
])
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(sweep, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    out = run_cli(["compare", *(a.format(sweep=sweep, empty=tmp_path / "empty") for a in args)], tmp_path)
    assert out.returncode == 2 and not out.stdout
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("regexp: error: ") and message in out.stderr


# ---------------------------------------------------------------- what is averaged, and bad files (hand-made runs)

def wall(run_dir: Path, seconds: float, **fields) -> Path:
    edit_summary(run_dir, lambda s: s.update(wall_time_s=seconds, **fields))
    return run_dir


def test_failed_and_diverged_runs_are_counted_never_averaged(tmp_path):
    wall(sweep_run(tmp_path, "0", "adam", 0, 0.98), 474.9)
    wall(sweep_run(tmp_path, "1", "adam", 1, None, status="failed"), 3.0, error="RuntimeError: boom\nTraceback")
    wall(sweep_run(tmp_path, "2", "sgd", 0, 0.90), 100.0)
    wall(make_run(tmp_path, "3", ["optimizer=sgd", "seed=1", "epochs=2"], metrics={"train/loss": 3137039191466.1, "test/acc": 0.1},
                  status="diverged", choices={"optimizer": "sgd"}, config={"seed": 1}), 20.0, nonfinite={"nonfinite/step": 7})
    groups = {g.values["optimizer"]: g for g in compare.group_runs(compare.find_runs([tmp_path]), ["optimizer"])}
    assert groups["adam"].stat("wall_time_s") == Stat(474.9, None, 1)  # not (474.9 + 3.0) / 2
    assert groups["sgd"].stat("train/loss") == Stat(pytest.approx(0.1), None, 1)  # the diverged loss stays out
    assert groups["sgd"].stat("test/acc").mean == pytest.approx(0.90)

    out = run_cli(["compare", str(tmp_path)], tmp_path)
    assert out.returncode == 0 and not out.stderr
    rows = table_rows(out.stdout)
    assert [c.strip() for c in rows["adam"].split("│")][5:] == ["474.9", "1 completed, 1 failed"]
    assert [c.strip() for c in rows["sgd"].split("│")][5:] == ["100.0", "1 completed, 1 diverged"]
    assert f"failed: {tmp_path / '1'}  (RuntimeError: boom)" in out.stdout
    assert f"diverged: {tmp_path / '3'}  (non-finite at step 7)" in out.stdout

    result = json.loads(run_cli(["compare", str(tmp_path), "--json"], tmp_path).stdout)
    adam = next(g for g in result["groups"] if g["values"]["optimizer"] == "adam")
    assert adam["stats"]["wall_time_s"] == {"mean": 474.9, "std": None, "n": 1, "ci_low": None, "ci_high": None} and adam["statuses"] == {"completed": 1, "failed": 1}
    assert {r["status"]: r["in_means"] for r in result["runs"]} == {"completed": True, "failed": False, "diverged": False}


@pytest.mark.slow
def test_json_into_a_closed_pipe_ends_quietly(tmp_path):
    """`regexp compare ... --json | head -1`: more than a pipe's buffer of JSON, the reader gone after one line."""
    for i in range(300):
        sweep_run(tmp_path / "runs", str(i), f"opt{i % 100}", i, 0.5 + i / 1000)
    out = subprocess.run(f"set -o pipefail; {REGEXP} compare {tmp_path / 'runs'} --json 2>{tmp_path / 'err'} | head -1",
                         shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=300)
    assert out.stdout == "{\n" and (tmp_path / "err").read_text() == ""
    assert out.returncode == 141  # as SIGPIPE ends other tools


def test_unreadable_summaries_are_named_and_left_out(tmp_path):
    sweep_run(tmp_path, "0", "adam", 0, 0.9)
    for name, text in (("1", '{"status": "completed", "metr'), ("2", "[1, 2]"), ("3", '{"status": "completed", "metrics": 5}')):
        sweep_run(tmp_path, name, "sgd", 0, 0.1)
        (tmp_path / name / "summary.json").write_text(text)
    out = run_cli(["compare", str(tmp_path), "--json"], tmp_path)
    assert out.returncode == 0 and [r["run_dir"] for r in json.loads(out.stdout)["runs"]] == [str(tmp_path / "0")]
    warnings = out.stderr.splitlines()
    assert len(warnings) == 3 and all(w.startswith("regexp: warning: skipping ") for w in warnings)
    for name, why in (("1", "not valid JSON"), ("2", "a JSON object was expected, not list"), ("3", "metrics is a int")):
        assert any(str(tmp_path / name / "summary.json") in w and why in w for w in warnings), name

    for name in ("0",):
        (tmp_path / name / "summary.json").write_text("")
    out = run_cli(["compare", str(tmp_path)], tmp_path)
    assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith("regexp: error: ") and "no runs found" in out.stderr


@pytest.mark.slow
def test_plot_leaves_out_a_corrupted_metrics_file(tmp_path):
    curve = [{"step": 2, "epoch": 1, "train/loss": 2.0, "val/acc": 0.5}, {"step": 4, "epoch": 2, "train/loss": 1.0, "val/acc": 0.6}]
    sweep_run(tmp_path / "runs", "0", "adam", 0, 0.9, curve=curve)
    bad = sweep_run(tmp_path / "runs", "1", "sgd", 0, 0.8, curve=curve)
    (bad / "metrics.jsonl").write_text('{"step": 2, "epo\n{"step": 4}\n')
    png = tmp_path / "curves.png"
    out = run_cli(["compare", str(tmp_path / "runs"), "--plot", str(png)], tmp_path)
    assert out.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert out.stderr == f"regexp: warning: --plot: leaving out {bad}: {bad / 'metrics.jsonl'}:1: not a JSON record; the file is corrupted\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.mark.slow
@pytest.mark.parametrize("plot,message,code", [
    ("{file}/curves.png", "output directory cannot be created: {file} is a file", 1),
    ("{dir}", "is a directory; name a file", 2),
    ("{run}/curves.png", "inside the run dir {run}", 2),
])
def test_a_plot_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, plot, message, code):
    sweep_run(tmp_path / "runs", "0", "adam", 0, 0.9, curve=[{"step": 2, "epoch": 1, "train/loss": 2.0}])
    (tmp_path / "a-file").write_text("")
    (tmp_path / "out.png").mkdir()
    names = {"file": tmp_path / "a-file", "dir": tmp_path / "out.png", "run": tmp_path / "runs" / "0"}
    out = run_cli(["compare", str(tmp_path / "runs"), "--plot", plot.format(**names)], tmp_path)
    assert out.returncode == code and not out.stdout and not (tmp_path / "runs" / "0" / "curves.png").exists()
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("regexp: error: --plot") and message.format(**names) in out.stderr


def test_help_documents_the_exit_codes_and_what_baseline_takes(tmp_path):
    out = run_cli(["compare", "--help"], tmp_path)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "Exit codes: 0" in text and "95% confidence interval" in text
    assert "GROUP is a group's label as the table prints it (regularizer=l2;" in text and "its value (l2)" in text


def test_table_data_is_what_json_prints_and_what_the_python_api_returns(tmp_path):
    import regexp

    sweep_run(tmp_path, "0", "adam", 0, 0.9)
    sweep_run(tmp_path, "1", "sgd", 0, None, status="failed")
    data = compare.table_data([tmp_path], ["optimizer"])
    assert data == json.loads(run_cli(["compare", str(tmp_path), "--by", "optimizer", "--json"], tmp_path).stdout)
    assert regexp.compare([tmp_path], by=["optimizer"]) == data == regexp.compare([tmp_path], by=["optimizer"])  # still a function
    with pytest.raises(UsageError, match="--by lr: no run has this key"):
        compare.table_data([tmp_path], ["lr"])


# ---------------------------------------------------------------- intervals, baseline and Welch's test (hand-made runs)

# Student's t quantiles from a printed table (not from scipy): t(0.975; 2), t(0.975; 4), t(0.995; 4)
T975_2, T975_4, T995_4 = 4.302653, 2.776445, 4.604095


def reg_runs(root: Path, accs: dict[str, list[float]], status: str = "completed") -> Path:
    """One run per value, `+regularizer=NAME seed=i`, test/acc the value."""
    for name, values in accs.items():
        for seed, acc in enumerate(values):
            make_run(root, f"{name}-{seed}", [f"+regularizer={name}", f"seed={seed}"], {"test/acc": acc, "train/loss": 1 - acc},
                     status=status, choices={"regularizer": name}, config={"seed": seed})
    return root


def groups_of(root: Path, baseline: str | None = None, by: list[str] | None = None) -> dict[str, dict]:
    data = compare.table_data([root], by, baseline=baseline)
    return {g["label"]: g for g in data["groups"]}


def test_the_interval_is_students_t_over_the_trained_runs():
    stat = compare.mean_std([1.0, 2.0, 3.0])  # mean 2, std 1: ± t(0.975; 2) / sqrt(3)
    assert (stat.ci_low, stat.ci_high) == (pytest.approx(2 - T975_2 / 3 ** 0.5, abs=1e-5), pytest.approx(2 + T975_2 / 3 ** 0.5, abs=1e-5))
    stat = compare.mean_std([0.91, 0.92, 0.93, 0.90, 0.94])  # std 0.0158114, t(0.975; 4)
    half = T975_4 * 0.0158114 / 5 ** 0.5
    assert (stat.ci_low, stat.ci_high) == (pytest.approx(0.92 - half, abs=1e-6), pytest.approx(0.92 + half, abs=1e-6))
    assert compare.mean_std([0.5]) == Stat(0.5, None, 1, None, None)  # no interval from one value
    assert compare.mean_std([0.5, 0.5, 0.5]) == Stat(0.5, 0.0, 3, 0.5, 0.5)  # no spread: the interval is the value


def test_welch_p_value_against_t_quantiles(tmp_path):
    """Equal n and spread: Welch's df is 2(n - 1) = 4, so a difference of t(q; 4) standard errors has p = 2(1 - q).
    Unequal n (3, 5) with s1²/n1 = 2 s2²/n2: df = 4 again, where Student's pooled test would have 6."""
    se = (2 / 3) ** 0.5
    reg_runs(tmp_path / "a", {"base": [0, 1, 2], "p05": [d + T975_4 * se for d in (0, 1, 2)], "p01": [d + T995_4 * se for d in (0, 1, 2)]})
    groups = groups_of(tmp_path / "a", baseline="base")
    assert groups["regularizer=p05"]["vs_baseline"] == {"diff": pytest.approx(T975_4 * se), "p_value": pytest.approx(0.05, rel=1e-5), "note": None}
    assert groups["regularizer=p01"]["vs_baseline"]["p_value"] == pytest.approx(0.01, rel=1e-5)
    assert groups["regularizer=base"]["vs_baseline"] is None
    shift = T975_4 * 0.6 ** 0.5  # se² = 1.2/3 + 1/5
    reg_runs(tmp_path / "b", {"base": [-1, -1, 0, 1, 1], "wide": [shift - 1.2 ** 0.5, shift, shift + 1.2 ** 0.5]})
    assert groups_of(tmp_path / "b", baseline="base")["regularizer=wide"]["vs_baseline"]["p_value"] == pytest.approx(0.05, rel=1e-5)


def test_too_few_runs_and_no_spread_say_why_there_is_no_p_value(tmp_path):
    import warnings

    reg_runs(tmp_path, {"base": [0.9, 0.9, 0.9], "same": [0.9, 0.9, 0.9], "flat": [0.8, 0.8, 0.8], "two": [0.7, 0.75],
                        "spread": [0.85, 0.9, 0.95], "nearly": [0.9, 0.9, 0.9000000000000001]})
    make_run(tmp_path, "crashed-0", ["+regularizer=crashed", "seed=0"], status="failed", choices={"regularizer": "crashed"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's precision warning for nearly equal values stays inside
        data = compare.table_data([tmp_path], baseline="base")
    vs = {g["values"]["regularizer"]: g["vs_baseline"] for g in data["groups"]}
    assert vs["same"] == {"diff": 0.0, "p_value": None, "note": "identical values"}
    assert vs["flat"] == {"diff": pytest.approx(-0.1), "p_value": None, "note": "no spread: every run of each group equal"}
    assert vs["two"] == {"diff": pytest.approx(-0.175), "p_value": None, "note": "too few runs"}
    assert vs["spread"]["p_value"] == pytest.approx(1.0) and vs["spread"]["note"] is None  # the baseline's spread is 0, this one's not
    assert vs["crashed"] == {"diff": None, "p_value": None, "note": "no trained runs"}
    assert vs["nearly"]["p_value"] == pytest.approx(1.0)
    json.dumps(data, allow_nan=False)  # no NaN anywhere
    assert data["baseline"] == "regularizer=base"


def test_baseline_by_label_by_value_and_with_several_keys(tmp_path):
    reg_runs(tmp_path, {"dropout": [0.9, 0.91, 0.92], "l2": [0.88, 0.89, 0.9]})
    assert compare.table_data([tmp_path], baseline="l2") == compare.table_data([tmp_path], baseline="regularizer=l2")
    assert compare.table_data([tmp_path])["baseline"] is None
    assert all(g["vs_baseline"] is None for g in compare.table_data([tmp_path])["groups"])
    data = compare.table_data([tmp_path], ["regularizer", "seed"], baseline="regularizer=l2 seed=0")
    assert data["baseline"] == "regularizer=l2 seed=0" and sum(g["vs_baseline"] is None for g in data["groups"]) == 1
    with pytest.raises(UsageError, match="--baseline l2: no such group"):  # a value only names a group of one key
        compare.table_data([tmp_path], ["regularizer", "seed"], baseline="l2")


def test_csv_rows_quote_user_text_and_keep_full_precision(tmp_path):
    import csv
    import io

    reg_runs(tmp_path, {"[dropout,l2]": [0.9, 0.91, 0.92], 'say "hi"': [0.88, 0.89, 0.9]})
    result = compare.comparison([tmp_path], None, "test/acc", baseline='say "hi"')
    out = io.StringIO()
    compare.write_csv(result, "test/acc", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert '"[dropout,l2]"' in out.getvalue() and '"say ""hi"""' in out.getvalue()
    assert [r["regularizer"] for r in rows] == ["[dropout,l2]", 'say "hi"']
    stat = compare.mean_std([0.9, 0.91, 0.92])
    assert rows[0]["n"] == "3" and float(rows[0]["mean"]) == stat.mean and float(rows[0]["ci_low"]) == stat.ci_low
    assert float(rows[0]["diff"]) == pytest.approx(0.02) and 0 < float(rows[0]["p_value"]) < 1 and rows[0]["note"] == ""
    assert rows[1]["diff"] == rows[1]["p_value"] == "" and rows[1]["note"] == "baseline"
    assert rows[0]["statuses"] == "3 completed" and rows[0]["metric"] == "test/acc"


def terminal_table(root: Path, width: int | None, baseline: str | None = "l2") -> list[str]:
    """print_table's lines on a terminal `width` wide (None: a file, 80 wide by default)."""
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=width or 80, force_terminal=width is not None, color_system=None, highlight=False)
    compare.print_table(compare.comparison([root], None, "test/acc", baseline=baseline), "test/acc", console)
    return out.getvalue().splitlines()


def test_on_a_terminal_the_table_fits_its_width(tmp_path):
    reg_runs(tmp_path, {"dropout": [0.91, 0.92, 0.93, 0.90, 0.94], "l2": [0.89, 0.90, 0.88, 0.91, 0.90]})
    for width in (80, 120):
        lines = terminal_table(tmp_path, width)
        table = [line for line in lines if line[:1] in "┏┃┡│└"]
        assert table and all(len(line) <= width for line in table), width
        assert "…" not in "\n".join(lines)  # wrapped, never cut
        body = " ".join(line for line in table if line.startswith("│"))
        for word in ("dropout", "0.9200", "0.0158", "[0.9004,", "0.9396]", "+0.0240", "0.027", "baseline", "completed"):
            assert word in body, (width, word)
    assert "  (train/loss and wall s left out to fit 80 columns; --json or a wider terminal shows them)" in terminal_table(tmp_path, 80)
    assert "(wall s left out to fit 120 columns" in "\n".join(terminal_table(tmp_path, 120))
    whole = terminal_table(tmp_path, None)  # a file: the table whole, one line a row, whatever its width
    assert max(map(len, whole)) > 120 and not any("left out" in line for line in whole)
    assert table_rows("\n".join(whole))["dropout"].split("│")[1:6] == [
        "    5 ", " 0.9200 ± 0.0158 ", " [0.9004, 0.9396] ", "       +0.0240 ", "     0.027 "]
    assert not any("left out" in line for line in terminal_table(tmp_path, 200, baseline=None))


@pytest.mark.parametrize("args,message", [
    (["{runs}", "--baseline", "nope"], "--baseline nope: no such group; groups: regularizer=dropout, regularizer=l2"),
    (["{runs}", "--baseline", ""], "--baseline : no such group; groups: "),
    (["{runs}", "--baseline", "[bold]l2[/bold]"], "--baseline [bold]l2[/bold]: no such group"),  # as typed
    (["{runs}", "--by", "regularizer", "--by", "seed", "--baseline", "l2"], "--baseline l2: no such group; groups: regularizer="),
    (["{twice}", "--baseline", "regularizer=x"], "--baseline regularizer=x: matches 2 groups ("),
    (["{runs}", "--csv", "--json"], "compare: argument --json: not allowed with argument --csv"),
    (["{runs}", "--baseline", "l2", "--metric", "test/accuracy"], "--metric test/accuracy: no run has this metric; available: "),
    (["{failed}", "--baseline", "l2"], "--metric test/acc: no run has this metric; available: wall_time_s"),
    (["{runs}", "--csv", "--baseline", "nope", "--plot", "{tmp}/plots/curves.png"], "--baseline nope: no such group"),
    (["{runs}", "--baseline"], "argument --baseline: expected one argument"),
])
def test_bad_baseline_csv_or_metric_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    reg_runs(tmp_path / "runs", {"dropout": [0.9, 0.91, 0.92], "l2": [0.88, 0.89, 0.9]})
    reg_runs(tmp_path / "failed", {"dropout": [0.9], "l2": [0.88]}, status="failed")
    for name in ("failed/dropout-0", "failed/l2-0"):
        edit_summary(tmp_path / name, lambda s: s.update(metrics={}))
    reg_runs(tmp_path / "twice", {"x": [0.9], "regularizer=x": [0.8]})  # a label of one group, the value of the other
    before = snapshot(tmp_path)
    names = {"runs": tmp_path / "runs", "failed": tmp_path / "failed", "twice": tmp_path / "twice", "tmp": tmp_path}
    error = refused(capsys, ["compare", *(a.format(**names) for a in args)])
    assert error.startswith("regexp: error: ") and message in error, error
    assert snapshot(tmp_path) == before and not (tmp_path / "plots").exists()


def test_the_python_apis_baseline(tmp_path):
    import regexp
    from regexp import ConfigError

    reg_runs(tmp_path, {"dropout": [0.9, 0.91, 0.92], "l2": [0.88, 0.89, 0.9]})
    assert regexp.compare([tmp_path], baseline="l2") == compare.table_data([tmp_path], baseline="l2")
    for bad, message in ((3, "baseline=3: must be a group's label or value"), ("nope", "--baseline nope: no such group")):
        with pytest.raises(ConfigError, match=message):
            regexp.compare([tmp_path], baseline=bad)


def test_csv_and_baseline_through_the_cli(tmp_path, capsys):
    from regexp import cli

    reg_runs(tmp_path, {"dropout": [0.9, 0.91, 0.92], "l2": [0.88, 0.89, 0.9]})
    assert cli.main(["compare", str(tmp_path), "--csv", "--baseline", "l2"]) == 0
    out, err = capsys.readouterr()
    assert not err and out.splitlines()[0] == "regularizer,metric,runs,n,mean,std,ci_low,ci_high,diff,p_value,note,statuses"
    assert len(out.splitlines()) == 3 and out.splitlines()[2].endswith(",,,baseline,3 completed")
    assert cli.main(["compare", str(tmp_path), "--baseline", "l2"]) == 0
    out = capsys.readouterr().out
    assert "against baseline regularizer=l2: difference of means and Welch's t-test p-value" in out
    assert [c.strip() for c in table_rows(out)["l2"].split("│")][4:6] == ["baseline", ""]
    reg_runs(tmp_path / "markup", {"[dim]l2": [0.9, 0.91, 0.92], "[red]x[/red]": [0.8, 0.81, 0.82]})
    assert cli.main(["compare", str(tmp_path / "markup"), "--baseline", "[dim]l2"]) == 0
    out = capsys.readouterr().out
    assert "against baseline regularizer=[dim]l2: " in out and "[red]x[/red]" in table_rows(out)  # as typed, never markup


# ---------------------------------------------------------------- numbers at float's edge

def test_a_metric_beyond_float_range_is_left_out_like_a_nan(tmp_path, capsys):
    sweep_run(tmp_path, "0", "adam", 0, 0.9)
    sweep_run(tmp_path, "1", "adam", 1, 0.92)
    huge = sweep_run(tmp_path, "2", "adam", 2, 0.9)
    summary = json.loads((huge / "summary.json").read_text())
    (huge / "summary.json").write_text(json.dumps({**summary, "metrics": {"test/acc": 10**400}}))
    data = compare.table_data([tmp_path])
    assert data["groups"][0]["stats"]["test/acc"]["n"] == 2
    assert [r["in_means"] for r in sorted(data["runs"], key=lambda r: r["run_dir"])] == [True, True, False]


def test_values_near_floats_limit_give_a_mean_not_a_traceback(tmp_path, capsys):
    for seed in range(3):
        sweep_run(tmp_path, f"a{seed}", "adam", seed, 0.5)
        sweep_run(tmp_path, f"s{seed}", "sgd", seed, 0.5)
        for name, value in ((f"a{seed}", 1e308), (f"s{seed}", [1e308, -1e308, 1e308][seed])):
            path = tmp_path / name / "summary.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "metrics": {"test/acc": value}}))
    assert compare.mean_std([1e308] * 3) == Stat(1e308, 0.0, 3, 1e308, 1e308)
    data = compare.table_data([tmp_path], baseline="adam")
    sgd = next(g for g in data["groups"] if g["label"] == "optimizer=sgd")
    assert sgd["stats"]["test/acc"]["ci_low"] is None  # mean ± t·s/√n leaves float range: no interval
    assert sgd["vs_baseline"]["p_value"] is None and sgd["vs_baseline"]["note"] == "values beyond float range"
    assert compare.main([str(tmp_path), "--baseline", "adam"]) == 0
    json.loads(json.dumps(data, allow_nan=False))  # no NaN or Infinity in the data


def test_a_group_without_the_key_is_named_by_the_dash_the_table_prints(tmp_path):
    sweep_run(tmp_path, "0", "adam", 0, 0.9)
    make_run(tmp_path, "1", ["seed=0"], metrics={"test/acc": 0.8}, config={"seed": 0})
    data = compare.table_data([tmp_path], by=["optimizer.lr"], baseline=compare.MISSING)
    assert data["baseline"] == f"optimizer.lr={compare.MISSING}"
