#!/usr/bin/env python3
"""Write a synthetic run dir of many log steps, to measure `regexp plot` on a long run
(docs/benchmarks.md, "regexp plot on a long run").

    python scripts/big_run.py /tmp/big                  # 100,000 log steps, 10 epochs
    python scripts/big_run.py /tmp/big --steps 2000     # a small one
    /usr/bin/time -v regexp plot /tmp/big --out /tmp/big-health.png

The run is an MLP with 3 hidden layers under monitor=default: each log-step record holds the
keys a real run's do (train loss and accuracy, lr, timings, global gradient norm, per-layer
activation mean/std/dead fraction, gradient norms before and after clipping, weight norm,
update ratio and sparsity: 39 keys), one record per epoch holds the validation metrics, and
summary.json and diagnosis.json are what `regexp train` writes. The values are smooth curves
with noise from a fixed seed, so the same command writes the same files.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from regexp.rundir import Status, Summary, write_diagnosis, write_summary

HIDDEN = [512, 256, 128]
LAYERS = [f"fc{i}" for i in range(1, len(HIDDEN) + 2)]
ACTIVATIONS = [f"act{i}" for i in range(1, len(HIDDEN) + 1)]


def log_step(step: int, fraction: float, noise: np.ndarray, epoch: int) -> dict:
    """One log-step record at `fraction` of the run; `noise` holds this record's random draws."""
    decay = np.exp(-4 * fraction)
    record = {"step": step, "epoch": epoch,
              "train/loss": (0.1 + 2.2 * decay) * np.exp(0.1 * noise[0]),
              "train/acc": 0.98 - 0.88 * decay + 0.01 * noise[1],
              "opt/lr": 1e-3 * 0.5 * (1 + np.cos(np.pi * fraction)), "opt/effective_batch": 64,
              "perf/samples_per_s": 9000 + 300 * noise[2], "perf/step_ms": 7 + 0.2 * noise[3],
              "grad/global_norm": 1 + decay + 0.1 * abs(noise[4])}
    record["grad/global_norm_clipped"] = record["grad/global_norm"]
    for i, name in enumerate(ACTIVATIONS):
        record[f"act/mean/{name}"] = 0.3 + 0.05 * i + 0.01 * noise[5 + i]
        record[f"act/std/{name}"] = 0.6 - 0.1 * i + 0.01 * noise[5 + i]
        record[f"act/dead_frac/{name}"] = 0.05 + 0.1 * i * fraction
    for i, name in enumerate(LAYERS):
        norm = (0.5 + 0.2 * i) * (decay + 0.2) * (1 + 0.1 * abs(noise[8 + i]))
        record[f"grad/norm/{name}"] = record[f"grad/norm_clipped/{name}"] = norm
        record[f"weight/norm/{name}"] = 10 - 2 * i + fraction
        record[f"weight/update_ratio/{name}"] = 1e-3 * (0.3 + decay) * (1 + 0.1 * noise[12 + i])
        record[f"weight/sparsity/{name}"] = 0.02
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in record.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the run dir to write (must not exist, or be empty)")
    p.add_argument("--steps", type=int, default=100_000, help="log steps (default 100,000)")
    p.add_argument("--epochs", type=int, default=10)
    options = p.parse_args()
    if options.steps < 1 or options.epochs < 1:
        p.error("--steps and --epochs must be at least 1")
    if options.out.exists() and any(options.out.iterdir()):
        p.error(f"{options.out} is not empty")
    options.out.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).standard_normal((options.steps, 16))
    per_epoch = -(-options.steps // options.epochs)
    with open(options.out / "metrics.jsonl", "w") as f:
        for i in range(options.steps):
            step, epoch = i + 1, i // per_epoch + 1
            f.write(json.dumps(log_step(step, i / options.steps, noise[i], epoch)) + "\n")
            if step % per_epoch == 0 or step == options.steps:
                decay = np.exp(-4 * step / options.steps)
                f.write(json.dumps({"epoch": epoch, "step": step, "val/loss": 0.1 + 2 * decay,
                                    "val/acc": 0.97 - 0.8 * decay}) + "\n")
    config = {"seed": 0, "epochs": options.epochs, "model": {"name": "mlp", "hidden": HIDDEN, "activation": "relu"},
              "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}, "clip": {"name": "none"},
              "monitor": {"name": "default", "log_every": 1}}
    summary = Summary(status=Status.COMPLETED, run_dir=str(options.out), config=config, steps=options.steps,
                      choices={"model": "mlp", "optimizer": "adamw", "monitor": "default"},
                      epochs_completed=options.epochs, metrics={"test/acc": 0.97})
    write_summary(options.out, summary)
    write_diagnosis(options.out, [])
    print(f"{options.out}: {options.steps:,} log steps in {options.epochs} epochs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
