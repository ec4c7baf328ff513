"""The console (Reporter) and the Tracker's fan-out: what a person reads at the end of a run."""

import io

import pytest
from rich.console import Console

from regexp.rundir import Status, Summary
from regexp.tracking import Reporter, Tracker, fmt_value, plural

LONG_RUN_DIR = "/scratch/experiments/" + "a-long-folder-name/" * 8 + "2026-12-02/04-30-00"


@pytest.mark.parametrize("value,text", [
    (3137039191466.123, "3.137e+12"),  # a diverged loss, not 3,137,039,191,466
    (1.5e-06, "1.5e-06"),
    (0.98123, "0.9812"),
    (52345.6, "52,346"),  # samples/s keep their separators
    (12.3456, "12.35"),
    (0.0, "0"),
    (float("nan"), "nan"),
    (7, "7"),
])
def test_numbers_read_well(value, text):
    assert fmt_value(value) == text


def test_plural():
    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]


def test_summary_panel_prints_paths_whole_when_piped():
    out = io.StringIO()
    reporter = Reporter(Console(file=out, width=80, highlight=False))
    reporter.summary("regexp · diverged", {"train/loss": 3137039191466.123, "run_dir": LONG_RUN_DIR}, "red")
    text = out.getvalue()
    assert LONG_RUN_DIR in text and "3.137e+12" in text and "3,137" not in text
    assert reporter.console.width == 80  # wider for the panel only


def test_summary_panel_on_a_terminal_folds_paths_without_cutting_them():
    out = io.StringIO()
    reporter = Reporter(Console(file=out, width=80, force_terminal=True, color_system=None))
    reporter.summary("regexp · completed", {"run_dir": LONG_RUN_DIR}, "green")
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out.getvalue()
    cells = "".join(line.strip("│ ").split("run_dir")[-1].strip().rstrip("│").strip() for line in lines[1:-1])
    assert cells == LONG_RUN_DIR


def test_the_tracker_hands_sinks_the_typed_summary():
    class Writer:  # a sink without summary(): metrics.jsonl
        def __init__(self):
            self.records, self.closed = [], None

        def write(self, record):
            self.records.append(record)

        def close(self, exit_code=0):
            self.closed = exit_code

    class Keeper(Writer):  # one that keeps the summary: W&B
        def summary(self, summary):
            self.summary_seen = summary

    writer, keeper = Writer(), Keeper()
    tracker = Tracker([writer, keeper])
    summary = Summary(status=Status.COMPLETED, metrics={"test/acc": 0.9})
    tracker.write({"step": 1})
    tracker.summary(summary)
    tracker.close(3)
    assert writer.records == keeper.records == [{"step": 1}] and writer.closed == keeper.closed == 3
    assert keeper.summary_seen is summary
