"""Sweeps that survive failure: the end-of-sweep summary (a Hydra callback), skipping
finished jobs on `resume=auto`, and per-job resources for parallel launchers.

The summary is built from the jobs' own run dirs, so it is the same whichever launcher
ran them (in this process, in joblib workers, or on a cluster). A failed job ends the
sweep with SweepFailed, which the CLI turns into exit code 1."""

import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from regexp.rundir import (ConfigError, RunError, Status, Summary, read_overrides, read_summary, write_json,
                           write_summary)
from regexp.tracking import plural

METRIC = "test/acc"
SWEEP_SUMMARY = "sweep_summary.json"


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir (those with .hydra/overrides.yaml), in job-number order."""
    job_dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    by_number = sorted(job_dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    return [job_row(job_dir) for job_dir in by_number]


def job_row(job_dir: Path) -> dict[str, Any]:
    try:
        overrides = read_overrides(job_dir) or []
    except RunError as e:
        overrides = [f"({e})"]
    summary = read_summary(job_dir)
    if summary is None:  # no (readable) summary at all: it died before starting
        summary = Summary(status=Status.FAILED, error=f"no readable summary.json in {job_dir}: it died before starting")
    status = Status.FAILED if summary.status is Status.RUNNING else summary.status  # the process ended mid-run
    return {"job": job_dir.name, "overrides": overrides, "status": status.value, METRIC: summary.metrics.get(METRIC),
            "wall_time_s": summary.wall_time_s, "error": summary.error, "run_dir": str(job_dir)}


class SweepSummary(Callback):
    """At the end of a multirun: a table on the console and sweep_summary.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_rows(sweep_dir)
        failed = [r for r in rows if not Status(r["status"]).finished]
        write_json(sweep_dir / SWEEP_SUMMARY,
                   {"sweep_dir": str(sweep_dir), "jobs": len(rows), "failed": len(failed), "metric": METRIC, "rows": rows})
        print_sweep_table(sweep_dir, rows, failed)
        if failed:
            raise SweepFailed(len(failed), len(rows))


def print_sweep_table(sweep_dir: Path, rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    table = Table(title=f"sweep {sweep_dir}: {plural(len(rows), 'job')}, {len(failed)} failed", title_justify="left",
                  caption=f"all jobs: {' '.join(o for o in rows[0]['overrides'] if o in shared)}" if shared else None,
                  caption_justify="left")
    for column in ("job", "overrides", "status", METRIC, "wall s"):
        table.add_column(column, overflow="fold")
    for r in rows:
        style = "red" if r in failed else "yellow" if r["status"] == Status.DIVERGED else ""
        metric = f"{r[METRIC]:.4f}" if isinstance(r[METRIC], float) else "-"
        wall = f"{r['wall_time_s']:.1f}" if isinstance(r["wall_time_s"], (int, float)) else "-"
        table.add_row(r["job"], " ".join(o for o in r["overrides"] if o not in shared), r["status"], metric, wall, style=style)
    console = Console(soft_wrap=False)
    console.print(table)
    for r in failed:
        console.print(f"job {r['job']} failed: {r['error']}", style="red", markup=False)


class SweepFailed(BaseException):
    """Raised at the end of a sweep in which a job did not finish (after the table and
    sweep_summary.json name each one): the CLI catches it and exits 1. A BaseException,
    because Hydra turns an Exception raised by a callback into a warning."""

    def __init__(self, failed: int, jobs: int):
        self.failed, self.jobs = failed, jobs
        super().__init__(f"{failed} of {plural(jobs, 'job')} failed")


def record_failure(run_dir: Path, error: BaseException, overrides: list[str]) -> None:
    """A failed job's summary.json, unless train() already wrote one (it does, once started)."""
    import traceback

    summary = read_summary(run_dir)
    if summary is None or summary.status is Status.RUNNING:
        summary = summary or Summary()
        summary.status, summary.run_dir, summary.overrides = Status.FAILED, str(run_dir), overrides
        summary.error, summary.traceback = f"{type(error).__name__}: {error}", traceback.format_exc()
        write_summary(run_dir, summary)
    print(f"regexp: job {run_dir} failed: {summary.error}", file=sys.stderr)


def already_finished(run_dir: Path, overrides: list[str]) -> Optional[Summary]:
    """For resume=auto: the summary of this job's run if an earlier invocation finished it.
    ConfigError when the run dir holds a run of other overrides (another command into the
    same sweep dir): continuing it would mix two experiments."""
    summary = read_summary(run_dir)
    if summary is None:
        return None
    if _without_resume(summary.overrides) != _without_resume(overrides):
        raise ConfigError("resume", "auto", f"{run_dir} holds a run of other overrides ({' '.join(summary.overrides)}); "
                          "use another hydra.sweep.dir / hydra.run.dir")
    return summary if summary.status.finished else None


def _without_resume(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.startswith("resume="))


def share_machine(hydra_cfg: Any) -> None:
    """Parallel jobs on one machine (joblib): each gets its own GPU by job number, or on
    CPU an equal share of the cores."""
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if "joblib" not in launcher.lower():
        return
    import torch

    n_jobs = hydra_cfg.launcher.get("n_jobs") or 1
    parallel = os.cpu_count() if n_jobs < 0 else n_jobs
    if torch.cuda.is_available():
        torch.cuda.set_device(hydra_cfg.job.num % torch.cuda.device_count())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, parallel)))
