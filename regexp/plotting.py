"""Figures drawn from run dirs (docs/plots.md): one run's training-health figure, the same
figure as small multiples (one column per group), and `regexp compare --plot`'s curves per group.

Everything is read through regexp.rundir. matplotlib is imported inside the functions and only
through `matplotlib.figure.Figure` (no pyplot: no display, no global state). Series longer than a
figure has pixels for are drawn as their min and max per bucket of steps, so a run of 100,000 log
steps draws as fast as one of 2,000. A group of runs reaches this module as a `comparison.Group`
(its `label` and `runs`, each run with `run_dir`, `status` and final `metrics`).
"""

import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from regexp.rundir import RunError, Summary, atomic_write, read_diagnosis, read_metrics, read_summary
from regexp.tracking import check_output_file, warn

BUCKETS = 600  # a longer series is drawn as min and max over this many buckets of steps
HEATMAP_COLUMNS = 400  # step buckets of a heatmap
HEATMAP_ABOVE = 8  # more layers than this: the per-layer families are drawn as heatmaps (layer x step)
UPDATE_RATIO_GUIDE = 1e-3  # the usual healthy update/weight ratio per step
PANEL_SIZE = (5.0, 3.2)  # inches, one panel of the health figure
DPI = 100
TRAIN_LOSS = "train/loss"

CURVES = {  # panel -> (metric, label, style); val/* and epoch/* are per epoch, drawn at the epoch's last step
    "loss": ((TRAIN_LOSS, "train", "-"), ("epoch/train_loss", "train (epoch mean)", "o-"), ("val/loss", "val", "o-")),
    "accuracy": (("train/acc", "train", "-"), ("epoch/train_acc", "train (epoch mean)", "o-"),
                 ("val/acc", "val", "o-")),
    "lr": (("opt/lr", "lr", "-"), ("epoch/lr", "lr (per epoch)", "o-")),
    "global": (("grad/global_norm", "before clipping", "-"), ("grad/global_norm_clipped", "after clipping", "--")),
}
PER_EPOCH_STANDIN = {"epoch/train_loss": TRAIN_LOSS, "epoch/train_acc": "train/acc", "epoch/lr": "opt/lr"}
"""An epoch row's train values, drawn only when the run recorded no log step of them (a run shorter
than monitor.log_every): with log steps they are those steps' means, and the log steps say more."""
MAX_STEP = 2**63  # steps are counted in int64: a larger number is no step a run recorded
MAX_VALUE = 1e100  # larger values are left out: matplotlib's axes overflow near 1e300 (float32 stops at 3.4e38)
CLIPPED_SHARE = "grad/clip_frac"  # recorded only when clipping is on: without it, after = before


@dataclass(frozen=True)
class Family:
    """A per-layer metric: its keys are `<prefix><layer>`."""
    prefix: str
    title: str
    log: bool
    guide: Optional[float] = None
    bounds: Optional[tuple[float, float]] = None  # the values a share can take: a heatmap's colour scale


LAYER_FAMILIES = (
    Family("grad/norm/", "gradient norm per layer (before clipping)", True),
    Family("act/std/", "activation std per layer", True),
    Family("act/dead_frac/", "dead fraction per layer", False, bounds=(0.0, 1.0)),
    Family("weight/update_ratio/", "update ratio per layer (|Δw| / |w|)", True, UPDATE_RATIO_GUIDE),
    Family("weight/norm/", "weight norm per layer", True),
)


@dataclass
class Series:
    steps: Any  # numpy arrays, in step order
    values: Any


@dataclass
class RunHealth:
    """What the health figure draws, read from one run dir."""
    run_dir: Path
    summary: Optional[Summary]
    series: dict[str, Series] = field(default_factory=dict)  # metric name -> finite values at their steps
    marks: list[tuple[int, str]] = field(default_factory=list)  # (step, finding names) in step order
    nonfinite_step: Optional[int] = None
    outside: list[tuple[int, str]] = field(default_factory=list)  # marks outside the recorded steps: not drawn

    @property
    def empty(self) -> bool:
        return not self.series

    def layers(self, family: Family) -> list[str]:
        """The family's layers in the order the run recorded them: input to output."""
        return [name[len(family.prefix):] for name in self.series if name.startswith(family.prefix)]

    def deep(self) -> bool:
        return max((len(self.layers(f)) for f in LAYER_FAMILIES), default=0) > HEATMAP_ABOVE


# ---------------------------------------------------------------- reading a run

def read_health(run_dir: Path) -> RunHealth:
    """The run's series, findings and non-finite step; RunError when metrics.jsonl (or
    diagnosis.json) is unreadable. Values that `finite` refuses and records without a
    step (see as_step) are left out; so are marks outside the recorded steps (kept in `outside`),
    which would stretch the step axis until the run is a sliver."""
    import numpy as np

    run_dir = Path(run_dir)
    records = [record for record in read_metrics(run_dir) if as_step(record.get("step")) is not None]
    summary = read_summary(run_dir)
    events: dict[str, int] = {}  # finding rule -> the step of its live event
    nonfinite = None
    for record in records:
        if "finding/rule" in record:
            events.setdefault(str(record["finding/rule"]), record["step"])
        elif "nonfinite/step" in record and nonfinite is None:
            nonfinite = record["step"]
    if nonfinite is None and summary is not None and summary.nonfinite:
        nonfinite = as_step(summary.nonfinite.get("nonfinite/step"))
    values = [record for record in records if "finding/rule" not in record and "nonfinite/step" not in record]
    names = [name for name in names_in_order(values) if drawn(name)]
    steps = np.array([record["step"] for record in values], dtype=np.int64)
    series = {name: s for name in names if (s := series_of(values, steps, name)) is not None}
    marks = finding_marks(run_dir, summary, events)
    recorded = range(min(r["step"] for r in records), max(r["step"] for r in records) + 1) if records else range(0)
    outside = [mark for mark in marks if mark[0] not in recorded]
    if nonfinite is not None and nonfinite not in recorded:
        outside, nonfinite = sorted([*outside, (nonfinite, "non-finite")]), None
    return RunHealth(run_dir, summary, series, [mark for mark in marks if mark[0] in recorded], nonfinite, outside)


def names_in_order(records: list[dict[str, Any]]) -> list[str]:
    """Every key of the records, in the order they first appear (a run records its layers from
    input to output); the records are read only until each key has been seen."""
    every = set().union(*records)
    ordered: dict[str, None] = {}
    for record in records:
        ordered.update(dict.fromkeys(record))
        if len(ordered) == len(every):
            break
    return list(ordered)


def drawn(name: str) -> bool:
    """Whether the health figure draws this metric."""
    return (any(name == metric for curves in CURVES.values() for metric, _, _ in curves) or name == CLIPPED_SHARE
            or any(name.startswith(f.prefix) for f in LAYER_FAMILIES))


NUMBERS = {float, int, type(None)}


def series_of(records: list[dict[str, Any]], steps: Any, name: str) -> Optional[Series]:
    """The finite values of `name` at their steps, in step order (None when there are none);
    column by column, as numpy converts a long run's values in one call."""
    import numpy as np

    column = [record.get(name) for record in records]
    try:
        if not set(map(type, column)) <= NUMBERS:  # numpy would read "1.5" and True as numbers
            raise TypeError
        values = np.array(column, dtype=np.float64)  # a missing value (None) becomes NaN
    except (TypeError, OverflowError):  # text, lists, booleans, huge integers: value by value
        values = np.array([math.nan if (v := finite(value)) is None else v for value in column], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        kept = np.abs(values) <= MAX_VALUE  # NaN and infinities too
    if not kept.any():
        return None
    order = np.argsort(steps[kept], kind="stable")
    return Series(steps[kept][order], values[kept][order])


def finite(value: Any) -> Optional[float]:
    """A value a figure can draw: a float or integer of magnitude at most MAX_VALUE."""
    if type(value) in (float, int) and abs(value) <= MAX_VALUE:
        return float(value)
    return None


def as_step(value: Any) -> Optional[int]:
    """A step (or epoch) number: an integer from 0 up to int64's largest; anything else (a
    negative or huge number, a float, text, a boolean) is none."""
    return value if type(value) is int and 0 <= value < MAX_STEP else None


def finding_marks(run_dir: Path, summary: Optional[Summary], events: dict[str, int]) -> list[tuple[int, str]]:
    """(step, names) of the run's findings: at the step of the finding's live event when the run
    has one, else at the step its evidence names; findings at one step share a mark."""
    findings = read_diagnosis(run_dir)
    if findings is None:
        findings = summary.findings if summary is not None else []
    at: dict[int, list[str]] = {}
    for finding in findings:
        if not isinstance(finding, dict):
            continue
        name = str(finding.get("rule") or finding.get("title") or "finding")
        evidence = finding.get("evidence") if isinstance(finding.get("evidence"), dict) else {}
        step = events.get(name, as_step(evidence.get("step")))
        step = step if step is not None else as_step(finding.get("step"))
        if step is not None:
            at.setdefault(step, []).append(name)
    return [(step, ", ".join(names)) for step, names in sorted(at.items())]


# ---------------------------------------------------------------- the health figure

@dataclass(frozen=True)
class Panel:
    key: str  # "loss", "accuracy", "lr", "global", or a family's prefix
    title: str
    log: bool = False


def panels_of(health: RunHealth) -> list[Panel]:
    """The panels the run has data for, in reading order."""
    panels = [panel for panel in (Panel("loss", "loss", log=True), Panel("accuracy", "accuracy"),
                                  Panel("lr", "learning rate"), Panel("global", "global gradient norm", log=True))
              if curves_drawn(health, panel)]
    panels += [Panel(f.prefix, f.title, f.log) for f in LAYER_FAMILIES if health.layers(f)]
    return panels


def curves_drawn(health: RunHealth, panel: Panel) -> list[tuple[str, str, str]]:
    """The (metric, label, style) of a curve panel that the run has values of: an epoch row's train
    value only without its log steps, the value after clipping only with clipping on."""
    return [(name, label, style) for name, label, style in CURVES[panel.key] if name in health.series
            and PER_EPOCH_STANDIN.get(name) not in health.series
            and (name != "grad/global_norm_clipped" or CLIPPED_SHARE in health.series)]


def health_figure(run_dir: Path) -> Any:
    """One run's training-health figure (a matplotlib Figure); RunError for unreadable records."""
    return figure_of(read_health(run_dir))


def figure_of(health: RunHealth) -> Any:
    from matplotlib.figure import Figure

    panels = panels_of(health)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.6))
    fixed_margins(fig, top=0.85, left=0.75, bottom=0.7 if health.outside else 0.45)  # room for the note
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    deep = health.deep()
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        draw_panel(ax, panel, health, deep, scale=None, labels=True, named_marks=i == 0)
        scale_y([ax], panel, deep)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=axes[0].transAxes)
    if health.outside:
        fig.text(0.01, 0.02, plain("not drawn, outside the recorded steps: " + "; ".join(
            f"{names} at step {step}" for step, names in health.outside)), fontsize="x-small", color="0.35")
    fig.suptitle(plain(title_of(health)), fontsize="medium")
    return fig


def health_columns(columns: list[tuple[str, Path]]) -> Any:
    """Small multiples: one column per (label, run dir), the panels as rows, shared axes per row
    (and a shared colour scale per heatmap row). RunError for unreadable records."""
    from matplotlib.figure import Figure

    healths = [(label, read_health(run_dir)) for label, run_dir in columns]
    panels = list(dict.fromkeys(p for _, h in healths for p in panels_of(h)))
    deep = any(h.deep() for _, h in healths)
    nrows, ncols = max(1, len(panels)), max(1, len(healths))
    fig = Figure(figsize=(4.2 * ncols + 1.2, 2.6 * nrows + 1.0))
    fixed_margins(fig, top=1.4, left=1.0)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    # the legend on the first column that has a row's panel, its colour scale on the last one, and
    # each column's marks named on its first panel: a column may lack a panel (monitor=off)
    has = [[has_panel(health, panel) for _, health in healths] for panel in panels]
    named_row = [next((row for row in range(len(panels)) if has[row][col]), None) for col in range(len(healths))]
    for row, panel in enumerate(panels):
        heatmap = deep and is_family(panel)
        scale = value_range([h for _, h in healths], panel) if heatmap else None
        first, last = has[row].index(True), len(healths) - 1 - has[row][::-1].index(True)
        for col, (label, health) in enumerate(healths):
            ax = axes[row][col]
            if col > 0 and not heatmap:  # a heatmap's rows are its own run's layers
                ax.sharey(axes[row][0])
            if has[row][col]:
                draw_panel(ax, panel, health, deep, scale, labels=col == first, named_marks=row == named_row[col],
                           colorbar=col == last)
            else:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", color="0.5", transform=ax.transAxes)
            if row == 0:
                ax.set_title(plain(label), fontsize="small")
            if col == 0:
                ax.set_ylabel(plain(panel.title), fontsize="small")
        scale_y(list(axes[row]), panel, deep)
    steps = [s.steps for _, h in healths for s in h.series.values()]
    if steps:  # every run's steps: a heatmap's extent would otherwise set the shared axis to its own run's
        axes[0][0].set_xlim(min(int(s[0]) for s in steps), max(int(s[-1]) for s in steps) + 1)
    fig.suptitle("training health per group (each column: the group's median completed run, else the run that "
                 "recorded the most steps)", fontsize="medium")
    return fig


def fixed_margins(fig: Any, top: float, left: float, bottom: float = 0.45) -> None:
    """Margins and gaps in inches: matplotlib's automatic layouts measure every tick label and
    would take most of the drawing time of a figure this size."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - 0.55 / width, top=1 - top / height, bottom=bottom / height,
                        wspace=0.32, hspace=0.42)


def has_panel(health: RunHealth, panel: Panel) -> bool:
    return panel in panels_of(health)


def is_family(panel: Panel) -> bool:
    return any(panel.key == f.prefix for f in LAYER_FAMILIES)


def family_of(panel: Panel) -> Family:
    return next(f for f in LAYER_FAMILIES if f.prefix == panel.key)


def value_range(healths: list[RunHealth], panel: Panel) -> Optional[tuple[float, float]]:
    """(low, high) of a family's values over several runs (positive ones on a log scale)."""
    import numpy as np

    family = family_of(panel)
    values = [health.series[family.prefix + layer].values for health in healths for layer in health.layers(family)]
    values = np.concatenate(values) if values else np.empty(0)
    if family.log:
        values = values[values > 0]
    return (float(values.min()), float(values.max())) if values.size else None


def draw_panel(ax: Any, panel: Panel, health: RunHealth, deep: bool, scale: Optional[tuple[float, float]],
               labels: bool, named_marks: bool, colorbar: bool = True) -> None:
    """One panel on `ax`, the findings and the non-finite step marked on it (named on the first)."""
    from matplotlib.ticker import MaxNLocator

    if is_family(panel):
        family = family_of(panel)
        if deep:
            draw_heatmap(ax, health, family, scale, colorbar)
        else:
            draw_layers(ax, health, family, legend=labels)
    else:
        draw_run_curves(ax, panel, health, legend=labels)
    ax.set_title(plain(panel.title), fontsize="small")
    ax.set_xlabel("step", fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one step alone: its own tick
    ax.tick_params(which="both", labelsize="x-small")
    mark_events(ax, health, named_marks)


def draw_run_curves(ax: Any, panel: Panel, health: RunHealth, legend: bool) -> None:
    for color, (name, label, style) in enumerate(curves_drawn(health, panel)):
        s = health.series[name]
        x, y = thinned(s.steps, s.values)
        fmt = style + ("o" if len(x) == 1 and "o" not in style else "")  # one point: a dot, not an empty line
        ax.plot(x, y, fmt, color=f"C{color}", label=label, linewidth=1, markersize=4)
    if panel.key == "global" and CLIPPED_SHARE in health.series:
        s = health.series[CLIPPED_SHARE]
        share = ax.twinx()
        x, y = thinned(s.steps, s.values)
        share.fill_between(x, y, step="post", color="C3", alpha=0.15, linewidth=0, label="clipped share")
        share.set_ylim(0, 1.05)
        share.set_ylabel("clipped share", fontsize="x-small", color="C3")
        share.tick_params(labelsize="x-small", colors="C3")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)


def layer_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def scale_y(axes: list[Any], panel: Panel, deep: bool) -> None:
    """A log scale for the update ratio (its guide is a ratio), and for other log panels where
    the values drawn on `axes` (a row shares one scale) span more than a decade and a half: a
    narrower range reads better on a linear one."""
    import numpy as np

    if not panel.log or (deep and is_family(panel)):
        return
    values = [np.asarray(line.get_ydata(), dtype=float) for ax in axes for line in ax.get_lines()
              if not line.get_label().startswith("_")]  # the curves, not the guide or the marks
    values = np.concatenate(values) if values else np.empty(0)
    values = values[np.isfinite(values) & (values > 0)]
    guided = is_family(panel) and family_of(panel).guide is not None
    if guided or (values.size and values.max() > 30 * values.min()):
        for ax in axes:
            ax.set_yscale("log")


def draw_layers(ax: Any, health: RunHealth, family: Family, legend: bool) -> None:
    """One line per layer, coloured from input (dark) to output (light)."""
    layers = health.layers(family)
    for color, layer in zip(layer_colors(len(layers)), layers):
        s = health.series[family.prefix + layer]
        x, y = thinned(s.steps, s.values)
        ax.plot(x, y, "-o" if len(x) == 1 else "-", color=color, linewidth=1, label=plain(layer))
    if family.guide is not None:
        ax.axhline(family.guide, color="0.3", linestyle="--", linewidth=0.8)
        ax.annotate(f"{family.guide:g}", (1, family.guide), xycoords=("axes fraction", "data"), fontsize="x-small",
                    ha="right", va="bottom", color="0.3")
    if legend:
        ax.legend(fontsize="xx-small", title="input → output", title_fontsize="xx-small",
                  ncol=2 if len(layers) > 4 else 1)
    ax.grid(alpha=0.3)


def draw_heatmap(ax: Any, health: RunHealth, family: Family, scale: Optional[tuple[float, float]],
                 colorbar: bool) -> None:
    """Layer x step, each cell the mean over its bucket of steps; input at the top."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    layers = health.layers(family)
    all_steps = np.concatenate([health.series[family.prefix + layer].steps for layer in layers])
    first, last = int(all_steps.min()), int(all_steps.max()) + 1
    columns = min(HEATMAP_COLUMNS, len(np.unique(all_steps)))
    edges = np.linspace(first, last, columns + 1)
    grid = np.full((len(layers), columns), np.nan)
    for row, layer in enumerate(layers):
        s = health.series[family.prefix + layer]
        bucket = np.clip(np.searchsorted(edges, s.steps, side="right") - 1, 0, columns - 1)
        counts = np.bincount(bucket, minlength=columns)
        sums = np.bincount(bucket, weights=s.values, minlength=columns)
        with np.errstate(invalid="ignore", divide="ignore"):
            grid[row] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    if family.log:
        grid[grid <= 0] = np.nan
    if scale is None:
        scale = (float(np.nanmin(grid)), float(np.nanmax(grid))) if np.isfinite(grid).any() else (1.0, 1.0)
    low, high = family.bounds or scale
    if low >= high:
        low, high = (low / 2, high * 2) if family.log and low > 0 else (low - 0.5, high + 0.5)
    norm = LogNorm(low, high) if family.log and low > 0 else Normalize(low, high)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", norm=norm, cmap="magma",
                      extent=(edges[0], edges[-1], len(layers) - 0.5, -0.5))
    every = max(1, math.ceil(len(layers) / 12))
    ax.set_yticks(range(0, len(layers), every), [plain(layer) for layer in layers[::every]], fontsize="xx-small")
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, pad=0.01)
        bar.ax.tick_params(which="both", labelsize="xx-small")
        if family.guide is not None and low <= family.guide <= high:
            bar.ax.axhline(family.guide, color="cyan", linewidth=1.5)


def mark_events(ax: Any, health: RunHealth, named: bool) -> None:
    """The findings (grey, dotted) and the non-finite step (red, dashed: with the findings of
    its step, if any), named on one panel."""
    marks = dict(health.marks)
    if health.nonfinite_step is not None:
        step = health.nonfinite_step
        marks[step] = ", ".join(filter(None, [marks.get(step), f"non-finite at step {step}"]))
    for step, names in sorted(marks.items()):
        color, style = ("red", "--") if step == health.nonfinite_step else ("0.35", ":")
        ax.axvline(step, color=color, linestyle=style, linewidth=1)
        if named:
            ax.text(step, 0.98, f" {plain(names)}", transform=ax.get_xaxis_transform(), rotation=90, va="top",
                    ha="right", fontsize="xx-small", color=color)


def thinned(steps: Any, values: Any) -> tuple[Any, Any]:
    """A long series as its min and max per bucket of consecutive points (what a pixel column
    would show), in step order; a short one as it is."""
    import numpy as np

    if len(steps) <= 2 * BUCKETS:
        return steps, values
    starts = np.linspace(0, len(steps), BUCKETS + 1).astype(np.int64)[:-1]
    lows, highs = np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts)
    return np.repeat(steps[starts], 2), np.column_stack((lows, highs)).ravel()


def title_of(health: RunHealth) -> str:
    """What identifies the run: model, optimizer and lr, regularizers, seed; then its dir and status."""
    summary = health.summary
    if summary is None:
        return health.run_dir.name
    config = summary.config
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    parts = [" ".join([str(model.get("name", "model?")), *(f"{k}={compact(model[k])}" for k in
                                                            ("hidden", "depth", "width", "activation") if k in model)])]
    init = config.get("init") if isinstance(config.get("init"), dict) else {}
    if init.get("name") not in (None, "default"):
        parts.append(f"init={init['name']}" + (f" std={compact(init['std'])}" if init["name"] == "normal" else ""))
    optimizer = config.get("optimizer") if isinstance(config.get("optimizer"), dict) else {}
    if optimizer:
        parts.append(f"{optimizer.get('name', 'optimizer?')} lr={compact(optimizer.get('lr'))}"
                     + (f" wd={compact(optimizer['weight_decay'])}" if optimizer.get("weight_decay") else ""))
    clip = config.get("clip") if isinstance(config.get("clip"), dict) else {}
    if clip.get("name") not in (None, "none"):
        value = clip.get("max_norm") if clip["name"] == "norm" else clip.get("clip_value")
        parts.append(f"clip={clip['name']} {compact(value)}")
    regularizers = config.get("regularizer") if isinstance(config.get("regularizer"), dict) else {}
    chosen = [regularizer_text(name, node) for name, node in regularizers.items() if isinstance(node, dict)]
    parts.append(" + ".join(chosen) if chosen else "no regularizer")
    if "seed" in config:
        parts.append(f"seed {config['seed']}")
    return " · ".join(parts) + f"\n{health.run_dir.name} · {summary.status.value} · {summary.steps} steps"


def regularizer_text(name: str, node: dict[str, Any]) -> str:
    values = [f"{k}={compact(v)}" for k, v in node.items() if k != "name" and type(v) in (int, float)]
    return f"{name}({', '.join(values)})" if values else name


def compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(map(compact, value)) + "]"
    return str(value)


def plain(text: str) -> str:
    """User text as matplotlib draws it literally: `$` would start math mode."""
    return str(text).replace("$", r"\$")


# ---------------------------------------------------------------- groups: compare --plot, plot --by

def median_run(group: Any, metric: str) -> Optional[Any]:
    """The group's trained run whose `metric` is the median (an even count: the lower middle),
    None when no trained run has the metric. Smoke runs are never the median: they are no result."""
    runs = sorted((run for run in group.runs if run.averaged and metric in run.metrics),
                  key=lambda run: (run.metrics[metric], str(run.run_dir)))
    return runs[(len(runs) - 1) // 2] if runs else None


def shown_run(group: Any, metric: str) -> tuple[Optional[Any], str]:
    """(the run whose health figure stands for the group, why it): the median run by `metric`
    (median_run); in a group without one (every run diverged, stopped, pruned or failed), the run
    whose metrics.jsonl reaches the furthest step, as that is where the figure explains most.
    (None, why) when no run of the group recorded a step."""
    run = median_run(group, metric)
    if run is not None:
        trained = sum(1 for r in group.runs if r.averaged and metric in r.metrics)
        return run, f"median run by {metric} ({run.metrics[metric]:.4g}, of {trained} completed)"
    none = ("no completed run" + (f" with {metric}" if any(r.averaged for r in group.runs) else "")
            + (" but smoke runs" if any(r.smoke for r in group.runs) else ""))
    steps = {r.run_dir: recorded_steps(r.run_dir) for r in group.runs}
    longest = min(group.runs, key=lambda r: (-steps[r.run_dir], str(r.run_dir)), default=None)
    if longest is None or not steps[longest.run_dir]:
        return None, f"{none}, and no run recorded a step"
    ended = (f"{longest.status.value} at step {longest.nonfinite_step}" if longest.nonfinite_step is not None
             else f"{longest.status.value}, recorded to step {steps[longest.run_dir]}")
    return longest, f"{none}; shown: the longest run ({ended})"


def recorded_steps(run_dir: Path) -> int:
    """The last step of the run's metrics.jsonl (0 without one, or when it cannot be read)."""
    try:
        return max((step for record in read_metrics(run_dir) if (step := as_step(record.get("step"))) is not None),
                   default=0)
    except RunError:
        return 0


def curve_metric(metric: str) -> str:
    """The per-epoch curve that tracks `metric`: test/* is measured once, val/* every
    epoch, and the final train/* are the last of the epoch means epoch/train_*."""
    if metric.startswith("test/"):
        return "val/" + metric[len("test/"):]
    if metric.startswith("train/"):
        return "epoch/train_" + metric[len("train/"):]
    return metric


def curve_of(records: list[dict[str, Any]], name: str) -> dict[int, float]:
    """{epoch: value} of a run's metric records; the last record of an epoch wins (the
    epoch's own row comes after its log steps)."""
    curve: dict[int, float] = {}
    for record in records:
        value, epoch = finite(record.get(name)), as_step(record.get("epoch"))
        if epoch is not None and value is not None:
            curve[epoch] = value
    return curve


def compare_plot_warning(run_dir: Path, error: RunError) -> None:
    """`regexp compare --plot`'s word on a run whose records cannot be read."""
    warn(f"--plot: leaving out {run_dir}: {error}")


def curves_figure(groups: Sequence[Any], metric: str,
                  unreadable: Callable[[Path, RunError], None] = compare_plot_warning) -> Optional[Any]:
    """Each group's mean curve (± std band where ≥ 2 runs reached the epoch) over its trained
    runs, of the metric's per-epoch counterpart and of the train loss; None when there is
    nothing to draw. A run whose metrics.jsonl is corrupted is left out and handed to
    `unreadable` (the caller says so in its own words). A group is in a panel's legend only
    when it has a value of that curve, with n the runs drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = list(dict.fromkeys([curve_metric(metric), curve_metric(TRAIN_LOSS)]))
    curves = trained_curves(groups, names, unreadable)
    panels = [name for name in names if any(run_curves[name] for run_curves in curves.values())]
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for color, g in enumerate(groups):
            group_curves = [curves[run.run_dir][name] for run in g.runs if curves.get(run.run_dir, {}).get(name)]
            if not group_curves:
                continue
            epochs = sorted({e for c in group_curves for e in c})
            at = [[c[e] for c in group_curves if e in c] for e in epochs]
            means = [statistics.fmean(values) for values in at]
            ax.plot(epochs, means, marker="o", color=f"C{color}", label=plain(f"{g.label} (n={len(group_curves)})"))
            band = [(e, m - statistics.stdev(v), m + statistics.stdev(v))
                    for e, m, v in zip(epochs, means, at) if len(v) > 1]
            if band:
                ax.fill_between(*zip(*band), color=f"C{color}", alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} (mean ± std over runs)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")  # each panel its own: a group may have one curve and not the other
    return fig


def trained_curves(groups: Sequence[Any], names: list[str],
                   unreadable: Callable[[Path, RunError], None]) -> dict[Path, dict[str, dict[int, float]]]:
    """run dir -> name -> {epoch: value}, for each trained run (smoke runs aside); a run whose
    metrics.jsonl is corrupted is handed to `unreadable` and left out."""
    curves = {}
    for run in (run for g in groups for run in g.runs if run.averaged):
        try:
            records = read_metrics(run.run_dir)
        except RunError as e:
            unreadable(run.run_dir, e)
            continue
        curves[run.run_dir] = {name: curve_of(records, name) for name in names}
    return curves


# ---------------------------------------------------------------- writing

def image_formats() -> dict[str, str]:
    from matplotlib.figure import Figure

    return Figure().canvas.get_supported_filetypes()


def check_out(out: Path, flag: str = "--out", example: str = "health.png") -> None:
    """An image file to write: see tracking.check_output_file."""
    check_output_file(out, flag, example, image_formats())


def png_bytes(fig: Any, dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Any, out: Path, dpi: int = DPI) -> None:
    """Written atomically (a reader never sees half an image); RunError when it cannot be."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create {out.parent} ({e.strerror or e})") from None
    atomic_write(out, lambda f: fig.savefig(f, format=out.suffix[1:].lower(), dpi=dpi), mode="wb")
