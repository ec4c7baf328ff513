"""Typed run records (regexp.rundir): the one reader and writer of summary.json,
metrics.jsonl and diagnosis.json. Fast unit tests on files in tmp_path."""

import json
import math
import os

import pytest

from regexp import rundir
from regexp.rundir import RunError, Status, Summary


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- Status and Summary

def test_finished_is_a_result_trained_is_what_means_average():
    assert {s for s in Status if s.finished} == {Status.COMPLETED, Status.EARLY_STOPPED, Status.DIVERGED, Status.STOPPED,
                                                Status.PRUNED}
    assert {s for s in Status if s.trained} == {Status.COMPLETED, Status.EARLY_STOPPED}
    assert str(Status.EARLY_STOPPED) == "early_stopped" and Status("diverged") is Status.DIVERGED


def test_summary_round_trip_keeps_unknown_keys(tmp_path):
    summary = Summary(status=Status.DIVERGED, run_dir=str(tmp_path), choices={"optimizer": "sgd"}, overrides=["optimizer=sgd"],
                      metrics={"train/loss": 2.5}, steps=7, nonfinite={"nonfinite/step": 7}, wall_time_s=1.5,
                      fused={"models": 4}, extra={"placement": {"node": 4}, "written_by_a_later_version": 1})
    rundir.write_summary(tmp_path, summary)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["fused"] == {"models": 4} and "extra" not in on_disk
    assert on_disk["placement"] == {"node": 4} and on_disk["written_by_a_later_version"] == 1
    assert "error" not in on_disk  # fields left at None are not written
    again = rundir.load_summary(tmp_path)
    assert again == summary and again.status is Status.DIVERGED
    assert Summary.from_dict(again.to_dict()).to_dict() == on_disk


def test_objective_is_nan_unless_finished():
    assert Summary(status=Status.COMPLETED, metrics={"val/acc": 0.9}).objective() == 0.9
    assert Summary(status=Status.DIVERGED, metrics={"val/acc": 0.1}).objective("val/acc") == 0.1
    assert math.isnan(Summary(status=Status.FAILED, metrics={"val/acc": 0.9}).objective())
    assert math.isnan(Summary(status=Status.COMPLETED).objective())


@pytest.mark.parametrize("text,why", [
    ('{"status": "completed", "metrics": {"test/acc"', "not valid JSON"),  # truncated
    ("[1, 2]", "a JSON object was expected, not list"),
    ('"completed"', "a JSON object was expected, not str"),
    ('{"status": "exploded"}', "not a regexp run summary"),
    ('{"status": "completed", "metrics": [0.9]}', "metrics is a list, not a dict"),
    ('{"status": "completed", "overrides": "optimizer=sgd"}', "overrides is a str, not a list"),
    ('{"status": "completed", "metrics": null}', "metrics is a NoneType, not a dict"),
    ('{"status": "diverged", "nonfinite": "step 7"}', "nonfinite is a str, not a dict"),
])
def test_a_bad_summary_is_one_error_naming_the_file(tmp_path, text, why):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(RunError, match=why) as error:
        rundir.load_summary(tmp_path)
    assert str(tmp_path / "summary.json") in str(error.value) and "\n" not in str(error.value)
    assert rundir.read_summary(tmp_path) is None


def test_optional_fields_may_be_null(tmp_path):
    summary = Summary.from_dict({"status": "completed", "nonfinite": None, "error": None})
    assert summary.nonfinite is None and summary.status is Status.COMPLETED


def test_a_missing_summary(tmp_path):
    assert rundir.read_summary(tmp_path) is None
    with pytest.raises(RunError, match="cannot read"):
        rundir.load_summary(tmp_path)


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "summary.json"
    rundir.write_json(path, {"a": 1})
    rundir.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and files(tmp_path) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    rundir.write_json(path, {"status": "completed"})

    def disk_full(f):
        f.write('{"status": "fai')
        raise OSError(28, "No space left on device")

    with pytest.raises(RunError, match="No space left on device") as error:
        rundir.atomic_write(path, disk_full)
    assert str(path) in str(error.value)
    assert files(tmp_path) == ["summary.json"] and json.loads(path.read_text()) == {"status": "completed"}


def test_a_write_into_a_missing_folder_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="cannot write"):
        rundir.write_json(tmp_path / "gone" / "summary.json", {})


# ---------------------------------------------------------------- metrics.jsonl

def write_lines(path, *lines: str, newline_at_end: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))


def test_metrics_file_drops_nonfinite_values_and_names_them(tmp_path):
    metrics = rundir.MetricsFile(tmp_path / "metrics.jsonl")
    assert files(tmp_path) == []  # opened on first use
    metrics.write({"step": 1, "train/loss": float("nan"), "grad/global_norm": float("inf"), "train/acc": 0.5})
    metrics.write({"step": 2, "train/loss": 1.0})
    metrics.close()
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert rundir.read_metrics(tmp_path) == [
        {"step": 1, "train/acc": 0.5, "nonfinite": ["train/loss", "grad/global_norm"]}, {"step": 2, "train/loss": 1.0}]


def test_a_half_written_last_line_is_a_run_still_writing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, '{"step": 1}', '{"step": 2}', '{"step": 3, "train/lo', newline_at_end=False)
    assert rundir.read_records(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize("lines,line,why", [
    (['{"step": 1}', '{"step": 2, "train/lo', '{"step": 3}'], 2, "not a JSON record"),  # a corrupted middle line
    (['{"step": 1}', "garbage"], 2, "not a JSON record"),  # a whole bad line (it ends with a newline)
    (['{"step": 1}', "[1, 2]", '{"step": 3}'], 2, "not a JSON object"),
    (["42"], 1, "not a JSON object"),
])
def test_a_corrupted_line_is_an_error_naming_file_and_line(tmp_path, lines, line, why):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, *lines)
    with pytest.raises(RunError, match=why) as error:
        rundir.read_records(path)
    assert str(error.value).startswith(f"{path}:{line}: ")


def test_records_share_their_key_strings(tmp_path):
    """A 100k-step run holds 100k records: one string per metric name, not one per record."""
    path = tmp_path / "metrics.jsonl"
    write_lines(path, '{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/loss": 1.0}')
    first, second = (list(r) for r in rundir.read_records(path))
    assert all(a is b for a, b in zip(first, second))


def test_missing_and_empty_metrics(tmp_path):
    assert rundir.read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert rundir.read_metrics(tmp_path) == []


def test_keep_metrics_up_to_a_step(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", *(json.dumps({"step": s}) for s in (10, 20, 30)), '{"step": 40', newline_at_end=False)
    rundir.keep_metrics_up_to(tmp_path, 20)
    assert rundir.read_metrics(tmp_path) == [{"step": 10}, {"step": 20}] and files(tmp_path) == ["metrics.jsonl"]


# ---------------------------------------------------------------- diagnosis.json, overrides

def test_diagnosis_round_trip_and_bad_files(tmp_path):
    assert rundir.read_diagnosis(tmp_path) is None
    findings = [{"rule": "overfitting", "evidence": {"step": 3}}]
    rundir.write_diagnosis(tmp_path, findings)
    assert rundir.read_diagnosis(tmp_path) == findings
    for text, why in (('{"findings": [', "not valid JSON"), ("[]", "not a diagnosis"), ('{"findings": 3}', "not a diagnosis")):
        (tmp_path / "diagnosis.json").write_text(text)
        with pytest.raises(RunError, match=why):
            rundir.read_diagnosis(tmp_path)


def test_overrides(tmp_path):
    assert rundir.read_overrides(tmp_path) is None
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- optimizer=sgd\n- +regularizer=[dropout,l2]\n")
    assert rundir.read_overrides(tmp_path) == ["optimizer=sgd", "+regularizer=[dropout,l2]"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("optimizer: sgd\n")
    with pytest.raises(RunError, match="not a list of overrides"):
        rundir.read_overrides(tmp_path)


def test_rundir_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, regexp.rundir; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ)).returncode == 0


def test_hydras_console_lines_keep_user_text_on_its_line():
    """Hydra's `[HYDRA] #0 : <overrides>` line: a line break or escape code in an override is
    shown escaped, Hydra's own tab stays (the filter conf/train.yaml puts on Hydra's console)."""
    import logging

    from regexp.rundir import PrintableLog

    record = logging.LogRecord("hydra", logging.INFO, __file__, 1, "\t#%d : %s", (0, "tags=[\"a\x1b[31mb\nc\"]"), None)
    assert PrintableLog().filter(record) and record.getMessage() == "\t#0 : tags=[\"a\\x1b[31mb\\nc\"]"
    from regexp.compose import compose

    assert list(compose([], with_hydra=True).hydra.hydra_logging.handlers.console.filters) == ["printable"]
