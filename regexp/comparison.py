"""`regexp compare`: runs and sweeps side by side, read from their run dirs (never W&B).

Every `summary.json` below the given paths is a run. The runs are grouped by the
override keys whose values differ between them (seed aside: seeds are what a group
averages over), or by `--by KEY`; each group gets mean ± sample std of the chosen metric,
of the final train loss and of the wall time, and its runs' statuses. Only trained runs
(completed, early stopped: `Status.trained`) enter the means; failed, diverged, stopped (by a
finding), pruned, interrupted and running runs are counted in the status column and listed
under the table with why they ended, never averaged (a crash's wall time, a diverged loss or
a run cut short at its first epochs says nothing about the group's trained result). Groups are
sorted best first. `--plot` draws each group's learning curves from metrics.jsonl.

Runs are read through regexp.rundir; a run whose files are unreadable is named in a
warning and left out. matplotlib is imported only for `--plot`, torch never.
"""

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from regexp.rundir import RunError, Status, UsageError, load_summary, read_overrides
from regexp.tracking import CommandParser, plural, print_whole, warn, why_ended

# Override keys that never define an experiment: the seed (what a group averages over)
# and where inputs, outputs and logs live.
NOT_EXPERIMENT_KEYS = ("seed", "out_dir", "resume", "dataset.root", "dataset.download")
NOT_EXPERIMENT_PREFIXES = ("hydra.", "logger.")
TRAIN_LOSS, WALL_TIME = "train/loss", "wall_time_s"
MISSING = "—"


@dataclass
class Run:
    run_dir: Path
    status: Status
    overrides: dict[str, str]  # key (without +/~) -> value as typed
    choices: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, float]  # final metrics (finite ones only) and wall_time_s
    error: Optional[str] = None
    nonfinite_step: Optional[int] = None  # where a diverged run's loss or gradients left float range
    ended_by: Optional[dict[str, Any]] = None  # why a stopped or pruned run ended (its finding, or its rung)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass
class Stat:
    mean: Optional[float]
    std: Optional[float]  # sample std (ddof=1); None below 2 values
    n: int


@dataclass
class Group:
    values: dict[str, Optional[str]]  # grouping key -> value (None: the runs lack the key)
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v if v is not None else MISSING}" for k, v in self.values.items()) or "all runs"

    def stat(self, name: str) -> Stat:
        """Over the group's trained runs only."""
        return mean_std(run.metrics[name] for run in self.runs if run.status.trained and name in run.metrics)

    def statuses(self) -> Counter:
        return Counter(run.status.value for run in self.runs)


# ---------------------------------------------------------------- reading runs

def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every run below each path (a path may itself be a run dir), each run once."""
    runs: dict[Path, Run] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise UsageError(f"{path}: no such directory")
        if not path.is_dir():
            raise UsageError(f"{path}: not a directory; give a run dir, a sweep dir or a folder holding them")
        found = [read_run(p.parent) for p in sorted(path.rglob("summary.json"))]
        found = [run for run in found if run is not None]
        if not found:
            raise UsageError(f"{path}: no runs found (no readable summary.json in it or below it)")
        runs.update((run.run_dir.resolve(), run) for run in found)
    return list(runs.values())


def read_run(run_dir: Path) -> Optional[Run]:
    """The run, or None (with a warning naming the file) when its records are unreadable."""
    try:
        summary = load_summary(run_dir)
        overrides = read_overrides(run_dir)
    except RunError as e:
        warn(f"skipping {run_dir}: {e}")
        return None
    metrics = {**summary.metrics, WALL_TIME: summary.wall_time_s}
    return Run(
        run_dir=run_dir,
        status=summary.status,
        overrides=parse_overrides(overrides or summary.overrides),
        choices=summary.choices,
        config=summary.config,
        metrics={k: float(v) for k, v in metrics.items() if is_number(v) and math.isfinite(v)},
        error=summary.error,
        nonfinite_step=(summary.nonfinite or {}).get("nonfinite/step"),
        ended_by=summary.ended_by,
    )


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`+regularizer=[dropout,l2]` -> {"regularizer": "[dropout,l2]"}: the key as the
    config names it (an appended group is still the group)."""
    parsed = {}
    for override in overrides:
        key, _, value = override.partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- keys and groups

def key_value(run: Run, key: str) -> Optional[str]:
    """What the run used for `key`, as text: a group's chosen option, else the resolved
    config value (so `optimizer.lr=1e-2` and `=0.01` agree, and a run without the
    override shows its default), else the override as typed (`+regularizer=[dropout,l2]`
    has no single choice). None when the run has no such key, or none of a group added with
    `+` (regularizer: the config holds each option, null unless chosen)."""
    if run.choices.get(key) is not None:
        return str(run.choices[key])
    found, value = dotted(run.config, key)
    if found and not isinstance(value, dict):
        return as_text(value)
    if key in run.overrides:
        return run.overrides[key]
    if found and value and all(option is None or isinstance(option, dict) for option in value.values()):
        chosen = [option for option, node in value.items() if node is not None]
        return f"[{','.join(chosen)}]" if chosen else None
    return as_text(value) if found else None


def dotted(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))  # true/null/[512,256] as YAML would write them


def swept_keys(runs: list[Run]) -> list[str]:
    """The override keys (in command-line order) whose values differ between the runs."""
    candidates = dict.fromkeys(key for run in runs for key in run.overrides)
    return [key for key in candidates
            if key not in NOT_EXPERIMENT_KEYS and not key.startswith(NOT_EXPERIMENT_PREFIXES)
            and len({key_value(run, key) for run in runs}) > 1]


def check_keys(runs: list[Run], keys: list[str]) -> None:
    """Each `--by` key must name something at least one run has."""
    for key in keys:
        if not any(key in run.overrides or key in run.choices or dotted(run.config, key)[0] for run in runs):
            overridden = dict.fromkeys(k for run in runs for k in run.overrides)
            groups = sorted({k for run in runs for k in run.choices if not k.startswith("hydra/")})
            raise UsageError(
                f"--by {key}: no run has this key; available: override keys {', '.join(overridden) or '(none)'}; "
                f"config groups {', '.join(groups) or '(none)'}; or a dotted config key such as optimizer.lr")


def group_runs(runs: list[Run], keys: list[str]) -> list[Group]:
    """One group per distinct combination of the keys' values, in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = {key: key_value(run, key) for key in keys}
        groups.setdefault(tuple(values.values()), Group(values)).runs.append(run)
    return list(groups.values())


def mean_std(values: Iterable[float]) -> Stat:
    values = list(values)
    if not values:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def lower_is_better(metric: str) -> bool:
    """Decided by the name: losses, errors and times go down."""
    return any(word in metric for word in ("loss", "error", "time", "_ms"))


def rank_groups(groups: list[Group], metric: str, higher_is_better: bool) -> list[Group]:
    """Best mean first; groups without the metric (e.g. only failed runs) last; ties by label."""
    def order(group: Group) -> tuple:
        mean = group.stat(metric).mean
        return (mean is None, 0.0 if mean is None else (-mean if higher_is_better else mean), group.label)
    return sorted(groups, key=order)


def check_metric(runs: list[Run], metric: str) -> None:
    """A metric no run has is a typo, unless no run was trained (then the table shows why)."""
    if any(metric in run.metrics for run in runs) or not any(run.status.trained for run in runs):
        return
    available = sorted({name for run in runs for name in run.metrics})
    raise UsageError(f"--metric {metric}: no run has this metric; available: {', '.join(available) or '(none)'}")


# ---------------------------------------------------------------- output

def as_json(groups: list[Group], keys: list[str], metric: str, higher_is_better: bool, plot: Optional[Path]) -> dict:
    columns = list(dict.fromkeys([metric, TRAIN_LOSS, WALL_TIME]))
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "keys": keys,
        "groups": [{"label": g.label, "values": g.values, "runs": len(g.runs), "statuses": dict(g.statuses()),
                    "stats": {name: asdict(g.stat(name)) for name in columns},
                    "run_dirs": [str(run.run_dir) for run in g.runs]} for g in groups],
        "runs": [{"run_dir": str(run.run_dir), "group": g.label, "values": g.values, "status": run.status.value,
                  "in_means": run.status.trained, "seed": run.seed, "metrics": {name: run.metrics.get(name) for name in columns},
                  **({"error": run.error} if run.error else {}), **({"ended_by": run.ended_by} if run.ended_by else {})}
                 for g in groups for run in g.runs],
        "plot": str(plot) if plot else None,
    }


def fmt(value: Optional[float]) -> str:
    if value is None:
        return MISSING
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


def fmt_stat(stat: Stat, runs: int) -> str:
    if stat.n == 0:
        return MISSING
    if stat.std is None:
        text = f"{fmt(stat.mean)} ±{MISSING}"
    elif "e" not in fmt(stat.mean):
        text = f"{stat.mean:.4f} ± {stat.std:.4f}"  # the spread at the mean's precision, not in its own notation
    else:
        text = f"{fmt(stat.mean)} ± {fmt(stat.std)}"
    return text + (f" (n={stat.n})" if stat.n < runs else "")


def status_text(counts: Counter) -> Text:
    text = Text()
    for i, (status, count) in enumerate(sorted(counts.items(), key=lambda item: not Status(item[0]).trained)):
        style = ("green" if Status(status).trained else "yellow" if status in (Status.RUNNING, Status.INTERRUPTED)
                 else "bold red")
        text.append(", " if i else "").append(f"{count} {status}", style=style)
    return text


def untrained_line(run: Run) -> str:
    """Why a run is not in its group's means, under the table."""
    detail = run.error.splitlines()[0] if run.error else None
    if detail is None and run.nonfinite_step is not None:
        detail = f"non-finite at step {run.nonfinite_step}"
    if detail is None:
        detail = why_ended(run.ended_by)
    return f"  {run.status.value}: {run.run_dir}" + (f"  ({detail})" if detail else "")


def print_table(groups: list[Group], keys: list[str], metric: str, higher_is_better: bool) -> None:
    runs = sum(len(g.runs) for g in groups)
    heading = (f"{plural(runs, 'run')} in {plural(len(groups), 'group')} · mean ± std over each group's completed "
               f"runs (others counted, not averaged) · best {metric} first ({'higher' if higher_is_better else 'lower'} is better)")
    table = Table()
    for key in keys or ["group"]:
        table.add_column(Text(key))
    table.add_column("runs", justify="right")
    columns = list(dict.fromkeys([metric, TRAIN_LOSS]))
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("wall s", justify="right")
    table.add_column("status")
    for g in groups:
        wall = g.stat(WALL_TIME).mean
        key_cells = [Text(g.values[k] or MISSING) for k in keys] if keys else ["all runs"]  # as typed: [dropout] stays
        table.add_row(*key_cells, str(len(g.runs)),
                      *(fmt_stat(g.stat(name), len(g.runs)) for name in columns),
                      MISSING if wall is None else f"{wall:.1f}", status_text(g.statuses()))
    console = Console(highlight=False)
    console.print(heading, markup=False, soft_wrap=True)
    print_whole(console, table)  # a file or a pipe: never squeezed into 80 columns
    for run in (run for g in groups for run in g.runs if not run.status.trained):
        console.print(untrained_line(run), markup=False, soft_wrap=True)


# ---------------------------------------------------------------- command

def parser() -> CommandParser:
    p = CommandParser(
        prog="regexp compare",
        description="Compare runs and sweeps from their run dirs (offline; never W&B): group by the swept "
                    "override keys (seed aside), mean ± std over each group's completed runs, best first. "
                    "Failed, diverged, stopped, pruned, interrupted and running runs are counted and listed, never "
                    "averaged.",
        epilog="example: regexp compare outputs/multirun/2024-05-01/12-00-00 --metric val/acc --plot curves.png. "
               "A run whose summary.json or metrics.jsonl is unreadable is named in a warning and left out. "
               "Exit codes: 0 the comparison was printed; 1 the --plot image could not be written; 2 bad input "
               "(no runs, an unknown --by key or --metric, a --plot path that cannot be written); 141 the reader "
               "of a pipe left early (e.g. | head), quietly.")
    p.add_argument("paths", nargs="+", metavar="PATH", type=Path,
                   help="a run dir, a sweep dir, or any directory: every summary.json below it is a run")
    p.add_argument("--metric", default="test/acc", help="the metric to rank by, from summary.json (default: test/acc)")
    p.add_argument("--by", action="append", metavar="KEY",
                   help="group by this key instead of the swept ones (repeatable): an override key (optimizer), "
                        "a config group or a dotted config key (optimizer.lr)")
    p.add_argument("--plot", type=Path, metavar="OUT.png",
                   help="write learning curves per group (mean ± std over its completed runs) to this image")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (and nothing else) on stdout")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--higher-is-better", dest="higher_is_better", action="store_true", default=None,
                       help="rank by the highest mean (default unless the metric's name says loss, error or time)")
    order.add_argument("--lower-is-better", dest="higher_is_better", action="store_false",
                       help="rank by the lowest mean")
    return p


def check_plot_path(out: Path) -> None:
    """Before any work: a known image format, in a directory that can be written."""
    from matplotlib.figure import Figure

    from regexp.config import ConfigError, check_writable

    if out.is_dir():
        raise UsageError(f"--plot {out}: is a directory; name an image file, e.g. {out / 'curves.png'}")
    if out.suffix.lstrip(".").lower() not in Figure().canvas.get_supported_filetypes():
        raise UsageError(f"--plot {out}: unknown image format; use e.g. .png, .pdf or .svg")
    try:
        check_writable(out.parent, "--plot", out)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def comparison(paths: list[Path], by: Optional[list[str]], metric: str,
               higher_is_better: Optional[bool] = None) -> tuple[list[Group], list[str], bool]:
    """(groups best first, the grouping keys, higher_is_better); UsageError on bad input."""
    if higher_is_better is None:
        higher_is_better = not lower_is_better(metric)
    runs = find_runs(paths)
    check_metric(runs, metric)
    if by:
        check_keys(runs, by)
    keys = list(dict.fromkeys(by)) if by else swept_keys(runs)
    return rank_groups(group_runs(runs, keys), metric, higher_is_better), keys, higher_is_better


def table_data(paths: list[Path], by: Optional[list[str]] = None, metric: str = "test/acc",
               higher_is_better: Optional[bool] = None) -> dict[str, Any]:
    """The comparison as data, as `regexp compare --json` prints it (the Python API's compare)."""
    groups, keys, higher_is_better = comparison(paths, by, metric, higher_is_better)
    return as_json(groups, keys, metric, higher_is_better, None)


def main(args: list[str]) -> int:
    """`regexp compare`. UsageError for bad input (exit 2), RunError when the plot cannot be written (1)."""
    options = parser().parse_args(args)
    if options.plot is not None:
        check_plot_path(options.plot)
    groups, keys, higher_is_better = comparison(options.paths, options.by, options.metric, options.higher_is_better)
    plotted = None
    if options.plot is not None:
        from regexp.plotting import curves_figure, save_figure

        figure = curves_figure(groups, options.metric)
        if figure is not None:
            save_figure(figure, options.plot)
            plotted = options.plot
        else:
            warn(f"--plot: no curves to draw (no metrics.jsonl values); {options.plot} not written")
    if options.json:
        print(json.dumps(as_json(groups, keys, options.metric, higher_is_better, plotted), indent=2))
    else:
        print_table(groups, keys, options.metric, higher_is_better)
        if plotted:
            print(f"curves: {plotted}")
    return 0
