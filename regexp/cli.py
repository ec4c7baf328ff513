"""`regexp` command line: dispatch on the sub-command, hand the rest to Hydra.

Exit codes: 0 the run(s) finished, whatever their status; 1 a crash; 2 bad input.
Nothing heavy is imported at module level: `regexp --help` must stay instant.
"""

import math
import re
import sys
import warnings
from typing import Optional

USAGE = """\
usage: regexp <command> [args]

regexp trains small vision models under any mix of initialization, normalization,
regularization, optimizer, schedule, clipping and accumulation, and records what happens.

commands:
  train [OVERRIDES...]      one run, e.g.  regexp train +regularizer=dropout optimizer=adam
  train -m [OVERRIDES...]   a sweep, e.g.  regexp train -m optimizer=adam,adamw seed=0,1,2
  train --cfg job           print the composed config and exit
  train --help              config groups, options and Hydra's flags
  diagnose RUN_DIR          what went wrong in a run and what to try, from its metrics
  compare PATH... [--metric test/acc] [--by KEY] [--plot out.png] [--json]
                            runs and sweeps side by side: groups by the swept keys, mean ± std over seeds

config groups (pick with group=option, set values with group.key=value):
  dataset       mnist fashion_mnist cifar10
  model         mlp deep_mlp cnn resnet
  init          default xavier_uniform xavier_normal kaiming_uniform kaiming_normal orthogonal normal
  norm          none batchnorm layernorm
  +regularizer  dropout l1 l2 elastic_net max_norm augment label_smoothing early_stopping
                (added with '+': +regularizer=dropout or +regularizer=[dropout,l2])
  optimizer     sgd momentum nesterov adam adamw
  scheduler     none step cosine warmup_cosine onecycle
  clip          none norm value
  accumulation  none steps
  device        auto cpu cuda
  monitor       default full off
  +experiment   presets reproducing classic results, e.g. regexp train -m +experiment=dropout_mnist
  hydra/launcher  joblib submitit_local submitit_slurm   (parallel or cluster sweeps)
  hydra/sweeper   tune   (Optuna search over lr, weight decay, dropout)
  logger        wandb none     (logger.mode=auto|online|offline|disabled)

Results go to outputs/<date>/<time>/ (metrics.jsonl, summary.json, checkpoints, train.log).
Exit codes: 0 finished (completed, early_stopped or diverged), 1 crashed, 2 bad input.
"""

# The launcher presets share the plugins' names on purpose (hydra/launcher=joblib); Hydra
# then warns on every run, also in each worker (they import this module to unpickle the task).
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema", category=UserWarning)

# Hydra flags that only print something: they get no pre-check.
INFO_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "--shell-completion", "-sc", "--version"}


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    print(f"regexp: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "--version":
        from regexp import __version__

        print(f"regexp {__version__}")
        return 0
    if command == "train":
        return train_command(rest)
    if command in ("compare", "diagnose"):
        return reader_command(command, rest)
    fail(f"unknown command {command!r}; commands: train, compare, diagnose (see regexp --help)")
    return 2


def reader_command(command: str, args: list[str]) -> int:
    """`regexp compare` / `regexp diagnose`, which read run dirs: bad input is one line and
    exit 2, an unreadable or unwritable file one line and exit 1; when the reader of a pipe
    leaves early (`| head`) the command ends quietly with 141, as SIGPIPE ends other tools."""
    import os

    from regexp.rundir import ConfigError, RunError, UsageError

    try:
        if command == "compare":
            from regexp.compare import main as command_main
        else:
            from regexp.diagnose import main as command_main
        code = command_main(args)
        sys.stdout.flush()  # a closed pipe is found here, not at exit
        return code
    except (UsageError, ConfigError) as e:
        fail(str(e))
    except RunError as e:
        print(f"regexp: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit cannot fail again
        return 141
    return 2


def train_command(args: list[str]) -> int:
    from regexp.config import ConfigError

    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        if not multirun:
            args = with_resumed_run(args)
        if not INFO_FLAGS.intersection(args):
            precheck([a for a in args if is_override(a)], multirun)
    except ConfigError as e:
        fail(str(e))
    import hydra

    from regexp.config import config_dir
    from regexp.train import Interrupted

    hydra_main = hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")(hydra_task)
    sys.argv = ["regexp train", *args]
    from regexp.sweep import SweepFailed

    try:
        hydra_main()
    except SweepFailed:  # the sweep's table has named each failed job
        return 1
    except Interrupted as e:
        print(f"regexp: interrupted by signal {e.signum}; checkpoint saved, continue with resume=<run dir>", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    return 0


def with_resumed_run(args: list[str]) -> list[str]:
    """`resume=RUN_DIR`: the run's own overrides, then the user's, into the same run dir."""
    from pathlib import Path

    from regexp.config import ConfigError
    from regexp.rundir import read_overrides

    value = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    if value in (None, "null", "auto"):
        return args
    run_dir = Path(value)
    recorded = read_overrides(run_dir)
    if not (run_dir / "checkpoint.pt").is_file() or recorded is None:
        raise ConfigError("resume", value, "must be a run directory holding checkpoint.pt and .hydra/overrides.yaml")
    saved = [o for o in recorded if not o.startswith(("resume=", "hydra.run.dir="))]
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if is_override(a)}
    kept = [o for o in saved if o.split("=", 1)[0].lstrip("+~") not in keys]  # the user's value wins
    return [*kept, *args, f"hydra.run.dir={run_dir.resolve()}"]


def is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def hydra_task(cfg) -> float:
    """The job Hydra runs (once per sweep job): checks, then train(). Returns the sweep
    objective (val/acc; NaN when there is none). In a sweep a failing job is recorded in
    its run dir and the sweep goes on; alone, bad input exits 2 and a bad file 1."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from regexp.config import ConfigError, RunError
    from regexp.sweep import already_finished, record_failure, share_machine
    from regexp.train import prepare, train

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    share_machine(hydra_cfg)
    try:
        finished = already_finished(run_dir, list(hydra_cfg.overrides.task)) if cfg.get("resume") == "auto" else None
        if finished is not None:
            print(f"{run_dir}: already {finished.status}, skipped (resume=auto)")
            return finished.objective()
        typed = prepare(cfg)
        # W&B: the run is named by its overrides (empty: the run dir's name); a sweep's jobs share its dir as group
        summary = train(typed, run_dir, choices=dict(hydra_cfg.runtime.choices), overrides=list(hydra_cfg.overrides.task),
                        composed=cfg, name=hydra_cfg.job.override_dirname, group=hydra_cfg.sweep.dir if multirun else None)
    except Exception as e:
        if multirun:
            record_failure(run_dir, e, list(hydra_cfg.overrides.task))
            return math.nan
        if isinstance(e, ConfigError):
            fail(str(e))
        if isinstance(e, RunError):  # a bad file: one line, not a traceback (summary.json has the details)
            print(f"regexp: error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
    return summary.objective()


def precheck(overrides: list[str], multirun: bool) -> None:
    """Compose and validate every job's config before Hydra starts any, so bad input fails
    fast with one line (Hydra's own errors are several lines and exit 1)."""
    from hydra import compose, initialize_config_dir

    from regexp.config import check_writable, config_dir, resolve_device, validate
    from regexp.train import prepare

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        for job in sweep_jobs(compose, overrides) if multirun else [overrides]:
            cfg = compose_or_explain(compose, job)
            out_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            if not any(o.startswith(out_key + "=") for o in job):
                out_key = "out_dir"
            out_dir = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
            shown = cfg.out_dir if out_key == "out_dir" else out_dir
            if multirun:  # data problems fail a job, not the whole sweep
                resolve_device(validate(cfg))
            else:
                prepare(cfg)
            check_writable(out_dir, out_key, shown)


def sweep_jobs(compose, overrides: list[str]) -> list[list[str]]:
    """The override list of each job of a basic-sweeper multirun: the command line's sweeps
    and the config's own (`hydra.sweeper.params`, as experiment presets carry). A search
    sweeper (Optuna) draws its jobs as it goes: then only the fixed part is checked here."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from regexp.config import ConfigError

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:  # a syntax error
        raise ConfigError("overrides", " ".join(overrides), first_line(e)) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose_or_explain(compose, fixed)
    if not str(base.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return [fixed]
    from_config = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
    try:
        combined = parser.parse_overrides(from_config) + parsed
        return [job for batch in BasicSweeper.split_arguments(combined, None) for job in batch]
    except Exception as e:  # e.g. interval() or tag() sweeps, which only a search sweeper expands
        raise ConfigError("overrides", " ".join(overrides), first_line(e)) from None


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def compose_or_explain(compose, overrides: list[str]):
    """Hydra's compose, with its errors turned into one ConfigError line."""
    from hydra.errors import HydraException, MissingConfigException

    from regexp.config import ConfigError

    try:
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        group, _, option = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            key = next((o.split("=")[0] for o in overrides if o.lstrip("+~").split("=")[0] == group), group)
            raise ConfigError(key, option, "unknown option; choose one of " + ", ".join(sorted(e.options))) from None
        raise ConfigError("config", e.missing_cfg_file, first_line(e)) from None
    except HydraException as e:
        message = first_line(e)
        ambiguous = re.match(r"Ambiguous value for argument '([^=']+)=([^']*)'", message)
        if ambiguous:
            raise ConfigError(ambiguous.group(1), ambiguous.group(2), "several values make a sweep: add -m (regexp train -m ...)") from None
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown:
            key = unknown.group(1)
            value = next((o.split("=", 1)[1] for o in overrides if o.split("=")[0] == key), "?")
            raise ConfigError(key, value, "unknown key (see `regexp train --cfg job` for the keys of this config)") from None
        raise ConfigError("overrides", " ".join(overrides), message) from None


if __name__ == "__main__":
    sys.exit(main())
