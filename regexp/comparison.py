"""`regexp compare`: runs and sweeps side by side, read from their run dirs (never W&B).

Every `summary.json` below the given paths is a run. The runs are grouped by the
override keys whose values differ between them (seed aside: seeds are what a group
averages over), or by `--by KEY`; each group gets mean ± sample std of the chosen metric,
of the final train loss and of the wall time, and its runs' statuses. Only trained runs
(completed, early stopped: `Status.trained`) enter the means; failed, diverged, stopped (by a
finding), pruned, interrupted and running runs are counted in the status column and listed
under the table with why they ended, never averaged (a crash's wall time, a diverged loss or
a run cut short at its first epochs says nothing about the group's trained result). Smoke runs
(smoke=true: two steps, docs/runs.md) are never averaged either: a group counts them as `smoke`
among its statuses, and a group of smoke runs alone has no mean. Groups are
sorted best first, each with the 95 % Student-t interval of its mean; `--baseline` adds each
group's difference to one group and Welch's t-test p-value (docs/compare.md). `--plot` draws
each group's learning curves from metrics.jsonl; `--csv` and `--json` print the table as data.

Runs are read through regexp.rundir; a run whose files are unreadable is named in a
warning and left out. matplotlib is imported only for `--plot`, scipy only for the
statistics, torch never.
"""

import json
import math
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from regexp.rundir import RunError, Status, UsageError, load_summary, read_overrides
from regexp.tracking import CommandParser, plural, print_whole, warn, why_ended

# Override keys that never define an experiment: the seed (what a group averages over),
# where inputs, outputs and logs live, and smoke (a smoke run joins its config's group, never averaged).
NOT_EXPERIMENT_KEYS = ("seed", "out_dir", "resume", "dataset.root", "dataset.download", "smoke")
NOT_EXPERIMENT_PREFIXES = ("hydra.", "logger.")
TRAIN_LOSS, WALL_TIME = "train/loss", "wall_time_s"
MISSING = "—"
CONFIDENCE = 0.95  # of each group's interval of the mean
MIN_TEST_RUNS = 3  # trained runs each group needs for a p-value: with 2, Welch's test has at most 2 degrees of freedom
SMOKE = "smoke"  # a group's count of smoke runs, among its statuses: counted, never averaged


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
    smoke: bool = False  # a smoke run (smoke=true): its two steps' metrics are no result

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def averaged(self) -> bool:
        """Whether its final metrics enter its group's means: trained, and not a smoke run."""
        return self.status.trained and not self.smoke


@dataclass
class Stat:
    mean: Optional[float]
    std: Optional[float]  # sample std (ddof=1); None below 2 values
    n: int
    ci_low: Optional[float] = None  # the 95 % Student-t interval of the mean; None below 2 values
    ci_high: Optional[float] = None


@dataclass
class VsBaseline:
    """A group's mean against the baseline group's: the difference and Welch's t-test p-value.
    p_value is None where the test says nothing, and `note` says why."""
    diff: Optional[float]
    p_value: Optional[float]
    note: Optional[str] = None


@dataclass
class Group:
    values: dict[str, Optional[str]]  # grouping key -> value (None: the runs lack the key)
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v if v is not None else MISSING}" for k, v in self.values.items()) or "all runs"

    def values_of(self, name: str) -> list[float]:
        """The metric of the group's trained runs only, smoke runs aside."""
        return [run.metrics[name] for run in self.runs if run.averaged and name in run.metrics]

    def stat(self, name: str) -> Stat:
        return mean_std(self.values_of(name))

    def statuses(self) -> Counter:
        """How many runs ended with each status; smoke runs, whatever theirs, as SMOKE."""
        return Counter(SMOKE if run.smoke else run.status.value for run in self.runs)


class Comparison(NamedTuple):
    groups: list[Group]  # best first
    keys: list[str]  # the grouping keys
    higher_is_better: bool
    baseline: Optional[Group]  # the group --baseline names, one of `groups`


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
        metrics={k: as_float(v) for k, v in metrics.items() if as_float(v) is not None},
        error=summary.error,
        nonfinite_step=(summary.nonfinite or {}).get("nonfinite/step"),
        ended_by=summary.ended_by,
        smoke=bool(summary.smoke),
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


def as_float(value: Any) -> Optional[float]:
    """A finite float, or None (NaN, inf, an int beyond float range, text: not a value to average)."""
    if not is_number(value):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


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
    """Mean, sample std and the 95 % confidence interval of the mean (Student's t with n - 1
    degrees of freedom: the runs of a group are few, so the normal 1.96 would be too narrow)."""
    values = list(values)
    if not values:
        return Stat(None, None, 0)
    mean, std = mean_and_std(values)
    if std is None:
        return Stat(mean, None, len(values))
    from scipy.stats import t  # lazily: scipy.stats takes a second to import

    half = float(t.ppf(1 - (1 - CONFIDENCE) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return Stat(mean, std, len(values), *map(as_float, (mean - half, mean + half)))


def mean_and_std(values: list[float]) -> tuple[float, Optional[float]]:
    """The mean and the sample std (None for one value, or when it leaves float range). Values
    near float's limit (1e308) overflow the sums: then they are computed on the values scaled
    by the largest."""
    try:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)
    except OverflowError:
        scale = max(map(abs, values))
        mean, std = mean_and_std([v / scale for v in values])
        return mean * scale, None if std is None else as_float(std * scale)


def vs_baseline(group: Group, baseline: Group, metric: str) -> VsBaseline:
    """The group's mean minus the baseline's, and Welch's t-test (unequal variances) between
    their trained runs' values; under MIN_TEST_RUNS in either group there is no p-value."""
    values, base = group.values_of(metric), baseline.values_of(metric)
    if not values or not base:
        return VsBaseline(None, None, "no trained runs")
    (mean, std), (base_mean, base_std) = mean_and_std(values), mean_and_std(base)
    diff = as_float(mean - base_mean)
    if min(len(values), len(base)) < MIN_TEST_RUNS:
        return VsBaseline(diff, None, "too few runs")
    if diff is None or any(x is None or not math.isfinite(x * x) for x in (std, base_std)):  # variances overflow
        return VsBaseline(diff, None, "values beyond float range")
    if std == 0 and base_std == 0:
        # Welch's t divides by the spread: with none there is no test, only the values themselves
        return VsBaseline(diff, None, "identical values" if diff == 0 else "no spread: every run of each group equal")
    import warnings

    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # scipy's precision warning for nearly equal values: the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = as_float(ttest_ind(values, base, equal_var=False).pvalue)  # NaN only where the sums overflow
    return VsBaseline(diff, p_value, None if p_value is not None else "values beyond float range")


def lower_is_better(metric: str) -> bool:
    """Decided by the name: losses, errors and times go down."""
    return any(word in metric for word in ("loss", "error", "time", "_ms"))


def rank_groups(groups: list[Group], metric: str, higher_is_better: bool) -> list[Group]:
    """Best mean first; groups without the metric (e.g. only failed runs) last; ties by label."""
    def order(group: Group) -> tuple:
        mean = group.stat(metric).mean
        return (mean is None, 0.0 if mean is None else (-mean if higher_is_better else mean), group.label)
    return sorted(groups, key=order)


def check_metric(runs: list[Run], metric: str, baseline: Optional[str] = None) -> None:
    """A metric no run has is a typo, unless no run was trained (then the table shows why);
    against a baseline it is always one, as there is nothing to test."""
    if any(metric in run.metrics for run in runs) or (baseline is None and not any(run.status.trained for run in runs)):
        return
    available = sorted({name for run in runs for name in run.metrics})
    raise UsageError(f"--metric {metric}: no run has this metric; available: {', '.join(available) or '(none)'}")


def find_baseline(groups: list[Group], keys: list[str], baseline: str) -> Group:
    """The group `--baseline` names: by its label as the table prints it (`regularizer=l2`,
    `optimizer=adam optimizer.lr=0.01`) or, grouped by one key, by that key's value (`l2`)."""
    matches = [g for g in groups if baseline == g.label or (len(keys) == 1 and baseline == (g.values[keys[0]] or MISSING))]
    labels = ", ".join(g.label for g in groups)
    if not matches:
        raise UsageError(f"--baseline {baseline}: no such group; groups: {labels}")
    if len(matches) > 1:
        raise UsageError(f"--baseline {baseline}: matches {len(matches)} groups ({', '.join(g.label for g in matches)}); "
                         "give one group's label as printed")
    return matches[0]


# ---------------------------------------------------------------- output

def as_json(groups: list[Group], keys: list[str], metric: str, higher_is_better: bool, plot: Optional[Path],
            baseline: Optional[Group] = None) -> dict:
    columns = list(dict.fromkeys([metric, TRAIN_LOSS, WALL_TIME]))
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "keys": keys,
        "baseline": baseline.label if baseline else None,
        "groups": [{"label": g.label, "values": g.values, "runs": len(g.runs), "statuses": dict(g.statuses()),
                    "stats": {name: asdict(g.stat(name)) for name in columns},
                    "vs_baseline": asdict(vs_baseline(g, baseline, metric)) if baseline and g is not baseline else None,
                    "run_dirs": [str(run.run_dir) for run in g.runs]} for g in groups],
        "runs": [{"run_dir": str(run.run_dir), "group": g.label, "values": g.values, "status": run.status.value,
                  "in_means": run.averaged and metric in run.metrics, "seed": run.seed, "metrics": {name: run.metrics.get(name) for name in columns},
                  **({"smoke": True} if run.smoke else {}),
                  **({"error": run.error} if run.error else {}), **({"ended_by": run.ended_by} if run.ended_by else {})}
                 for g in groups for run in g.runs],
        "plot": str(plot) if plot else None,
    }


def fmt(value: Optional[float], sign: str = "") -> str:
    """4 decimals, or 4 digits in e-notation for the very small and large; `sign="+"` signs it."""
    if value is None:
        return MISSING
    return f"{value:{sign}.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:{sign}.3e}"


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
    for i, (status, count) in enumerate(sorted(counts.items(), key=lambda item: status_kind(item[0]) != "trained")):
        style = {"trained": "green", "pending": "yellow", SMOKE: "cyan"}.get(status_kind(status), "bold red")
        text.append(", " if i else "").append(status_count(status, count), style=style)
    return text


def status_kind(status: str) -> str:
    """trained, pending (running, interrupted), smoke, or untrained: how a status count is shown."""
    if status == SMOKE:
        return SMOKE
    found = Status(status)
    return "trained" if found.trained else "pending" if found in (Status.RUNNING, Status.INTERRUPTED) else "untrained"


def status_count(status: str, count: int) -> str:
    """`2 completed`; smoke runs say they are left out of the means."""
    return f"{count} {status}" + (" (not averaged)" if status == SMOKE else "")


def untrained_detail(run: Run) -> Optional[str]:
    """Why a run is not in its group's means: its error, its non-finite step or what ended it,
    or that it is a smoke run."""
    if run.smoke and run.status.trained:
        return "a smoke run: never averaged"
    if run.error:
        return run.error.splitlines()[0]
    if run.nonfinite_step is not None:
        return f"non-finite at step {run.nonfinite_step}"
    return why_ended(run.ended_by)


def untrained_line(run: Run) -> str:
    """Why a run is not in its group's means, under the table."""
    detail = untrained_detail(run)
    return f"  {'smoke, ' if run.smoke else ''}{run.status.value}: {run.run_dir}" + (f"  ({detail})" if detail else "")


def fmt_ci(stat: Stat) -> str:
    if stat.ci_low is None:
        return MISSING
    if "e" in fmt(stat.mean):
        return f"[{fmt(stat.ci_low)}, {fmt(stat.ci_high)}]"
    return f"[{stat.ci_low:.4f}, {stat.ci_high:.4f}]"  # at the mean's precision, as the std


def fmt_vs(vs: VsBaseline) -> tuple[str, str]:
    """(difference, p-value or why there is none)."""
    if vs.p_value is None:
        return fmt(vs.diff, "+"), vs.note or MISSING
    return fmt(vs.diff, "+"), f"{vs.p_value:.3f}" if vs.p_value >= 1e-3 else f"{vs.p_value:.1e}"


Cell = str | Text


def table_cells(result: Comparison, metric: str, optional: list[str]) -> tuple[list[Cell], list[list[Cell]]]:
    """(headers, rows): key columns, runs, the metric's mean ± std and CI, against the baseline
    when there is one, then the `optional` columns (the train loss, the wall time) and the statuses."""
    headers: list[Cell] = [*map(Text, result.keys or ["group"]), "runs", Text(metric), f"{CONFIDENCE:.0%} CI"]
    if result.baseline:
        headers += ["Δ vs baseline", "p (Welch)"]
    headers += [*(Text(column_name(name)) for name in optional), "status"]
    rows = []
    for g in result.groups:
        stat = g.stat(metric)
        # as typed: [dropout] stays
        cells: list[Cell] = [Text(g.values[k] or MISSING) for k in result.keys] if result.keys else ["all runs"]
        cells += [str(len(g.runs)), fmt_stat(stat, len(g.runs)), fmt_ci(stat)]
        if result.baseline:
            cells += ["baseline", ""] if g is result.baseline else fmt_vs(vs_baseline(g, result.baseline, metric))
        for name in optional:
            if name == WALL_TIME:
                wall = g.stat(WALL_TIME).mean
                cells.append(MISSING if wall is None else f"{wall:.1f}")
            else:
                cells.append(fmt_stat(g.stat(name), len(g.runs)))
        rows.append([*cells, status_text(g.statuses())])
    return headers, rows


def fitted_table(result: Comparison, metric: str, width: Optional[int]) -> tuple[Table, list[str]]:
    """The table, and the columns left out. Whole where `width` is None (a file or a pipe); on a
    terminal `width` wide, without the optional columns that do not fit (the wall time, then the
    train loss go first), and then, if the rows are still too wide, each column as wide as its
    longest word at least, the spare width to the leftmost columns (the keys, then the metric),
    the rest of a cell wrapped between words."""
    optional = [name for name in (TRAIN_LOSS, WALL_TIME) if name != metric]
    headers, rows = table_cells(result, metric, optional)
    while width is not None and optional and table_width(headers, rows) > width:
        optional.pop()
        headers, rows = table_cells(result, metric, optional)
    widths = column_widths(headers, rows, width) if width is not None and table_width(headers, rows) > width else None
    table = Table()
    keys = len(result.keys or ["group"])
    for i, header in enumerate(headers):
        numeric = keys <= i < len(headers) - 1  # between the keys and the statuses
        table.add_column(header, justify="right" if numeric else "left", width=widths[i] if widths else None,
                         overflow="fold")
    for row in rows:
        table.add_row(*row)
    left_out = [column_name(name) for name in (TRAIN_LOSS, WALL_TIME) if name != metric and name not in optional]
    return table, left_out


def column_name(name: str) -> str:
    return "wall s" if name == WALL_TIME else name


def plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def table_width(headers: list[Cell], rows: list[list[Cell]]) -> int:
    """A rich table's width with no cell wrapped: each column's longest cell, a space either
    side and a border between (and at each edge)."""
    return sum(max(len(plain(cell)) for cell in column) for column in zip(headers, *rows)) + 3 * len(headers) + 1


def column_widths(headers: list[Cell], rows: list[list[Cell]], width: int) -> Optional[list[int]]:
    """Column widths (of the text, padding and borders aside) that fill `width`: each column
    its longest word, then as much of its longest cell as the spare width gives, leftmost
    first. None when the longest words alone overflow (then rich squeezes them as it can)."""
    columns = [[plain(cell) for cell in column] for column in zip(headers, *rows)]
    words = [max((len(word) for cell in column for word in cell.split()), default=1) for column in columns]
    spare = width - 3 * len(columns) - 1 - sum(words)
    if spare < 0:
        return None
    widths = []
    for column, word in zip(columns, words):
        extra = min(spare, max(len(cell) for cell in column) - word)
        widths.append(word + extra)
        spare -= extra
    return widths


def print_table(result: Comparison, metric: str, console: Optional[Console] = None) -> None:
    groups = result.groups
    runs = sum(len(g.runs) for g in groups)
    others = "others and smoke runs" if any(run.smoke for g in groups for run in g.runs) else "others"
    heading = (f"{plural(runs, 'run')} in {plural(len(groups), 'group')} · mean ± std and {CONFIDENCE:.0%} confidence "
               f"interval (Student's t) over each group's completed runs ({others} counted, not averaged) · best {metric} "
               f"first ({'higher' if result.higher_is_better else 'lower'} is better)")
    if result.baseline:
        heading += (f" · against baseline {result.baseline.label}: difference of means and Welch's t-test p-value "
                    f"(none under {MIN_TEST_RUNS} completed runs a group: too few runs)")
    console = console or Console(highlight=False)
    table, left_out = fitted_table(result, metric, console.width if console.is_terminal else None)
    console.print(heading, markup=False, soft_wrap=True)
    print_whole(console, table)  # a file or a pipe: never squeezed into 80 columns
    if left_out:
        console.print(f"  ({' and '.join(left_out)} left out to fit {console.width} columns; --json or a wider "
                      "terminal shows them)", markup=False, soft_wrap=True)
    for run in (run for g in groups for run in g.runs if not run.averaged):
        console.print(untrained_line(run), markup=False, soft_wrap=True)


def group_rows(result: Comparison, metric: str) -> tuple[list[str], list[list[Any]]]:
    """(columns, one row per group): its key values, then the metric's statistics and the test
    against the baseline (None where there is no value), as --csv prints them and W&B's sweep
    table holds them."""
    columns = [*(result.keys or ["group"]), "metric", "runs", "n", "mean", "std", "ci_low", "ci_high",
               "diff", "p_value", "note", "statuses"]
    rows = []
    for g in result.groups:
        stat = g.stat(metric)
        vs = vs_baseline(g, result.baseline, metric) if result.baseline and g is not result.baseline else None
        note = "baseline" if g is result.baseline else vs.note if vs else None
        cells = [g.values[k] for k in result.keys] if result.keys else ["all runs"]
        rows.append([*cells, metric, len(g.runs), stat.n, stat.mean, stat.std, stat.ci_low, stat.ci_high,
                     vs and vs.diff, vs and vs.p_value, note,
                     "; ".join(status_count(status, count) for status, count in g.statuses().items())])
    return columns, rows


def write_csv(result: Comparison, metric: str, out: Any) -> None:
    """group_rows as CSV: empty cells for None, floats in full (repr), user text quoted as needed."""
    import csv

    columns, rows = group_rows(result, metric)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if cell is None else repr(cell) if isinstance(cell, float) else cell for cell in row])


# ---------------------------------------------------------------- command

def parser() -> CommandParser:
    p = CommandParser(
        prog="regexp compare",
        description="Compare runs and sweeps from their run dirs (offline; never W&B): group by the swept "
                    "override keys (seed aside), mean ± std and the 95% confidence interval of the mean (Student's "
                    "t) over each group's completed runs, best first; with --baseline, each group's difference to "
                    "that group and Welch's t-test p-value. Failed, diverged, stopped, pruned, interrupted and "
                    "running runs are counted and listed, never averaged; so are smoke runs (smoke=true).",
        epilog="example: regexp compare outputs/multirun/2024-05-01/12-00-00 --baseline l2 --plot curves.png. "
               "A run whose summary.json or metrics.jsonl is unreadable is named in a warning and left out. "
               "Exit codes: 0 the comparison was printed; 1 the --plot image or its directory cannot be written; 2 "
               "bad input (no runs, an unknown --by key or --metric, a --baseline that names no group or several, "
               "--json with --csv, a --plot path that is a directory, of an unknown format or inside a run dir); "
               "141 the reader "
               "of a pipe left early (e.g. | head), quietly.")
    p.add_argument("paths", nargs="+", metavar="PATH", type=Path,
                   help="a run dir, a sweep dir, or any directory: every summary.json below it is a run")
    p.add_argument("--metric", default="test/acc", help="the metric to rank by, from summary.json (default: test/acc)")
    p.add_argument("--by", action="append", metavar="KEY",
                   help="group by this key instead of the swept ones (repeatable): an override key (optimizer), "
                        "a config group or a dotted config key (optimizer.lr)")
    p.add_argument("--plot", type=Path, metavar="OUT.png",
                   help="write learning curves per group (mean ± std over its completed runs) to this image")
    p.add_argument("--baseline", metavar="GROUP",
                   help="compare every group with this one: the difference of means and Welch's t-test p-value "
                        "(none under 3 completed runs in either group: too few runs). GROUP is a group's label as "
                        "the table prints it (regularizer=l2; with several keys all of them: 'optimizer=adam "
                        "optimizer.lr=0.01') or, grouped by one key, its value (l2)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the comparison as JSON (and nothing else) on stdout")
    output.add_argument("--csv", action="store_true",
                        help="print one CSV row per group (and nothing else) on stdout: the key values, metric, runs, "
                             "n (completed runs averaged), mean, std, ci_low, ci_high, diff, p_value, note, statuses")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--higher-is-better", dest="higher_is_better", action="store_true", default=None,
                       help="rank by the highest mean (default unless the metric's name says loss, error or time)")
    order.add_argument("--lower-is-better", dest="higher_is_better", action="store_false",
                       help="rank by the lowest mean")
    return p


def comparison(paths: list[Path], by: Optional[list[str]], metric: str, higher_is_better: Optional[bool] = None,
               baseline: Optional[str] = None) -> Comparison:
    """The runs below `paths`, grouped and ranked; UsageError on bad input."""
    if higher_is_better is None:
        higher_is_better = not lower_is_better(metric)
    runs = find_runs(paths)
    check_metric(runs, metric, baseline)
    if by:
        check_keys(runs, by)
    keys = list(dict.fromkeys(by)) if by else swept_keys(runs)
    groups = rank_groups(group_runs(runs, keys), metric, higher_is_better)
    found = None if baseline is None else find_baseline(groups, keys, baseline)
    return Comparison(groups, keys, higher_is_better, found)


def table_data(paths: list[Path], by: Optional[list[str]] = None, metric: str = "test/acc",
               higher_is_better: Optional[bool] = None, baseline: Optional[str] = None) -> dict[str, Any]:
    """The comparison as data, as `regexp compare --json` prints it (the Python API's compare)."""
    result = comparison(paths, by, metric, higher_is_better, baseline)
    return as_json(result.groups, result.keys, metric, result.higher_is_better, None, result.baseline)


def main(args: list[str]) -> int:
    """`regexp compare`. UsageError for bad input (exit 2), RunError when the plot cannot be written (1)."""
    options = parser().parse_args(args)
    if options.plot is not None:
        from regexp.plotting import check_out

        check_out(options.plot, "--plot", "curves.png")
    result = comparison(options.paths, options.by, options.metric, options.higher_is_better, options.baseline)
    plotted = None
    if options.plot is not None:
        from regexp.plotting import curves_figure, save_figure

        figure = curves_figure(result.groups, options.metric)
        if figure is not None:
            save_figure(figure, options.plot)
            plotted = options.plot
        else:
            warn(f"--plot: no curves to draw (no metrics.jsonl values); {options.plot} not written")
    if options.json:
        data = as_json(result.groups, result.keys, options.metric, result.higher_is_better, plotted, result.baseline)
        print(json.dumps(data, indent=2))
    elif options.csv:
        write_csv(result, options.metric, sys.stdout)
    else:
        print_table(result, options.metric)
        if plotted:
            print(f"curves: {plotted}")
    return 0
