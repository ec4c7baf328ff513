"""Metric sinks (the run files: docs/runs.md): the Tracker fans each record out to metrics.jsonl, histograms
and W&B; the Reporter is the console (rich) and train.log (a fused group's members share one
GroupConsole, a table with a row each). The record files themselves are
written by regexp.rundir. Also the console pieces that the commands reading run dirs
(compare, diagnose) share: the diagnosis panel, number formats, one-line usage errors.
"""

import argparse
import logging
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Iterator, NoReturn, Optional

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from regexp.rundir import (
    METRICS,
    SUMMARY,
    SWEEP_RECORDS,
    Interrupted,
    MetricsFile,
    RunError,
    Status,
    Summary,
    UsageError,
    printable,
)

log = logging.getLogger("regexp")


class Tracker:
    """Fans each metrics record out to the sinks (metrics.jsonl, W&B, ...). A sink has
    `write(record)` and `close(exit_code)`, and `summary(summary)` if it keeps the final
    summary itself (summary.json is written by train); records carry their own `step` / `epoch`."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def summary(self, summary: Summary) -> None:
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


def fmt_value(value: Any) -> str:
    """A number as a person reads it: 4 significant digits, thousands separators up to
    millions (samples/s), scientific notation beyond and below (a diverged loss of 3.1e+12)."""
    if isinstance(value, float):
        return f"{value:,.0f}" if 1e4 <= abs(value) < 1e7 else f"{value:.4g}"
    return str(value)


def short_evidence(evidence: dict[str, Any]) -> str:
    """A finding's evidence on one line: the metric, of which layer, its value(s)."""
    values = evidence.get("values")
    layer = evidence.get("layer")
    where = f"{evidence.get('metric')}" + (f" of {layer}" if layer else "")
    return f"{where}: {_in_short(values, layer)}" if values is not None else where


def _in_short(values: Any, named: Any = None) -> str:
    """Values on a line: a list's first four, a dict's first two and last entries and the one
    the finding names (a deep net's layers would fill the console), a nested dict the same way."""
    if isinstance(values, dict):
        keys = list(values)
        shown = keys if len(keys) <= 4 else list(dict.fromkeys([*keys[:2], *([named] if named in values else []), keys[-1]]))
        parts = [f"{k} {_in_short(values[k], named)}" for k in shown]
        if len(shown) < len(keys):  # "..." where entries were left out: after the first two
            parts.insert(2, "...")
        return ", ".join(parts)
    if isinstance(values, (list, tuple)):
        return ", ".join(fmt_value(v) for v in values[:4]) + (", ..." if len(values) > 4 else "")
    return fmt_value(values)


def warn(message: str) -> None:
    """A command's warning: one line on stderr, whatever user text it quotes (as cli's errors)."""
    print(f"regexp: warning: {printable(message)}", file=sys.stderr)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def why_ended(ended_by: Any) -> Optional[str]:
    """Why a stopped or pruned run ended, from its summary's `ended_by`, in one phrase: the
    finding and the step it held at, or the rung's epoch, the metric, its value and the
    threshold it missed. Only what the record holds, on one line; None when it holds nothing."""
    if not isinstance(ended_by, dict):
        return None
    finding = " ".join(str(ended_by.get("title") or ended_by.get("rule") or "").split())  # a line break would split the line
    metric, value, threshold = ended_by.get("metric"), ended_by.get("value"), ended_by.get("threshold")
    parts = [finding] if finding else []
    parts += [f"at epoch {ended_by['epoch']}"] if "epoch" in ended_by else []
    parts += [f"at step {ended_by['step']}"] if "step" in ended_by else []
    text = " ".join(parts)
    if metric is not None and value is not None:
        text += (", " if text else "") + f"{metric} {fmt_value(value)}" + (
            f" vs threshold {fmt_value(threshold)}" if threshold is not None else "")
    return text or None


def render(findings: list[dict[str, Any]], console: Console) -> None:
    """The diagnosis as a rich panel (green when healthy)."""
    if not findings:
        console.print(Panel("no findings: nothing in the metrics matches a known failure", title="diagnosis", border_style="green", expand=False))
        return
    parts = []
    for i, f in enumerate(findings, 1):
        steps = "\n".join(f"     {n}. {escape(s)}" for n, s in enumerate(f["interventions"], 1))
        parts.append(f"[bold]{i}. {escape(f['title'])}[/bold]\n   {escape(f['message'])}\n   try, in order:\n{steps}")
    console.print(Panel("\n\n".join(parts), title="diagnosis", border_style="red", expand=False))


def check_output_file(out: Path, flag: str, example: str, formats: Collection[str], kind: str = "image",
                      usual: str = ".png, .pdf or .svg") -> None:
    """Before a reader command does any work, the file it will write: UsageError (exit 2) for a
    directory, a suffix not in `formats`, or a record of a run or sweep (only they write those);
    RunError (exit 1) when its directory cannot be written."""
    from regexp.config import ConfigError, check_writable

    if out.is_dir():
        raise UsageError(f"{flag} {out}: is a directory; name a file, e.g. {out / example}")
    if out.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"{flag} {out}: unknown {kind} format {out.suffix or '(none)'}; use {usual}")
    owner = record_owner(out)
    if owner is not None:
        raise UsageError(f"{flag} {out}: {owner}; name a file outside it")
    try:
        check_writable(out.parent, flag, out)
    except ConfigError as e:
        raise RunError(str(e)) from None


def record_owner(out: Path) -> Optional[str]:
    """Whose records `out` would be among: a run dir (anything in it), a sweep's job records or
    a `.hydra/` folder; else None. (A sweep's own files, sweep_summary.json and multirun.yaml,
    are no image or page: the suffix check refuses them.)"""
    folder = out.absolute().parent.resolve()  # a link to a run dir is that run dir
    for d in [folder, *folder.parents]:
        if (d / SUMMARY).is_file() or (d / METRICS).is_file():
            return f"inside the run dir {d}, which only its run writes"
        if d.name in (SWEEP_RECORDS, ".hydra"):
            return f"inside {d}, the records of a run or sweep"
    return None


class CommandParser(argparse.ArgumentParser):
    """argparse for `regexp compare` and `regexp diagnose`: a usage error is a UsageError
    (one line, exit 2 at the CLI), not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.split()[-1]}: {message} (see {self.prog} --help)")


@contextmanager
def wider(console: Console, width: int) -> Iterator[None]:
    """The console at least `width` columns wide for a while (rich never prints wider than it)."""
    before = console.width
    console.width = max(before, width)
    try:
        yield
    finally:
        console.width = before


def print_whole(console: Console, renderable: Any) -> None:
    """A table or panel on the console: as wide as a terminal is; on a file or a pipe, which
    have no width to respect, as wide as it needs (a path or a row whole, on one line)."""
    if console.is_terminal:
        console.print(renderable)
        return
    needed = console.measure(renderable, options=console.options.update_width(10_000)).maximum
    with wider(console, needed):
        console.print(renderable)


class Reporter:
    """The console: a progress bar per epoch on a terminal, one line per epoch everywhere
    (also when stdout is a file or a CI log), a summary panel at the end. Every line also
    goes to train.log through the `regexp` logger."""

    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console(file=sys.stdout, highlight=False)

    def show(self, text: str, style: str = "") -> None:
        """A line on the console only."""
        self.console.print(text, style=style, soft_wrap=True, markup=False)

    def line(self, text: str, style: str = "") -> None:
        self.show(text, style)
        log.info(text)

    def header(self, text: str) -> None:
        """A run's opening lines: what trains, and from where."""
        self.line(text)

    def warn(self, text: str) -> None:
        self.show(f"warning: {text}", "yellow")
        log.warning(text)

    def finding(self, step: int, title: str, evidence: dict[str, Any], first_try: list[str], then: str = "",
                label: str = "") -> None:
        """A finding at the step it trips, as the run trains: what, the evidence in short, what to
        try first, and `then`, what it does to the run (monitor.on_finding)."""
        try_first = f" · try first: {first_try[0]}" if first_try else ""
        then = f" · {then}" if then else ""
        self.warn(f"{label + ' · ' if label else ''}step {step} · {title} ({short_evidence(evidence)}){try_first}{then}")

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

    def epoch_line(self, epoch: int, epochs: int, metrics: dict[str, Any], label: str = "") -> None:
        self.line(epoch_text(epoch, epochs, metrics, label))

    def left_group(self, status: str) -> None:
        """A member of a fused group ended with `status` while the others train on: its own
        lines said why; only a group's console shows it again."""

    def run_ended(self, status: str, rows: dict[str, Any], style: str) -> None:
        """The run's end: its summary panel and train.log's line of it."""
        self.summary(f"regexp · {status}", rows, style)

    def summary(self, title: str, rows: dict[str, Any], style: str) -> None:
        table = Table.grid(padding=(0, 2))
        table.add_column()
        table.add_column(overflow="fold")  # a path too wide for a terminal folds, never loses its middle
        for k, v in rows.items():
            table.add_row(Text(k), Text(fmt_value(v)))  # a run dir named [bold] is shown as named
        print_whole(self.console, Panel(table, title=Text(title), border_style=style, expand=False))
        log_summary(title, rows)

    def diagnosis(self, findings: list[dict[str, Any]]) -> None:
        render(findings, self.console)
        log_diagnosis(findings)


def epoch_text(epoch: int, epochs: int, metrics: dict[str, Any], label: str = "") -> str:
    shown = "  ".join(f"{k} {fmt_value(v)}" for k, v in metrics.items())
    return f"{label + ' · ' if label else ''}epoch {epoch}/{epochs}  {shown}"


def log_summary(title: str, rows: dict[str, Any]) -> None:
    log.info("%s: %s", title, "  ".join(f"{k}={fmt_value(v)}" for k, v in rows.items()))


def log_diagnosis(findings: list[dict[str, Any]]) -> None:
    for f in findings:
        log.warning("diagnosis: %s: %s", f["title"], f["message"])


TRAINING = "training"  # a fused group's member until it ends


class GroupConsole:
    """A fused group on the console: one table with a row per member (epoch, train/loss,
    val/acc, status), live on a terminal, printed once at the group's end on a file or a pipe:
    no header, epoch line or end panel per member (train.log keeps every one of them, and the
    run dir its diagnosis: regexp diagnose). Findings, prunings and warnings are still lines,
    above the table; one that every member shares (a config warning), once."""

    STATUS_STYLES = {Status.FAILED.value: "red", Status.DIVERGED.value: "red", Status.STOPPED.value: "yellow",
                     Status.PRUNED.value: "yellow", Status.INTERRUPTED.value: "yellow"}

    def __init__(self, console: Console, labels: list[str]):
        self.console = console
        self.rows = [{"run": label, "epoch": "-", "train/loss": None, "val/acc": None, "status": TRAINING}
                     for label in labels]
        self.progress = ""  # where the group's epoch stands (on a terminal)
        self.shown: set[str] = set()

    def member(self, index: int) -> "MemberReporter":
        return MemberReporter(self, self.rows[index])

    def show(self, text: str, style: str) -> None:
        if text not in self.shown:
            self.shown.add(text)
            self.console.print(text, style=style, soft_wrap=True, markup=False)

    @contextmanager
    def showing(self) -> Iterator[None]:
        """The table while the block trains the group (live on a terminal), and at its end."""
        from rich.live import Live

        # live, a table taller than the terminal shows its top rows (the title counts them all);
        # at the end the live view goes and the whole table is printed, every row
        terminal = self.console.is_terminal
        live = Live(console=self.console, get_renderable=self.table, refresh_per_second=4, transient=True,
                    vertical_overflow="ellipsis") if terminal else None
        if live is not None:
            live.start()
        try:
            yield
        except BaseException as e:  # a crash or a signal ends the members still training
            ended = Status.INTERRUPTED if isinstance(e, (KeyboardInterrupt, Interrupted)) else Status.FAILED
            for row in self.rows:
                row["status"] = ended.value if row["status"] == TRAINING else row["status"]
            raise
        finally:
            if live is not None:
                live.stop()
            print_whole(self.console, self.table())

    def table(self) -> Table:
        counts = Counter(row["status"] for row in self.rows)
        tally = ", ".join(f"{n} {status}" for status, n in counts.items()) if len(counts) > 1 else ""
        table = Table(title=Text(f"fused group of {plural(len(self.rows), 'model')}{self.progress}"
                                 f"{f' ({tally})' if tally else ''}"), title_justify="left")
        for column in self.rows[0]:
            table.add_column(column, overflow="fold")
        for row in self.rows:
            cells = [c if isinstance(c, str) else "-" if c is None else fmt_value(c) for c in row.values()]
            table.add_row(*map(Text, cells), style=self.STATUS_STYLES.get(row["status"], ""))
        return table


class MemberReporter(Reporter):
    """A member's Reporter in a GroupConsole: everything to train.log as a solo run's; on the
    console, its row of the group's table and the lines the group shows."""

    def __init__(self, group: GroupConsole, row: dict[str, Any]):
        super().__init__(group.console)
        self.group, self.row = group, row

    def show(self, text: str, style: str = "") -> None:
        self.group.show(text, style)

    def header(self, text: str) -> None:
        log.info(text)

    @contextmanager
    def epoch_progress(self, epoch: int, epochs: int, total_samples: int) -> Iterator["GroupBar"]:
        yield GroupBar(self.group, f"epoch {epoch}/{epochs}", total_samples)
        self.group.progress = ""

    def epoch_line(self, epoch: int, epochs: int, metrics: dict[str, Any], label: str = "") -> None:
        log.info(epoch_text(epoch, epochs, metrics, label))
        self.row["epoch"] = f"{epoch}/{epochs}"
        self.row.update({k: metrics[k] for k in ("train/loss", "val/acc") if k in metrics})

    def left_group(self, status: str) -> None:
        self.row["status"] = status

    def run_ended(self, status: str, rows: dict[str, Any], style: str) -> None:
        self.row["status"] = status
        log_summary(f"regexp · {status}", rows)

    def diagnosis(self, findings: list[dict[str, Any]]) -> None:
        log_diagnosis(findings)


class EpochBar:
    def __init__(self, progress: Progress, task: Any):
        self.progress, self.task = progress, task

    def advance(self, samples: int) -> None:
        self.progress.update(self.task, advance=samples)

    def show(self, loss: float, samples_per_s: float) -> None:
        self.progress.update(self.task, loss=fmt_value(loss), rate=f"{samples_per_s:,.0f}")


class GroupBar:
    """A fused group's epoch progress, in its table's title (EpochBar's calls)."""

    def __init__(self, group: GroupConsole, epoch: str, total: int):
        self.group, self.epoch, self.total, self.done = group, epoch, max(total, 1), 0

    def advance(self, samples: int) -> None:
        self.done += samples
        self.group.progress = f" · {self.epoch} {100 * self.done // self.total}%"

    def show(self, loss: float, samples_per_s: float) -> None:
        """The group's loss and speed are its rows' (each epoch's) and its members' train.log."""
