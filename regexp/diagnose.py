"""The diagnosis (its rules: docs/diagnostics.md): the classic symptoms of a failing training
run, turned into rules over a run's metrics. Each finding names the rule, the evidence
(metric, layer, step, values) and the interventions to try, in order. A healthy run has no findings.

Every rule is linear (or n log n) in the number of log steps: the same diagnosis runs at
the end of every training run and on `regexp diagnose` of a run of any length.
`regexp diagnose RUN_DIR` is `main` below.
"""

import heapq
import math
import statistics
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console

from regexp.rundir import METRICS, SUMMARY, Status, Summary, UsageError, load_summary, read_metrics
from regexp.tracking import CommandParser, plural, render

# Thresholds, chosen so that crafted failures trip them and default runs do not.
VANISHING_RATIO = 1e-3  # first layer's gradient norm / last layer's
SPIKE_FACTOR = 10.0  # global gradient norm / running median
INIT_SCALE_FACTOR = 10.0  # last activation layer's std / first's (or the inverse)
DEAD_FRACTION = 0.5  # share of units zero for a whole batch
OVERFIT_GAP = 0.05  # train acc - val acc
OVERFIT_VAL_RISE = 1.2  # last val loss / best val loss
CLIP_FRACTION = 0.5  # share of steps clipped
FLAT_CHANGE = 0.01  # relative loss change over the first log steps
OSCILLATION = 0.05  # mean |step-to-step loss change| / mean loss
NO_TREND = 0.9  # last third's mean loss / first third's


@dataclass
class Finding:
    rule: str
    title: str
    message: str
    evidence: dict[str, Any]
    interventions: list[str] = field(default_factory=list)
    step: int = 0  # ADAPTER (branch live only): the first record's step where the rule held
    decisive: bool = False
    cause: Optional[str] = None


@dataclass
class RunHistory:
    """A run's metrics.jsonl split by kind, plus its summary."""

    steps: list[dict[str, Any]]  # log steps
    epochs: list[dict[str, Any]]  # per-epoch rows with val/*
    events: list[dict[str, Any]]  # nonfinite/* events
    summary: Summary
    layer_keys: dict[tuple, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], summary: Summary) -> "RunHistory":
        return cls(
            steps=[r for r in records if "perf/step_ms" in r],
            epochs=[r for r in records if "perf/step_ms" not in r and "nonfinite/step" not in r and "epoch" in r],
            events=[r for r in records if "nonfinite/step" in r],
            summary=summary,
        )

    def layer_series(self, record: dict[str, Any], prefix: str) -> list[tuple[str, float]]:
        """(layer, value) of one record's per-layer metric, in the model's order."""
        return [(layer, record[key]) for layer, key in self._layer_keys(tuple(record), prefix)]

    def _layer_keys(self, keys: tuple[str, ...], prefix: str) -> list[tuple[str, str]]:
        # the log steps of a run share their keys: look through them once, not at every step
        if (keys, prefix) not in self.layer_keys:
            self.layer_keys[keys, prefix] = [(k[len(prefix):], k) for k in keys if k.startswith(prefix)]
        return self.layer_keys[keys, prefix]

    def config(self, *keys: str) -> Any:
        node: Any = self.summary.config
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _finite(values: list[Any]) -> list[float]:
    return [v for v in values if _is_finite(v)]


def divergence(run: RunHistory) -> Optional[Finding]:
    event = next((e for e in run.events if e.get("nonfinite/kind") != "grad_norm"), None)
    if event is None:
        return None
    where = event.get("nonfinite/where", "not reproduced")
    return Finding(
        "divergence", "Divergence: the loss or the gradients became NaN/Inf",
        f"non-finite values at step {event['nonfinite/step']}, first in {where}",
        {"metric": "nonfinite/where", "layer": event.get("nonfinite/layer"), "step": event["nonfinite/step"], "values": where},
        ["lower the learning rate (optimizer.lr)", "clip the gradient norm (clip=norm clip.max_norm=1.0)",
         "check the initialization (init=kaiming_normal for ReLU, xavier_normal for tanh)", "add normalization (norm=batchnorm)"],
    )


def clipping_zeroed_update(run: RunHistory) -> Optional[Finding]:
    event = next((e for e in run.events if e.get("nonfinite/kind") == "grad_norm"), None)
    if event is None:
        return None
    clipping = run.config("clip", "name") not in (None, "none")
    consequence = ("clip_grad_norm_ scales every gradient by max_norm/inf = 0: the model silently stops learning"
                   if clipping else "the update is not finite")
    return Finding(
        "clipping_zeroed_update" if clipping else "divergence",
        "Gradient norm overflow: " + ("clipping zeroes the update" if clipping else "divergence"),
        f"the pre-clip global gradient norm overflowed float range at step {event['nonfinite/step']} (every gradient "
        f"finite, their norm not; largest layer {event.get('nonfinite/layer')}): {consequence}",
        {"metric": "grad/global_norm", "layer": event.get("nonfinite/layer"), "step": event["nonfinite/step"], "values": "inf"},
        ["treat it as a divergence: lower the learning rate (optimizer.lr)",
         "fix the initialization scale (init=kaiming_normal, or a smaller init.std)", "add normalization (norm=batchnorm)"],
    )


def _losses(run: RunHistory) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in run.steps if isinstance(r.get("train/loss"), (int, float)) and math.isfinite(r["train/loss"])]


def lr_too_high(run: RunHistory) -> Optional[Finding]:
    losses = [v for _, v in _losses(run)]
    if len(losses) < 6 or run.events:
        return None
    third = len(losses) // 3
    first, last = statistics.fmean(losses[:third]), statistics.fmean(losses[-third:])
    swing = statistics.fmean(abs(b - a) for a, b in zip(losses, losses[1:])) / statistics.fmean(losses)
    if last < NO_TREND * first or swing < OSCILLATION:
        return None
    return Finding(
        "lr_too_high", "Learning rate too high: the loss oscillates without a downward trend",
        f"train/loss averages {first:.3g} in the first third of the log steps and {last:.3g} in the last, "
        f"moving {swing:.0%} of its mean between log steps",
        {"metric": "train/loss", "layer": None, "step": _losses(run)[-1][0], "values": {"first_third": first, "last_third": last, "swing": swing}},
        ["lower the learning rate (optimizer.lr, e.g. 3-10x)", "add warmup (scheduler=warmup_cosine)", "clip the gradient norm (clip=norm)"],
    )


def loss_flat_at_start(run: RunHistory) -> Optional[Finding]:
    points = _losses(run)
    if len(points) < 4 or run.events:
        return None
    head = points[: max(4, len(points) // 5)]
    change = abs(head[-1][1] - head[0][1]) / max(abs(head[0][1]), 1e-12)
    if change >= FLAT_CHANGE:
        return None
    return Finding(
        "loss_flat", "Loss flat at the start: learning rate too low or a bad initialization",
        f"train/loss moved {change:.2%} over steps {head[0][0]}-{head[-1][0]} ({head[0][1]:.4g} -> {head[-1][1]:.4g})",
        {"metric": "train/loss", "layer": None, "step": head[-1][0], "values": [v for _, v in head]},
        ["raise the learning rate (optimizer.lr)", "He initialization for ReLU (init=kaiming_normal)", "add normalization (norm=batchnorm)"],
    )


def vanishing_gradients(run: RunHistory) -> Optional[Finding]:
    ratios = []
    for record in run.steps:
        weighted = {name for name, _ in run.layer_series(record, "weight/norm/")}
        norms = [(n, v) for n, v in run.layer_series(record, "grad/norm/") if n in weighted and _is_finite(v)]
        if len(norms) >= 2 and norms[-1][1] > 0:
            ratios.append((norms[0][1] / norms[-1][1], record["step"], norms[0], norms[-1]))
    if not ratios:
        return None
    ratio, step, early, late = sorted(ratios, key=lambda r: r[0])[len(ratios) // 2]  # the median log step
    if ratio >= VANISHING_RATIO:
        return None
    return Finding(
        "vanishing_gradients", "Vanishing gradients: early layers barely learn",
        f"the gradient norm of {early[0]} is {ratio:.1e} x that of {late[0]} ({early[1]:.2e} vs {late[1]:.2e}, median log step)",
        {"metric": "grad/norm", "layer": early[0], "step": step, "values": {early[0]: early[1], late[0]: late[1], "ratio": ratio}},
        ["He/Xavier initialization matching the activation (init=kaiming_normal for ReLU, xavier_normal for tanh)",
         "add normalization (norm=batchnorm or layernorm)", "residual connections (model=resnet)",
         "ReLU instead of sigmoid (model.activation=relu)"],
    )


class RunningMedian:
    """The median of the values added so far (equal to statistics.median of them) in
    O(log n) per value: the smaller half in a max-heap, the larger half in a min-heap."""

    def __init__(self) -> None:
        self.low: list[float] = []  # negated: heapq's min-heap as a max-heap
        self.high: list[float] = []

    def __len__(self) -> int:
        return len(self.low) + len(self.high)

    def add(self, value: float) -> None:
        if self.low and value > -self.low[0]:
            heapq.heappush(self.high, value)
        else:
            heapq.heappush(self.low, -value)
        if len(self.low) > len(self.high) + 1:  # keep len(low) - len(high) in {0, 1}
            heapq.heappush(self.high, -heapq.heappop(self.low))
        elif len(self.high) > len(self.low):
            heapq.heappush(self.low, -heapq.heappop(self.high))

    @property
    def median(self) -> float:
        if len(self.low) > len(self.high):
            return -self.low[0]
        return (-self.low[0] + self.high[0]) / 2


def exploding_gradients(run: RunHistory) -> Optional[Finding]:
    history = RunningMedian()
    for record in run.steps:
        norm = record.get("grad/global_norm")
        if not _is_finite(norm):
            continue
        if len(history) >= 4 and norm > SPIKE_FACTOR * history.median:
            layers = [(n, v) for n, v in run.layer_series(record, "grad/norm/") if _is_finite(v)]
            layer = max(layers, key=lambda nv: nv[1])[0] if layers else None
            median = history.median
            return Finding(
                "exploding_gradients", f"Exploding gradients from layer {layer}",
                f"grad/global_norm spiked to {norm:.3g} at step {record['step']}, {norm / median:.0f} x its running median {median:.3g}",
                {"metric": "grad/global_norm", "layer": layer, "step": record["step"], "values": {"norm": norm, "median": median}},
                ["clip the gradient norm (clip=norm clip.max_norm=1.0)", "lower the learning rate (optimizer.lr)", "add normalization (norm=batchnorm)"],
            )
        history.add(norm)
    return None


def bad_init_scale(run: RunHistory) -> Optional[Finding]:
    first = next((r for r in run.steps if any(k.startswith("act/std/") for k in r)), None)
    if first is None:
        return None
    stds = [(n, v) for n, v in run.layer_series(first, "act/std/") if _is_finite(v)]
    if len(stds) < 3 or stds[0][1] <= 0:
        return None
    ratio = stds[-1][1] / stds[0][1]
    if 1 / INIT_SCALE_FACTOR <= ratio <= INIT_SCALE_FACTOR:
        return None
    trend = "grows" if ratio > 1 else "shrinks"
    return Finding(
        "bad_init_scale", f"Bad initialization scale: activation std {trend} with depth",
        f"at step {first['step']} the activation std goes from {stds[0][1]:.3g} ({stds[0][0]}) to {stds[-1][1]:.3g} ({stds[-1][0]}), x{ratio:.2g}",
        {"metric": "act/std", "layer": stds[-1][0], "step": first["step"], "values": dict(stds)},
        ["initialization matching the activation (init=kaiming_normal for ReLU, xavier_normal for tanh)", "add normalization (norm=batchnorm)"],
    )


def dying_relu(run: RunHistory) -> Optional[Finding]:
    last = next((r for r in reversed(run.steps) if any(k.startswith("act/dead_frac/") for k in r)), None)
    if last is None:
        return None
    dead = [(n, v) for n, v in run.layer_series(last, "act/dead_frac/") if _is_finite(v)]
    worst = max(dead, key=lambda nv: nv[1], default=None)
    if worst is None or worst[1] <= DEAD_FRACTION:
        return None
    return Finding(
        "dying_relu", "Dying ReLU: many units output zero for every input",
        f"{worst[1]:.0%} of the units of {worst[0]} are zero for the whole batch at step {last['step']}",
        {"metric": "act/dead_frac", "layer": worst[0], "step": last["step"], "values": dict(dead)},
        ["lower the learning rate (optimizer.lr)", "leaky or smooth activations (model.activation=gelu)", "He initialization (init=kaiming_normal)"],
    )


def overfitting(run: RunHistory) -> Optional[Finding]:
    evals = [r for r in run.epochs if len(_finite([r.get("val/loss"), r.get("val/acc"), r.get("epoch/train_acc")])) == 3]
    if len(evals) < 3:
        return None
    last = evals[-1]
    best = min(evals, key=lambda r: r["val/loss"])
    gap = last["epoch/train_acc"] - last["val/acc"]
    if gap <= OVERFIT_GAP or last["val/loss"] <= OVERFIT_VAL_RISE * best["val/loss"]:
        return None
    return Finding(
        "overfitting", "Overfitting: training accuracy far above validation, validation loss rising",
        f"train acc {last['epoch/train_acc']:.3f} vs val/acc {last['val/acc']:.3f} at epoch {last['epoch']}; val/loss rose from "
        f"{best['val/loss']:.3g} (epoch {best['epoch']}) to {last['val/loss']:.3g}",
        {"metric": "val/loss", "layer": None, "step": last.get("step"), "values": {"train_acc": last["epoch/train_acc"], "val/acc": last["val/acc"],
                                                                                  "best_val_loss": best["val/loss"], "last_val_loss": last["val/loss"]}},
        ["dropout (+regularizer=dropout)", "weight decay / L2 (optimizer.weight_decay or +regularizer=l2)",
         "augmentation (+regularizer=augment)", "early stopping (+regularizer=early_stopping)"],
    )


def clip_too_low(run: RunHistory) -> Optional[Finding]:
    fractions = _finite([r.get("grad/clip_frac") for r in run.steps])
    if not fractions or statistics.fmean(fractions) <= CLIP_FRACTION:
        return None
    norms = sorted(_finite([r.get("grad/global_norm") for r in run.steps]))
    p90 = norms[min(len(norms) - 1, int(0.9 * len(norms)))] if norms else None
    max_norm = run.config("clip", "max_norm")
    return Finding(
        "clip_too_low", "Clipping threshold too low: most steps are clipped",
        f"{statistics.fmean(fractions):.0%} of the steps were clipped at clip.max_norm={max_norm}"
        + (f"; the 90th percentile of the pre-clip norm is {p90:.3g}" if p90 is not None else ""),
        {"metric": "grad/clip_frac", "layer": None, "step": run.steps[-1]["step"], "values": {"clip_frac": statistics.fmean(fractions), "p90_pre_clip_norm": p90}},
        [f"raise clip.max_norm to about the 90th percentile of the pre-clip norm ({p90:.3g})" if p90 else "raise clip.max_norm"],
    )


RULES: list[Callable[[RunHistory], Optional[Finding]]] = [
    divergence, clipping_zeroed_update, lr_too_high, loss_flat_at_start, vanishing_gradients,
    exploding_gradients, bad_init_scale, dying_relu, overfitting, clip_too_low,
]


# ---- ADAPTER (branch live only; helper "rules" replaces this with the incremental rules): the
# Watch interface over the whole-run rules, re-run on the records so far (quadratic; tests only).
DECISIVE = ("loss_flat_at_start", "vanishing_gradients", "dying_relu")
PER_LAYER = ("vanishing_gradients", "bad_init_scale", "dying_relu")


class Watch:
    def __init__(self, config: dict[str, Any]):
        self.summary = Summary(config=config)
        self.records: list[dict[str, Any]] = []
        self.tripped: dict[str, Finding] = {}
        per_layer = (config.get("monitor") or {}).get("per_layer", True)
        self.inactive = [] if per_layer else list(PER_LAYER)

    def feed(self, record: dict[str, Any]) -> list[Finding]:
        self.records.append(record)
        run = RunHistory.from_records(self.records, self.summary)
        new = []
        for rule in RULES:
            if rule.__name__ in self.inactive or rule.__name__ in self.tripped:
                continue
            finding = rule(run)
            if finding is not None and finding.rule not in self.tripped:
                finding.step, finding.decisive = record.get("step", 0), finding.rule in DECISIVE
                self.tripped[finding.rule] = finding
                new.append(finding)
        return new

    def findings(self) -> list[Finding]:
        return list(self.tripped.values())


def diagnose(records: list[dict[str, Any]], summary: Summary) -> list[dict[str, Any]]:
    watch = Watch(summary.config or {})
    for record in records:
        watch.feed(record)
    return [asdict(f) for f in watch.findings()]


def parser() -> CommandParser:
    p = CommandParser(
        prog="regexp diagnose",
        description="What went wrong in a run and what to try, from the metrics it recorded (metrics.jsonl) "
                    "and its summary.json: the rules of the diagnosis that ends every run, applied again.",
        epilog="A failed, interrupted or still running run is diagnosed too, on what it recorded, after a line "
               "saying so (with its error). Exit codes: 0 the diagnosis was printed, whatever the run's status "
               "or findings; 1 a record file is unreadable, corrupted or not a regular file (named); 2 RUN_DIR does not "
               "exist or is not a run directory.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's directory (holding summary.json, metrics.jsonl)")
    return p


def main(args: list[str]) -> int:
    """`regexp diagnose RUN_DIR`. UsageError for bad input, RunError for a bad record file."""
    run_dir = parser().parse_args(args).run_dir
    if not run_dir.exists():
        raise UsageError(f"RUN_DIR={run_dir}: does not exist")
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR={run_dir}: not a directory; give a run's directory")
    # anything in a record's place is read (and refused, named, when it is no regular file)
    has_summary, has_metrics = os.path.lexists(run_dir / SUMMARY), os.path.lexists(run_dir / METRICS)
    if not (has_summary or has_metrics):
        raise UsageError(f"RUN_DIR={run_dir}: not a run directory (no {SUMMARY} or {METRICS})")
    summary = load_summary(run_dir) if has_summary else None
    records = read_metrics(run_dir)
    console = Console(highlight=False)
    note = what_was_recorded(summary, records)
    if note:
        console.print(f"{run_dir}: {note}", style="yellow", markup=False, soft_wrap=True)
    render(diagnose(records, summary or Summary()), console)
    return 0


def what_was_recorded(summary: Optional[Summary], records: list[dict[str, Any]]) -> Optional[str]:
    """A line for a run that did not end with a result: what it was and what is diagnosed."""
    steps = plural(sum("perf/step_ms" in r for r in records), "log step")
    if summary is None:
        return f"no {SUMMARY}: diagnosing the {steps} of {METRICS} alone"
    if summary.status.finished:
        return None
    error = f" ({summary.error.splitlines()[0]})" if summary.error else ""
    why = {Status.FAILED: "the run failed", Status.INTERRUPTED: "the run was interrupted",
           Status.RUNNING: "the run is still running (or was killed)"}[summary.status]
    return f"{why}{error}; diagnosing the {steps} it recorded"
