#!/usr/bin/env python3
"""A model of your own (model=custom) against the built-in model of the same layers (docs/benchmarks.md).

`SmallCNN` below is the built-in `model=cnn` written as a user would write it: an
nn.Sequential of conv32-relu-pool-conv64-relu-pool-flatten-fc128-relu-fc10, named as the
built-in names its layers. On MNIST, batch 64, AdamW lr 1e-3, monitor=default, logger=none,
in one process (regexp.train.train_group, as scripts/bench.py --fused):

  solo    one run of each, `--limit` training samples x 1 epoch: perf/samples_per_s of its
          summary.json; the ratio custom / built-in is paired per repeat
  fused   N seeds (--fused, default 4) trained as one fused group against the same N jobs one
          after another, for each model: the fused gain (fused / sequential samples/s, paired
          per repeat), and the custom model's gain over the built-in's

Repeats alternate which model goes first (the fused timings in ABBA order: both models'
sequential runs, then both fused, reversed on odd repeats), after an untimed warm-up; the
tables show medians. On a shared CPU, compare the ratios, not the rates.

    python scripts/bench_custom_model.py                 # 6,400 samples a job, 3 repeats, N = 4
    python scripts/bench_custom_model.py --quick         # seconds: a smoke run, not a measurement
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import bench  # scripts/bench.py: composing, in-process training and the fused timings

TARGET = "bench_custom_model.SmallCNN"  # this file, importable from scripts/ (sys.path[0] when it runs)
MODELS = {"built-in": ["model=cnn"], "custom": ["model=custom", f"model.target={TARGET}"]}


def SmallCNN(channels: int = 1, classes: int = 10, side: int = 28) -> nn.Sequential:  # noqa: N802 (a class to the user)
    """The built-in cnn's layers at its defaults (channels [32, 64], fc 128, relu, no norm)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(channels, 32, 3, padding=1)), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * (side // 4) ** 2, 128)), ("act3", nn.ReLU()),
        ("fc2", nn.Linear(128, classes)),
    ]))


def check_same_layers(cfg: Any) -> None:
    """The comparison is fair: the built-in model as configured has SmallCNN's parameter shapes, by name."""
    from regexp.models import build_model

    built_in = build_model(cfg.model, cfg.norm, None, (1, 28, 28), 10)
    shapes = {name: tuple(p.shape) for name, p in built_in.named_parameters()}
    if shapes != {name: tuple(p.shape) for name, p in SmallCNN().named_parameters()}:
        raise SystemExit(f"bench: model=cnn is not SmallCNN's layers: {shapes}")


def solo(compose: dict, tmp: Path, label: str) -> float:
    """perf/samples_per_s of one run."""
    summary, = bench.train_quietly([compose[label](["seed=0"])], [tmp / f"solo-{label}"], fuse=False)
    return summary.metrics["perf/samples_per_s"]


def fused_order(r: int) -> list[tuple[str, str]]:
    """Repeat r's fused timings, ABBA: the two models' sequential runs, then their fused ones (the
    other way round on odd repeats), so that a drift in the machine's load touches both models alike."""
    order = [("built-in", "sequential"), ("custom", "sequential"), ("custom", "fused"), ("built-in", "fused")]
    return order if r % 2 == 0 else order[::-1]


def paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    device = torch.device("cpu")
    base = [*bench.base_overrides("mnist", args, device), f"dataset.root={bench.mnist_root(args)}", "monitor=default",
            "epochs=1", f"dataset.limit={args.limit}"]
    compose = {label: bench.composer([*base, *model]) for label, model in MODELS.items()}
    check_same_layers(compose["built-in"](["seed=0"]))
    rates: dict[str, list[float]] = {label: [] for label in MODELS}
    gains: dict[str, dict[str, list[float]]] = {label: {"sequential": [], "fused": []} for label in MODELS}
    groups: dict[str, int] = {}
    if not args.quick:  # the first runs of a process pay for imports and caches
        bench.progress("warm-up: one run of each model, fused and alone")
        for label in MODELS:
            solo(compose, tmp, label)
            bench.fused_jobs(compose[label], 2, tmp, fuse=True)
    for r in range(args.repeats):
        order = list(MODELS) if r % 2 == 0 else list(reversed(MODELS))
        for label in order:
            rates[label].append(solo(compose, tmp, label))
            bench.progress(f"repeat {r + 1}/{args.repeats} solo {label:<8} {rates[label][-1]:>8,.0f} samples/s")
        for label, mode in fused_order(r):
            result = bench.fused_jobs(compose[label], args.fused, tmp, fuse=mode == "fused")
            gains[label][mode].append(result["samples_per_s"])
            groups[label] = result["models_per_group"] if mode == "fused" else groups.get(label, 0)
            bench.progress(f"repeat {r + 1}/{args.repeats} N={args.fused} {label:<8} {mode:<10} "
                           f"{result['samples_per_s']:>8,.0f} samples/s")
    fused_gain = {label: paired_median(g["fused"], g["sequential"]) for label, g in gains.items()}
    return {
        "machine": bench.machine(device), "load": [round(x, 2) for x in os.getloadavg()],
        "overrides": base, "models": MODELS, "repeats": args.repeats, "n": args.fused,
        "solo": {label: statistics.median(xs) for label, xs in rates.items()}, "solo_runs": rates,
        "solo_ratio": paired_median(rates["custom"], rates["built-in"]),
        "fused": {label: {mode: statistics.median(xs) for mode, xs in g.items()} for label, g in gains.items()},
        "fused_runs": gains, "fused_gain": fused_gain, "gain_ratio": fused_gain["custom"] / fused_gain["built-in"],
        "models_per_group": groups,
    }


def render(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\n{m.get('cpu', 'CPU')} · torch {m.get('torch', '?')} · {result['repeats']} repeats · load {result['load']}")
    print(f"jobs: {' '.join(result['overrides'])}\n")
    print("| MNIST, batch 64, AdamW | model=cnn | model=custom (SmallCNN) | custom / cnn |")
    print("|---|---|---|---|")
    solo = result["solo"]
    print(f"| one run, samples/s (median) | {solo['built-in']:,.0f} | {solo['custom']:,.0f} | {result['solo_ratio']:.2f}× |")
    fused, gain = result["fused"], result["fused_gain"]
    n = result["n"]
    for mode in ("sequential", "fused"):
        print(f"| {n} seeds {mode}, samples/s (median) | {fused['built-in'][mode]:,.0f} | {fused['custom'][mode]:,.0f} | "
              f"{fused['custom'][mode] / fused['built-in'][mode]:.2f}× |")
    print(f"| fused gain (fused / sequential, paired) | {gain['built-in']:.2f}× | {gain['custom']:.2f}× | "
          f"{result['gain_ratio']:.2f}× |")
    print(f"\nmodels per fused group: {result['models_per_group']}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--limit", type=int, default=None, help="training samples a run (default 6400; --quick 256)")
    p.add_argument("--repeats", type=int, default=None, help="paired rounds (default 3; --quick 1)")
    p.add_argument("--fused", type=int, default=4, metavar="N", help="seeds of the fused group (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: a shared CPU)")
    p.add_argument("--data-root", default=os.environ.get("REGEXP_DATA_DIR") or "data", help="holds MNIST/raw")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds, not a measurement")
    p.add_argument("--save", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    args.limit = args.limit or (256 if args.quick else bench.FUSED_LIMIT)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if min(args.limit, args.repeats, args.fused, args.threads) < 1:
        p.error("--limit, --repeats, --fused and --threads must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="regexp-bench-custom-") as tmp:
        result = run(args, Path(tmp))
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    render(result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # (already there when run as a script)
    sys.exit(main())
