"""The diagnosis (its rules: docs/diagnostics.md): the classic symptoms of a failing training
run, turned into rules over a run's metrics. Each finding names the rule, the evidence
(metric, layer, step, values, threshold) and the interventions to try, in order. A healthy
run has no findings.

One rule set, two drivers. A `Watch` is fed a run's records in the order they are written
(metrics.jsonl's rows: log steps, epoch rows, non-finite events): live by the training loop,
offline by `diagnose` over the file, and both give the same findings at the same steps. Each
rule trips at the first record where the records so far satisfy it and stays tripped; a rule
that must see a sign persist holds a declared window or patience (the constants below). Every
rule does constant work per record, so a run of any length is diagnosed in linear time.
`regexp diagnose RUN_DIR` is `main` below.
"""

import math
import os
from bisect import bisect_left, insort
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import fmean
from typing import Any, Optional

from rich.console import Console

from regexp.rundir import METRICS, SUMMARY, Status, Summary, UsageError, load_summary, read_metrics
from regexp.tracking import CommandParser, plural, render

# Thresholds, chosen so that crafted failures trip them and default runs do not.
VANISHING_RATIO = 1e-3  # first layer's gradient norm / last layer's
SPIKE_FACTOR = 10.0  # global gradient norm / the median of its recent values
INIT_SCALE_FACTOR = 10.0  # last activation layer's std / first's (or the inverse)
DEAD_FRACTION = 0.5  # share of a layer's units zero for a whole batch
DEAD_NETWORK_FRACTION = 1.0  # every unit: nothing passes the layer and no gradient flows back through it
OVERFIT_GAP = 0.05  # train acc - val acc
OVERFIT_VAL_RISE = 1.2  # val loss / its best so far
CLIP_FRACTION = 0.5  # share of steps clipped
FLAT_CHANGE = 0.01  # how far (relative) the loss moves from its first log step
OSCILLATION = 0.05  # median move of the loss between log steps / its mean
NO_TREND = 0.9  # recent mean loss / the first log steps' mean: above it, no downward trend
NO_PROGRESS_FRACTION = 0.9  # the share of its start that the loss must fall below
# An untrained classifier's cross-entropy is about ln(classes): 2.3 for 10, 6.9 for 1000. A loss
# above this has logits thrown more than 100 apart: the steps overshoot. It also caps the start
# no_progress measures from, where such steps threw the first log step's loss already.
UNTRAINED_LOSS_MAX = 100.0

# Windows and patiences, in log steps (overfitting: in evaluations). A sign must hold this long
# before its rule trips: one spike or one noisy log step never makes a finding.
LR_WINDOW = 12  # the median of its 11 moves ignores a spike (which moves 2 or 3 of them)
FLAT_STEPS = 5  # the start of a run, over which a loss that did not move is flat
NO_PROGRESS_PATIENCE = 10  # decisive: 500 optimizer steps at the default log_every without a 10 % fall
VANISHING_PATIENCE = 10  # decisive: long enough for adaptive optimizers to have rescaled the early layers
# ... and at least this many optimizer steps: at monitor.log_every=1 ten log steps are ten steps, too few
# to call a run hopeless (README's deep_mlp example at log_every=1 was flat for 10 steps, then fell 12 %)
DECISIVE_SPAN = 200
EXPLODING_PATIENCE = 3  # decisive: 10x the recent median three log steps running is no spike
MEDIAN_WINDOW = 50  # the recent norms a spike is judged against: a norm that drifts over a long run is not one
MEDIAN_MIN = 4  # norms seen before a norm can be called a spike
DEAD_PATIENCE = 5  # dying_relu: units that stay dead, not a batch that missed them
DEAD_NETWORK_PATIENCE = 3  # decisive: a layer without one live unit gets no gradient to revive it
OVERFIT_PATIENCE = 3  # evaluations running
CLIP_WINDOW = 10  # the log steps whose clipped share is judged (the first steps of a run clip more)

# The interventions that more than one rule gives.
LOWER_LR = "lower the learning rate (optimizer.lr)"
RAISE_LR = "raise the learning rate (optimizer.lr)"
CLIP_NORM = "clip the gradient norm (clip=norm clip.max_norm=1.0)"
NORMALIZE = "add normalization (norm=batchnorm)"
INIT_MATCHING = "initialization matching the activation (init=kaiming_normal for ReLU, xavier_normal for tanh)"
TREAT_AS_DIVERGENCE = "treat it as a divergence: lower the learning rate (optimizer.lr)"
FIX_INIT_SCALE = "fix the initialization scale (init=kaiming_normal, or a smaller init.std)"
DEAD_UNITS_ADVICE = [LOWER_LR, "leaky or smooth activations (model.activation=gelu)", "He initialization (init=kaiming_normal)"]

# The knob each piece of advice turns, and which way (by how the advice begins): two findings
# never turn one knob opposite ways.
LEVERS = {"lower the learning rate": ("optimizer.lr", -1), TREAT_AS_DIVERGENCE: ("optimizer.lr", -1),
          "raise the learning rate": ("optimizer.lr", 1), "clip the gradient norm": ("clip.max_norm", -1),
          "raise clip.max_norm": ("clip.max_norm", 1)}

# What explains what. A too-large step (the loss thrown up, a divergence, norms exploding) kills
# units, zeroes gradients and stalls the loss; a bad init scale vanishes gradients, stalls the
# loss and, shrinking the signal, leaves units dead. Such a finding is ranked under its cause,
# and the learning rate is the cause's to advise on (the finding points to it instead).
# Gradients that vanish, or a layer that let none through, in turn explain a loss that does not move.
STEP_TOO_LARGE = ("divergence", "clipping_zeroed_update", "lr_too_high", "exploding_gradients")
EXPLAINED_BY = {
    **{rule: (*STEP_TOO_LARGE, "bad_init_scale") for rule in ("dying_relu", "dead_network")},
    "vanishing_gradients": (*STEP_TOO_LARGE, "bad_init_scale", "dead_network"),
    **{rule: (*STEP_TOO_LARGE, "bad_init_scale", "dead_network", "vanishing_gradients") for rule in ("loss_flat", "no_progress")},
}
SETTLED_BY_CAUSE = ("optimizer.lr",)


@dataclass
class Finding:
    rule: str
    title: str
    message: str
    evidence: dict[str, Any]  # metric, layer, step, values, threshold
    interventions: list[str] = field(default_factory=list)
    step: int = 0  # the first step at which the records so far satisfy the rule
    decisive: bool = False  # the run will not recover: monitor.on_finding=stop ends the run on it
    cause: Optional[str] = None  # the rule of the finding that explains this one (it is ranked under that one)


def _number(value: Any) -> Optional[float]:
    """A finite number (a bool is none, nor an integer beyond float range), else None: a value a
    rule can judge."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def record_kind(record: Any) -> Optional[str]:
    """Which of a run's records this is: "log_step", "epoch", "nonfinite", or None for what the
    rules do not read (a live finding's event, anything without an integer step)."""
    if not isinstance(record, dict) or "finding/rule" in record:
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    if "nonfinite/step" in record:
        return "nonfinite"
    if "perf/step_ms" in record:
        return "log_step"
    return "epoch" if "epoch" in record else None


class WindowMedian:
    """The median of the last `size` values added (statistics.median of them), in constant work
    per value: the window kept sorted beside its order of arrival."""

    def __init__(self, size: int):
        self.size = size
        self.arrived: deque[float] = deque()
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.arrived)

    def add(self, value: float) -> None:
        if len(self.arrived) == self.size:
            del self.sorted[bisect_left(self.sorted, self.arrived.popleft())]
        self.arrived.append(value)
        insort(self.sorted, value)

    @property
    def median(self) -> float:
        mid = len(self.sorted) // 2
        return self.sorted[mid] if len(self.sorted) % 2 else (self.sorted[mid - 1] + self.sorted[mid]) / 2


class Rule:
    """One rule of the diagnosis, fed a run's records one at a time: its Finding at the record
    where it trips, None before."""

    name = ""
    decisive = False
    per_layer = False  # reads metrics that only monitor.per_layer records
    judges_loss = False  # reads train/loss, which after a non-finite event only the divergence speaks for

    def __init__(self, watch: "Watch"):
        self.watch = watch

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        return None

    def epoch(self, record: dict[str, Any]) -> Optional[Finding]:
        return None

    def nonfinite(self, record: dict[str, Any]) -> Optional[Finding]:
        return None

    def finding(self, record: dict[str, Any], title: str, message: str, interventions: list[str], *, metric: str,
                values: Any, threshold: Any, layer: Optional[str] = None) -> Finding:
        step = record["step"]
        evidence = {"metric": metric, "layer": layer, "step": step, "values": values, "threshold": threshold}
        return Finding(self.name, title, message, evidence, list(interventions), step=step, decisive=self.decisive)


def _overflow(record: dict[str, Any]) -> str:
    return (f"the pre-clip global gradient norm overflowed float range at step {record['step']} (every gradient "
            f"finite, their norm not; largest layer {record.get('nonfinite/layer')})")


class Divergence(Rule):
    """The first non-finite event: NaN/Inf in the loss or the gradients, named by the first layer
    where it appeared (an overflowing pre-clip norm with clipping on is ClippingZeroedUpdate's)."""

    name = "divergence"

    def nonfinite(self, record: dict[str, Any]) -> Optional[Finding]:
        layer = record.get("nonfinite/layer")
        if record.get("nonfinite/kind") != "grad_norm":
            where = record.get("nonfinite/where", "not reproduced")
            return self.finding(record, "Divergence: the loss or the gradients became NaN/Inf",
                                f"non-finite values at step {record['step']}, first in {where}",
                                [LOWER_LR, CLIP_NORM, "check the initialization (init=kaiming_normal for ReLU, xavier_normal for tanh)",
                                 NORMALIZE], metric="nonfinite/where", layer=layer, values=where, threshold="finite")
        if self.watch.clipping:
            return None
        return self.finding(record, "Gradient norm overflow: divergence", f"{_overflow(record)}: the update is not finite",
                            [TREAT_AS_DIVERGENCE, FIX_INIT_SCALE, NORMALIZE], metric="grad/global_norm", layer=layer,
                            values="inf", threshold="finite")


class ClippingZeroedUpdate(Rule):
    """The pre-clip norm overflowed while clipping is on: clip_grad_norm_ scales by max_norm/inf = 0."""

    name = "clipping_zeroed_update"

    def nonfinite(self, record: dict[str, Any]) -> Optional[Finding]:
        if record.get("nonfinite/kind") != "grad_norm" or not self.watch.clipping:
            return None
        return self.finding(record, "Gradient norm overflow: clipping zeroes the update",
                            f"{_overflow(record)}: clip_grad_norm_ scales every gradient by max_norm/inf = 0: the model "
                            "silently stops learning", [TREAT_AS_DIVERGENCE, FIX_INIT_SCALE, NORMALIZE],
                            metric="grad/global_norm", layer=record.get("nonfinite/layer"), values="inf", threshold="finite")


class LrTooHigh(Rule):
    """The loss thrown above any untrained model's (UNTRAINED_LOSS_MAX) at once, unless an init that
    grows the activations with depth threw it (bad_init_scale's); or, over the last LR_WINDOW log
    steps, a loss that swings (median move at least OSCILLATION of its mean) with no downward trend
    (its last third's mean at least NO_TREND of the run's first LR_WINDOW // 3)."""

    name = "lr_too_high"
    judges_loss = True
    advice = ["lower the learning rate (optimizer.lr, e.g. 3-10x)", "add warmup (scheduler=warmup_cosine)",
              "clip the gradient norm (clip=norm)"]

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.first: list[float] = []
        self.window: deque[float] = deque(maxlen=LR_WINDOW)
        self.moves = WindowMedian(LR_WINDOW - 1)

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        loss = _number(record.get("train/loss"))
        if loss is None:
            return None
        if loss > UNTRAINED_LOSS_MAX and not self.watch.init_grows:
            return self.finding(record, "Learning rate too high: the loss blew up",
                                f"train/loss reached {loss:.3g} at step {record['step']}, above {UNTRAINED_LOSS_MAX:g} where "
                                "an untrained classifier's is about ln(classes) (2.3 for 10 classes): the steps overshoot",
                                self.advice, metric="train/loss", values={"loss": loss}, threshold=UNTRAINED_LOSS_MAX)
        third = LR_WINDOW // 3
        if len(self.first) < third:
            self.first.append(loss)
        if self.window:
            self.moves.add(abs(loss - self.window[-1]))
        self.window.append(loss)
        if len(self.window) < LR_WINDOW:
            return None
        start, recent, mean = fmean(self.first), fmean(list(self.window)[-third:]), fmean(self.window)
        swing = self.moves.median / mean if mean > 0 else 0.0
        if recent < NO_TREND * start or swing < OSCILLATION:
            return None
        return self.finding(record, "Learning rate too high: the loss oscillates without a downward trend",
                            f"train/loss averages {recent:.3g} over the {third} log steps to step {record['step']}, against "
                            f"{start:.3g} over the run's first {third}, and moves {swing:.0%} of its mean between log steps "
                            f"(the median over the last {LR_WINDOW})", self.advice, metric="train/loss",
                            values={"first": start, "recent": recent, "swing": swing},
                            threshold={"no_trend": NO_TREND, "swing": OSCILLATION})


class LossFlat(Rule):
    """Over the first FLAT_STEPS log steps, the loss stays within FLAT_CHANGE of its first value."""

    name = "loss_flat"
    judges_loss = True

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.losses: list[float] = []

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        loss = _number(record.get("train/loss"))
        if loss is None or len(self.losses) == FLAT_STEPS:
            return None
        self.losses.append(loss)
        if len(self.losses) < FLAT_STEPS:
            return None
        start = self.losses[0]
        change = max(abs(v - start) for v in self.losses) / max(abs(start), 1e-12)
        if change >= FLAT_CHANGE:
            return None
        return self.finding(record, "Loss flat at the start: learning rate too low or a bad initialization",
                            f"train/loss moved at most {change:.2%} over its first {FLAT_STEPS} log steps, to step "
                            f"{record['step']} ({start:.4g} -> {loss:.4g})",
                            [RAISE_LR, "He initialization for ReLU (init=kaiming_normal)", NORMALIZE],
                            metric="train/loss", values=list(self.losses), threshold=FLAT_CHANGE)


class NoProgress(Rule):
    """After NO_PROGRESS_PATIENCE log steps spanning DECISIVE_SPAN optimizer steps, the loss has never
    fallen below NO_PROGRESS_FRACTION of its start (the first log step's loss, at most UNTRAINED_LOSS_MAX)."""

    name = "no_progress"
    decisive = True
    judges_loss = True

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.seen = 0
        self.first = self.lowest = math.inf
        self.first_step = 0
        self.progressed = False  # the loss fell below the fraction once: the rule has nothing left to judge

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        loss = _number(record.get("train/loss"))
        if loss is None or self.progressed:
            return None
        self.seen += 1
        if self.seen == 1:
            self.first, self.first_step = loss, record["step"]
        self.lowest = min(self.lowest, loss)
        start = min(self.first, UNTRAINED_LOSS_MAX)
        self.progressed = self.lowest < NO_PROGRESS_FRACTION * start
        if self.progressed or self.seen < NO_PROGRESS_PATIENCE or record["step"] - self.first_step < DECISIVE_SPAN:
            return None
        capped = f" (capped: its first log step's was {self.first:.3g})" if self.first > start else ""
        return self.finding(record, "No progress: the loss has not fallen from its start",
                            f"over {self.seen} log steps, steps {self.first_step}-{record['step']}, train/loss is at "
                            f"best {self.lowest:.4g}, never below {NO_PROGRESS_FRACTION:.0%} of its start "
                            f"{start:.4g}{capped}",
                            [RAISE_LR, INIT_MATCHING, NORMALIZE], metric="train/loss",
                            values={"start": start, "lowest": self.lowest, **({"first": self.first} if capped else {})},
                            threshold=NO_PROGRESS_FRACTION)


class VanishingGradients(Rule):
    """The first layer's gradient norm under VANISHING_RATIO x the last layer's, VANISHING_PATIENCE
    log steps running over DECISIVE_SPAN optimizer steps."""

    name = "vanishing_gradients"
    decisive = True
    per_layer = True

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.streak = 0
        self.since = 0  # the step the streak began at

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        weighted = {name for name, _ in self.watch.layers(record, "weight/norm/")}  # not the norm layers
        norms = [(n, v) for n, v in self.watch.layers(record, "grad/norm/") if n in weighted]
        if len(norms) < 2 or norms[-1][1] <= 0:
            return None
        (early, low), (late, high) = norms[0], norms[-1]
        ratio = low / high
        self.streak = self.streak + 1 if ratio < VANISHING_RATIO else 0
        self.since = record["step"] if self.streak == 1 else self.since
        if self.streak < VANISHING_PATIENCE or record["step"] - self.since < DECISIVE_SPAN:
            return None
        return self.finding(record, "Vanishing gradients: early layers barely learn",
                            f"the gradient norm of {early} has been under {VANISHING_RATIO:g} x that of {late} for "
                            f"{self.streak} log steps running (steps {self.since}-{record['step']}); at step "
                            f"{record['step']} {ratio:.1e} x "
                            f"({low:.2e} vs {high:.2e})",
                            [f"He/Xavier {INIT_MATCHING}", "add normalization (norm=batchnorm or layernorm)",
                             "residual connections (model=resnet)", "ReLU instead of sigmoid (model.activation=relu)"],
                            metric="grad/norm", layer=early, values={early: low, late: high, "ratio": ratio},
                            threshold=VANISHING_RATIO)


class ExplodingGradients(Rule):
    """The global gradient norm above SPIKE_FACTOR x the median of the (up to MEDIAN_WINDOW) norms
    before it, EXPLODING_PATIENCE log steps running, while the loss is no lower than before the
    norm rose: sustained, never one spike. A norm that rises while the loss falls is a network
    waking up (a tiny init's gradients growing to their working size), not an explosion."""

    name = "exploding_gradients"
    decisive = True
    per_layer = True

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.recent = WindowMedian(MEDIAN_WINDOW)
        self.streak = 0
        self.lowest_before = math.inf  # the lowest loss of the log steps before the streak

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        norm = _number(record.get("grad/global_norm"))
        if norm is None:
            return None
        loss = _number(record.get("train/loss"))
        median = self.recent.median if len(self.recent) >= MEDIAN_MIN else 0.0  # a norm off zero is no spike
        self.streak = self.streak + 1 if median > 0 and norm > SPIKE_FACTOR * median else 0
        self.recent.add(norm)
        if self.streak == 0 and loss is not None:
            self.lowest_before = min(self.lowest_before, loss)
        if self.streak < EXPLODING_PATIENCE or (loss is not None and loss < self.lowest_before):
            return None
        layers = self.watch.layers(record, "grad/norm/")
        layer = max(layers, key=lambda nv: nv[1])[0] if layers else None
        return self.finding(record, f"Exploding gradients from layer {layer}",
                            f"grad/global_norm has been above {SPIKE_FACTOR:g} x the median of its recent values for "
                            f"{self.streak} log steps running, and the loss has not fallen meanwhile; at step "
                            f"{record['step']} {norm:.3g}, {norm / median:.3g} x {median:.3g}", [CLIP_NORM, LOWER_LR, NORMALIZE],
                            metric="grad/global_norm", layer=layer, values={"norm": norm, "median": median, "loss": loss},
                            threshold=SPIKE_FACTOR)


class BadInitScale(Rule):
    """At the first log step with activation stds: the last activation layer's over INIT_SCALE_FACTOR
    x the first's, or under 1 / INIT_SCALE_FACTOR of it. Judged there only: later, training has
    moved the scales."""

    name = "bad_init_scale"
    per_layer = True

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.judged = False

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        stds = self.watch.layers(record, "act/std/")
        if self.judged or not stds:
            return None
        self.judged = True
        if len(stds) < 3 or stds[0][1] <= 0:
            return None
        (first, low), (last, high) = stds[0], stds[-1]
        ratio = high / low
        if 1 / INIT_SCALE_FACTOR <= ratio <= INIT_SCALE_FACTOR:
            return None
        return self.finding(record, f"Bad initialization scale: activation std {'grows' if ratio > 1 else 'shrinks'} with depth",
                            f"at step {record['step']} the activation std goes from {low:.3g} ({first}) to {high:.3g} "
                            f"({last}), x{ratio:.2g}", [INIT_MATCHING, NORMALIZE], metric="act/std", layer=last,
                            values={"std": dict(stds), "ratio": ratio}, threshold=INIT_SCALE_FACTOR)


class DyingRelu(Rule):
    """A layer with more than DEAD_FRACTION of its units zero for a whole batch, DEAD_PATIENCE log
    steps running."""

    name = "dying_relu"
    per_layer = True
    title = "Dying ReLU: many units output zero for every input"
    threshold, patience, held = DEAD_FRACTION, DEAD_PATIENCE, f"over {DEAD_FRACTION:.0%}"

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.streaks: dict[str, int] = {}

    def dead(self, fraction: float) -> bool:
        return fraction > self.threshold

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        fractions = self.watch.layers(record, "act/dead_frac/")
        if not fractions:
            return None
        self.streaks = {n: self.streaks.get(n, 0) + 1 for n, v in fractions if self.dead(v)}
        held = [(n, v) for n, v in fractions if self.streaks.get(n, 0) >= self.patience]
        if not held:
            return None
        layer, fraction = max(held, key=lambda nv: nv[1])
        return self.finding(record, self.title,
                            f"{fraction:.0%} of the units of {layer} are zero for the whole batch at step {record['step']}; "
                            f"{self.held} for {self.patience} log steps running", DEAD_UNITS_ADVICE, metric="act/dead_frac", layer=layer,
                            values=dict(fractions), threshold=self.threshold)


class DeadNetwork(DyingRelu):
    """A layer with every unit zero for a whole batch, DEAD_NETWORK_PATIENCE log steps running:
    nothing passes it, and no gradient reaches its units to revive them."""

    name = "dead_network"
    decisive = True
    title = "Dead network: a layer passes nothing (every unit outputs zero)"
    threshold, patience, held = DEAD_NETWORK_FRACTION, DEAD_NETWORK_PATIENCE, "all of them"

    def dead(self, fraction: float) -> bool:
        return fraction >= self.threshold


class Overfitting(Rule):
    """At OVERFIT_PATIENCE evaluations running: train accuracy above val accuracy by more than
    OVERFIT_GAP and the val loss above OVERFIT_VAL_RISE x its best so far."""

    name = "overfitting"

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.best: Optional[tuple[float, Any]] = None  # (val loss, epoch)
        self.streak = 0

    def epoch(self, record: dict[str, Any]) -> Optional[Finding]:
        train_acc, val_acc, val_loss = (_number(record.get(k)) for k in ("epoch/train_acc", "val/acc", "val/loss"))
        if train_acc is None or val_acc is None or val_loss is None:
            return None
        if self.best is None or val_loss < self.best[0]:
            self.best = (val_loss, record.get("epoch"))
        gap = train_acc - val_acc
        self.streak = self.streak + 1 if gap > OVERFIT_GAP and val_loss > OVERFIT_VAL_RISE * self.best[0] else 0
        if self.streak < OVERFIT_PATIENCE:
            return None
        (best, best_epoch), epoch = self.best, record.get("epoch")
        return self.finding(record, "Overfitting: training accuracy far above validation, validation loss rising",
                            f"train acc {train_acc:.3f} vs val/acc {val_acc:.3f} at epoch {epoch}; val/loss rose from "
                            f"{best:.3g} (epoch {best_epoch}) to {val_loss:.3g}, above {OVERFIT_VAL_RISE:g} x its best for "
                            f"{OVERFIT_PATIENCE} evaluations running",
                            ["dropout (+regularizer=dropout)", "weight decay / L2 (optimizer.weight_decay or +regularizer=l2)",
                             "augmentation (+regularizer=augment)", "early stopping (+regularizer=early_stopping)"],
                            metric="val/loss", values={"train_acc": train_acc, "val/acc": val_acc, "best_val_loss": best,
                                                       "last_val_loss": val_loss},
                            threshold={"gap": OVERFIT_GAP, "val_rise": OVERFIT_VAL_RISE})


class ClipTooLow(Rule):
    """More than CLIP_FRACTION of the steps clipped over the last CLIP_WINDOW log steps."""

    name = "clip_too_low"
    per_layer = True  # grad/clip_frac is recorded with the per-layer metrics

    def __init__(self, watch: "Watch"):
        super().__init__(watch)
        self.window: deque[tuple[float, Optional[float]]] = deque(maxlen=CLIP_WINDOW)  # (clipped share, pre-clip norm)

    def log_step(self, record: dict[str, Any]) -> Optional[Finding]:
        share = _number(record.get("grad/clip_frac"))
        if share is None:
            return None
        self.window.append((share, _number(record.get("grad/global_norm"))))
        clipped = fmean(s for s, _ in self.window)
        if len(self.window) < CLIP_WINDOW or clipped <= CLIP_FRACTION:
            return None
        norms = sorted(n for _, n in self.window if n is not None)
        p90 = norms[min(len(norms) - 1, int(0.9 * len(norms)))] if norms else None
        max_norm = self.watch.setting("clip", "max_norm")
        return self.finding(record, "Clipping threshold too low: most steps are clipped",
                            f"{clipped:.0%} of the steps were clipped at clip.max_norm={max_norm} over the {CLIP_WINDOW} log "
                            f"steps to step {record['step']}" + (f"; the 90th percentile of their pre-clip norm is {p90:.3g}"
                                                                 if p90 is not None else ""),
                            [f"raise clip.max_norm to about the 90th percentile of the pre-clip norm ({p90:.3g})"
                             if p90 is not None else "raise clip.max_norm"],
                            metric="grad/clip_frac", values={"clip_frac": clipped, "p90_pre_clip_norm": p90},
                            threshold=CLIP_FRACTION)


# In this order within a record: causes before the findings they explain.
RULES: list[type[Rule]] = [
    # a cause before what it explains: at one record, the cause trips first (and stops a run first)
    Divergence, ClippingZeroedUpdate, BadInitScale, LrTooHigh, ExplodingGradients, DeadNetwork, VanishingGradients,
    LossFlat, NoProgress, DyingRelu, Overfitting, ClipTooLow,
]


def lever(advice: str) -> Optional[tuple[str, int]]:
    """The knob a piece of advice turns and which way, None for advice that turns none."""
    return next((turn for start, turn in LEVERS.items() if advice.startswith(start)), None)


class Watch:
    """The rule set, fed a run's records in the order they are written."""

    def __init__(self, config: dict[str, Any]):
        self.config = config if isinstance(config, dict) else {}
        # an older run records no monitor.per_layer: its records say whether it has per-layer metrics
        per_layer = self.setting("monitor", "per_layer") is not False
        rules = [rule(self) for rule in RULES]
        self.inactive: list[str] = [r.name for r in rules if r.per_layer and not per_layer]
        self.rules = [r for r in rules if r.name not in self.inactive]
        self.tripped: dict[str, Finding] = {}  # in the order they tripped
        self.advised: dict[str, tuple[int, str]] = {}  # knob -> (the way the findings turn it, the first one's title)
        self.diverged = False
        self.layer_keys: dict[str, tuple[tuple[str, ...], list[tuple[str, str]]]] = {}

    def setting(self, *keys: str) -> Any:
        node: Any = self.config
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    @property
    def clipping(self) -> bool:
        return self.setting("clip", "name") not in (None, "none")

    @property
    def init_grows(self) -> bool:
        """bad_init_scale found the activations growing with depth (and so the loss thrown up by the init)."""
        init = self.tripped.get("bad_init_scale")
        return init is not None and init.evidence["values"]["ratio"] > 1

    def layers(self, record: dict[str, Any], prefix: str) -> list[tuple[str, float]]:
        """(layer, value) of one record's per-layer metric, in the model's order, finite values only."""
        keys = tuple(record)
        if self.layer_keys.get(prefix, ((),))[0] != keys:  # a run's log steps share their keys: look once
            self.layer_keys[prefix] = (keys, [(k[len(prefix):], k) for k in keys if k.startswith(prefix)])
        named = ((layer, _number(record[key])) for layer, key in self.layer_keys[prefix][1])
        return [(layer, value) for layer, value in named if value is not None]

    def feed(self, record: dict[str, Any]) -> list[Finding]:
        """The findings that tripped at this record (new ones only), as findings() shows them."""
        kind = record_kind(record)
        if kind is None:
            return []
        new = []
        for rule in self.rules:
            if rule.name in self.tripped or (rule.judges_loss and self.diverged):
                continue
            finding = getattr(rule, kind)(record)
            if finding is not None:
                self.tripped[rule.name] = self.settle(finding)
                new.append(self.tripped[rule.name])
        self.diverged = self.diverged or kind == "nonfinite"
        return new

    def settle(self, finding: Finding) -> Finding:
        """A new finding as it is shown from now on: under its cause (the first tripped finding that
        explains it, or that one's own cause), its advice on what the cause settles replaced by a
        pointer to the cause, and its advice that turns a knob against earlier advice replaced by a
        pointer to that."""
        cause = next((f for f in self.tripped.values() if f.rule in EXPLAINED_BY.get(finding.rule, ())), None)
        if cause is not None and cause.cause is not None:  # ranked under the root cause, which explains both
            cause = self.tripped[cause.cause]
        shown: list[str] = []
        for advice in finding.interventions:
            turn = lever(advice)
            earlier = self.advised.get(turn[0]) if turn is not None else None
            if turn is not None and cause is not None and turn[0] in SETTLED_BY_CAUSE:
                advice = f'see "{cause.title}"'
            elif turn is not None and earlier is not None and earlier[0] != turn[1]:
                advice = f'see "{earlier[1]}"'
            elif turn is not None:
                self.advised.setdefault(turn[0], (turn[1], finding.title))
            if advice not in shown:
                shown.append(advice)
        return replace(finding, interventions=shown, cause=cause.rule if cause else None)

    def findings(self) -> list[Finding]:
        """Every finding tripped so far, ranked: each cause, by step, followed by the findings it
        explains, by step (a non-finite event's step can precede the log step it arrives after)."""
        by_step = sorted(self.tripped.values(), key=lambda f: f.step)  # stable: ties keep the order they tripped
        return [g for f in by_step if f.cause is None for g in (f, *(c for c in by_step if c.cause == f.rule))]


def diagnose(records: list[dict[str, Any]], summary: Summary) -> list[dict[str, Any]]:
    """The end-of-run and offline diagnosis: a Watch of the run's config fed every record in order."""
    watch = Watch(summary.config)
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
