"""`regexp plot`: the training-health figure of a run, or of each group's median run side by
side (`--by KEY`), read from run dirs (docs/plots.md). Everything a command needs is checked
before anything is written; the image is written atomically, never into a run dir."""

import os
from pathlib import Path
from typing import Optional

from regexp.comparison import check_keys, check_metric, find_runs, group_runs
from regexp.plotting import check_out, figure_of, health_columns, read_health, save_figure, shown_run
from regexp.rundir import METRICS, UsageError
from regexp.tracking import CommandParser, plural, warn


def parser() -> CommandParser:
    p = CommandParser(
        prog="regexp plot",
        description="Draw a run's training-health figure from its run dir: loss and accuracy, learning rate, "
                    "global gradient norm before/after clipping, per-layer gradient norm, activation std, dead "
                    "fraction, update ratio and weight norm, with the findings and the non-finite step marked. "
                    "With --by, one column per group: each group's median run by --metric, or in a group without a "
                    "completed run, the run that recorded the most steps.",
        epilog="examples: regexp plot outputs/2024-05-01/12-00-00 · regexp plot outputs/multirun/drop --by "
               "regularizer --out by-regularizer.png. Exit codes: 0 the figure was written; 1 a run's records are "
               "unreadable or the image cannot be written; 2 bad input (no run, several runs without --by, an "
               "unknown --by key or --metric, an --out that is a directory, inside a run dir or of an unknown "
               "format); nothing is written on any error.")
    p.add_argument("paths", nargs="+", metavar="PATH", type=Path,
                   help="a run dir; with --by, run dirs, sweep dirs or any directory holding runs")
    p.add_argument("--by", action="append", metavar="KEY",
                   help="one column per value of this key (repeatable): an override key, a config group or a "
                        "dotted config key")
    p.add_argument("--metric", help="with --by: the metric that picks each group's median run (default: test/acc)")
    p.add_argument("--out", type=Path, metavar="FILE.png",
                   help="the image to write (.png, .pdf, .svg; default: <run dir name>-health.png, or "
                        "<dir name>-by-<key>.png with --by, in the current directory)")
    return p


def main(args: list[str]) -> int:
    """UsageError for bad input (exit 2), RunError for unreadable records or an unwritable image (1)."""
    options = parser().parse_args(args)
    if options.by:
        return plot_groups(options.paths, options.by, options.metric or "test/acc", options.out)
    if options.metric is not None:
        raise UsageError(f"--metric {options.metric}: only with --by, where it picks each group's median run")
    return plot_run(options.paths, options.out)


def plot_run(paths: list[Path], out: Optional[Path]) -> int:
    if len(paths) > 1:
        raise UsageError(f"plot: {len(paths)} paths; name one run dir, or compare runs with --by KEY")
    runs = find_runs(paths)
    if len(runs) > 1:
        raise UsageError(f"{paths[0]}: holds {len(runs)} runs; name one run dir, or compare them with --by KEY")
    run_dir = runs[0].run_dir
    out = out or Path(f"{run_dir.resolve().name}-health.png")
    check_out(out)
    if not os.path.lexists(run_dir / METRICS):
        raise UsageError(f"{run_dir}: nothing to draw (no {METRICS}: the run recorded no metrics); nothing written")
    health = read_health(run_dir)
    if health.empty:
        raise UsageError(f"{run_dir}: nothing to draw ({METRICS} holds no metric values); nothing written")
    save_figure(figure_of(health), out)
    print(f"health figure: {out}")
    return 0


def plot_groups(paths: list[Path], by: list[str], metric: str, out: Optional[Path]) -> int:
    keys = list(dict.fromkeys(by))
    out = out or Path(f"{paths[0].resolve().name}-by-{'-'.join(keys).replace('/', '_')}.png")
    check_out(out)
    runs = find_runs(paths)
    check_keys(runs, keys)
    check_metric(runs, metric)
    columns, left_out = [], []
    for group in group_runs(runs, keys):
        run, why = shown_run(group, metric)
        if run is None:
            left_out.append(f"{group.label}: {why}")
        else:
            columns.append((f"{group.label}\n{why}\n{run.run_dir.name}", run.run_dir))
    if not columns:
        raise UsageError(f"--by {' '.join(keys)}: no run recorded a step; nothing written")
    for line in left_out:
        warn(f"{line}; left out of the figure")
    save_figure(health_columns(columns), out)
    print(f"health figure: {out} ({plural(len(columns), 'group')})")
    return 0
