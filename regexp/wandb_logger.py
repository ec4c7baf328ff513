"""The Weights & Biases sink (docs/wandb.md): one W&B run per job, in the job's run dir.

`import wandb` happens only in here and only for a job that logs to W&B, so `regexp
--help`, `logger=none` and disabled W&B never pay for it. Nothing here prompts: without
credentials a run is logged offline, and one line says where and how to upload it (`wandb sync`).
"""

import io
import netrc
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import urlsplit

from omegaconf import DictConfig

from regexp.config import GROUP_SCHEMAS, REGULARIZERS
from regexp.live import FINDING_RULE
from regexp.rundir import Summary, split_finite

if TYPE_CHECKING:
    from regexp.tracking import Reporter

# An unreachable server costs at most this long before the run is logged offline instead.
ONLINE_INIT_TIMEOUT_S = 5
# summary.json keys that the W&B config already holds; the rest goes to the W&B summary.
IN_CONFIG = ("config", "choices", "overrides")


@dataclass
class WandbServer:
    """What the jobs of one process learned about the W&B server: once an online start
    failed, the later jobs of a one-process multirun log offline at once (the timeout is
    paid once). The caller that runs the jobs holds one and passes it to each job."""

    unreachable: bool = False


def wandb_sinks(cfg: DictConfig, config: dict[str, Any], run_dir: Path, name: str, group: str,
                reporter: "Reporter", run_id: Optional[str] = None,
                server: Optional[WandbServer] = None, concurrent: bool = False) -> list["WandbRun"]:
    """[the job's W&B run], or [] with logger=none or W&B disabled. `config` is the config
    as recorded (config.recorded_container); the chosen options are added to it as
    `choices/<group>` (regularizers, added with `+`, joined by commas, or none) and become
    the run's tags, with `smoke` for a smoke run. A resumed run
    passes its earlier `run_id`, so W&B continues that run instead of starting another.
    `server`: shared by the jobs of one process (default: this job knows nothing yet).
    `concurrent`: the runs of a fused group are open at the same time, one each. `reporter`
    prints the warnings and the line that says where an offline run is."""
    if cfg.logger.name == "none":
        return []
    # wandb's own console lines (login, sync hints) would break into regexp's; WANDB_SILENT=false shows them
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = choose_mode(cfg.logger.mode, reporter.warn)
    if mode == "disabled":
        return []
    regularizers = [r for r in REGULARIZERS if cfg.regularizer[r] is not None]
    choices = {g: cfg[g].name for g in GROUP_SCHEMAS}
    choices["regularizer"] = ",".join(regularizers) or "none"
    tags = [f"{g}={o}" for g, o in choices.items() if g not in ("logger", "regularizer")]
    tags += [f"+regularizer={r}" for r in regularizers] + list(cfg.logger.tags)
    if cfg.smoke:  # W&B's filters find smoke runs apart from the real ones
        tags.append("smoke")
    init_args = dict(
        project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), name=name, group=group, tags=tags,
        config={**config, **{f"choices/{g}": o for g, o in choices.items()}},
    )
    if os.environ.get("WANDB_SWEEP_ID"):  # started by `wandb agent`: its run (WANDB_RUN_ID) lives in the sweep's project
        init_args.update(project=os.environ.get("WANDB_PROJECT") or cfg.logger.project,
                         entity=os.environ.get("WANDB_ENTITY") or cfg.logger.entity)
    if run_id is not None:
        init_args.update(id=run_id, resume="allow")
    run = init_run(mode, init_args, run_dir, reporter.warn, server or WandbServer(), concurrent)
    if run.offline:
        reporter.line(offline_line(run.settings.sync_dir))
    return [WandbRun(run, run_dir, reporter.warn)]


def offline_line(sync_dir: str) -> str:
    """Where an offline W&B run is, and the command that uploads it."""
    return f"W&B logged offline to {sync_dir}; upload it with: wandb sync {sync_dir}"


def choose_mode(requested: str, warn: Callable[[str], None]) -> str:
    """logger.mode → online, offline or disabled. `auto` follows WANDB_MODE=offline|disabled
    and otherwise goes online only with credentials; online without them would prompt for
    a key, so it logs offline instead."""
    if requested == "auto":
        if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            return os.environ["WANDB_MODE"]
        return "online" if has_credentials() else "offline"
    if requested == "online" and not has_credentials():
        warn("logger.mode=online but no W&B credentials (`wandb login` or WANDB_API_KEY): logging offline")
        return "offline"
    return requested


def has_credentials() -> bool:
    """An API key in the environment or in wandb's settings, or a netrc entry for the W&B
    host. Only presence is checked; no key is read into anything that is logged."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    settings = wandb.setup().settings
    if settings.api_key:
        return True
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    # the configured host, and wandb.ai, which newer wandb versions reach through another host name
    return bool({urlsplit(settings.base_url).hostname, "api.wandb.ai"} & hosts.keys())


def init_run(mode: str, init_args: dict[str, Any], run_dir: Path, warn: Callable[[str], None], server: WandbServer,
             concurrent: bool = False) -> Any:
    """wandb.init without console capture, code or git state. Online falls back to offline
    (with a warning) when the server cannot be reached in time, and `server` remembers it,
    so the later jobs that share it go offline at once."""
    import wandb

    # reinit: each job gets a run of its own, even if an earlier job's run were still open; the
    # runs of a fused group stay open side by side
    settings = dict(console="off", save_code=False, disable_git=True, reinit="create_new" if concurrent else "finish_previous")
    if mode == "online" and server.unreachable:
        warn("W&B could not go online earlier in this process; logging offline")
    elif mode == "online":
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=ONLINE_INIT_TIMEOUT_S, **settings), **init_args)
        except Exception as e:  # unreachable, timed out, key rejected: the run goes on offline
            server.unreachable = True
            warn(f"W&B could not go online ({reason_of(e)}); logging offline")
            for aborted in (run_dir / "wandb").glob("run-*"):  # the failed attempt: `wandb sync` would upload it as an empty run
                shutil.rmtree(aborted, ignore_errors=True)
    return wandb.init(mode="offline", settings=wandb.Settings(**settings), **init_args)


def reason_of(error: Exception) -> str:
    """An exception's first line, or its type's name when it says nothing."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without NaN/Inf, which are named under `nonfinite` instead (as in metrics.jsonl)."""
    clean, bad = split_finite(values)
    if bad:
        clean["nonfinite"] = bad
    return clean


class WandbRun:
    """A Tracker sink: records (and monitor=full's histograms) go to the run's history, all
    plotted against `step`, the per-epoch validation metrics against `epoch`; the final
    summary goes to its summary. Given the run dir, the run's health figure goes to the
    history as an image (`health`) when the run ends, after metrics.jsonl is complete."""

    def __init__(self, run: Any, run_dir: Optional[Path] = None, warn: Optional[Callable[[str], None]] = None):
        self.run = run
        self.run_dir = run_dir
        self.warn = warn or (lambda text: None)
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        run.define_metric("val/*", step_metric="epoch")
        run.define_metric("epoch/*", step_metric="epoch")

    def write(self, record: dict[str, Any]) -> None:
        if FINDING_RULE in record:  # an event, not a series to plot
            self.note_finding(record)
            return
        self.run.log(_finite(record))

    def note_finding(self, event: dict[str, Any]) -> None:
        """A live finding: `finding/<rule>` = its step in the run's summary, and an alert (Slack,
        e-mail, as the user set W&B up) when the run is online; an offline run has no one to tell."""
        self.run.summary[f"finding/{event[FINDING_RULE]}"] = event["step"]
        if not self.run.offline:
            import wandb

            self.run.alert(title=event["finding/title"], text=f"step {event['step']}: {event['finding/message']}",
                           level=wandb.AlertLevel.WARN)

    def write_histograms(self, step: int, histograms: dict[str, dict[str, list]]) -> None:
        import wandb

        self.run.log({"step": step, **{name: wandb.Histogram(np_histogram=(h["counts"], h["bins"]))
                                       for name, h in histograms.items()}})

    @property
    def run_id(self) -> str:
        return self.run.id

    def summary(self, summary: Summary) -> None:
        """Final metrics, status, timings and (when present) diagnosis findings."""
        rest = {k: v for k, v in summary.to_dict().items() if k not in IN_CONFIG and k != "metrics"}
        self.run.summary.update(_finite({**summary.metrics, **rest}))

    def close(self, exit_code: int = 0) -> None:
        """The Tracker closes metrics.jsonl before this sink: the figure sees every record."""
        try:
            if self.run_dir is not None:
                self.log_health()
        finally:
            self.run.finish(exit_code=exit_code)

    def log_health(self) -> None:
        """The health figure (docs/plots.md) as an image; one that cannot be drawn is a warning,
        never the run's end. A run that recorded no metrics has nothing to show."""
        try:
            import wandb
            from PIL import Image

            from regexp.plotting import figure_of, png_bytes, read_health

            health = read_health(self.run_dir)
            if not health.empty:
                image = Image.open(io.BytesIO(png_bytes(figure_of(health))))
                self.run.log({"health": wandb.Image(image, caption=self.run_dir.name)})
        except Exception as e:  # whatever the records hold, the run has ended as it ended
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.warn(f"W&B: the health figure was not logged ({type(e).__name__}{': ' + reason if reason else ''})")


SWEEP_TABLE_JOB_TYPE = "sweep-summary"


def log_sweep_table(cfg: DictConfig, run_dirs: list[Path], metric: str, say: Callable[[str], None]) -> None:
    """At the end of a sweep that logs to W&B: its compare table (groups by the swept keys, mean,
    std and 95 % interval of `metric`, as `regexp compare --csv` prints it) as a wandb.Table
    named `compare`, in one more W&B run of the sweep's group, with job type sweep-summary.
    `say` prints a line. Never fails the sweep: a W&B error (or any other) is one warning."""
    def warn(text: str) -> None:
        say(f"warning: {text}")

    try:
        if cfg.logger.name == "none" or not run_dirs:
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # as for the jobs' runs
        mode = choose_mode(cfg.logger.mode, warn)
        if mode == "disabled":
            return
        import wandb

        from regexp.comparison import comparison, group_rows

        result = comparison(run_dirs, None, metric)
        columns, rows = group_rows(result, metric)
        sweep_dir = Path(cfg.hydra.sweep.dir)
        init_args = dict(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(sweep_dir),
                         name=SWEEP_TABLE_JOB_TYPE, group=str(cfg.hydra.sweep.dir), job_type=SWEEP_TABLE_JOB_TYPE,
                         tags=list(cfg.logger.tags),
                         config={"metric": metric, "keys": result.keys, "runs": len(run_dirs)})
        run = init_run(mode, init_args, sweep_dir, warn, WandbServer())
        try:
            run.log({"compare": wandb.Table(columns=columns, data=rows)})
        finally:
            run.finish()
        if run.offline:
            say(f"the sweep's compare table: {offline_line(run.settings.sync_dir)}")
    except Exception as e:  # the sweep's runs are done and recorded: a dashboard extra must not fail it
        warn(f"W&B: the sweep's compare table was not logged ({reason_of(e)})")
