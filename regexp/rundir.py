"""Typed run records: everything that reads or writes a run dir's record files goes through here.

A run dir holds `summary.json` (a `Summary`: status, final metrics, config, timings),
`metrics.jsonl` (one JSON object per log step, evaluation or event), `diagnosis.json`
(`{"findings": [...]}`) and Hydra's `.hydra/overrides.yaml`. Every whole-file write is
atomic (a temp file in the same folder, fsync, `os.replace`, the temp file removed on
failure), so a reader or a crash never sees half a file and a full disk leaves no
`.tmp` behind. A NaN or Inf is never written as a number: it is dropped from the record
and named under `nonfinite` instead.

This module is a leaf: it imports nothing else from regexp, and no torch.
"""

import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union, get_args, get_origin

SUMMARY, METRICS, DIAGNOSIS = "summary.json", "metrics.jsonl", "diagnosis.json"
CONTINUATION = "continuation.json"  # a resumed finished run's own record, until it ends at least as well
SWEEP_SUMMARY, SWEEP_RECORDS = "sweep_summary.json", ".sweep"  # a sweep dir's table, and its jobs' records
# The most a reader takes in at once: a whole record file (summary.json, diagnosis.json, overrides.yaml)
# or one line of metrics.jsonl; far above any real record.
MAX_FILE_BYTES = 256 * 2**20
MAX_LINE_BYTES = 64 * 2**20


def printable(text: str) -> str:
    """`text` with each character that is not printable (a line break, an escape code) written as
    its escape (`\\n`, `\\x1b`): user text (an override, a path) in an error or a console line can
    start no line of its own nor colour one."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class PrintableLog(logging.Filter):
    """Hydra's own console lines (`[HYDRA] #0 : seed=0 ...`) with user text kept on its line, as
    `printable` keeps regexp's (a tab, as Hydra indents with one, stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "\t".join(map(printable, record.getMessage().split("\t"))), None
        return True


class ConfigError(ValueError):
    """A bad configuration value: `key=value: allowed`. Exit code 2 at the CLI."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


def _show(value: Any) -> str:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return str(value)


class UsageError(ValueError):
    """Bad command-line input to a command that reads run dirs (compare, diagnose): the
    message is the whole line. Exit code 2 at the CLI."""


class RunError(RuntimeError):
    """A problem with a file the run needs or writes (data, checkpoint, output): the
    message says which file and what to do. Exit code 1, one line, no traceback."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM; exit code 128 + signal. `saved`: a checkpoint of this very step was
    written (the first signal); a second signal stops at once, without one."""

    def __init__(self, signum: int, saved: bool = False):
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.saved = signum, saved


class Status(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    DIVERGED = "diverged"
    STOPPED = "stopped"  # a decisive finding ended it (monitor.on_finding=stop)
    PRUNED = "pruned"  # a sweep's pruning ended it at a rung (prune=)
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        """The run ended with a result (exit code 0); a divergence, a stop on a finding and a
        pruning are results, not crashes."""
        return self in (Status.COMPLETED, Status.EARLY_STOPPED, Status.DIVERGED, Status.STOPPED, Status.PRUNED)

    @property
    def trained(self) -> bool:
        """Its final metrics are those of a trained model (what means over runs may average)."""
        return self in (Status.COMPLETED, Status.EARLY_STOPPED)

    @property
    def rank(self) -> int:
        """How good a record it is: a trained result, a run ended before its end (diverged,
        stopped, pruned), or no result."""
        return 2 if self.trained else 1 if self.finished else 0

    def __str__(self) -> str:
        return self.value


ENDED_EARLY = (Status.STOPPED, Status.PRUNED)  # results that a setting ended before the plan's end


def continues_under(summary: "Summary", cfg: Any) -> bool:
    """Whether a run that a finding stopped or a pruning ended goes on when resumed with `cfg`:
    with monitor.on_finding=warn, with prune=none. Under the setting that ended it, it is finished."""
    if summary.status == Status.STOPPED:
        return cfg.monitor.on_finding != "stop"
    if summary.status == Status.PRUNED:
        return cfg.prune.name == "none"
    return False


@dataclass
class Summary:
    """summary.json. Optional fields left at None are not written; keys this version does
    not know are kept in `extra` and written back unchanged."""

    status: Status = Status.RUNNING
    run_dir: str = ""
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    choices: dict[str, Any] = field(default_factory=dict)  # group -> option, as Hydra chose them
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # resolved
    metrics: dict[str, float] = field(default_factory=dict)  # final: train/*, val/*, test/*, perf/*
    findings: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    epochs_completed: int = 0
    train_time_s: Optional[float] = None
    wall_time_s: Optional[float] = None
    device: Optional[str] = None
    threads: Optional[int] = None  # CPU threads the run trained with (device.threads)
    parameters: Optional[int] = None
    data: Optional[dict[str, Any]] = None  # the data set as trained: input_shape [C, H, W] and classes
    steps_per_epoch: Optional[int] = None
    effective_batch: Optional[int] = None
    train_samples: Optional[int] = None
    wandb_id: Optional[str] = None
    nonfinite: Optional[dict[str, Any]] = None  # the first non-finite event
    last_finite_step: Optional[int] = None
    # why a run stopped (its decisive finding: rule, title, step) or was pruned (rung epoch, metric, value, threshold)
    ended_by: Optional[dict[str, Any]] = None
    skipped_steps: int = 0
    resumed_from: Optional[str] = None
    resumed_at_step: Optional[int] = None
    fused: Optional[dict[str, Any]] = None  # trained side by side with other jobs: {models: N, ...}
    smoke: Optional[bool] = None  # true for a smoke run (smoke=true), whose metrics no mean takes; absent otherwise
    # a signal's stop: {signal: 15, saved: true when a checkpoint of its last step was written}
    interrupted: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        out["status"] = self.status.value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Summary":
        """Raises ValueError when `data` is not a summary (not an object, unknown status)."""
        if not isinstance(data, dict):
            raise ValueError(f"a JSON object was expected, not {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        for f in fields(cls):  # a reader may index, split or format these: a wrong type is not a summary
            if f.name in data and f.name not in ("status", "extra"):
                _check_type(f.name, data[f.name], f.type)
        summary = cls(**{k: v for k, v in data.items() if k in known})
        summary.status = Status(data.get("status", Status.FAILED.value))
        summary.extra = {k: v for k, v in data.items() if k not in known}
        return summary

    def objective(self, metric: str = "val/acc") -> float:
        """A sweeper's objective: `metric` of a finished run, NaN when there is none."""
        value = self.metrics.get(metric) if self.status.finished else None
        return float(value) if isinstance(value, (int, float)) else math.nan


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """ValueError unless `value` fits a Summary field's annotation: a str, a number (int or
    float alike), a dict, or a list whose items fit; None where the field is Optional."""
    if get_origin(annotation) is Union:  # Optional[X]
        if value is None:
            return
        annotation = get_args(annotation)[0]
    expected = get_origin(annotation) or annotation
    if expected in (int, float):
        fits, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "number"
    else:
        fits, wanted = isinstance(value, expected), expected.__name__
    if not fits:
        raise ValueError(f"{name} is a {type(value).__name__}, not a {wanted}")
    item = get_args(annotation)[0] if expected is list and get_args(annotation) else None
    if item is not None and item is not Any:
        for element in value:
            _check_type(f"an item of {name}", element, item)


# ---------------------------------------------------------------- folders a failed command made
def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove `dirs` (deepest first, as missing_dirs lists them) while they are empty, so a
    command that failed leaves none of the folders it made."""
    for folder in dirs:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else wrote there meanwhile
            break


# ---------------------------------------------------------------- whole-file writes
def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temp file in the same directory, fsync, then os.replace: a reader (or
    a crash) never sees a half-written file, and a failed write leaves no temp file behind.
    RunError naming the file on failure."""
    path = Path(path)
    tmp: Optional[Path] = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise cannot_write(path, e) from None
    except RuntimeError as e:  # torch.save reports a full disk as a RuntimeError
        raise cannot_write(path, OSError(str(e).splitlines()[0])) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def cannot_write(path: Path, error: OSError) -> RunError:
    return RunError(f"{path}: cannot write ({error.strerror or error}); free disk space or make {Path(path).parent} "
                    f"writable (or choose another out_dir); the files written before are intact")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False, default=str))


def read_json(path: Path) -> Any:
    """A JSON file's content; RunError naming the file when it cannot be read or parsed."""
    return parse_json(read_text(path), path)


def parse_json(text: str, where: Any) -> Any:
    """`text` as JSON; RunError naming `where` (a file, or file:line) when it is not, nesting
    too deep for Python's parser included."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise RunError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise RunError(f"{where}: not valid JSON (nested too deep)") from None


class NotARegularFile(RunError):
    """A path that cannot be read as a regular file: `why` says what is there instead."""

    def __init__(self, path: Path, why: str, advice: str = ""):
        self.why = why
        super().__init__(f"{path}: {why}{advice}")


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, only when it is a regular file (after symlinks): a FIFO, a
    device (/dev/zero) or a directory is a NotARegularFile naming it, never a read that blocks
    or never ends. O_NONBLOCK keeps the open itself from waiting for a FIFO's writer; the check
    is fstat on the opened descriptor, so nothing can be swapped in after it.
    FileNotFoundError passes through: the caller decides what a missing file means."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NotARegularFile(path, f"cannot read ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(path, f"not a regular file ({_file_kind(mode)})", "; a run's records are regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((kind for is_kind, kind in kinds if is_kind(mode)), "not a file")


def read_text(path: Path) -> str:
    """A whole record file as text (undecodable bytes replaced); RunError naming the file when
    it is missing, not a regular file, unreadable or larger than any record."""
    try:
        with open_regular(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise RunError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB; not a run's record")
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- summary.json
def write_summary(run_dir: Path, summary: Summary) -> None:
    write_json(Path(run_dir) / SUMMARY, summary.to_dict())


class SummaryRecord:
    """Where a run writes its summary. A run dir that already holds a finished result (a
    resumed completed run, continued for more epochs) keeps that summary.json until the
    continuation ends at least as well, with every metric it had; until then, and for good if it ends
    worse, the continuation's summary is continuation.json beside it."""

    def __init__(self, run_dir: Path, earlier: Optional[Summary]):
        self.run_dir, self.earlier = Path(run_dir), earlier
        self.guarded = earlier is not None and earlier.status.finished

    def replaces_earlier(self, summary: Summary) -> bool:
        """A worse status, or fewer metrics, never replaces a finished record."""
        return not self.guarded or (summary.status.rank >= self.earlier.status.rank and bool(summary.metrics)
                                    and set(self.earlier.metrics) <= set(summary.metrics))

    def write(self, summary: Summary, final: bool = False) -> None:
        if final and self.replaces_earlier(summary):
            write_summary(self.run_dir, summary)
            (self.run_dir / CONTINUATION).unlink(missing_ok=True)
        else:
            write_json(self.run_dir / (CONTINUATION if self.guarded else SUMMARY), summary.to_dict())


def load_summary(run_dir: Path) -> Summary:
    """The run's summary; RunError naming the file when it is missing or not a summary."""
    path = Path(run_dir) / SUMMARY
    try:
        return Summary.from_dict(read_json(path))
    except (ValueError, TypeError) as e:
        raise RunError(f"{path}: not a regexp run summary ({e})") from None


def read_summary(run_dir: Path) -> Optional[Summary]:
    """The run's summary, or None when it is missing or unreadable."""
    try:
        return load_summary(run_dir)
    except RunError:
        return None


# ---------------------------------------------------------------- metrics.jsonl
def split_finite(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the record without non-finite floats, the names of those dropped)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    return {k: v for k, v in metrics.items() if k not in bad}, bad


class MetricsFile:
    """An append-only JSON-lines file (metrics.jsonl): one object per log step, evaluation
    or event, each line flushed as it is written. Opened on first use: no empty files."""

    def __init__(self, path: Path):
        self.path, self.file = Path(path), None

    def write(self, record: dict[str, Any]) -> None:
        clean, bad = split_finite(record)
        if bad:
            clean["nonfinite"] = bad
        try:
            if self.file is None:
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


def read_records(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file ([] when it does not exist), read line by line. A
    half-written last line (a run still writing, or killed mid-write) is ignored; any other
    bad line, or a file that is not a regular one, is a RunError naming the file (and line)."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            return list(_parse_records(_lines(f, path), path))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror or e})") from None


def _lines(f: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as text, each at most MAX_LINE_BYTES."""
    for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
        if len(line) > MAX_LINE_BYTES:
            raise RunError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES // 2**20} MiB; the file is corrupted")
        yield line.decode("utf-8", errors="replace")


def _parse_records(lines: Iterator[str], path: Path) -> Iterator[dict[str, Any]]:
    names: dict[str, str] = {}  # one string per metric name, shared by every record (a long run holds 100k of them)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path}:{number}")
        except RunError:  # not JSON, or nested deeper than Python's parser goes
            if not line.endswith("\n"):  # the last line, still being written
                return
            raise RunError(f"{path}:{number}: not a JSON record; the file is corrupted") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}:{number}: not a JSON object; the file is corrupted")
        yield {names.setdefault(key, key): value for key, value in record.items()}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_records(Path(run_dir) / METRICS)


def keep_metrics_up_to(run_dir: Path, step: int) -> None:
    """Drop the records a resumed run will write again (those after its checkpoint's step)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = [record for record in read_records(path) if record.get("step", 0) <= step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(record) + "\n" for record in kept)))


# ---------------------------------------------------------------- diagnosis.json, overrides
def write_diagnosis(run_dir: Path, findings: list[dict[str, Any]]) -> None:
    write_json(Path(run_dir) / DIAGNOSIS, {"findings": findings})


def read_diagnosis(run_dir: Path) -> Optional[list[dict[str, Any]]]:
    """The findings written at the end of the run, None when there is no diagnosis.json."""
    path = Path(run_dir) / DIAGNOSIS
    if not os.path.lexists(path):
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
        raise RunError(f'{path}: not a diagnosis (expected {{"findings": [...]}})')
    return data["findings"]


def read_overrides(run_dir: Path) -> Optional[list[str]]:
    """Hydra's record of the job's overrides, None when the run dir has no .hydra/overrides.yaml."""
    import yaml  # a dependency of omegaconf; only needed here

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not os.path.lexists(path):
        return None
    text = read_text(path)
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RunError(f"{path}: cannot read the run's overrides ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise RunError(f"{path}: cannot read the run's overrides (nested too deep)") from None
    if items is not None and not (isinstance(items, list) and all(isinstance(item, str) for item in items)):
        raise RunError(f"{path}: not a list of overrides (strings)")
    return [str(item) for item in items or []]
