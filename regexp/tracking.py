"""Where results go: metrics.jsonl and summary.json (always), the console (rich), train.log.

A metric value that is NaN or Inf is never written as a number: it is dropped from the
record and named under `nonfinite` instead, so a reader never averages a NaN by mistake.
"""

import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from regexp.config import RunError

log = logging.getLogger("regexp")


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temp file in the same directory, fsync, then os.replace: a reader
    (or a crash) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    except RuntimeError as e:  # torch.save reports a full disk as a RuntimeError
        raise cannot_write(path, OSError(str(e).splitlines()[0])) from None


def cannot_write(path: Path, error: OSError) -> RunError:
    return RunError(f"{path}: cannot write ({error.strerror or error}); free disk space or make {path.parent} "
                    f"writable (or choose another out_dir); the files written before are intact")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False, default=str))


def read_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run dir's summary.json, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def read_override_list(run_dir: Path) -> Optional[list[str]]:
    """Hydra's record of the job's overrides, None when the run dir has no .hydra/."""
    import yaml  # a dependency of omegaconf; only needed here

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    return [str(item) for item in yaml.safe_load(path.read_text()) or []]


def split_finite(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the record without non-finite floats, the names of those dropped)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    return {k: v for k, v in metrics.items() if k not in bad}, bad


class MetricsFile:
    """metrics.jsonl: one JSON object per log step or evaluation."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def write(self, record: dict[str, Any]) -> None:
        clean, bad = split_finite(record)
        if bad:
            clean["nonfinite"] = bad
        try:
            if self.file is None:  # opened on first use: no empty files
                self.file = open(self.path, "a", buffering=1)
            self.file.write(json.dumps(clean) + "\n")
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def close(self, exit_code: int = 0) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the write that failed has been reported already
                pass


class Tracker:
    """Fans each metrics record out to the sinks (metrics.jsonl, W&B, ...). A sink has
    `write(record)` and `close(exit_code)`, and `summary(summary)` if it keeps the final
    summary itself (summary.json is written by train); records carry their own `step` / `epoch`."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def summary(self, summary: dict[str, Any]) -> None:
        for sink in self.sinks:
            if hasattr(sink, "summary"):
                sink.summary(summary)

    def write_histograms(self, step: int, histograms: dict[str, dict[str, list]]) -> None:
        """Weight/gradient histograms (monitor=full), to the sinks that keep them."""
        for sink in self.sinks:
            if hasattr(sink, "write_histograms"):
                sink.write_histograms(step, histograms)

    def close(self, exit_code: int = 0) -> None:
        for sink in self.sinks:
            sink.close(exit_code)


class HistogramFile(MetricsFile):
    """histograms.jsonl: {"step": N, "hist/weight/<layer>": {"bins": [...], "counts": [...]}, ...}."""

    def write(self, record: dict[str, Any]) -> None:  # metrics go to metrics.jsonl only
        pass

    def write_histograms(self, step: int, histograms: dict[str, dict[str, list]]) -> None:
        super().write({"step": step, **histograms})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class Reporter:
    """The console: a progress bar per epoch on a terminal, one line per epoch everywhere
    (also when stdout is a file or a CI log), a summary panel at the end. Every line also
    goes to train.log through the `regexp` logger."""

    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console(file=sys.stdout, highlight=False)

    def line(self, text: str, style: str = "") -> None:
        self.console.print(text, style=style, soft_wrap=True, markup=False)
        log.info(text)

    def warn(self, text: str) -> None:
        self.console.print(f"warning: {text}", style="yellow", soft_wrap=True, markup=False)
        log.warning(text)

    @contextmanager
    def epoch_progress(self, epoch: int, epochs: int, total_samples: int) -> Iterator["EpochBar"]:
        progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} samples/s  loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        with progress:
            task = progress.add_task("train", total=total_samples, rate="-", loss="-")
            yield EpochBar(progress, task)

    def epoch_line(self, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self.line(f"epoch {epoch}/{epochs}  {shown}")

    def summary(self, title: str, rows: dict[str, Any], style: str) -> None:
        table = Table.grid(padding=(0, 2))
        for k, v in rows.items():
            table.add_row(k, _fmt(v))
        self.console.print(Panel(table, title=title, border_style=style, expand=False))
        log.info("%s: %s", title, "  ".join(f"{k}={_fmt(v)}" for k, v in rows.items()))


    def diagnosis(self, findings: list[dict[str, Any]]) -> None:
        from regexp.diagnose import render

        render(findings, self.console)
        for f in findings:
            log.warning("diagnosis: %s: %s", f["title"], f["message"])


class EpochBar:
    def __init__(self, progress: Progress, task: Any):
        self.progress, self.task = progress, task

    def advance(self, samples: int) -> None:
        self.progress.update(self.task, advance=samples)

    def show(self, loss: float, samples_per_s: float) -> None:
        self.progress.update(self.task, loss=_fmt(loss), rate=f"{samples_per_s:,.0f}")
