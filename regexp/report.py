"""`regexp report`: a comparison of runs and sweeps as one HTML file that opens offline.

The page holds what `regexp compare` prints (mean ± std, the 95 % confidence interval, each
group's difference to a baseline group and Welch's p-value), each group's learning curves
(mean with a band), the health figure and findings of each group's median run (without a
completed run, of its longest run), the config keys whose values differ between groups, and
every run's dir and status: a run that did not train (failed, diverged, stopped, pruned,
interrupted, running) is listed with why, never averaged. Everything is inside the file: the
CSS inline, the figures as PNG data: URIs, no script, font or stylesheet from the network, so
it opens on a cluster without internet.
Every text that comes from a run or the command line (dirs, overrides, metric names,
findings) is HTML-escaped. Runs are read through regexp.comparison and regexp.rundir,
figures drawn by regexp.plotting; torch is never imported.
"""

import base64
import html
from pathlib import Path
from typing import Any

from regexp.comparison import (CONFIDENCE, MISSING, NOT_EXPERIMENT_KEYS, NOT_EXPERIMENT_PREFIXES, SMOKE, TRAIN_LOSS,
                               WALL_TIME, Comparison, Group, Run, as_text, comparison, fmt, fmt_ci, fmt_stat, fmt_vs,
                               status_count, status_kind, untrained_detail, vs_baseline)
from regexp.rundir import RunError, atomic_write, load_summary, read_diagnosis
from regexp.tracking import CommandParser, check_output_file, plural, short_evidence, warn

DPI = 80  # the figures' resolution in the page: sharp on screen, about 160 KB a health figure

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { margin-bottom: 0.3em; } .note { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f0f0f0; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline td { background: #f4f8ff; } code { font-size: 0.95em; word-break: break-all; }
.trained { color: #1a7f37; } .untrained { color: #c62828; font-weight: 600; } .pending { color: #9a6700; }
.smoke { color: #0969da; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.group { margin-bottom: 2em; } .finding { margin: 0.2em 0 0.6em 0; } .finding b { color: #c62828; }
"""


# ---------------------------------------------------------------- command line

def parser() -> CommandParser:
    p = CommandParser(
        prog="regexp report",
        description="Write a comparison of runs and sweeps as one self-contained HTML file that opens offline: "
                    "the compare table (mean ± std, 95 % CI, difference to a baseline group and p-value), the "
                    "learning curves per group, each group's health figure and findings, the config keys that differ "
                    "between groups, and every run's dir and status.",
        epilog="example: regexp report outputs/multirun/2024-05-01/12-00-00 --out report.html --baseline "
               "regularizer=l2. Exit codes: 0 the report was written; 1 --out cannot be written; 2 bad input (no "
               "runs, an unknown --by key, --metric or --baseline group, --out a directory or inside a run dir); nothing "
               "is written then.")
    p.add_argument("paths", nargs="+", metavar="PATH", type=Path,
                   help="a run dir, a sweep dir, or any directory: every summary.json below it is a run")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT.html", help="the HTML file to write")
    p.add_argument("--metric", default="test/acc", help="the metric to rank by, from summary.json (default: test/acc)")
    p.add_argument("--by", action="append", metavar="KEY",
                   help="group by this key instead of the swept ones (repeatable), as regexp compare --by")
    p.add_argument("--baseline", metavar="GROUP",
                   help="the group each other group is compared with (difference and Welch's t-test p-value): "
                        "its label as regexp compare prints it (regularizer=l2) or, grouped by one key, its value (l2)")
    return p


def main(args: list[str]) -> int:
    """`regexp report`. UsageError for bad input (exit 2), RunError when --out cannot be written (1)."""
    options = parser().parse_args(args)
    check_output_file(options.out, "--out", "report.html", ("html", "htm"), "page", ".html")
    result = comparison(options.paths, options.by, options.metric, baseline=options.baseline)
    page = report_page(result, options.metric, options.paths)
    write_page(options.out, page)
    runs = sum(len(g.runs) for g in result.groups)
    print(f"report: {options.out} ({plural(runs, 'run')} in {plural(len(result.groups), 'group')}, "
          f"{len(page.encode()) / 2**20:.1f} MiB)")
    return 0


def write_page(out: Path, page: str) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create {out.parent} ({e.strerror or e})") from None
    atomic_write(out, lambda f: f.write(page), mode="w")


# ---------------------------------------------------------------- the page

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def report_page(result: Comparison, metric: str, paths: list[Path]) -> str:
    groups = result.groups
    runs = [run for g in groups for run in g.runs]
    order = "higher" if result.higher_is_better else "lower"
    unreadable: dict[Path, str] = {}  # run dir -> why its metrics.jsonl cannot be read (the curves find them first)
    sections = [
        f"<h1>regexp report: {esc(metric)}</h1>",
        f'<p class="note">{esc(plural(len(runs), "run"))} in {esc(plural(len(groups), "group"))} from '
        f'{", ".join(f"<code>{esc(p)}</code>" for p in paths)} · best {esc(metric)} first ({order} is better) · '
        f"mean ± std and {CONFIDENCE:.0%} confidence interval (Student's t) over each group's completed runs; runs "
        "that did not complete, and smoke runs (smoke=true), are listed, never averaged"
        + (f" · against {esc(result.baseline.label)}: difference of means, Welch's t-test p-value"
           if result.baseline else "") + "</p>",
        contents(groups),
        '<h2 id="comparison">Comparison</h2>', compare_table(result, metric),
        '<h2 id="curves">Curves</h2>', curves_section(groups, metric, unreadable),
        '<h2 id="groups">Groups: health and findings</h2>',
        *(group_section(g, metric, number, unreadable) for number, g in enumerate(groups, 1)),
        '<h2 id="config">Config keys that differ between groups</h2>', config_section(groups),
        '<h2 id="runs">Runs</h2>', runs_table(groups, metric),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>regexp report: {esc(metric)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def contents(groups: list[Group]) -> str:
    """Links to the sections and to each group's figure: a long page (8 groups, 8 figures) reads by jumping."""
    links = ", ".join(f'<a href="#group-{number}">{esc(g.label)}</a>' for number, g in enumerate(groups, 1))
    return ('<p class="note"><a href="#comparison">Comparison</a> · <a href="#curves">Curves</a> · '
            f'<a href="#groups">Groups</a> ({links}) · <a href="#config">Config keys</a> · <a href="#runs">Runs</a></p>')


def table(head: list[str], rows: list[str]) -> str:
    """A table from escaped header texts and ready <tr> rows."""
    return f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>\n" + "\n".join(rows) + "</table>"


def cell(text: Any, num: bool = False) -> str:
    return f'<td class="num">{esc(text)}</td>' if num else f"<td>{esc(text)}</td>"


def compare_table(result: Comparison, metric: str) -> str:
    """What `regexp compare` prints: key values, runs, the metric's mean ± std and interval, the
    test against the baseline when there is one, the train loss, the wall time, the statuses."""
    keys, baseline = result.keys, result.baseline
    losses = [TRAIN_LOSS] if metric != TRAIN_LOSS else []
    head = [*(esc(k) for k in keys or ["group"]), "runs", f"{esc(metric)} mean ± std", f"{CONFIDENCE:.0%} CI",
            *([f"diff vs {esc(baseline.label)}", "p (Welch)"] if baseline else []),
            *(f"{esc(name)} mean ± std" for name in losses), "wall s", "status"]
    rows = []
    for g in result.groups:
        stat, wall = g.stat(metric), g.stat(WALL_TIME).mean
        cells = [cell(g.values[k] or MISSING) for k in keys] or [cell(g.label)]
        cells += [cell(len(g.runs), num=True), cell(fmt_stat(stat, len(g.runs)), num=True), cell(fmt_ci(stat), num=True)]
        if baseline:
            vs = ("baseline", "") if g is baseline else fmt_vs(vs_baseline(g, baseline, metric))
            cells += [cell(text, num=True) for text in vs]
        cells += [cell(fmt_stat(g.stat(name), len(g.runs)), num=True) for name in losses]
        cells += [cell(MISSING if wall is None else f"{wall:.1f}", num=True), f"<td>{status_html(g.statuses())}</td>"]
        rows.append(f"<tr{' class=baseline' if g is baseline else ''}>{''.join(cells)}</tr>")
    return table(head, rows)


def status_html(statuses: dict[str, int]) -> str:
    parts = []
    for status, count in sorted(statuses.items(), key=lambda item: status_kind(item[0]) != "trained"):
        parts.append(f'<span class="{status_kind(status)}">{esc(status_count(status, count))}</span>')
    return ", ".join(parts)


def image(fig, alt: str) -> str:
    from regexp.plotting import png_bytes

    data = base64.b64encode(png_bytes(fig, dpi=DPI)).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def curves_section(groups: list[Group], metric: str, unreadable: dict[Path, str]) -> str:
    """The curves per group; each completed run whose metrics.jsonl cannot be read is left out,
    named here and in its group's section (added to `unreadable`), and in a warning."""
    from regexp.plotting import curves_figure

    def left_out(run_dir: Path, error: RunError) -> None:
        warn(f"curves: leaving out {run_dir}: {error}")
        unreadable[run_dir] = str(error)

    fig = curves_figure(groups, metric, left_out)
    lines = "".join(f'<p class="note">left out, its records unreadable: <code>{esc(run_dir)}</code>: {esc(error)}</p>'
                    for run_dir, error in unreadable.items())
    if fig is not None:
        return image(fig, f"{metric} and train loss per epoch, mean ± std per group") + lines
    if unreadable:
        return '<p class="note">no curves to draw: no other completed run recorded per-epoch values</p>' + lines
    return '<p class="note">no curves to draw: no completed run recorded per-epoch values</p>'


def group_section(group: Group, metric: str, number: int, unreadable: dict[Path, str]) -> str:
    """The health figure and findings of the run that stands for the group (plotting.shown_run:
    its median run by `metric`, else the run that recorded the most steps), and a line for each
    of its runs whose records the curves could not read."""
    from regexp.plotting import figure_of, read_health, shown_run

    parts = [f'<div class="group" id="group-{number}"><h3>{esc(group.label)}</h3>']
    run, why = shown_run(group, metric)
    if run is None:
        parts.append(f'<p class="note">{esc(why)}: no health figure (see Runs for why)</p>')
    else:
        parts.append(f'<p class="note">{esc(why)}: <code>{esc(run.run_dir)}</code> (seed {esc(run.seed)}, '
                     f'{esc(metric)} {esc(fmt(run.metrics.get(metric)))})</p>')
        try:
            health = read_health(run.run_dir)
            parts.append(image(figure_of(health), f"training health of {run.run_dir}"))
            recorded = "no metrics were recorded" if health.empty else "nothing in the metrics matches a known failure"
        except RunError as e:
            warn(f"no health figure for {run.run_dir}: {e}")
            parts.append(f'<p class="note">no health figure: {esc(e)}</p>')
            recorded = "its metrics are unreadable"
        parts.append(findings_html(run.run_dir, recorded))
    parts += [f'<p class="note">records unreadable, left out of the curves: <code>{esc(r.run_dir)}</code>: '
              f"{esc(unreadable[r.run_dir])}</p>" for r in group.runs if r.run_dir in unreadable and r is not run]
    return "".join(parts) + "</div>"


def findings_html(run_dir: Path, none_because: str) -> str:
    """The run's findings: its diagnosis.json, else those its summary.json holds; without any,
    `none_because` says why."""
    try:
        findings = read_diagnosis(run_dir)
        if findings is None:
            findings = load_summary(run_dir).findings
    except RunError as e:
        warn(f"no findings for {run_dir}: {e}")
        return f'<p class="note">findings unreadable: {esc(e)}</p>'
    if not findings:
        return f'<p class="note">no findings: {esc(none_because)}</p>'
    return "".join(finding_html(f) for f in findings if isinstance(f, dict))


def finding_html(finding: dict[str, Any]) -> str:
    evidence = finding.get("evidence")
    advice = finding.get("interventions") or []
    return (f'<div class="finding"><b>{esc(finding.get("title", finding.get("rule", "finding")))}</b>'
            f' at step {esc(finding.get("step", MISSING))}: {esc(finding.get("message", ""))}'
            + (f"<br>evidence: {esc(short_evidence(evidence))}" if isinstance(evidence, dict) else "")
            + (f"<br>try: {esc('; '.join(map(str, advice)))}" if isinstance(advice, list) and advice else "")
            + "</div>")


# ---------------------------------------------------------------- config and runs

def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{dotted key: value as text} of a resolved config."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = as_text(value)
    return flat


def differing_config(groups: list[Group]) -> list[tuple[str, list[str]]]:
    """(key, one cell per group) for each config key whose values differ between groups; a
    group whose runs disagree on a key shows each value. Seeds and paths aside, as compare does."""
    per_run = {id(run): flat_config(run.config) for g in groups for run in g.runs}
    keys = dict.fromkeys(k for flat in per_run.values() for k in flat)
    # a node that is null in some runs (an optional group not chosen: regularizer.dropout) and holds
    # keys in others: its keys' rows show the difference
    nodes = {key[:i] for key in keys for i, char in enumerate(key) if char == "."}
    rows = []
    for key in keys:
        if key in nodes or key in NOT_EXPERIMENT_KEYS or key.startswith(NOT_EXPERIMENT_PREFIXES):
            continue
        cells = [", ".join(sorted({per_run[id(run)].get(key, MISSING) for run in g.runs})) for g in groups]
        if len(set(cells)) > 1:
            rows.append((key, cells))
    return rows


def config_section(groups: list[Group]) -> str:
    rows = differing_config(groups)
    if not rows:
        return '<p class="note">none: the groups share every config key (seeds aside)</p>'
    return table(["key", *(esc(g.label) for g in groups)],
                 [f"<tr><td><code>{esc(key)}</code></td>{''.join(cell(c) for c in cells)}</tr>" for key, cells in rows])


def runs_table(groups: list[Group], metric: str) -> str:
    rows = [run_row(run, g, metric) for g in groups for run in g.runs]
    return table(["run dir", "group", "seed", "status", esc(metric), "in means", "why not"], rows)


def run_row(run: Run, group: Group, metric: str) -> str:
    value = run.metrics.get(metric)
    in_means = run.averaged and value is not None
    why = untrained_detail(run) if not run.averaged else None if in_means else f"no finite {metric} recorded"
    status = f"{run.status.value} ({SMOKE})" if run.smoke else run.status.value
    return (f"<tr><td><code>{esc(run.run_dir)}</code></td>{cell(group.label)}{cell(MISSING if run.seed is None else run.seed)}"
            f'<td class="{status_kind(run.status.value)}">{esc(status)}</td>'
            f"{cell(fmt(value), num=True)}{cell('yes' if in_means else 'no')}{cell(why or '')}</tr>")
