"""Sweeps that survive failure: the end-of-sweep summary (a Hydra callback), skipping
finished jobs on `resume=auto`, and per-job resources for parallel launchers.

The summary is built from the jobs' own run dirs, so it is the same whichever launcher
ran them (in this process, in joblib workers, or on a cluster)."""

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from regexp.tracking import read_override_list, read_summary

# Set at the end of each multirun in this process: the CLI exits 1 when a job failed.
LAST_SWEEP: dict[str, Any] = {}

FINISHED = ("completed", "early_stopped", "diverged")  # a divergence is a result, not a failure
METRIC = "test/acc"


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir (those with .hydra/overrides.yaml), in job-number order."""
    rows = []
    job_dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    for job_dir in sorted(job_dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        summary = read_summary(job_dir) or {}
        overrides = read_override_list(job_dir) or []
        status = summary.get("status", "failed")  # no summary at all: it died before starting
        if status in ("running",):
            status = "failed"  # the process ended without finishing the run
        rows.append({
            "job": job_dir.name, "overrides": overrides, "status": status,
            METRIC: summary.get("metrics", {}).get(METRIC), "wall_time_s": summary.get("wall_time_s"),
            "error": summary.get("error"), "run_dir": str(job_dir),
        })
    return rows


class SweepSummary(Callback):
    """At the end of a multirun: a table on the console and sweep_summary.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rich.console import Console
        from rich.table import Table

        from regexp.tracking import write_json

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_rows(sweep_dir)
        failed = [r for r in rows if r["status"] not in FINISHED]
        summary = {"sweep_dir": str(sweep_dir), "jobs": len(rows), "failed": len(failed), "metric": METRIC, "rows": rows}
        write_json(sweep_dir / "sweep_summary.json", summary)
        LAST_SWEEP.clear()
        LAST_SWEEP.update(summary)

        shared = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
        table = Table(title=f"sweep {sweep_dir}: {len(rows)} jobs, {len(failed)} failed", title_justify="left",
                      caption=f"all jobs: {' '.join(o for o in rows[0]['overrides'] if o in shared)}" if shared else None,
                      caption_justify="left")
        for column in ("job", "overrides", "status", METRIC, "wall s"):
            table.add_column(column, overflow="fold")
        for r in rows:
            style = "red" if r["status"] not in FINISHED else "yellow" if r["status"] == "diverged" else ""
            metric = f"{r[METRIC]:.4f}" if isinstance(r[METRIC], float) else "-"
            wall = f"{r['wall_time_s']:.1f}" if isinstance(r["wall_time_s"], (int, float)) else "-"
            table.add_row(r["job"], " ".join(o for o in r["overrides"] if o not in shared), r["status"], metric, wall, style=style)
        console = Console(soft_wrap=False)
        console.print(table)
        for r in failed:
            console.print(f"job {r['job']} failed: {r['error'] or 'no summary.json: it died before starting'}", style="red", markup=False)


def record_failure(run_dir: Path, error: BaseException, overrides: list[str]) -> None:
    """A failed job's summary.json, unless train() already wrote one (it does, once started)."""
    import traceback

    from regexp.tracking import write_json

    summary = read_summary(run_dir)
    if summary is None or summary.get("status") == "running":
        summary = {**(summary or {}), "status": "failed", "run_dir": str(run_dir), "overrides": overrides,
                   "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        write_json(Path(run_dir) / "summary.json", summary)
    print(f"regexp: job {run_dir} failed: {summary.get('error')}", file=sys.stderr)


def already_finished(run_dir: Path, overrides: list[str]) -> Optional[dict[str, Any]]:
    """For resume=auto: the summary of this job's run if an earlier invocation finished it.
    ConfigError when the run dir holds a run of other overrides (another command into the
    same sweep dir): continuing it would mix two experiments."""
    from regexp.config import ConfigError

    summary = read_summary(run_dir)
    if summary is None:
        return None
    if _without_resume(summary.get("overrides", [])) != _without_resume(overrides):
        raise ConfigError("resume", "auto", f"{run_dir} holds a run of other overrides ({' '.join(summary.get('overrides', []))}); "
                          "use another hydra.sweep.dir / hydra.run.dir")
    return summary if summary.get("status") in FINISHED else None


def _without_resume(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.startswith("resume="))


def objective(summary: Optional[dict[str, Any]]) -> float:
    """What a sweeper optimizes: val/acc; NaN when the job has none (failed, diverged)."""
    value = (summary or {}).get("metrics", {}).get("val/acc")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


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
