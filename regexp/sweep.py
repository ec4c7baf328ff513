"""Sweeps that survive failure: the end-of-sweep summary (a Hydra callback), skipping
finished jobs on `resume=auto`, the report of a sweep stopped by a signal, and per-job
resources for parallel launchers.

The summary lists the jobs of THIS invocation only, each with its own overrides, status and
error: a job records itself in `<sweep dir>/.sweep/<job number>.json` as it starts (whichever
launcher ran it: in this process, in joblib workers or on a cluster), and the summary joins
those records with the jobs' run dirs. A job dir left by an earlier sweep into the same dir
is not one of its rows. A failed or refused job ends the sweep with SweepFailed, which the
CLI turns into exit code 1; a signal ends it with Interrupted (128 + signal). A diverged,
stopped or pruned job is a result, not a failure: counted per status and shown in yellow; why
a stopped or pruned one ended (its `ended_by`) is a line under the table.

While the sweep runs, each job gets one console line as it ends (JobEnds), read the same way
from its record and run dir on the launching host, whichever process or host ran it."""

import functools
import os
import shutil
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from regexp.rundir import (
    SUMMARY,
    SWEEP_RECORDS,
    SWEEP_SUMMARY,
    ENDED_EARLY,
    ConfigError,
    Interrupted,
    RunError,
    Status,
    Summary,
    continues_under,
    printable,
    read_json,
    read_summary,
    write_json,
    write_summary,
)
from regexp.fusion import job_numbers, launcher_target
from regexp.tracking import plural, print_whole, why_ended

METRIC = "test/acc"
PLAN = "plan.json"  # this invocation's planned jobs, among its job records (SWEEP_RECORDS)
REFUSED, NOT_RUN = "refused", "not run"  # row statuses of jobs that have no run of their own in this sweep
SKIPPED = "skipped"  # a job record's key: resume=auto found its run finished by an earlier invocation
NO_CHECKPOINT = "no checkpoint saved"
SIGNALS = {signal.SIGTERM: " (SIGTERM: scancel, or the system stopping it)", signal.SIGINT: " (SIGINT: Ctrl-C)",
           signal.SIGUSR2: " (SIGUSR2: the cluster's time-limit or preemption warning)",
           signal.SIGUSR1: " (SIGUSR1: the cluster's time-limit or preemption warning)"}  # a job's stop, in its row
CUT_SHORT = (Status.DIVERGED, *ENDED_EARLY)  # results that did not train to the plan's end: shown in yellow
SUBDIR, DIFFER = "hydra.sweep.subdir", "use a subdir that differs between jobs (the default is ${hydra.job.num})"


class Refused(ConfigError):
    """A job's run dir holds another run (resume=auto finds one of other overrides there), or is
    an earlier job's of this sweep: that run stays as it is."""


class SweepSummary(Callback):
    """A multirun's bookkeeping: this invocation's job records, signals turned into
    Interrupted between jobs (a job's own handler saves its checkpoint), and at the end a
    table on the console and sweep_summary.json."""

    def __init__(self):
        self.previous_handlers: dict[int, Any] = {}
        self.job_ends: Optional[JobEnds] = None  # this multirun's, from its start to its table

    def __getstate__(self) -> dict[str, Any]:
        """A copy for a job's process (joblib, submitit pickle Hydra's callbacks along): the jobs'
        lines are the launching process's, so it goes without them."""
        return {**self.__dict__, "job_ends": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        planned = planned_jobs(config.hydra)
        start_records(Path(config.hydra.sweep.dir), planned)
        self.job_ends = JobEnds(Path(config.hydra.sweep.dir), planned, list(config.hydra.overrides.task))
        if not jobs_in_this_process(config.hydra):
            self.job_ends.watch()
        optuna_colours_on_terminals_only(config.hydra)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous_handlers[signum] = signal.signal(signum, stop_sweep)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write_job_record(config.hydra)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.jobs_ended()

    def jobs_ended(self) -> None:
        """Jobs of this process may have ended: their lines now, not at the next poll."""
        if self.job_ends is not None:
            self.job_ends.poll()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        if self.job_ends is not None:  # the last lines, before the table, and none after it
            self.job_ends.close()
            self.job_ends = None
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        failed = [r for r in rows if not row_finished(r)]
        write_sweep_summary(sweep_dir, rows, "failed" if failed else "completed")
        print_sweep_table(sweep_dir, rows, failed)
        log_compare_table(config, rows)
        if failed:
            raise SweepFailed(len(failed), len(rows))


def log_compare_table(config: DictConfig, rows: list[dict[str, Any]]) -> None:
    """The compare table of this invocation's runs (refused and unlaunched jobs have none) to
    W&B, when the sweep logs there."""
    from regexp.wandb_logger import log_sweep_table

    run_dirs = [Path(r["run_dir"]) for r in rows
                if r["status"] not in (REFUSED, NOT_RUN) and (Path(r["run_dir"]) / "summary.json").is_file()]
    log_sweep_table(config, run_dirs, METRIC, print)  # not through logging: Hydra's handler would print it twice


def signal_number(stopped_by: BaseException) -> int:
    """Interrupted's signal; a KeyboardInterrupt is Ctrl-C's SIGINT."""
    return int(getattr(stopped_by, "signum", signal.SIGINT))


def stop_sweep(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM while no job is training (between jobs, or before a job's own handler)."""
    raise Interrupted(signum)


def optuna_colours_on_terminals_only(hydra_cfg: Any) -> None:
    """Optuna's log handler colours its lines whatever the stream, which puts escape codes in a
    file or a pipe: its formatter is told the stream, so colours go to a terminal only (colorlog
    still honours NO_COLOR and FORCE_COLOR)."""
    if "optuna" not in str(hydra_cfg.sweeper.get("_target_", "")).lower():
        return
    import logging

    import colorlog  # Optuna's formatter
    import optuna

    for handler in optuna.logging.get_logger("optuna").handlers:  # get_logger sets Optuna's handler up
        formatter = handler.formatter
        if isinstance(handler, logging.StreamHandler) and isinstance(formatter, colorlog.ColoredFormatter):
            formatter.stream = formatter.stream or handler.stream


# ---------------------------------------------------------------- this invocation's records
def planned_jobs(hydra_cfg: Any) -> Optional[list[list[str]]]:
    """Every job's overrides in launch order, split as Hydra's basic sweeper splits them;
    None for a search sweeper, which draws its jobs as it goes."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from regexp.compose import expands_its_jobs, task_overrides

    if not expands_its_jobs(hydra_cfg):
        return None
    params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *task_overrides(hydra_cfg)])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def start_records(sweep_dir: Path, planned: Optional[list[list[str]]]) -> None:
    """A fresh record folder: the jobs recorded there are this invocation's."""
    shutil.rmtree(sweep_dir / SWEEP_RECORDS, ignore_errors=True)
    (sweep_dir / SWEEP_RECORDS).mkdir(parents=True)
    write_json(sweep_dir / SWEEP_RECORDS / PLAN, {"pid": os.getpid(), "jobs": planned})


def mark_skipped(hydra_cfg: Any, status: Status) -> None:
    """resume=auto skips this job: its run ended `status` in an earlier invocation (its line says so)."""
    write_job_record(hydra_cfg, **{SKIPPED: status.value})


def job_record_path(hydra_cfg: Any) -> Path:
    return Path(hydra_cfg.sweep.dir) / SWEEP_RECORDS / f"{hydra_cfg.job.num}.json"


def write_job_record(hydra_cfg: Any, **outcome: str) -> None:
    """The job as this invocation launched it (number, run dir, overrides), and how it ended
    when that is not in its run dir (`refused`) or not only there (`error`)."""
    from regexp.compose import task_overrides

    path = job_record_path(hydra_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"job": str(hydra_cfg.job.num), "run_dir": str(hydra_cfg.runtime.output_dir),
                      "overrides": task_overrides(hydra_cfg), **outcome})


def read_records(sweep_dir: Path) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]]]:
    """(the plan, the job records in job-number order) of the sweep's last invocation."""
    folder = Path(sweep_dir) / SWEEP_RECORDS
    try:
        plan = read_json(folder / PLAN)
    except RunError:
        plan = None
    records = []
    for path in folder.glob("*.json"):
        if path.name != PLAN:
            try:
                records.append(read_json(path))
            except RunError:  # half a record, or no file: its job is listed as not run (or not at all)
                continue
    records = [r for r in records if is_job_record(r)]
    return plan if isinstance(plan, dict) else None, sorted(records, key=lambda r: int(r["job"]))


def is_job_record(record: Any) -> bool:
    """What write_job_record writes; anything else in .sweep/ is not one of this sweep's jobs."""
    job = record.get("job") if isinstance(record, dict) else None
    return (isinstance(job, str) and job.isascii() and job.isdigit() and len(job) <= 9
            and isinstance(record.get("run_dir"), str) and isinstance(record.get("overrides"), list))


# ---------------------------------------------------------------- a line per job as it ends
POLL_S = 1.0  # how often the launching process looks for jobs that ended in other processes
IN_THIS_PROCESS = ("BasicLauncher", "FusedLauncher")  # launchers that run the jobs in the launching process


class JobEnds:
    """One console line per job of this invocation as it ends: its status, metric and finding
    or error, read from its record and run dir, so the same for a job of this process, of a
    joblib worker or of a cluster node. A job has ended when its record says it failed, was
    refused or was skipped, or when its run dir's summary.json, written after its record (not
    an earlier run's), holds a final status. Jobs of this process are looked at as they end
    (SweepSummary.jobs_ended); jobs of other processes by a thread, every POLL_S, until the
    sweep's summary is written (its end, or a signal's report). Each job once."""

    def __init__(self, sweep_dir: Path, planned: Optional[list[list[str]]], fixed: Optional[list[str]] = None):
        """`planned`: every job's overrides (None: a search draws them); `fixed`: the command's
        overrides that every job shares (a search's lines leave them out, as a sweep's do)."""
        self.sweep_dir = sweep_dir
        self.total = len(planned) if planned is not None else None
        self.shared = set.intersection(*map(set, planned)) if planned and len(planned) > 1 else set(fixed or [])
        self.shown: set[str] = set()
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.thread: Optional[threading.Thread] = None

    def watch(self) -> None:
        """Look for ended jobs every POLL_S until close()."""
        self.thread = threading.Thread(target=self._watch, name="regexp-job-ends", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopping.wait(POLL_S):
            self.poll()

    def poll(self, final: bool = False) -> None:
        """A line for each job that ended since the last look; `final`: for every job not shown
        yet that started (as the table will show it)."""
        with self.lock:
            if self.sweep_reported():
                return
            _, records = read_records(self.sweep_dir)
            for record in records:
                if record["job"] not in self.shown and (final or has_ended(self.sweep_dir, record)):
                    self.shown.add(record["job"])
                    print_job_end(record, f"{len(self.shown)}/{self.total}" if self.total else str(len(self.shown)),
                                  self.shared)

    def sweep_reported(self) -> bool:
        """Whether this invocation's sweep_summary.json is written: its table has the last word."""
        return written_since(self.sweep_dir / SWEEP_SUMMARY, self.sweep_dir / SWEEP_RECORDS / PLAN)

    def close(self) -> None:
        """Every job has ended: the lines not printed yet."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        self.poll(final=True)


def jobs_ended(callbacks: Any) -> None:
    """For a launcher that trains several jobs at once in this process (fused), after they ended:
    their lines now. `callbacks`: the multirun's (Hydra's HydraContext.callbacks)."""
    for callback in getattr(callbacks, "callbacks", []):
        if isinstance(callback, SweepSummary):
            callback.jobs_ended()


def jobs_in_this_process(hydra_cfg: Any) -> bool:
    return launcher_target(hydra_cfg).endswith(IN_THIS_PROCESS)


def has_ended(sweep_dir: Path, record: dict[str, Any]) -> bool:
    """Whether this invocation's job `record` has ended (see JobEnds)."""
    if any(key in record for key in (REFUSED, "error", SKIPPED)):
        return True
    summary_path = Path(record["run_dir"]) / SUMMARY
    if not written_since(summary_path, sweep_dir / SWEEP_RECORDS / f"{record['job']}.json"):
        return False  # none yet, or an earlier run's, which this job may continue
    summary = read_summary(summary_path.parent)
    return summary is not None and summary.status is not Status.RUNNING


def print_job_end(record: dict[str, Any], count: str, shared: set[str]) -> None:
    """`[3/8] job 2 (seed=2): completed · test/acc 0.9120 · no findings`: the row the sweep's
    table will show, with the run's findings, or why it ended, or its error."""
    from rich.console import Console

    row = job_row(record)
    who = " ".join(shown(o) for o in row["overrides"] if o not in shared)
    parts = [f"[{count}] job {row['job']}{f' ({who})' if who else ''}: {status_shown(row)}"]
    if isinstance(row[METRIC], float):
        parts.append(f"{METRIC} {row[METRIC]:.4f}")
    error = printable(str(row["error"]))  # one line, as the list under the table shows it
    parts.append(error if row["error"] else why_ended(row["ended_by"]) or findings_text(row))
    if SKIPPED in record:
        parts.append("finished earlier, skipped (resume=auto)")
    style = ("red" if not row_finished(row) and row["status"] != NOT_RUN
             else "yellow" if row["status"] in (*CUT_SHORT, NOT_RUN) else "")
    Console(soft_wrap=True).print(" · ".join(p for p in parts if p), style=style, markup=False, highlight=False)


def findings_text(row: dict[str, Any]) -> str:
    """The end-of-run diagnosis of a job's run, in a phrase: its findings' titles, or none."""
    summary = read_summary(Path(row["run_dir"])) if row["run_dir"] else None
    if summary is None or not row_finished(row):
        return ""
    titles = [str(f.get("title", f.get("rule", ""))) for f in summary.findings if isinstance(f, dict)]
    return f"{plural(len(titles), 'finding')}: {'; '.join(titles)}" if titles else "no findings"


# ---------------------------------------------------------------- rows
def sweep_rows(sweep_dir: Path, stopped_by: Optional[BaseException] = None) -> list[dict[str, Any]]:
    """One row per job of this invocation, in job-number order: each launched job from its
    record and run dir, then the planned jobs that never started (`not run`)."""
    plan, records = read_records(sweep_dir)
    rows = [job_row(record, stopped_by) for record in records]
    launched = {r["job"] for r in rows}
    planned = (plan or {}).get("jobs") or []
    rows += [{"job": str(n), "overrides": job, "status": NOT_RUN, METRIC: None, "wall_time_s": None, "error": None,
              "ended_by": None, "run_dir": None, "smoke": False} for n, job in enumerate(planned) if str(n) not in launched]
    return sorted(rows, key=lambda r: int(r["job"]))


def job_row(record: dict[str, Any], stopped_by: Optional[BaseException] = None) -> dict[str, Any]:
    run_dir = Path(record["run_dir"])
    row = {"job": record["job"], "overrides": record["overrides"], "status": NOT_RUN, METRIC: None,
           "wall_time_s": None, "error": None, "ended_by": None, "run_dir": str(run_dir), "smoke": False}
    if REFUSED in record:  # the run dir holds another run, left as it was: nothing of it is this job's
        return {**row, "status": REFUSED, "error": record[REFUSED]}
    summary = read_summary(run_dir)
    if summary is None and stopped_by is not None:  # the signal came before it started
        return row
    if summary is None:
        summary = Summary(status=Status.FAILED, error=f"no readable summary.json in {run_dir}: it died before starting")
    status, error = summary.status, record.get("error") or summary.error  # this invocation's error first
    earlier = bool(record.get("error")) and status is not Status.FAILED  # failed before its run started: the summary is older
    if earlier:  # this invocation's job failed (an unreadable checkpoint), whatever its run said before
        status = Status.FAILED
    elif status is Status.RUNNING:  # the process ended mid-run
        status = Status.INTERRUPTED if stopped_by is not None else Status.FAILED
    if status is Status.INTERRUPTED and (stopped_by is not None or summary.interrupted):
        saved = what_is_saved(run_dir, stopped_by, summary)
        then = "starts it again" if saved == NO_CHECKPOINT else "continues it from its checkpoint"
        signum = (summary.interrupted or {}).get("signal") or signal_number(stopped_by)
        error = f"stopped by signal {signum}{SIGNALS.get(signum, '')}; {saved}: resume=auto {then}"
    return {**row, "status": status.value, METRIC: None if earlier else summary.metrics.get(METRIC),
            "wall_time_s": None if earlier else summary.wall_time_s, "error": error,
            "ended_by": summary.ended_by if status in ENDED_EARLY else None, "smoke": bool(summary.smoke)}


def what_is_saved(run_dir: Path, stopped_by: Optional[BaseException], summary: Optional[Summary] = None) -> str:
    """What the interrupted job left to continue from: only what is on disk. Whether its stop
    saved a checkpoint of its last step: its summary says, whichever process or host ran it,
    else the signal that stopped this process (a run it trained that recorded nothing yet)."""
    summary = summary or read_summary(run_dir)
    record = summary.interrupted if summary is not None and summary.status is Status.INTERRUPTED else None
    saved = record.get("saved") if isinstance(record, dict) else getattr(stopped_by, "saved", False)
    if saved and (run_dir / "checkpoint.pt").is_file():
        return "checkpoint saved"
    if (run_dir / "checkpoint.pt").is_file():
        return "no checkpoint of its last step, the one before is kept"
    return NO_CHECKPOINT


def row_finished(row: dict[str, Any]) -> bool:
    return row["status"] not in (REFUSED, NOT_RUN) and Status(row["status"]).finished


def write_sweep_summary(sweep_dir: Path, rows: list[dict[str, Any]], status: str, **more: Any) -> None:
    write_json(sweep_dir / SWEEP_SUMMARY,
               {"sweep_dir": str(sweep_dir), "status": status, "jobs": len(rows), "failed": len(failures(rows)),
                **{name.replace(" ", "_"): sum(r["status"] == name for r in rows) for name in UNFINISHED},
                "statuses": status_counts(rows), "smoke": smoke_count(rows), **more, "metric": METRIC,
                "rows": rows})


UNFINISHED = (Status.INTERRUPTED.value, NOT_RUN)  # not finished, and not a failure either: counted on their own


def failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of jobs that failed or were refused (not those interrupted or not run)."""
    return [r for r in rows if not row_finished(r) and r["status"] not in UNFINISHED]


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many jobs ended with each status (refused and not run included), in the order first seen."""
    return dict(Counter(r["status"] for r in rows))


def counts_text(rows: list[dict[str, Any]]) -> str:
    """`2 completed, 1 pruned`: the jobs per status, as the table's title says them, and how many
    were smoke runs, whose results no mean takes (`regexp compare`, the W&B compare table)."""
    smoke = smoke_count(rows)
    return ", ".join(f"{n} {status}" for status, n in status_counts(rows).items()) + (
        f"; {plural(smoke, 'smoke run')}, not averaged" if smoke else "")


def smoke_count(rows: list[dict[str, Any]]) -> int:
    """How many rows are smoke runs' (a row built without the key is none)."""
    return sum(bool(r.get("smoke")) for r in rows)


def status_shown(row: dict[str, Any]) -> str:
    """A job's status as its line and the table show it: a smoke run's says so."""
    return f"{row['status']} (smoke)" if row.get("smoke") else row["status"]


def print_sweep_table(sweep_dir: Path, rows: list[dict[str, Any]], failed: list[dict[str, Any]], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    title = title or f"{len(failures(rows))} failed" + (f" ({counts_text(rows)})" if rows else "")
    # overrides are printed as typed (Text, not markup): +regularizer=[dropout] keeps its brackets
    table = Table(caption=Text(f"all jobs: {' '.join(shown(o) for o in rows[0]['overrides'] if o in shared)}")
                  if shared else None, caption_justify="left")
    dirs = [run_dir_shown(sweep_dir, r) for r in rows]
    elsewhere = any(d not in (r["job"], "-") for d, r in zip(dirs, rows))  # resume=auto moved a job, or a custom subdir
    for column in ("job", "overrides", "status", METRIC, "wall s", *(["run dir"] if elsewhere else [])):
        table.add_column(column, overflow="fold")
    for r, run_dir in zip(rows, dirs):
        style = "red" if r in failed else "yellow" if r["status"] in (*CUT_SHORT, NOT_RUN) else ""
        metric = f"{r[METRIC]:.4f}" if isinstance(r[METRIC], float) else "-"
        wall = f"{r['wall_time_s']:.1f}" if isinstance(r["wall_time_s"], (int, float)) else "-"
        table.add_row(r["job"], Text(" ".join(shown(o) for o in r["overrides"] if o not in shared)), status_shown(r), metric,
                      wall, *([Text(run_dir)] if elsewhere else []), style=style)
    console = Console(soft_wrap=False)
    console.print(f"sweep {sweep_dir}: {plural(len(rows), 'job')}, {title}", markup=False, highlight=False, soft_wrap=True)
    print_whole(console, table)
    for r in failed:
        why = printable(str(r["error"])) if r["error"] else "the sweep ended before it started; resume=auto runs it"
        console.print(f"job {r['job']} {'was refused' if r['status'] == REFUSED else r['status']}: {why}",
                      style="red", markup=False, soft_wrap=True)  # one line each, whole, for grep and logs
    for r in rows:
        why = why_ended(r.get("ended_by"))
        if why is not None:
            console.print(f"job {r['job']} {r['status']}: {why}", style="yellow", markup=False, soft_wrap=True)


def run_dir_shown(sweep_dir: Path, row: dict[str, Any]) -> str:
    """A row's run dir as the table shows it: inside the sweep dir relative to it, else whole."""
    if row["run_dir"] is None:
        return "-"
    relative = os.path.relpath(os.path.realpath(row["run_dir"]), os.path.realpath(sweep_dir))
    return row["run_dir"] if relative.startswith("..") else relative


def shown(override: str) -> str:
    """An override as the sweep table and the jobs' lines show it: its characters printable
    (printable); a long float (a search sweeper's draw, such as optimizer.lr=0.0012520653814999472)
    at 4 significant digits. sweep_summary.json keeps it whole."""
    override = printable(override)
    key, equals, value = override.partition("=")
    if not equals or len(value) <= 8 or not any(c in value for c in ".eE"):
        return override
    try:
        return f"{key}={float(value):.4g}"
    except ValueError:
        return override


class SweepFailed(BaseException):
    """Raised at the end of a sweep in which a job did not finish (after the table and
    sweep_summary.json name each one): the CLI catches it and exits 1. A BaseException,
    because Hydra turns an Exception raised by a callback into a warning."""

    def __init__(self, failed: int, jobs: int):
        self.failed, self.jobs = failed, jobs
        super().__init__(f"{failed} of {plural(jobs, 'job')} failed")


# ---------------------------------------------------------------- a sweep stopped by a signal
def report_interruption(sweep_dir: Path, stopped_by: BaseException) -> str:
    """After SIGINT/SIGTERM ended a sweep run in this process: the table and sweep_summary.json
    say which jobs finished, which was interrupted (checkpoint saved only if it was) and which
    did not run. Returns the advice line."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # this report is short: let it finish
        signal.signal(signum, signal.SIG_IGN)
    try:
        return report_rows(sweep_dir, stopped_by)
    finally:  # Python's own handlers again (the sweep's were for the jobs)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def report_rows(sweep_dir: Path, stopped_by: BaseException) -> str:
    plan, _ = read_records(sweep_dir)
    if plan is None or plan.get("pid") != os.getpid():
        return "the sweep stopped before its first job started; nothing was run"
    rows = sweep_rows(sweep_dir, stopped_by)
    stopped = [r for r in rows if r["status"] == Status.INTERRUPTED]
    not_run = [r["job"] for r in rows if r["status"] == NOT_RUN]
    advice = f"to continue, run the same command again with resume=auto hydra.sweep.dir={sweep_dir}"
    write_sweep_summary(sweep_dir, rows, Status.INTERRUPTED.value, signal=signal_number(stopped_by),
                        advice=advice)
    parts = [f"job {r['job']} interrupted ({what_is_saved(Path(r['run_dir']), stopped_by)})" for r in stopped]
    parts += [f"{plural(len(not_run), 'job')} not run ({', '.join(not_run)})"] if not_run else []
    print_sweep_table(sweep_dir, rows, [r for r in rows if r in stopped or r["status"] in (REFUSED, Status.FAILED)],
                      "interrupted: " + counts_text(rows))
    return f"sweep {sweep_dir}: " + ", ".join(parts or ["no job was running"]) + f"; {advice}"


# ---------------------------------------------------------------- a job's failure or refusal
def record_failure(hydra_cfg: Any, error: BaseException) -> None:
    """A failed job's error in its record and, unless train() already wrote one (it does, once
    started), its summary.json. A job refused by resume=auto writes nothing in its run dir:
    that holds another run, whose records stay as they were; nor does one refused because
    another process writes its run dir (regexp.lock)."""
    import traceback

    from regexp.compose import task_overrides
    from regexp.lock import DirHeld

    run_dir = Path(hydra_cfg.runtime.output_dir)
    if isinstance(error, (Refused, DirHeld)):
        write_job_record(hydra_cfg, refused=str(error))  # its line: JobEnds, from this record
        return
    summary = read_summary(run_dir)
    if summary is None or summary.status is Status.RUNNING:
        summary = summary or Summary()
        summary.status, summary.run_dir, summary.overrides = Status.FAILED, str(run_dir), task_overrides(hydra_cfg)
        summary.error, summary.traceback = f"{type(error).__name__}: {error}", traceback.format_exc()
        write_summary(run_dir, summary)
    write_job_record(hydra_cfg, error=f"{type(error).__name__}: {error}")  # its line: JobEnds, from this record


def record_lost_job(hydra_cfg: Any, what: str) -> None:
    """A job whose cluster (or local submitit) job ended without a result (`what`: cancelled,
    out of time, killed, its node lost): a failure in its record, and in its run's summary when
    that still says running, unless its run recorded its own end (a cancelled job that saved
    its checkpoint as it stopped: interrupted). A job that never started gets only its record:
    no run dir is made for it. `hydra_cfg`: the job's node as the launcher loaded it."""
    from omegaconf import open_dict

    record = job_record_path(hydra_cfg)
    run_dir = Path(str(hydra_cfg.sweep.dir)) / str(hydra_cfg.sweep.subdir)
    with open_dict(hydra_cfg):
        hydra_cfg.runtime.output_dir = str(run_dir.absolute())
    summary = read_summary(run_dir) if record.is_file() else None  # not started: an earlier run's is not its own
    if summary is not None and summary.status is not Status.RUNNING and written_since(run_dir / SUMMARY, record):
        return
    if summary is None:
        write_job_record(hydra_cfg, error=f"{JobLost.__name__}: {what}")  # as record_failure words an error
    else:
        record_failure(hydra_cfg, JobLost(what))


class JobLost(RuntimeError):
    """A cluster job that gave no result back (record_lost_job)."""


def written_since(path: Path, since: Path) -> bool:
    """Whether `path` was written since `since` was (False when either is missing)."""
    try:
        return path.stat().st_mtime_ns >= since.stat().st_mtime_ns
    except OSError:
        return False


# ---------------------------------------------------------------- resume=auto
def already_finished(run_dir: Path, overrides: list[str], cfg: DictConfig) -> Optional[Summary]:
    """For resume=auto: the summary of this job's run if an earlier invocation finished it (a
    run stopped by a finding or pruned is finished unless `cfg` continues it: continues_under).
    Refused (a ConfigError) when the run dir holds a run of other overrides (another command
    into the same sweep dir): continuing it would mix two experiments."""
    summary = read_summary(run_dir)
    if summary is None:
        return None
    theirs, ours = _run_overrides(summary.overrides), _run_overrides(overrides)
    if theirs != ours:  # the differences as typed
        only_theirs = [o for o in sorted(_kept(summary.overrides)) if same_spelling(o) not in ours]
        only_ours = [o for o in sorted(_kept(overrides)) if same_spelling(o) not in theirs]
        raise Refused("resume", "auto", f"{run_dir} holds a run of other overrides ({' '.join(only_theirs) or 'none'} "
                      f"where this job has {' '.join(only_ours) or 'none'}); that run is left as it is: use another "
                      "hydra.sweep.dir / hydra.run.dir for this command")
    return summary if summary.status.finished and not continues_under(summary, cfg) else None


# ---------------------------------------------------------------- resume=auto: a job's run dir by its overrides
NUMBERED = "${hydra.job.num}"  # hydra.sweep.subdir as regexp sets it: a job's run dir is named by its number
RECORDS = ".hydra"  # hydra.output_subdir as regexp sets it


class Placement(NamedTuple):
    """resume=auto's plan of a sweep's run dirs: each job's run number and whether a run is
    there already (place_jobs), and what the console says of it (plan_lines)."""

    jobs: list[tuple[int, bool]]
    lines: list[str]


def resume_plan(sweep_dir: Path, cfg: DictConfig, jobs: list[list[str]]) -> Optional[Placement]:
    """For resume=auto over a sweep dir whose run dirs are numbered (the default subdir): the
    Placement of its jobs; None otherwise (a custom subdir names each job's dir itself, a search
    draws its jobs as it goes)."""
    from regexp.compose import expands_its_jobs

    if cfg.get("resume") != "auto" or not expands_its_jobs(cfg.hydra) or raw_subdir(cfg.hydra) != NUMBERED:
        return None
    runs = recorded_runs(sweep_dir)
    placed = place_jobs(jobs, runs)
    return Placement(placed, plan_lines(sweep_dir, placed, runs))


def recorded_runs(sweep_dir: Path) -> dict[int, Optional[list[str]]]:
    """The sweep dir's numbered run dirs (named as Hydra numbers jobs: `7`, not `007` or `-1`),
    each with its run's overrides as recorded: its summary.json's (as already_finished reads
    them), else Hydra's .hydra/overrides.yaml (a job that died before its summary). None for a
    dir whose record cannot be read (a line on stderr names it: no job goes there, it is left
    as it is) or that holds no record at all."""
    runs: dict[int, Optional[list[str]]] = {}
    for entry in sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else []:
        if entry.name.isascii() and entry.name.isdigit() and str(int(entry.name)) == entry.name:
            runs[int(entry.name)] = _recorded_overrides(entry)
    return runs


def _recorded_overrides(run_dir: Path) -> Optional[list[str]]:
    from regexp.rundir import SUMMARY, load_summary, read_overrides

    try:
        overrides = load_summary(run_dir).overrides if os.path.lexists(run_dir / SUMMARY) else read_overrides(run_dir)
    except RunError as e:
        print(f"regexp: {e}; resume=auto leaves {run_dir} as it is, no job of this sweep continues it", file=sys.stderr)
        return None
    return overrides if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides) else None


def place_jobs(jobs: list[list[str]], runs: dict[int, Optional[list[str]]]) -> list[tuple[int, bool]]:
    """Each job's run dir number, and whether it holds the job's run: the numbered run dir whose
    recorded overrides equal the job's (as _run_overrides compares them), whatever the job's
    position now; jobs of equal overrides take such dirs in number order. A job without one
    gets a new number past every numbered dir (a run of unreadable overrides too), so no two
    jobs share a dir and no run is written over."""
    waiting: dict[tuple[str, ...], list[int]] = {}
    for number in sorted(runs):
        if runs[number] is not None:
            waiting.setdefault(tuple(_run_overrides(runs[number])), []).append(number)
    following = max(runs, default=-1) + 1
    placed = []
    for job in jobs:
        same = waiting.get(tuple(_run_overrides(job)))
        if same:
            placed.append((same.pop(0), True))
        else:
            placed.append((following, False))
            following += 1
    return placed


def plan_overrides(plan: list[tuple[int, bool]], hydra_cfg: Any) -> list[str]:
    """The Hydra overrides that carry the plan to every launcher (each resolves a job's subdir
    from its number wherever it runs): a job's run dir by the plan, and Hydra's records
    (.hydra/) written only in a new run's dir: a continued or skipped run keeps the record of
    the job that started it, as a single run's resume keeps it. The plan as the resolvers read
    it: each job's dir number in job order, `+` before a new one (`0 1 2 +6 3 4 5 +7`)."""
    text = " ".join(f"{number}" if held else f"+{number}" for number, held in plan)  # quoted: `+6` stays text
    overrides = [f"hydra.sweep.subdir='${{regexp.planned_run:${{hydra.job.num}},\"{text}\"}}'"]
    if OmegaConf.to_container(hydra_cfg)["output_subdir"] == RECORDS:
        overrides.append(f"hydra.output_subdir='${{regexp.planned_records:${{hydra.job.num}},\"{text}\"}}'")
    return overrides


def planned_run(number: int, plan: str) -> str:
    """The resolver of a planned job's subdir: its run dir's number."""
    return plan.split()[int(number)].lstrip("+")


def planned_records(number: int, plan: str) -> Optional[str]:
    """The resolver of a planned job's hydra.output_subdir: none where a run is already."""
    return RECORDS if plan.split()[int(number)].startswith("+") else None


def register_plan_resolvers() -> None:
    """In each process that runs jobs (this one, a joblib or submitit worker)."""
    for name, resolver in (("regexp.planned_run", planned_run), ("regexp.planned_records", planned_records)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def plan_lines(sweep_dir: Path, plan: list[tuple[int, bool]], runs: dict[int, Optional[list[str]]]) -> list[str]:
    """What resume=auto's plan says: the jobs whose run dir is not their number, as `job->dir`,
    and the `runs` of the sweep dir that no job of this command continues (their overrides
    differ), which would otherwise go unnoticed while every job trains anew beside them."""
    lines = []
    moved = [f"{job}->{number}" for job, (number, _) in enumerate(plan) if number != job]
    if moved:
        lines.append(f"resume=auto: run dirs by overrides (job->dir): {' '.join(moved)}")
    taken = {number for number, held in plan if held}
    left = [n for n, overrides in runs.items() if overrides is not None and n not in taken]
    if left:
        lines.append(f"resume=auto: {plural(len(left), 'run')} in {sweep_dir} ({job_numbers(left, 'dir')}) "
                     f"{'match' if len(left) > 1 else 'matches'} no job of this command and "
                     f"{'are' if len(left) > 1 else 'is'} left as {'they are' if len(left) > 1 else 'it is'}: "
                     "a job continues only a run whose recorded overrides equal its own")
    return lines


def check_sweep_job(sweep_dir: Path, cfg: DictConfig, number: int, overrides: list[str],
                    job_dirs: dict[str, int], run_number: Optional[int] = None) -> Optional[Summary]:
    """The pre-flight of job `number` of a basic sweep, before Hydra writes anything in its run
    dir (the dir numbered `run_number` where resume=auto's plan puts it: resume_plan): refused
    when that dir is an earlier job's (`job_dirs`: real path -> job number, this job's added)
    or the sweep dir itself, when another process writes it now, and with resume=auto when it
    holds a run of other overrides (a subdir of the user's). A search draws its jobs as it goes:
    only a subdir that names neither the job nor its draws is refused here; each draw is
    checked as it comes (check_drawn_job_dir, the job's own lock, already_finished). Returns
    the summary of its run when an earlier invocation finished it (resume=auto skips the job)."""
    from regexp.compose import expands_its_jobs
    from regexp.lock import check_free

    if not expands_its_jobs(cfg.hydra):
        check_search_subdir(sweep_dir, cfg)
        return None
    run_dir = job_dir(sweep_dir, cfg, number if run_number is None else run_number)
    if os.path.realpath(run_dir) == os.path.realpath(sweep_dir):
        raise ConfigError(SUBDIR, raw_subdir(cfg.hydra), f"job {number}'s run dir would be the sweep dir {run_dir} "
                                                         f"itself; {DIFFER}")
    first = job_dirs.setdefault(os.path.realpath(run_dir), number)
    if first != number:
        raise ConfigError(SUBDIR, raw_subdir(cfg.hydra), f"jobs {first} and {number} would both write {run_dir}; "
                                                         f"{DIFFER}")
    if cfg.prune.name != "none" and os.path.realpath(run_dir.parent) != os.path.realpath(sweep_dir):
        raise ConfigError(SUBDIR, raw_subdir(cfg.hydra), f"prune={cfg.prune.name} meets a job's peers in the sweep "
                                                         f"dir's own subfolders, and job {number}'s run dir {run_dir} "
                                                         "lies deeper: use a subdir without '/' (the default "
                                                         "${hydra.job.num})")
    check_free(run_dir, "hydra.sweep.dir", str(sweep_dir))
    return already_finished(run_dir, overrides, cfg) if cfg.get("resume") == "auto" else None


def check_search_subdir(sweep_dir: Path, cfg: DictConfig) -> None:
    """A search of several trials whose subdir names neither the job (its number) nor what it
    draws (override_dirname, a searched key) would write every trial into one dir."""
    subdir = raw_subdir(cfg.hydra)
    drawn = [str(key).lstrip("+~") for key in (cfg.hydra.sweeper.get("params") or {})]
    if cfg.hydra.sweeper.get("n_trials", 2) < 2 or "override_dirname" in subdir or any(k in subdir for k in drawn):
        return
    run_dir = job_dir(sweep_dir, cfg, 0)
    if run_dir == job_dir(sweep_dir, cfg, 1):
        raise ConfigError(SUBDIR, subdir, f"every trial of this search would write {run_dir}; {DIFFER}")


def check_drawn_job_dir(hydra_cfg: Any) -> None:
    """A search's draw, which the pre-flight did not see: Refused, before it writes its own
    records, when an earlier job of this invocation has the same run dir."""
    run_dir, number = os.path.realpath(hydra_cfg.runtime.output_dir), int(hydra_cfg.job.num)
    _, records = read_records(Path(hydra_cfg.sweep.dir))
    earlier = [r["job"] for r in records if int(r["job"]) < number and os.path.realpath(r["run_dir"]) == run_dir]
    if earlier:
        raise Refused(SUBDIR, raw_subdir(hydra_cfg), f"job {number}'s run dir {run_dir} is job {earlier[0]}'s too: "
                                                     f"not trained there; {DIFFER}")


def raw_subdir(hydra_cfg: Any) -> str:
    """hydra.sweep.subdir as written, ${...} unresolved."""
    return str(OmegaConf.to_container(hydra_cfg.sweep)["subdir"])


def job_dir(sweep_dir: Path, cfg: DictConfig, number: int) -> Path:
    """Job `number`'s run dir as Hydra's launchers name it: the sweep dir joined with
    hydra.sweep.subdir, resolved with the job's number."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.job.num = number
    return Path(os.path.abspath(os.path.join(str(sweep_dir), str(cfg.hydra.sweep.subdir))))


# The settings that end a run before its plan's end: resume=auto with another of them continues
# such a run (prune=none a pruned one, monitor.on_finding=warn a stopped one), so they do not
# make a run what it is
ENDING_SETTINGS = ("prune", "monitor.on_finding")


def _run_overrides(overrides: list[str]) -> list[str]:
    """What makes a run what it is: the overrides but resume=, Hydra's own (dirs, launcher)
    and the ENDING_SETTINGS, in any order, each as one spelling (same_spelling)."""
    return sorted(same_spelling(o) for o in _kept(overrides))


def _kept(overrides: list[str]) -> list[str]:
    """The overrides _run_overrides compares, as typed."""
    def ends_runs(key: str) -> bool:
        return key in ENDING_SETTINGS or key.startswith(tuple(k + "." for k in ENDING_SETTINGS))

    return [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.", "hydra/"))
            and not ends_runs(o.lstrip("+~").split("=", 1)[0])]


@functools.lru_cache(maxsize=4096)  # a sweep's jobs and runs repeat the same few overrides
def same_spelling(override: str) -> str:
    """An override with its value as Hydra's parser reads it, numbers by their value: so
    optimizer.lr=1e-3 is optimizer.lr=0.001 and seed=1.0 is seed=1, as compare puts such runs
    in one group (by their config's value); `+group=x` is `group=x`. Text stays as typed
    (quotes aside); what Hydra cannot parse is kept whole."""
    import json

    from hydra.errors import OverrideParseException

    try:
        value = _parser().parse_override(override).value()
    except OverrideParseException:
        return override
    return f"{override.partition('=')[0].lstrip('+')}={json.dumps(_by_value(value), sort_keys=True, default=str)}"


def _by_value(value: Any) -> Any:
    """A parsed value with each whole float as its int (1.0 -> 1), in lists and dicts too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_by_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _by_value(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


# ---------------------------------------------------------------- parallel jobs
def is_joblib(hydra_cfg: Any) -> bool:
    return "joblib" in launcher_target(hydra_cfg).lower()


def check_parallel_launcher(hydra_cfg: Any) -> None:
    """The pre-flight of joblib's n_jobs, which its schema already types as an integer: not 0
    (joblib's own error was a traceback after Hydra wrote multirun.yaml)."""
    if not is_joblib(hydra_cfg):
        return
    value = hydra_cfg.launcher.get("n_jobs")
    if value == 0:
        raise ConfigError("hydra.launcher.n_jobs", value,
                          "must be a non-zero integer: jobs at once (-1: one per core, -2: all cores but one)")


def share_machine(hydra_cfg: Any) -> None:
    """Parallel jobs on one machine (joblib): each gets its own GPU by job number, or on
    CPU an equal share of the cores."""
    if not is_joblib(hydra_cfg):
        return
    import torch

    n_jobs = hydra_cfg.launcher.get("n_jobs") or 1
    parallel = os.cpu_count() if n_jobs < 0 else n_jobs
    if torch.cuda.is_available():
        torch.cuda.set_device(hydra_cfg.job.num % torch.cuda.device_count())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, parallel)))
