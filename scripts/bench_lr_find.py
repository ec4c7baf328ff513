#!/usr/bin/env python3
"""`regexp lr-find`, measured (docs/benchmarks.md, docs/lr-find.md). Two modes, each through the real CLI:

  speed   4 seeds fused (the default) against the same 4 seeds one after another, in one
          command (--solo) and as 4 commands of one seed each (separate), in rotating order,
          --repeats times each: the range test's own time (lr_find.json's `seconds`: data
          loaded, models built, every step) and the commands' wall time; medians, and the
          ratios fused / the others, paired per repeat. device.threads=1 throughout.
  trust   per optimizer (sgd, momentum, adamw) on the MNIST MLP: lr-find's suggestion (4
          seeds), and a grid of 7 lrs half a decade apart trained for 2 epochs with 2 seeds
          each (`regexp train -m hydra/launcher=fused ...`, resume=auto: a second call reuses
          the runs that finished); the grid's best lr by the seeds' mean final val/acc and by
          val/loss, each also refined (the vertex of a parabola through the best lr and its
          neighbours, over log lr); the ratio suggestion / best (target: within 2x) and the
          spread of the seeds' suggestions (max/min, target: within 2x), for each suggestion
          rule, recomputed from the same curves. A markdown table on stdout and in WORK/trust.md.

    python scripts/bench_lr_find.py speed --repeats 3
    nice python scripts/bench_lr_find.py trust --work /tmp/lrfind/trust     # about 20 minutes on 2 CPU cores
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from regexp.lrfind import RULES  # noqa: E402  (the repo's own module, whatever is installed)

# 7 lrs half a decade apart, centred where each optimizer usually trains an MLP well
GRIDS = {
    "sgd": [10 ** (e / 2) for e in range(-5, 2)],  # 0.00316 .. 3.16
    "momentum": [10 ** (e / 2) for e in range(-7, 0)],  # 0.000316 .. 0.316
    "adamw": [10 ** (e / 2) for e in range(-9, -2)],  # 3.16e-5 .. 0.0316
}
SEEDS = (0, 1)
EPOCHS = 2
THREADS = ["device.threads=1"]  # on a CPU that other processes share, more threads wait for each other


def regexp(args: list[str], cwd: Path) -> float:
    """Run the CLI (this checkout's code); its wall time. Fails loudly on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "regexp.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"regexp {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - began


def lr_find(args: list[str], out: Path) -> dict:
    """One `regexp lr-find` into its own out_dir; its lr_find.json, with the command's wall time."""
    out.mkdir(parents=True, exist_ok=True)
    wall = regexp(["lr-find", "logger=none", f"out_dir={out}", *args], out)
    found = json.loads(sorted(out.glob("lr-find/*/*/lr_find.json"))[-1].read_text())  # the newest: <date>/<time>
    return {**found, "wall": wall}


# ---------------------------------------------------------------- speed
MODES = {  # how the 4 seeds run: one command's flags, or (separate) 4 commands of one seed each
    "fused": ["--seeds", "4"],
    "solo": ["--seeds", "4", "--solo"],
    "separate": ["--seeds", "1"],
}


def timed(mode: str, extra: list[str], out: Path) -> dict:
    """The 4 seeds in `mode`: the range test's seconds and the wall time, over its command(s)."""
    if mode != "separate":
        run = lr_find([*MODES[mode], *THREADS, *extra], out)
        return {"seconds": run["seconds"], "wall": run["wall"]}
    runs = [lr_find([*MODES[mode], f"seed={seed}", *THREADS, *extra], out / str(seed)) for seed in range(4)]
    return {"seconds": sum(r["seconds"] for r in runs), "wall": sum(r["wall"] for r in runs)}


def speed(repeats: int, extra: list[str]) -> None:
    times: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-lr-find-") as tmp:
        lr_find(["--steps", "20", *THREADS, *extra], Path(tmp, "warm-up"))  # untimed: data cache, imports
        for r in range(repeats):
            order = list(MODES)[r % len(MODES):] + list(MODES)[: r % len(MODES)]  # rotate: load spreads over all
            for mode in order:
                times[mode].append(timed(mode, extra, Path(tmp, f"{mode}-{r}")))
    print(f"regexp lr-find, 4 seeds, {' '.join([*THREADS, *extra])}; medians of {repeats} rotating runs")
    print("| 4 seeds | range test (s) | command wall (s) | fused / this, range test | fused / this, wall |")
    print("|---|---|---|---|---|")
    for mode, runs in times.items():
        ratio = [f["seconds"] / t["seconds"] for f, t in zip(times["fused"], runs)]
        wall = [f["wall"] / t["wall"] for f, t in zip(times["fused"], runs)]
        print(f"| {mode} | {statistics.median(r['seconds'] for r in runs):.1f} | "
              f"{statistics.median(r['wall'] for r in runs):.1f} | {statistics.median(ratio):.2f}x "
              f"({', '.join(f'{x:.2f}' for x in ratio)}) | {statistics.median(wall):.2f}x |")


# ---------------------------------------------------------------- trust
METRICS = {"val/acc": max, "val/loss": min}  # the grid's best lr by each, and which way is better


def grid(optimizer: str, work: Path) -> dict[float, dict[str, float]]:
    """The grid's runs (trained, or finished earlier): per lr, the seeds' mean final val/acc and
    val/loss, and whether a seed diverged (then it has no best: val/acc 0, val/loss inf)."""
    sweep = work / f"grid-{optimizer}"
    if len(finished(sweep)) < len(GRIDS[optimizer]) * len(SEEDS):  # a grid trained earlier is read, not trained again
        lrs = ",".join(f"{lr:.3g}" for lr in GRIDS[optimizer])
        regexp(["train", "-m", "hydra/launcher=fused", f"optimizer={optimizer}", f"optimizer.lr={lrs}",
                f"seed={','.join(map(str, SEEDS))}", f"epochs={EPOCHS}", "logger=none", f"hydra.sweep.dir={sweep}",
                "resume=auto", *THREADS], work)
    runs: dict[float, list[dict]] = {}
    for s in finished(sweep):
        runs.setdefault(round(s["config"]["optimizer"]["lr"], 12), []).append(s)
    return {lr: {"val/acc": statistics.mean(r["metrics"].get("val/acc", 0.0) for r in rs),
                 "val/loss": statistics.mean(r["metrics"].get("val/loss", math.inf) for r in rs),
                 "diverged": any(r["status"] == "diverged" for r in rs)}
            for lr, rs in sorted(runs.items())}


def finished(sweep: Path) -> list[dict]:
    """The summaries of the sweep's runs that ended (completed or diverged)."""
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    return [s for s in summaries if s["status"] not in ("running", "failed", "interrupted")]


def best_lr(results: dict[float, dict], metric: str) -> tuple[float, float]:
    """The grid's best lr by `metric`, and the same refined: the vertex of the parabola through it
    and its two neighbours over log lr (the grid's best stays, at the grid's edge or beside a
    diverged lr)."""
    lrs = list(results)
    i = lrs.index(METRICS[metric](lrs, key=lambda lr: results[lr][metric]))
    if i in (0, len(lrs) - 1) or results[lrs[i - 1]]["diverged"] or results[lrs[i + 1]]["diverged"]:
        return lrs[i], lrs[i]
    y0, y1, y2 = (results[lrs[j]][metric] for j in (i - 1, i, i + 1))
    step = math.log(lrs[i + 1] / lrs[i])  # the grid's spacing, in log lr
    curvature = y0 - 2 * y1 + y2
    offset = 0.0 if curvature == 0 else step * (y0 - y2) / (2 * curvature)
    return lrs[i], lrs[i] * math.exp(offset)


def versus(suggestion: float, best: float) -> str:
    ratio = suggestion / best
    return f"{max(ratio, 1 / ratio):.2f}x {'over' if ratio > 1 else 'under'}"


def trust(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    rows, details = [], []
    for optimizer in GRIDS:
        found = lr_find([f"optimizer={optimizer}", "--seeds", "4", *THREADS], work / f"find-{optimizer}")
        results = grid(optimizer, work)
        bests = {metric: best_lr(results, metric) for metric in METRICS}
        details.append(f"- {optimizer}: " + ", ".join(
            f"{lr:.3g}: " + ("diverged" if v["diverged"] else f"{v['val/acc']:.4f} / {v['val/loss']:.4f}")
            for lr, v in results.items()))
        for rule, suggest in RULES.items():
            per_seed = [suggest(s["lrs"], s["smoothed"]) for s in found["seeds"]]
            overall = math.exp(statistics.mean(map(math.log, per_seed)))
            cells = [f"{point:.3g} ({refined:.2g}) | {versus(overall, point)} ({versus(overall, refined)})"
                     for point, refined in bests.values()]
            rows.append(f"| {optimizer} | {rule} | {overall:.2g} | {max(per_seed) / min(per_seed):.2f}x | "
                        f"{' | '.join(cells)} |")
    table = "\n".join([
        f"MNIST MLP; lr-find: 4 seeds, {found['range']['steps']} steps {found['range']['start']:g}..."
        f"{found['range']['end']:g}; grid: 7 lrs half a decade apart, {EPOCHS} epochs, seeds "
        f"{', '.join(map(str, SEEDS))}, the seeds' mean final metric (refined: the parabola's vertex over log lr)",
        "",
        "| optimizer | rule | suggestion | spread (max/min) | best by val/acc (refined) | suggestion vs it (refined) "
        "| best by val/loss (refined) | suggestion vs it (refined) |",
        "|---|---|---|---|---|---|---|---|",
        *rows, "", "Grid (lr: mean val/acc / mean val/loss):", *details])
    print(table)
    (work / "trust.md").write_text(table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("speed", "trust"))
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed runs of each mode")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-lr-find",
                        help="trust: where the grids and lr-find runs go (kept: a second call reuses finished runs)")
    parser.add_argument("overrides", nargs="*", help="speed: overrides and flags for lr-find, e.g. dataset.limit=8192")
    args, flags = parser.parse_known_args()  # lr-find's own flags (--steps 50) pass through
    if args.mode == "speed":
        speed(args.repeats, [*args.overrides, *flags])
    else:
        trust(args.work)


if __name__ == "__main__":
    main()
