"""Pruning in sweeps (`prune=median|asha`, docs/sweeps.md): at each rung epoch a job worse
than its peers ends as `pruned`, its records whole and its checkpoint saved.

- A fused group (hydra/launcher=fused) ranks its members that reached the rung: asha keeps
  the best ceil(n / reduction_factor), median those no worse than the group's median; the
  rest leave the stack, so the members that stay step faster.
- A job that trains alone (the basic, joblib and submitit launchers; a fused launcher's job
  that runs alone) compares itself with the other jobs of its sweep dir that reached the
  rung, read from their metrics.jsonl without locking: median prunes it when worse than
  their median, asha when worse than their best ceil(n / reduction_factor).

No job is judged against fewer than MIN_PEERS others: the first jobs of a sweep always train.
The loop (regexp.train.fit) calls `prune_at_rung` after each epoch's records are written.
"""

import math
from pathlib import Path
from typing import Any, Iterable, Optional

from regexp.rundir import ConfigError, RunError, Status, read_metrics

MIN_PEERS = 2  # others that must have reached a rung before a job is judged there
# The metrics of an epoch record a rung can rank: validation's, and the epoch's training means
EPOCH_METRICS = ("val/loss", "val/acc", "epoch/train_loss", "epoch/train_acc")
SWEEP_ONLY = ("median", "asha")  # the options that need peers, hence -m


def maximizes(metric: str, mode: str) -> bool:
    """Whether a larger value of `metric` is better: mode auto takes an accuracy's (`*acc`) as better larger."""
    return mode == "max" or (mode == "auto" and metric.endswith("acc"))


def badness(value: Any, larger_is_better: bool) -> float:
    """A value on one scale where smaller is better; a missing or non-finite one is the worst."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return math.inf
    return -float(value) if larger_is_better else float(value)


def kept(n: int, reduction_factor: int) -> int:
    """How many of `n` ranked jobs asha keeps: the best ceil(n / reduction_factor), at least one."""
    return max(1, math.ceil(n / reduction_factor))


def threshold(rule: str, scores: list[float], reduction_factor: int) -> float:
    """The worst score (smaller is better) that `rule` keeps among `scores`: the median
    (median), or the score of the last one kept (asha). A tie with it is kept too."""
    ordered = sorted(scores)
    if rule == "asha":
        return ordered[kept(len(ordered), reduction_factor) - 1]
    low, high = ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]
    return (low + high) / 2 if math.isfinite(high) else low  # no midpoint with a non-finite value


def pruned_members(rule: str, scores: list[float], reduction_factor: int) -> tuple[list[int], float]:
    """The indices of a group's ranked members that `rule` prunes, and the threshold (a score):
    none when fewer than MIN_PEERS + 1 are ranked (each judged against at least MIN_PEERS)."""
    if len(scores) <= MIN_PEERS:
        return [], math.inf
    limit = threshold(rule, scores, reduction_factor)
    return [i for i, s in enumerate(scores) if s > limit], limit


def prunes_alone(rule: str, score: float, peer_scores: list[float], reduction_factor: int) -> tuple[bool, float]:
    """Whether a job that trains alone is pruned against its sweep's peers at a rung, and the
    threshold: worse than what `rule` keeps among the peers (at least MIN_PEERS of them)."""
    if len(peer_scores) < MIN_PEERS:
        return False, math.inf
    limit = threshold(rule, peer_scores, reduction_factor)
    return score > limit, limit


def peer_values(sweep_dir: Path, own_run_dir: Path, epoch: int, metric: str) -> list[Any]:
    """The `metric` of the epoch record at `epoch` of every other job in the sweep dir (its
    subfolders, as hydra.sweep.subdir makes them) that reached it. Read without locking, as
    the other jobs write: a half-written last line is ignored, an unreadable file skipped."""
    values = []
    own = own_run_dir.resolve()
    for metrics in sorted(Path(sweep_dir).glob("*/metrics.jsonl")):
        if metrics.parent.resolve() == own:
            continue
        try:
            rows = [r for r in read_metrics(metrics.parent) if r.get("epoch") == epoch and "epoch/lr" in r]
        except RunError:
            continue
        if rows and metric in rows[-1]:
            values.append(rows[-1][metric])
    return values


def prune_at_rung(loops: list[Any], fused: bool) -> None:
    """After an epoch's records (regexp.train.fit): at a rung epoch of their prune config, the
    loops worse than their peers end as PRUNED (`summary.ended_by` says why, one console line
    each). Members of a fused group are ranked together; a loop alone meets its sweep's peers
    on disk. A loop at its last epoch has nothing left to save: no rung applies there."""
    at_rung = [loop for loop in loops if _at_rung(loop)]
    if not at_rung:
        return
    prune, metric = at_rung[0].cfg.prune, at_rung[0].cfg.prune.metric
    larger = maximizes(metric, prune.mode)
    # the members that trained to the rung: diverged or stopped ones keep no one; one that early
    # stopping ended here is ranked, but has nothing left to prune
    ranked = [loop for loop in at_rung if loop.status in (Status.COMPLETED, Status.EARLY_STOPPED)]
    scores = [badness(loop.row.get(metric), larger) for loop in ranked]
    if fused:
        chosen, limit = pruned_members(prune.name, scores, prune.reduction_factor)
        pruned = [ranked[i] for i in chosen if ranked[i].status == Status.COMPLETED]
        for loop in pruned:
            _prune(loop, limit, larger, f"{prune.name}, {len(ranked) - len(pruned)} of {len(ranked)} kept")
        return
    for loop, score in zip(ranked, scores):
        if loop.sweep_dir is None or loop.status != Status.COMPLETED:
            continue
        peers = [badness(v, larger) for v in peer_values(loop.sweep_dir, loop.run_dir, loop.state.epoch, metric)]
        worse, limit = prunes_alone(prune.name, score, peers, prune.reduction_factor)
        if worse:
            best = f"asha: the best {kept(len(peers), prune.reduction_factor)}" if prune.name == "asha" else "median"
            _prune(loop, limit, larger, f"{best} of {len(peers)} other jobs at this epoch")


def _at_rung(loop: Any) -> bool:
    prune, state = loop.cfg.prune, loop.state
    return prune.name != "none" and state.epoch in prune.rungs and not loop.plan.last_epoch(state.epoch, state.step)


def _prune(loop: Any, limit: float, larger: bool, how: str) -> None:
    """End a loop as PRUNED at this epoch: why in its summary, and one console line."""
    prune, epoch = loop.cfg.prune, loop.state.epoch
    value, shown_limit = loop.row.get(prune.metric), -limit if larger else limit
    loop.status = Status.PRUNED
    loop.summary.ended_by = {"epoch": epoch, "metric": prune.metric, "value": _plain(value),
                             "threshold": _plain(shown_limit), "rule": prune.name}
    loop.reporter.line(f"{loop.label or loop.run_dir}: pruned at epoch {epoch}: {prune.metric} {_shown(value)}, worse "
                       f"than {_shown(shown_limit)} ({how}); resume=auto prune=none trains it on", style="yellow")


def _plain(value: Any) -> Optional[float]:
    """A number as summary.json can hold it (JSON has no NaN or infinity)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "missing"


def check_one_run(overrides: Iterable[str]) -> None:
    """ConfigError for `prune=median|asha` among a single run's `overrides`, as the user typed
    them (before a resume adds its run's own: a sweep's job resumed alone keeps its choice,
    and has no peers to meet). A single run has no peers to rank."""
    for line in overrides:
        key, sep, value = str(line).partition("=")
        option = value.strip("'\" ")
        if sep and key.lstrip("+~") == "prune" and option in SWEEP_ONLY:
            raise ConfigError("prune", option, "prunes the jobs of a sweep against each other: add -m and the values "
                                               "to sweep (regexp train -m ...), or use prune=none for a single run")
