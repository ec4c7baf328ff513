"""`regexp` command line: dispatch on the sub-command, hand the rest to Hydra.

Exit codes: 0 the run(s) finished, whatever their status; 1 a crash; 2 bad input; 3 a check of
`regexp check` failed.
Nothing heavy is imported at module level: `regexp --help` must stay instant.
"""

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

USAGE = """\
usage: regexp <command> [args]

regexp trains small vision models under any mix of initialization, normalization,
regularization, optimizer, schedule, clipping and accumulation, and records what happens.

commands:
  train [OVERRIDES...]      one run, e.g.  regexp train +regularizer=dropout optimizer=adam
  train -m [OVERRIDES...]   a sweep, e.g.  regexp train -m optimizer=adam,adamw seed=0,1,2
  train --cfg job           print the composed config and exit (--resolve: with ${...} resolved)
  train --help              how to write overrides, the config groups and the flags
  diagnose RUN_DIR          what went wrong in a run and what to try, from its metrics
  compare PATH... [--metric test/acc] [--by KEY] [--plot out.png] [--json]
                            runs and sweeps side by side: groups by the swept keys, mean ± std over seeds
  plot RUN [--out FILE.png] the training-health figure of a run (or: plot PATH... --by KEY, one column a group)
  report PATH... --out report.html [--by KEY] [--baseline GROUP]
                            the comparison, curves and health figures as one HTML file that opens offline
  check [OVERRIDES...]      the recipe checks before a long run (loss at init, overfit a batch, ...): seconds
  lr-find [OVERRIDES...] [--start 1e-7 --end 10 --steps 100 --seeds 4]
                            Smith's lr range test, seeds side by side; prints optimizer.lr=... to paste

{groups}
Results go to outputs/<date>/<time>/ (metrics.jsonl, summary.json, checkpoints, train.log).
Exit codes: 0 finished (completed, early_stopped, diverged, stopped by a finding or pruned
by a sweep), 1 crashed, 2 bad input; regexp check: 0 all checks pass, 3 a check failed.
"""

TRAIN_USAGE = """\
usage: regexp train [-m] [--cfg job [--resolve]] [OVERRIDES...]

Trains one model; with -m, one per job of a sweep. OVERRIDES are Hydra's:
  group=option          choose an option       model=cnn optimizer=sgd
  group.key=value       set a value            optimizer.lr=0.01 model.hidden=[256,128]
  +group=option         add an optional group  +regularizer=dropout +regularizer=[dropout,l2]
  key=a,b  key=range()  sweep (with -m)        -m seed=0,1,2 optimizer=adam,adamw

{groups}
flags:
  -m, --multirun        run every job of the sweep (hydra/launcher and hydra/sweeper choose how)
  --cfg job             print the job's composed, validated config and exit; --resolve resolves ${...}
  --info                Hydra's view of the config: search path, defaults tree
  --hydra-help          Hydra's own flags
A flag may stand anywhere on the line; values are overrides: epochs=1, not --epochs 1.
"""

GROUPS = """\
config groups (pick with group=option, set values with group.key=value):
{registry}
  +experiment   presets reproducing classic results, e.g. regexp train -m +experiment=dropout_mnist
  hydra/launcher  fused joblib submitit_local submitit_slurm   (side by side, parallel or cluster sweeps)
  hydra/sweeper   tune   (Optuna search over lr, weight decay, dropout)
'+' adds a group that is not in the defaults: +regularizer=dropout, +regularizer=[dropout,l2],
+experiment=NAME. Without the '+' (W&B sweep agents cannot pass it), regularizer=dropout and
experiment=NAME add the group just the same.
"""

CHECK_USAGE = """\
usage: regexp check [OVERRIDES...]

The recipe checks on the config `regexp train OVERRIDES` would run, in seconds, nothing written:
loss at init vs ln(classes), one batch overfit, every parameter gets a gradient, the output
depends on the input, labels balanced, inputs normalized, train/test copies (docs/check.md).
Each check is a line: PASS or FAIL, its numbers, and what to try when it fails.
Exit codes: 0 all checks pass, 3 a check failed, 1 a crash, 2 bad input.

{groups}"""

# Hydra flags that only print something: they get no pre-check.
INFO_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "--shell-completion", "-sc", "--version"}
# Hydra's flags (`regexp train --hydra-help`): the switches, those followed by a value, and
# the values a flag allows (--info's is optional)
SWITCHES = {"-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run", "-m", "--multirun",
            "-sc", "--shell-completion"}
VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
               "--config-dir", "--experimental-rerun"}
CFG_VALUES = ("job", "hydra", "all")
INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
FLAG_VALUES = {"-c": CFG_VALUES, "--cfg": CFG_VALUES, "-i": INFO_VALUES, "--info": INFO_VALUES}
# what Hydra does with the command line: one of these at most
MODES = ({"-r", "--run"}, {"-m", "--multirun"}, {"-c", "--cfg"}, {"-i", "--info"}, {"-sc", "--shell-completion"})


def usage(text: str = USAGE) -> str:
    """A help text; its groups and options come from the registry (no Hydra, no torch: instant)."""
    from regexp.config import group_lines

    return text.replace("{groups}", GROUPS.replace("{registry}", "\n".join(group_lines())))


def error_line(message: object) -> None:
    """A command's error: one line on stderr, whatever user text it quotes (rundir.printable)."""
    from regexp.rundir import printable

    print(f"regexp: error: {printable(str(message))}", file=sys.stderr)


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    error_line(message)
    sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "--version":
        from regexp import __version__

        print(f"regexp {__version__}")
        return 0
    if command == "train":
        return train_command(rest)
    if command in ("compare", "diagnose", "plot", "report", "lr-find"):
        return reader_command(command, rest)
    if command == "check":
        return check_command(rest)
    fail(f"unknown command {command!r}; commands: train, compare, diagnose, plot, report, check, lr-find (see regexp --help)")
    return 2


def reader_command(command: str, args: list[str]) -> int:
    """`regexp compare`, `diagnose`, `plot`, `report` (which read run dirs), `check` and `lr-find`: bad input is one line and
    exit 2, an unreadable or unwritable file one line and exit 1; when the reader of a pipe
    leaves early (`| head`) the command ends quietly with 141, as SIGPIPE ends other tools."""
    import os

    from regexp.rundir import ConfigError, RunError, UsageError

    try:
        if command == "compare":
            from regexp.comparison import main as command_main
        elif command == "plot":
            from regexp.plot import main as command_main
        elif command == "report":
            from regexp.report import main as command_main
        elif command == "check":
            from regexp.check import main as command_main
        elif command == "lr-find":
            from regexp.lrfind import main as command_main
        else:
            from regexp.diagnose import main as command_main
        code = command_main(args)
        sys.stdout.flush()  # a closed pipe is found here, not at exit
        return code
    except (UsageError, ConfigError) as e:
        fail(str(e))
    except RunError as e:
        error_line(e)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit cannot fail again
        return 141
    return 2


def check_command(args: list[str]) -> int:
    """`regexp check`: its help here (no torch), its checks as a reader's command (exit codes alike, 3: a check failed)."""
    if "-h" in args or "--help" in args:
        print(usage(CHECK_USAGE), end="")
        return 0
    with warnings.catch_warnings():
        ignore_preset_warning()
        return reader_command("check", args)


def train_command(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(usage(TRAIN_USAGE), end="")
        return 0
    with warnings.catch_warnings():  # for this command only: importing regexp changes no filter
        ignore_preset_warning()
        return run_train(args)


def ignore_preset_warning() -> None:
    """The launcher presets share the plugins' names on purpose (hydra/launcher=joblib), which
    Hydra reports as deprecated schema matching each time it composes one."""
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                            category=UserWarning)


def run_train(args: list[str]) -> int:
    from pathlib import Path

    from regexp.compose import hydra_quoted, is_override, with_resumed_run
    from regexp.lock import writing
    from regexp.prune import check_one_run
    from regexp.rundir import ConfigError, RunError, UsageError

    try:
        args = flags_first(args)
        multirun = any(a in ("-m", "--multirun") for a in args)
        printing = any(a in ("-c", "--cfg") for a in args)  # --cfg job: the config, validated; no run
        if not multirun and not printing:  # the config of a sweep's job may be printed, prune and all
            check_one_run(a for a in args if is_override(a))  # what the user typed, before a resume adds its run's
            args = with_resumed_run(args)
        args = with_plus_where_needed(args)
        out_dir = typed = None
        if not INFO_FLAGS.intersection(args):
            out_dir, typed, planned = precheck([a for a in args if is_override(a)], multirun, run=not printing)
            args = [*args, *planned]  # resume=auto's run dir of each job (regexp.sweep.plan_overrides)
        with contextlib.ExitStack() as held:
            if out_dir is not None:
                key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
                held.enter_context(writing([Path(out_dir)], key))  # the one writer until this process ends, however
                args = [*args, f"{key}={hydra_quoted(out_dir)}"]  # the dir as checked (${now:...} resolved once)
                if not multirun:
                    from regexp.train import check_resume, finished_line  # torch: only once the config is known good

                    start = check_resume(typed, Path(out_dir), key)  # what the run dir holds, under the lock
                    if start.finished is not None:  # nothing left to do: Hydra would still write train.log
                        print(finished_line(Path(out_dir), start.finished))
                        return 0
                    if start.resumed is not None:
                        args.append("hydra.output_subdir=null")  # a resume leaves the run's own .hydra/ record as it is
            return run_hydra(args, out_dir)
    except (ConfigError, UsageError) as e:
        fail(str(e))
    except RunError as e:  # a data or run file that does not fit: one line, exit 1, nothing written
        error_line(e)
        return 1
    return 2


def flags_first(args: list[str]) -> list[str]:
    """The command line with Hydra's flags (each with its value) before the overrides, where
    Hydra's parser takes them: `regexp train seed=0 -m lr=1,2` works. Anything else that
    starts with '-' is no flag: UsageError suggesting the override (`--epochs 1`: epochs=1)."""
    from regexp.compose import is_override
    from regexp.rundir import UsageError

    flags, overrides, rest = [], [], list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            if not is_override(arg):
                raise UsageError(f"{arg}: neither an override nor a flag; overrides are key=value or group=option "
                                 "(regexp train --help)")
            overrides.append(arg)
            continue
        name, given, value = arg.partition("=")
        if not given and rest and _takes_next(name, rest[0]):
            value, given, arg = rest[0], "=", f"{arg} {rest.pop(0)}"
        allowed = FLAG_VALUES.get(name)
        optional = name in FLAG_VALUES and name not in VALUE_FLAGS  # --info
        if not given and (name in SWITCHES or optional):
            flags.append(name)
        elif given and (name in VALUE_FLAGS or optional) and (allowed is None or value in allowed):
            flags += [name, value]
        elif name in VALUE_FLAGS | SWITCHES | FLAG_VALUES.keys():
            what = (f"takes one of {', '.join(allowed)}" if allowed
                    else "takes a value" if name in VALUE_FLAGS else "takes no value")
            raise UsageError(f"{arg}: {name} {what} (regexp train --help)")
        elif name.strip("-"):
            override = f"{name.lstrip('-').replace('-', '_')}={value if given else 'VALUE'}"  # keys have no '-'
            raise UsageError(f"{arg}: not a flag of regexp train; write it as an override: {override}")
        else:
            raise UsageError(f"{arg}: not a flag of regexp train (regexp train --help)")
    if sum(1 for mode in MODES if mode.intersection(flags)) > 1:
        given = [f for f in flags if any(f in mode for mode in MODES)]
        advice = ("; to print a sweep job's config, drop -m and give one value of each swept key (e.g. regexp train "
                  "--cfg job seed=0)" if {"-m", "--multirun"} & set(given) and {"-c", "--cfg"} & set(given) else "")
        raise UsageError(f"{' '.join(given)}: one of these at most (regexp train --help){advice}")
    return [*flags, *overrides]


def _takes_next(name: str, following: str) -> bool:
    """Whether the word after flag `name` is its value: as Hydra's parser reads it, and for
    a word that is no flag, the value the user meant (`--epochs 1`)."""
    from regexp.compose import is_override

    if name in SWITCHES:
        return False
    if name in FLAG_VALUES:
        return following in FLAG_VALUES[name] or name in VALUE_FLAGS and not following.startswith("-")
    return name in VALUE_FLAGS or not following.startswith("-") and not is_override(following)


def run_hydra(args: list[str], out_dir: Optional[str]) -> int:
    """Hydra runs the job(s) of the checked command line; exit code as the module says."""
    from pathlib import Path

    import hydra

    from regexp.config import config_dir
    from regexp.rundir import Interrupted
    from regexp.sweep import SweepFailed, register_plan_resolvers, report_interruption

    register_plan_resolvers()
    hydra_main = hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")(Job())
    sys.argv = ["regexp train", *args]
    try:
        hydra_main()
    except SweepFailed:  # the sweep's table has named each failed job
        return 1
    except Interrupted as e:
        sweep = out_dir is not None and any(a in ("-m", "--multirun") for a in args)
        advice = report_interruption(Path(out_dir), e) if sweep else interruption_advice(e, out_dir)
        print(f"regexp: interrupted by signal {e.signum}; {advice}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    return 0


def interruption_advice(e, out_dir: Optional[str]) -> str:
    """What is on disk after a signal, and how to go on: only what is true."""
    from pathlib import Path

    if e.saved:
        return f"checkpoint saved; continue with resume={out_dir}"
    if out_dir is not None and (Path(out_dir) / "checkpoint.pt").is_file():
        return f"stopped at once (second signal), no checkpoint of this step; resume={out_dir} continues from the last one saved"
    return "stopped at once (second signal) before any checkpoint was saved; start the run again"


class Job:
    """The task Hydra runs: hydra_task. A launcher (joblib, submitit) pickles it into worker
    processes that exist only to run jobs; unpickled there, it quiets the presets' warning in
    that process as train_command does here, before the worker composes the job's config."""

    regexp_task = True  # how regexp's launchers tell it from another app's task (also as __main__.Job)

    def __init__(self):
        from regexp.wandb_logger import WandbServer

        self.wandb_server = WandbServer()  # what this process's jobs learn about the W&B server

    def __call__(self, cfg) -> float:
        return hydra_task(cfg, self.wandb_server)

    def __reduce__(self) -> tuple:
        return (job_in_worker, ())


def job_in_worker() -> Job:
    from regexp.sweep import register_plan_resolvers

    ignore_preset_warning()
    register_plan_resolvers()  # before the worker resolves its job's run dir
    return Job()


def with_plus_where_needed(args: list[str]) -> list[str]:
    """The command line with `regularizer=X` / `experiment=X` read as `+regularizer=X` where
    the group is not in the defaults yet (regexp.compose.with_added_groups); flags untouched."""
    from regexp.compose import is_override, with_added_groups

    positions = [i for i, a in enumerate(args) if is_override(a)]
    rewritten = dict(zip(positions, with_added_groups([args[i] for i in positions])))
    return [rewritten.get(i, a) for i, a in enumerate(args)]


def hydra_task(cfg, wandb_server) -> float:
    """The job Hydra runs (once per sweep job): train() on the job's config; returns the sweep
    objective (val/acc). In a sweep a failing job is recorded in its run dir and the sweep goes
    on: the basic sweeper gets NaN; a search sweeper (Optuna) gets the exception, which it
    records as a failed trial (it cannot rank a NaN). Alone, bad input exits 2, a bad file 1."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from regexp.compose import expands_its_jobs

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    searching = multirun and not expands_its_jobs(hydra_cfg)
    try:
        summary = run_job(cfg, hydra_cfg, multirun, searching, wandb_server)
    except Exception as e:
        return job_failed(e, hydra_cfg, multirun, searching)
    return sweep_objective(summary, searching)


def job_failed(e: Exception, hydra_cfg, multirun: bool, searching: bool) -> float:
    """A job's exception, answered inside its `except`: in a sweep recorded (summary.json, the
    job's record) and NaN, or raised again for a search sweeper; alone, bad input exits 2, a
    bad file 1, anything else is raised again."""
    from regexp.config import ConfigError, RunError
    from regexp.sweep import record_failure

    if multirun:
        record_failure(hydra_cfg, e)
        if searching:
            raise e
        return math.nan
    if isinstance(e, ConfigError):
        fail(str(e))
    if isinstance(e, RunError):  # a bad file: one line, not a traceback (summary.json has the details)
        error_line(e)
        sys.exit(1)
    raise e


def sweep_objective(summary, searching: bool) -> float:
    """What the sweeper gets for a job's run: its val/acc. A run that a finding stopped or a
    pruning ended has none, as a diverged one has none: its val/acc is that of a model cut short,
    which would rank its configuration on a partial result. A search sweeper's run without a
    value is a failed trial."""
    from regexp.rundir import ENDED_EARLY
    from regexp.tracking import why_ended

    cut_short = summary.status in ENDED_EARLY
    objective = math.nan if cut_short else summary.objective()
    if searching and math.isnan(objective):
        why = why_ended(summary.ended_by) if cut_short else None
        how = f"before its planned end{f' ({why})' if why else ''}" if cut_short else "without val/acc"
        raise RuntimeError(f"{summary.run_dir}: the run ended {summary.status} {how}: a failed trial")
    return objective


def run_job(cfg, hydra_cfg, multirun: bool, searching: bool, wandb_server):
    """One job of `regexp train`: skipped when resume=auto finds it finished, else trained."""
    from regexp.rundir import Summary
    from regexp.train import train_group

    job = job_spec(cfg, hydra_cfg, multirun, searching)
    return job if isinstance(job, Summary) else train_group([job], wandb_server=wandb_server)[0]


def job_spec(cfg, hydra_cfg, multirun: bool, searching: bool):
    """A job's checks before training: the summary of its finished run when resume=auto finds
    one (the job is skipped), else what to train (a train.RunSpec). The pre-flight validated
    every job it could list (a single run, each job of a basic sweep), so Hydra's config,
    typed by the schemas, is only put in the job's shape (job_config); a search sweeper's
    draws are checked here."""
    from pathlib import Path

    from regexp.compose import check_job, run_name, task_overrides
    from regexp.config import job_config
    from regexp.data import check_available
    from regexp.sweep import already_finished, check_drawn_job_dir, mark_skipped, share_machine
    from regexp.train import RunSpec, check_resume

    run_dir = Path(hydra_cfg.runtime.output_dir)
    if searching:  # a search sweeper's draw: its run dir not seen by the pre-flight
        check_drawn_job_dir(hydra_cfg)
    share_machine(hydra_cfg)
    finished = already_finished(run_dir, task_overrides(hydra_cfg), cfg) if cfg.get("resume") == "auto" else None
    if finished is not None:
        if multirun:  # its line as it ends: JobEnds, from this record
            mark_skipped(hydra_cfg, finished.status)
        else:
            print(f"{run_dir}: already {finished.status}, skipped (resume=auto)")
        return finished
    if searching:  # a search sweeper's draw: not seen by the pre-flight
        job = check_job(cfg)
    else:
        job = job_config(cfg)
        if multirun:  # data problems fail this job, not the sweep
            check_available(job.dataset)
    start = check_resume(job, run_dir, "run_dir")  # its checkpoint and records: a bad one fails this job alone
    # W&B: the run is named by its overrides (empty: the run dir's name); a sweep's jobs share its dir as group
    return RunSpec(job, run_dir, choices=dict(hydra_cfg.runtime.choices), overrides=task_overrides(hydra_cfg),
                   name=run_name(hydra_cfg), group=hydra_cfg.sweep.dir if multirun else None, start=start,
                   sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None)


# ---------------------------------------------------------------- fused groups (hydra/launcher=fused)
@dataclass
class GroupMember:
    """One job of a fused group, prepared inside Hydra's job context (its run dir and .hydra
    files exist, its sweep record is written): its Hydra node, and what to train (a RunSpec),
    or, when it needs no training (skipped, or failed its checks), the sweeper's value."""

    hydra_cfg: Any
    searching: bool
    spec: Any = None  # train.RunSpec
    value: float = math.nan


def prepare_member(cfg) -> GroupMember:
    """The task function Hydra's run_job calls for each job of a fused group: run_job's checks
    (resume=auto, data), no training. A job that fails them is recorded as hydra_task does."""
    import copy

    from hydra.core.hydra_config import HydraConfig

    from regexp.compose import expands_its_jobs
    from regexp.rundir import Summary

    hydra_cfg = copy.deepcopy(HydraConfig.get())  # the job's node, kept beyond its job context
    searching = not expands_its_jobs(hydra_cfg)
    try:
        job = job_spec(cfg, hydra_cfg, True, searching)
    except Exception as e:
        return GroupMember(hydra_cfg, searching, value=job_failed(e, hydra_cfg, True, searching))
    if isinstance(job, Summary):
        return GroupMember(hydra_cfg, searching, value=sweep_objective(job, searching))
    return GroupMember(hydra_cfg, searching, spec=job)


def run_group(members: list[GroupMember], wandb_server) -> list:
    """Train the prepared members side by side (train.train_group); each member's sweeper
    value in order: its objective, NaN for a failure (recorded in its run dir), or, for a
    search sweeper's failed trial, the exception. A group that crashes fails each of its
    members, and the sweep goes on."""
    training = [m for m in members if m.spec is not None]
    if not training:
        return [m.value for m in members]
    from regexp.train import train_group

    try:
        summaries = train_group([m.spec for m in training], wandb_server=wandb_server)
    except Exception as e:
        return [m.value if m.spec is None else member_failed(e, m) for m in members]
    trained = iter(summaries)
    return [m.value if m.spec is None else member_value(next(trained), m) for m in members]


def member_failed(e: Exception, member: GroupMember):
    """A member of a crashed group, answered as hydra_task answers its job's exception."""
    try:
        return job_failed(e, member.hydra_cfg, True, member.searching)
    except Exception as raised:
        if raised is not e:
            raise
        return e  # a search sweeper's failed trial


def member_value(summary, member: GroupMember):
    try:
        return sweep_objective(summary, member.searching)
    except RuntimeError as e:  # a search sweeper's failed trial
        return e


def precheck(overrides: list[str], multirun: bool, run: bool = True) -> tuple:
    """Pre-flight, before Hydra creates anything: compose and validate every job's config
    (regexp.compose); to `run`, also the device, the output dir (writable, no other process
    writing it), each sweep job's own run dir (regexp.sweep.check_sweep_job) and, for a single
    run, its data. A sweep's data are looked at per job (a job that lacks them fails alone), and
    when every job to train lacks them, the command is refused once, as a single run is. Returns
    the directory the command will write (the run dir, or the sweep dir), as it will be named,
    the (last) job's typed config, and the overrides that carry resume=auto's plan of a sweep's
    run dirs (regexp.sweep.resume_plan: decided here, once, for every launcher; the jobs it
    moves and the runs no job continues are a line each on stdout). Bad input fails fast with one line (Hydra's own errors are
    several lines, exit 1)."""
    from pathlib import Path

    from regexp.cluster import check_request
    from regexp.compose import check_job, compose, composing_many, initialized, sweep_jobs
    from regexp.config import check_run_dir_text, check_writable, validate
    from regexp.fusion import check_launcher
    from regexp.lock import check_free
    from regexp.sweep import check_parallel_launcher, check_sweep_job, plan_overrides, resume_plan

    out_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    out_dir = typed = plan = None
    job_dirs: dict[str, int] = {}  # a sweep's job dirs so far: real path -> job number
    data_problems: dict = {}  # a data set's problem (None: none), looked at once
    missing = []  # each job to train: its data set's problem
    with initialized(), composing_many():
        jobs = sweep_jobs(overrides) if multirun else [overrides]
        for number, job in enumerate(jobs):
            cfg = compose(job, with_hydra=True)
            if not run:
                validate(cfg)
                continue
            typed = check_job(cfg, data=not multirun)  # in a sweep, missing data fail their job, not the whole sweep
            check_launcher(cfg.hydra)
            check_parallel_launcher(cfg.hydra)
            if multirun and number == 0:  # a SLURM launcher's request (regexp.cluster): one for the whole sweep
                check_request(cfg.hydra)
            out_dir = out_dir or str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)  # ${now:...} once
            key = out_key if any(o.startswith(out_key + "=") for o in job) else "out_dir"
            check_run_dir_text(out_dir, key, out_dir if key == out_key else cfg.out_dir)
            check_writable(out_dir, key, out_dir if key == out_key else cfg.out_dir)
            check_free(Path(out_dir), out_key, out_dir)  # the first thing to say when another process writes it
            if multirun:
                check_sweep_dir(Path(out_dir), typed.resume, out_key)
                plan = resume_plan(Path(out_dir), cfg, jobs) if number == 0 else plan
                run_number = plan.jobs[number][0] if plan else None
                if check_sweep_job(Path(out_dir), cfg, number, job, job_dirs, run_number) is None:  # None: it trains
                    missing.append(data_problem(typed.dataset, data_problems))
    if missing and all(missing):
        raise missing[0]
    if not plan:
        return out_dir, typed, []
    for line in plan.lines:
        print(line, flush=True)
    return out_dir, typed, plan_overrides(plan.jobs, cfg.hydra)


def data_problem(dataset, seen: dict) -> Optional[Exception]:
    """What regexp.data.check_available finds wrong with a sweep job's data set (None: they
    are there), asked once per data set: `seen` holds the answers so far."""
    from omegaconf import OmegaConf

    from regexp.data import check_available  # torch: only once the configs are known good
    from regexp.rundir import ConfigError, RunError

    key = OmegaConf.to_yaml(dataset)
    if key not in seen:
        try:
            check_available(dataset)
            seen[key] = None
        except (ConfigError, RunError) as e:
            seen[key] = e
    return seen[key]


def check_sweep_dir(sweep_dir, resume: Optional[str], key: str) -> None:
    """A sweep into a directory that holds runs must continue them (resume=auto)."""
    from regexp.rundir import SUMMARY, ConfigError

    if resume != "auto" and sweep_dir.is_dir() and any(sweep_dir.glob(f"*/{SUMMARY}")):
        raise ConfigError(key, str(sweep_dir), "holds the runs of an earlier sweep; continue them with resume=auto, "
                                               "or choose another sweep dir")

if __name__ == "__main__":
    sys.exit(main())
