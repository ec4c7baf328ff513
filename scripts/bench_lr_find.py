#!/usr/bin/env python3
"""`regexp lr-find`, measured (docs/benchmarks.md, docs/lr-find.md). Two modes, each through the real CLI:

  speed   4 seeds fused (the default) against the same 4 seeds one after another (--solo),
          alternating, --repeats times each: the range test's own time (lr_find.json's
          `seconds`: data loaded, models built, every step) and the whole command's wall time;
          medians and their ratio fused / solo.
  trust   per optimizer (sgd, momentum, adamw) on the MNIST MLP: lr-find's suggestion (4
          seeds), and a grid of 7 lrs half a decade apart trained for 2 epochs with 2 seeds
          each (`regexp train -m hydra/launcher=fused ...`, resume=auto: a second call reuses
          the runs that finished); the grid's best lr by the seeds' mean final val/acc (and by
          val/loss); the ratio suggestion / best (target: within 2x) and the spread of the
          seeds' suggestions (max/min, target: within 2x), for each suggestion rule, recomputed
          from the same curves. A markdown table on stdout and in WORK/trust.md.

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
    found = json.loads(next(out.glob("lr-find/*/*/lr_find.json")).read_text())
    return {**found, "wall": wall}


# ---------------------------------------------------------------- speed
def speed(repeats: int, extra: list[str]) -> None:
    times: dict[str, list[dict]] = {"fused": [], "solo": []}
    with tempfile.TemporaryDirectory(prefix="bench-lr-find-") as tmp:
        lr_find(["--seeds", "4", "--steps", "20", *extra], Path(tmp, "warm-up"))  # untimed: data cache, imports
        for r in range(repeats):
            order = ("fused", "solo") if r % 2 == 0 else ("solo", "fused")  # alternate: load spreads over both
            for mode in order:
                flags = ["--seeds", "4", *(["--solo"] if mode == "solo" else []), *extra]
                times[mode].append(lr_find(flags, Path(tmp, f"{mode}-{r}")))
    print(f"regexp lr-find, 4 seeds, {' '.join(extra) or 'default config'}; medians of {repeats} alternating runs")
    print("| | range test (s) | command wall (s) | steps |")
    print("|---|---|---|---|")
    for mode, runs in times.items():
        steps = "/".join(str(len(s["lrs"])) for s in runs[0]["seeds"])
        print(f"| {mode} | {statistics.median(r['seconds'] for r in runs):.1f} | "
              f"{statistics.median(r['wall'] for r in runs):.1f} | {steps} |")
    ratio = [f["seconds"] / s["seconds"] for f, s in zip(times["fused"], times["solo"])]
    wall = [f["wall"] / s["wall"] for f, s in zip(times["fused"], times["solo"])]
    pairs = ", ".join(f"{x:.2f}" for x in ratio)
    print(f"fused / solo: range test {statistics.median(ratio):.2f}x (each pair: {pairs}); "
          f"command {statistics.median(wall):.2f}x")


# ---------------------------------------------------------------- trust
def grid(optimizer: str, work: Path) -> dict[float, dict[str, float]]:
    """The grid's runs (trained, or finished earlier): per lr, the seeds' mean final val/acc and val/loss
    (a diverged seed counts as val/acc 0 and val/loss inf)."""
    sweep = work / f"grid-{optimizer}"
    lrs = ",".join(f"{lr:.3g}" for lr in GRIDS[optimizer])
    regexp(["train", "-m", "hydra/launcher=fused", f"optimizer={optimizer}", f"optimizer.lr={lrs}",
            f"seed={','.join(map(str, SEEDS))}", f"epochs={EPOCHS}", "logger=none", f"hydra.sweep.dir={sweep}",
            "resume=auto"], work)
    runs: dict[float, list[dict]] = {}
    for summary in sweep.glob("*/summary.json"):
        s = json.loads(summary.read_text())
        runs.setdefault(round(s["config"]["optimizer"]["lr"], 12), []).append(s)
    return {lr: {"val/acc": statistics.mean(r["metrics"].get("val/acc", 0.0) for r in rs),
                 "val/loss": statistics.mean(r["metrics"].get("val/loss", math.inf) for r in rs)}
            for lr, rs in sorted(runs.items())}


def trust(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    rows, details = [], []
    for optimizer in GRIDS:
        found = lr_find([f"optimizer={optimizer}", "--seeds", "4"], work / f"find-{optimizer}")
        results = grid(optimizer, work)
        best_acc = max(results, key=lambda lr: results[lr]["val/acc"])
        best_loss = min(results, key=lambda lr: results[lr]["val/loss"])
        details.append(f"{optimizer}: " + ", ".join(f"{lr:.3g}: acc {v['val/acc']:.4f} loss {v['val/loss']:.4f}"
                                                     for lr, v in results.items()))
        for rule, suggest in RULES.items():
            per_seed = [suggest(s["lrs"], s["smoothed"]) for s in found["seeds"]]
            overall = math.exp(statistics.mean(map(math.log, per_seed)))
            ratio = overall / best_acc
            rows.append(f"| {optimizer} | {rule} | {overall:.3g} | {best_acc:.3g} | {best_loss:.3g} | "
                        f"{max(ratio, 1 / ratio):.2f}x {'over' if ratio > 1 else 'under'} | "
                        f"{max(per_seed) / min(per_seed):.2f}x |")
    table = "\n".join([
        f"MNIST MLP, lr-find 4 seeds ({found['range']['steps']} steps "
        f"{found['range']['start']:g}..{found['range']['end']:g}); "
        f"grid: 7 lrs half a decade apart, {EPOCHS} epochs, seeds {SEEDS}, best by mean final val/acc",
        "",
        "| optimizer | rule | suggestion | grid's best (val/acc) | grid's best (val/loss) | suggestion vs best "
        "| spread (max/min) |",
        "|---|---|---|---|---|---|---|",
        *rows, "", *details])
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
