"""Hostile run dirs and hostile text: every reader opens only regular files, survives deep
nesting, huge lines and binary garbage, answers in one line (exit 1 for a bad file, 2 for bad
input), and user text printed through rich stays as typed."""

import io
import json
import logging
import os
import threading
from pathlib import Path

import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from rich.console import Console

import regexp
from regexp import rundir
from regexp.rundir import RunError

DEEP = 100_000  # far beyond Python's recursion limit
RUN_RECORDS = ["summary.json", "metrics.jsonl", "diagnosis.json", ".hydra/overrides.yaml"]


def healthy_run(run_dir: Path, overrides: tuple[str, ...] = ("seed=0",), status: str = "completed") -> Path:
    """A run dir holding each record a reader opens, all of them good."""
    (run_dir / ".hydra").mkdir(parents=True)
    summary = {"status": status, "overrides": list(overrides), "metrics": {"test/acc": 0.5}, "wall_time_s": 1.0,
               **({"error": "RuntimeError: boom"} if status == "failed" else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2)))
    (run_dir / "diagnosis.json").write_text('{"findings": []}')
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def finishes(call, seconds: float = 30.0):
    """`call()`'s outcome (its value or exception), failing the test if it is still running after `seconds`."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: B036 - the outcome is what the test checks
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the reader hung"
    return outcome


def one_line_error(out, code: int) -> str:
    assert out.returncode == code, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("regexp: error: "), out.stderr
    return out.stderr


# ---------------------------------------------------------------- not a regular file

@pytest.mark.parametrize("record", RUN_RECORDS)
def test_a_fifo_in_place_of_any_record_is_refused_by_load_without_hanging(tmp_path, record):
    run_dir = healthy_run(tmp_path / "run")
    replace_with_fifo(run_dir / record)
    outcome = finishes(lambda: regexp.load(run_dir)) if record != ".hydra/overrides.yaml" else \
        finishes(lambda: rundir.read_overrides(run_dir))
    error = outcome.get("error")
    assert isinstance(error, RunError), outcome
    assert str(error) == f"{run_dir / record}: not a regular file (a FIFO); a run's records are regular files"
    assert (run_dir / record).is_fifo()  # left as it was


def test_diagnose_a_fifo_metrics_file_is_one_line_exit_1(tmp_path):
    run_dir = healthy_run(tmp_path / "run")
    replace_with_fifo(run_dir / "metrics.jsonl")
    out = run_cli(["diagnose", str(run_dir)], tmp_path, timeout=60)  # a hang is a TimeoutExpired
    assert "metrics.jsonl: not a regular file (a FIFO)" in one_line_error(out, 1) and not out.stdout


def test_compare_skips_a_run_whose_summary_is_a_fifo_without_hanging(tmp_path):
    healthy_run(tmp_path / "sweep" / "good", ("seed=0",))
    bad = healthy_run(tmp_path / "sweep" / "bad", ("seed=1",))
    replace_with_fifo(bad / "summary.json")
    out = run_cli(["compare", str(tmp_path / "sweep")], tmp_path, timeout=60)
    assert out.returncode == 0
    assert out.stderr == (f"regexp: warning: skipping {bad}: {bad / 'summary.json'}: not a regular file (a FIFO); "
                          "a run's records are regular files\n")
    assert "1 run in 1 group" in out.stdout


def test_a_symlink_to_dev_zero_is_refused_not_read_forever(tmp_path):
    run_dir = healthy_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to("/dev/zero")
    out = run_cli(["diagnose", str(run_dir)], tmp_path, timeout=60)
    assert "metrics.jsonl: not a regular file (a character device)" in one_line_error(out, 1)
    outcome = finishes(lambda: regexp.load(run_dir))
    assert "not a regular file (a character device)" in str(outcome.get("error"))


def test_a_directory_in_place_of_summary_json_is_named_not_skipped(tmp_path):
    run_dir = healthy_run(tmp_path / "run")
    (run_dir / "summary.json").unlink()
    (run_dir / "summary.json").mkdir()
    out = run_cli(["diagnose", str(run_dir)], tmp_path)
    assert "summary.json: not a regular file (a directory)" in one_line_error(out, 1) and not out.stdout
    out = run_cli(["compare", str(run_dir)], tmp_path)
    assert out.returncode == 2 and "not a regular file (a directory)" in out.stderr.splitlines()[0]
    assert (run_dir / "summary.json").is_dir() and not list((run_dir / "summary.json").iterdir())


@pytest.mark.parametrize("reader", ["read_checkpoint", "read_weights"])
def test_a_fifo_checkpoint_or_best_pt_is_refused_without_hanging(tmp_path, reader):
    from regexp import train

    os.mkfifo(tmp_path / "best.pt")
    outcome = finishes(lambda: getattr(train, reader)(tmp_path / "best.pt"))
    assert str(outcome.get("error")) == f"{tmp_path / 'best.pt'}: not a regular file (a FIFO); a run's records are regular files"


def test_sweep_records_that_are_not_job_records_are_left_out(tmp_path):
    from regexp.sweep import SWEEP_RECORDS, read_records

    folder = tmp_path / SWEEP_RECORDS
    folder.mkdir()
    (folder / "plan.json").write_text("[1, 2]")  # not a plan
    (folder / "0.json").write_text(json.dumps({"job": "0", "run_dir": str(tmp_path / "0"), "overrides": ["seed=0"]}))
    for name, text in (("1", '{"job": "x"}'), ("2", "[]"), ("3", json.dumps({"job": "9" * 5000, "run_dir": "", "overrides": []})),
                       ("4", "{" * DEEP)):
        (folder / f"{name}.json").write_text(text)
    os.mkfifo(folder / "5.json")
    outcome = finishes(lambda: read_records(tmp_path))
    assert outcome.get("value") == (None, [{"job": "0", "run_dir": str(tmp_path / "0"), "overrides": ["seed=0"]}])


# ---------------------------------------------------------------- nesting, size, garbage

def test_a_metrics_line_nested_deep_is_one_line_naming_file_and_line(tmp_path):
    run_dir = healthy_run(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("[" * DEEP + "]" * DEEP + "\n")
    out = run_cli(["diagnose", str(run_dir)], tmp_path)
    assert one_line_error(out, 1) == f"regexp: error: {run_dir / 'metrics.jsonl'}:3: not a JSON record; the file is corrupted\n"
    with pytest.raises(RunError, match=r"metrics.jsonl:3: not a JSON record"):
        regexp.load(run_dir)


@pytest.mark.parametrize("record,why", [("summary.json", "not valid JSON (nested too deep)"),
                                        ("diagnosis.json", "not valid JSON (nested too deep)"),
                                        (".hydra/overrides.yaml", "cannot read the run's overrides (nested too deep)")])
def test_a_record_file_nested_deep_is_a_run_error(tmp_path, record, why):
    run_dir = healthy_run(tmp_path / "run")
    (run_dir / record).write_text('{"a":' * DEEP + "1" + "}" * DEEP if record.endswith("json") else "[" * DEEP + "]" * DEEP)
    read = rundir.read_overrides if record.startswith(".hydra") else regexp.load
    with pytest.raises(RunError) as error:
        read(run_dir)
    assert str(error.value) == f"{run_dir / record}: {why}"


def test_compare_names_a_deep_overrides_file_and_leaves_the_run_out(tmp_path):
    healthy_run(tmp_path / "sweep" / "good", ("seed=0",))
    bad = healthy_run(tmp_path / "sweep" / "bad", ("seed=1",))
    (bad / ".hydra" / "overrides.yaml").write_text("[" * DEEP + "]" * DEEP)
    out = run_cli(["compare", str(tmp_path / "sweep")], tmp_path)
    assert out.returncode == 0 and out.stderr.count("\n") == 1
    assert "overrides.yaml: cannot read the run's overrides (nested too deep)" in out.stderr


def test_a_line_longer_than_any_record_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    run_dir = healthy_run(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "pad": "' + "x" * 5000 + '"}\n')
    monkeypatch.setattr(rundir, "MAX_LINE_BYTES", 1000)
    with pytest.raises(RunError, match=r"metrics.jsonl:3: a line longer than"):
        rundir.read_metrics(run_dir)


def test_a_summary_larger_than_any_record_is_refused(tmp_path, monkeypatch):
    run_dir = healthy_run(tmp_path / "run")
    monkeypatch.setattr(rundir, "MAX_FILE_BYTES", 16)
    with pytest.raises(RunError, match=r"summary.json: larger than"):
        rundir.load_summary(run_dir)


def test_binary_garbage_is_one_line_exit_1(tmp_path):
    run_dir = healthy_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").write_bytes(bytes(range(256)) * 20 + b"\n")
    (run_dir / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    out = run_cli(["diagnose", str(run_dir)], tmp_path)
    assert "summary.json: not valid JSON" in one_line_error(out, 1)


@pytest.mark.parametrize("fields,why", [({"status": "failed", "error": 5}, "error is a int, not a str"),
                                        ({"overrides": ["seed=0", 5]}, "an item of overrides is a int, not a str"),
                                        ({"steps": "many"}, "steps is a str, not a number"),
                                        ({"findings": ["x"]}, "an item of findings is a str, not a dict")])
def test_a_summary_field_of_the_wrong_type_is_one_line_not_a_traceback(tmp_path, fields, why):
    run_dir = healthy_run(tmp_path / "run")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", **fields}))
    out = run_cli(["diagnose", str(run_dir)], tmp_path)
    assert one_line_error(out, 1) == f"regexp: error: {run_dir / 'summary.json'}: not a regexp run summary ({why})\n"
    out = run_cli(["compare", str(run_dir)], tmp_path)
    assert out.returncode == 2 and out.stderr.splitlines()[0].endswith(f"({why})")


def test_compare_a_path_that_is_no_directory_says_so(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    out = run_cli(["compare", str(tmp_path / "fifo")], tmp_path, timeout=60)
    assert one_line_error(out, 2).startswith(f"regexp: error: {tmp_path / 'fifo'}: not a directory")


# ---------------------------------------------------------------- diagnose's RUN_DIR

@pytest.mark.parametrize("make,why", [(lambda p: None, "does not exist"),
                                       (lambda p: p.write_text("x"), "not a directory")])
def test_diagnose_says_what_is_wrong_with_run_dir(tmp_path, make, why):
    path = tmp_path / "nothing"
    make(path)
    out = run_cli(["diagnose", str(path)], tmp_path)
    assert one_line_error(out, 2) == f"regexp: error: RUN_DIR={path}: {why}" + (
        "; give a run's directory\n" if why == "not a directory" else "\n")


# ---------------------------------------------------------------- printed as text, never markup

def test_compare_prints_appended_groups_and_run_dirs_as_typed(tmp_path):
    healthy_run(tmp_path / "sweep" / "a", ("+regularizer=[dropout]", "seed=0"))
    healthy_run(tmp_path / "sweep" / "[bold]b", ("+regularizer=[dropout,l2]", "seed=0"), status="failed")
    out = run_cli(["compare", str(tmp_path / "sweep")], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1].strip() == "[dropout]"  # the best group's label, not an empty cell
    assert rows[1].split("│")[1].strip() == "[dropout,l2]"
    assert f"failed: {tmp_path / 'sweep' / '[bold]b'}  (RuntimeError: boom)" in out.stdout


def test_compare_shows_an_absent_added_group_as_missing_not_a_dict(tmp_path):
    from regexp import comparison

    options = {"dropout": None, "l2": None}
    without = comparison.Run(tmp_path, rundir.Status.COMPLETED, {}, {}, {"regularizer": options}, {})
    with_l2 = comparison.Run(tmp_path, rundir.Status.COMPLETED, {}, {}, {"regularizer": {**options, "l2": {"coef": 1}}}, {})
    assert comparison.key_value(without, "regularizer") is None
    assert comparison.key_value(with_l2, "regularizer") == "[l2]"


def test_the_run_summary_panel_shows_a_run_dir_named_with_markup(tmp_path):
    from regexp.tracking import Reporter

    out = io.StringIO()
    Reporter(Console(file=out, width=80, highlight=False)).summary(
        "regexp · [red]completed", {"test/acc": 0.5, "run_dir": str(tmp_path / "[bold]run")}, "green")
    assert f"{tmp_path / '[bold]run'}" in out.getvalue() and "regexp · [red]completed" in out.getvalue()


def test_the_sweep_table_keeps_brackets_and_shortens_drawn_floats(tmp_path, capsys):
    from regexp.sweep import print_sweep_table

    rows = [{"job": str(n), "overrides": ["+regularizer=[dropout]", f"optimizer.lr={lr}", "seed=[0]"], "status": "completed",
             "test/acc": 0.5, "wall_time_s": 1.0, "error": None, "run_dir": str(tmp_path / str(n))}
            for n, lr in enumerate((0.0012520653814999472, 0.001229607110732572))]
    print_sweep_table(tmp_path / "[bold]sweep", rows, [])
    out = capsys.readouterr().out
    assert f"sweep {tmp_path / '[bold]sweep'}: 2 jobs" in out
    assert "│ 0   │ optimizer.lr=0.001252 │" in out and "│ 1   │ optimizer.lr=0.00123  │" in out  # one line per job
    assert "all jobs: +regularizer=[dropout] seed=[0]" in out


def test_optuna_colours_its_log_lines_on_a_terminal_only(monkeypatch, capsys):
    pytest.importorskip("optuna")
    from regexp.sweep import optuna_colours_on_terminals_only

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    optuna_colours_on_terminals_only(OmegaConf.create({"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}}))
    handlers = logging.getLogger("optuna").handlers
    assert handlers
    record = logging.LogRecord("optuna", logging.INFO, __file__, 1, "A new study created", None, None)
    for handler in handlers:  # pytest's captured stderr is no terminal
        assert "\x1b" not in handler.format(record)


# ---------------------------------------------------------------- hostile numbers and flags

def test_device_threads_beyond_the_cores_is_refused_at_validation():
    from regexp.compose import compose_and_validate
    from regexp.config import ConfigError, usable_cores

    with pytest.raises(ConfigError, match=rf"^device.threads=100000: must be auto or an integer from 1 to {usable_cores()} "):
        compose_and_validate(["device.threads=100000"])
    assert compose_and_validate([f"device.threads={usable_cores()}"]).device.threads == str(usable_cores())


def test_a_number_of_thousands_of_digits_is_one_line_exit_2(tmp_path):
    out = run_cli(["train", "--cfg", "job", "batch_size=" + "9" * 5000], tmp_path)
    assert "a number of more than 4300 digits" in one_line_error(out, 2) and len(out.stderr) < 300
    assert not out.stdout and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--cfg", "job", "--resolve", "-m"], ["--info", "-m"]])
def test_cfg_or_info_with_multirun_is_one_line_exit_2(tmp_path, flags):
    out = run_cli(["train", *flags, "seed=0,1"], tmp_path)
    assert "one of these at most" in one_line_error(out, 2) and not out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_with_device_threads_beyond_the_cores_writes_nothing(tmp_path):
    out = run_cli(["train", "device.threads=100000", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert "device.threads=100000: must be auto or an integer from 1 to" in one_line_error(out, 2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_run_dir_named_with_markup_is_printed_as_named(tmp_path, data_root):
    from conftest import TINY

    run_dir = tmp_path / "[bold]run"
    out = run_cli(["train", *TINY, "logger=none", "+regularizer=[dropout]", f"hydra.run.dir='{run_dir}'"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr
    assert f"run dir {run_dir}" in out.stdout  # the first line
    assert any(line.startswith("│ run_dir") and str(run_dir) in line for line in out.stdout.splitlines())  # the panel
    out = run_cli(["compare", str(tmp_path)], tmp_path)
    assert out.returncode == 0 and "1 run in 1 group" in out.stdout
    out = run_cli(["diagnose", str(run_dir)], tmp_path)
    assert out.returncode == 0 and "diagnosis" in out.stdout
