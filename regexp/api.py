"""The Python API (`regexp.run`, `regexp.load`, `regexp.compare`): the same composition,
validation and pre-flight as `regexp train`, without Hydra's job runner, for notebooks.

A run writes the run dir the command line would (summary.json, metrics.jsonl,
diagnosis.json, checkpoints, train.log, .hydra/config.yaml and overrides.yaml), so
`regexp compare`, `regexp diagnose` and `resume=` work on it. Bad input raises
ConfigError (a ValueError) naming the key or the argument; nothing is written then.
Runs in several threads at once work: each composes its config in turn (Hydra's state is
one per process) and logs to its own train.log.
"""

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from regexp.rundir import ConfigError, Summary, load_summary, read_diagnosis, read_metrics


@dataclass
class Run:
    """A run dir, read back: its summary, its metric records and its findings."""

    run_dir: Path
    summary: Summary
    metrics: list[dict[str, Any]]
    findings: list[dict[str, Any]]


def run(overrides: Sequence[str] = (), run_dir: Optional[str | Path] = None) -> Summary:
    """Train one run of `overrides` (as `regexp train` takes them) into `run_dir` (default:
    Hydra's outputs/<date>/<time>); returns its summary, whatever its status. A crash is
    recorded in the run dir and raised. A resume of a run finished at its end returns that
    run's summary and writes nothing."""
    from omegaconf import OmegaConf

    from regexp.compose import check_job, compose, with_added_groups, with_resumed_run
    from regexp.config import check_writable
    from regexp.lock import check_free, writing
    from regexp.prune import check_one_run
    from regexp.train import check_resume, train

    overrides = strings(overrides, "overrides", "['model=cnn', 'seed=1']")
    check_one_run(overrides)  # as typed, before a resume adds its run's own
    overrides = with_added_groups(with_resumed_run(overrides))
    run_dir = None if run_dir is None else path_of(run_dir, "run_dir")
    composed = compose(overrides, with_hydra=True)
    typed = check_job(composed)
    if run_dir is None:
        run_dir = OmegaConf.select(composed, "hydra.run.dir")
    run_dir = Path(run_dir)
    check_writable(run_dir, "run_dir", str(run_dir))
    check_free(run_dir, "run_dir", str(run_dir))  # nor inside a sweep dir that another process trains
    choices = OmegaConf.to_container(composed.hydra.runtime.choices)
    user_overrides = [o for o in overrides if not o.startswith("hydra.")]
    with writing([run_dir], "run_dir"):
        start = check_resume(typed, run_dir, "run_dir")  # what the run dir holds: nothing is written on a refusal
        if start.finished is not None:
            return start.finished
        with train_log(run_dir):
            write_hydra_record(run_dir, composed, user_overrides)
            return train(typed, run_dir, choices=choices, overrides=user_overrides)


def load(run_dir: str | Path) -> Run:
    """A run dir's summary, metric records and findings (RunError when it is no run dir)."""
    run_dir = path_of(run_dir, "run_dir")
    return Run(run_dir, load_summary(run_dir), read_metrics(run_dir), read_diagnosis(run_dir) or [])


def compare(paths: Sequence[str | Path], by: Optional[Sequence[str]] = None, metric: str = "test/acc",
            baseline: Optional[str] = None) -> dict[str, Any]:
    """The table `regexp compare` prints, as data: groups (mean, std and 95 % confidence
    interval of each column, run counts by status) and runs; with `baseline` (a group's label
    or, grouped by one key, its value) each other group's difference of means to it and Welch's
    p-value. Failed, diverged, stopped and pruned runs are counted, never averaged."""
    from regexp.comparison import table_data
    from regexp.rundir import UsageError

    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or not paths:
        raise ConfigError("paths", repr(paths), "must be a non-empty list of run or sweep dirs, e.g. ['outputs']")
    paths = [path_of(p, "paths") for p in paths]
    by = None if by is None else strings(by, "by", "['optimizer']")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("metric", repr(metric), "must be a metric name (a non-empty str), e.g. 'test/acc'")
    if baseline is not None and (not isinstance(baseline, str) or not baseline):
        raise ConfigError("baseline", repr(baseline), "must be a group's label or value (a non-empty str), e.g. 'l2'")
    try:
        return table_data(paths, by or None, metric, baseline=baseline)
    except UsageError as e:  # e.g. an unknown --by key or metric: the message names it
        raise ConfigError("compare", [str(p) for p in paths], str(e)) from None


def strings(value: Any, name: str, example: str) -> list[str]:
    """`value` as a list of non-empty str; ConfigError naming the argument otherwise. One str
    is refused, not split: "model=cnn seed=1" would read as one override."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
            or not all(isinstance(item, str) and item for item in value)):
        raise ConfigError(name, repr(value), f"must be a list of non-empty strings, e.g. {example}")
    return list(value)


def path_of(value: Any, name: str) -> Path:
    """`value` (a str or os.PathLike naming a directory) as a Path; ConfigError naming the
    argument otherwise. An empty one is refused: it would mean the current directory."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip() or "\0" in text:  # NUL: no file system takes it
        raise ConfigError(name, repr(value),
                          "must be a directory's path (a non-empty str or os.PathLike), without NUL characters")
    return Path(text)


def write_hydra_record(run_dir: Path, composed: Any, overrides: list[str]) -> None:
    """.hydra/config.yaml and overrides.yaml, as Hydra writes them for a job."""
    import yaml
    from omegaconf import OmegaConf

    from regexp.rundir import atomic_write

    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
    atomic_write(hydra_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(job)))
    atomic_write(hydra_dir / "overrides.yaml", lambda f: yaml.safe_dump(overrides, f))


@contextmanager
def train_log(run_dir: Path) -> Iterator[None]:
    """The run's log lines into run_dir/train.log for the length of the run, as under Hydra."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)  # a run in another thread logs to its own file
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("regexp")
    logger.addHandler(handler)
    try:
        with _LOGGING:
            yield
    finally:
        logger.removeHandler(handler)
        handler.close()


class _LoggingRuns:
    """The `regexp` logger at INFO while any run writes its train.log; its own level again
    after the last one ends (runs in threads overlap)."""

    def __init__(self):
        self.lock, self.runs, self.level = threading.Lock(), 0, logging.NOTSET

    def __enter__(self) -> None:
        logger = logging.getLogger("regexp")
        with self.lock:
            if self.runs == 0:
                self.level = logger.level
                logger.setLevel(logging.INFO)
            self.runs += 1

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.runs -= 1
            if self.runs == 0:
                logging.getLogger("regexp").setLevel(self.level)


_LOGGING = _LoggingRuns()
