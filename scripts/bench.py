#!/usr/bin/env python3
"""Training throughput of regexp against plain PyTorch loops, in one process (docs/benchmarks.md).

On the same data, model, optimizer and batch size, it measures training samples/s of:

  dataloader              the textbook PyTorch loop: torchvision dataset + ToTensor/Normalize
                          transforms + DataLoader(shuffle=True), forward, CrossEntropyLoss,
                          backward, optimizer.step, zero_grad, running_loss += loss.item()
  tensor_loop             a hand-written loop over the whole training set as one float tensor
                          on the device: randperm per epoch, slices, no per-step .item()
  regexp monitor=off      regexp.train.train() with a composed config (logger=none);
  regexp monitor=default  samples/s is the summary's perf/samples_per_s (training time only,
  regexp monitor=full     evaluation and checkpoints excluded)

The plain loops time training only too (no evaluation at all), synchronizing CUDA around
each epoch. Every loop gets one untimed warm-up (one short epoch; not with --quick), then
`--repeats` timed runs, interleaved and in a rotating order so that load from other
processes spreads over all loops; the table shows medians, and ratios are taken between runs
of the same process. On a CPU that other processes keep busy, use `--threads 1`: torch's
intra-op threads wait for each other there, which makes every loop slow and erratic.

It also times the command line: `regexp --help`, and the time to the first training step of
an MNIST run through `regexp train` (a second run, so the decoded-data cache is warm).

    python scripts/bench.py                      # mnist_mlp, full 55000-sample train split
    python scripts/bench.py --threads 1          # the same on a shared CPU
    python scripts/bench.py --case all --device cuda --epochs 3 --repeats 5
    python scripts/bench.py --quick --json       # seconds; machine-readable only

Two modes measure runs that end before their plan's end, each through the real `regexp train`:

  --live-stop   each of the 10-layer sigmoid MLP (init normal std 0.01) and the MNIST MLP at
                AdamW lr 10, once with monitor.on_finding=stop and once with warn: the step
                where it stopped and its finding (summary.json's ended_by), the step that
                finding first held (the warn run's first `finding` event in metrics.jsonl),
                how many log steps later it stopped, and the wall time stop / warn (% sooner)
  --prune       a 27-job grid (lr x weight decay x dropout p, 4 epochs, the MNIST MLP) with
                hydra/launcher=fused prune=asha against the same grid fused unpruned, and with
                the basic launcher prune=median against basic unpruned: wall time ratio,
                model-epochs trained, statuses and the best job's val/acc of each

    python scripts/bench.py --live-stop          # 3 epochs of the whole train split (--epochs, --limit)
    python scripts/bench.py --prune              # 4 epochs, 6,400 samples a job (--limit, --repeats)
"""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from regexp.rundir import read_metrics
from regexp.synthetic import write_cifar10

# per-channel constants of the training sets, as textbook loops hard-code them
NORMALIZE = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
CASES = {
    "mnist_mlp": {
        "dataset": "mnist",
        "title": "MNIST · MLP 784-256-10, dropout 0.2 · AdamW lr 1e-3 · batch 64",
        "overrides": ["model=mlp", "model.hidden=[256]", "+regularizer=dropout", "regularizer.dropout.p=0.2"],
        "quick_limit": 256,
        "synthetic_limit": None,  # MNIST is never synthesized
    },
    "cifar_cnn": {
        "dataset": "cifar10",
        "title": "CIFAR-10 · SimpleCNN (conv32-pool-conv64-pool-fc128-fc10) · AdamW lr 1e-3 · batch 64",
        "overrides": ["model=cnn"],
        "quick_limit": 128,
        "synthetic_limit": 5000,  # training samples when the data is synthetic and no --limit
    },
}
BATCH_SIZE = 64
LOOPS = [  # key, label
    ("dataloader", "dataloader"),
    ("tensor_loop", "tensor_loop"),
    ("regexp_off", "regexp monitor=off"),
    ("regexp_default", "regexp monitor=default"),
    ("regexp_full", "regexp monitor=full"),
]
MONITOR = {"regexp_off": "off", "regexp_default": "default", "regexp_full": "full"}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the data
def split_train_indices(n_total: int, val_size: int, limit: Optional[int]) -> torch.Tensor:
    """regexp's split (regexp.data._split_indices): a fixed generator holds `val_size` samples
    out for validation; the training samples are the rest in their original order, the
    first `limit` of them. The plain loops train on exactly these samples."""
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(0))
    return order[: n_total - val_size].sort().values[:limit]


def has_files(name: str, root: Path) -> bool:
    from regexp.data import SPECS

    return all((root / f).is_file() for f in SPECS[name].files)


def torchvision_train_set(name: str, root: Path, synthetic: bool, transform=None):
    """torchvision's reader of the data set, as regexp uses it (for CIFAR-10, one that checks
    that the files exist instead of their md5s, which generated files cannot match)."""
    from regexp.data import SPECS, torchvision_class

    return torchvision_class(SPECS[name])(str(root), train=True, transform=transform, download=False)


# ---------------------------------------------------------------- the loops
def timed_epochs(run_epoch: Callable[[], int], epochs: int, device: torch.device) -> tuple[float, int]:
    """(training seconds, samples) over `epochs` epochs; CUDA synchronized around each."""
    seconds, samples = 0.0, 0
    for _ in range(epochs):
        sync(device)
        t = time.perf_counter()
        samples += run_epoch()
        sync(device)
        seconds += time.perf_counter() - t
    return seconds, samples


def build_net(cfg, input_shape: tuple[int, int, int], device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model regexp builds for `cfg` (same builder, same init) and a plain AdamW with the
    config's hyperparameters, in one parameter group (regexp's two, decay and no decay, cost
    about 1 % of a step on the MNIST MLP)."""
    from regexp.init import init_weights
    from regexp.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.norm, cfg.regularizer.dropout, input_shape, 10)
    init_weights(model, cfg.init, cfg.model.activation)
    model.to(device)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    return model, optimizer


def dataloader_loop(ctx: dict, n: int, epochs: int) -> tuple[float, int]:
    """The textbook loop: per-sample PIL decode + transforms in a DataLoader."""
    from torch.utils.data import DataLoader, Subset

    device = ctx["device"]
    loader = DataLoader(Subset(ctx["transformed_set"], ctx["train_idx"][:n].tolist()), batch_size=BATCH_SIZE,
                        shuffle=True, num_workers=ctx["workers"])
    model, optimizer = build_net(ctx["cfg"], ctx["input_shape"], device)
    criterion = torch.nn.CrossEntropyLoss()

    def epoch() -> int:
        model.train()
        running_loss, seen = 0.0, 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            seen += len(labels)
        return seen

    return timed_epochs(epoch, epochs, device)


def tensor_loop(ctx: dict, n: int, epochs: int) -> tuple[float, int]:
    """The whole training set as one normalized float tensor on the device; randperm, slices."""
    device = ctx["device"]
    x, y = ctx["train_x"][:n], ctx["train_y"][:n]
    model, optimizer = build_net(ctx["cfg"], ctx["input_shape"], device)

    def epoch() -> int:
        model.train()
        perm = torch.randperm(n, device=device)
        for start in range(0, n, BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return n

    return timed_epochs(epoch, epochs, device)


def train_quietly(cfgs: list, run_dirs: list[Path], fuse: bool) -> list:
    """The summaries of regexp.train.train_group on these configs (fused, or one config alone),
    its console silenced; every run must complete. The run dirs are removed afterwards."""
    from rich.console import Console

    from regexp.tracking import Reporter
    from regexp.train import RunSpec, train_group

    specs = [RunSpec(cfg, run_dir) for cfg, run_dir in zip(cfgs, run_dirs)]
    summaries = train_group(specs, reporter=Reporter(Console(file=io.StringIO())), fuse=fuse)
    for run_dir, summary in zip(run_dirs, summaries):
        if summary.status != "completed":
            raise RuntimeError(f"regexp run {run_dir} ended {summary.status}: {summary.error}")
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a bench are not worth keeping
    return summaries


def regexp_loop(ctx: dict, n: int, epochs: int, monitor: str) -> tuple[float, int]:
    """One run through regexp.train (its own timing: training only, eval excluded)."""
    cfg = ctx["compose"]([f"monitor={monitor}", f"epochs={epochs}", f"dataset.limit={n}"])
    ctx["runs"] += 1
    summary, = train_quietly([cfg], [ctx["tmp"] / f"run-{ctx['runs']:03d}-{monitor}"], fuse=False)
    samples_per_s = summary.metrics["perf/samples_per_s"]
    samples = summary.train_samples * summary.epochs_completed
    return samples / samples_per_s, samples


# ---------------------------------------------------------------- one case
def composer(overrides: list[str]) -> Callable[..., Any]:
    """compose_cfg(extra, check=True): the train config of `overrides` + `extra`, as
    `regexp train` composes it; validated (check_job) unless not `check`."""
    from hydra import compose, initialize_config_dir

    from regexp.compose import check_job
    from regexp.config import config_dir

    def compose_cfg(extra: list[str], check: bool = True):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
            cfg = compose(config_name="train", overrides=[*overrides, *extra])
        return check_job(cfg) if check else cfg

    return compose_cfg


def base_overrides(dataset: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    """What every in-process regexp run of the bench sets. --quick validates on 64 samples
    (evaluation is never timed; it only costs wall time)."""
    return [f"dataset={dataset}", "dataset.download=false", f"batch_size={BATCH_SIZE}", "logger=none",
            f"device={device.type}", *(["dataset.val_size=64"] if args.quick else [])]


def mnist_root(args: argparse.Namespace) -> Path:
    root = Path(args.data_root).expanduser().resolve()
    if not has_files("mnist", root):
        raise SystemExit(f"bench: no MNIST at {root} (expected {root}/MNIST/raw/*-ubyte); use --data-root or REGEXP_DATA_DIR")
    return root


def run_case(name: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    from torchvision import transforms

    case = CASES[name]
    dataset = case["dataset"]
    root = Path(args.data_root).expanduser().resolve()
    base = [*base_overrides(dataset, args, device), *case["overrides"]]

    synthetic = False
    if dataset == "mnist":
        root = mnist_root(args)
    elif not has_files(dataset, root):
        synthetic = True
        wanted = args.limit or (case["quick_limit"] if args.quick else case["synthetic_limit"])
        val_size = composer([*base, f"dataset.root={root}"])([], check=False).dataset.val_size
        root = tmp / "synthetic-cifar10"
        progress(f"no CIFAR-10 under {args.data_root}: writing SYNTHETIC real-format CIFAR-10 "
                 f"({wanted} training + {val_size} validation samples) to {root}")
        write_cifar10(root, per_batch=math.ceil((val_size + wanted) / 5), n_test=64 if args.quick else 1000)

    compose_cfg = composer([*base, f"dataset.root={root}"])
    cfg = compose_cfg(["monitor=off"])
    mean, std = NORMALIZE[dataset]
    transformed = torchvision_train_set(dataset, root, synthetic,
                                        transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)]))
    n_total = len(transformed)
    full_idx = split_train_indices(n_total, cfg.dataset.val_size, None)
    n = min(args.limit or (case["quick_limit"] if args.quick else len(full_idx)), len(full_idx))
    train_idx = full_idx[:n]

    # the tensor loop's copy of the same samples: uint8 -> float in [0, 1] -> normalized, on the device
    raw = torch.as_tensor(transformed.data)[train_idx]
    raw = raw.unsqueeze(1) if raw.dim() == 3 else raw.permute(0, 3, 1, 2)
    train_x = raw.to(device).float().div_(255)
    train_x = train_x.sub_(torch.tensor(mean, device=device).view(1, -1, 1, 1)).div_(torch.tensor(std, device=device).view(1, -1, 1, 1))
    train_y = torch.as_tensor(transformed.targets, dtype=torch.int64)[train_idx].to(device)

    ctx = {"device": device, "cfg": cfg, "input_shape": tuple(train_x.shape[1:]), "transformed_set": transformed,
           "train_idx": train_idx, "train_x": train_x, "train_y": train_y, "workers": args.workers,
           "compose": compose_cfg, "tmp": tmp, "runs": 0}
    runners: dict[str, Callable[[int, int], tuple[float, int]]] = {
        "dataloader": lambda k, e: dataloader_loop(ctx, k, e),
        "tensor_loop": lambda k, e: tensor_loop(ctx, k, e),
        **{key: (lambda k, e, m=m: regexp_loop(ctx, k, e, m)) for key, m in MONITOR.items()},
    }
    model, _ = build_net(cfg, ctx["input_shape"], device)
    params = sum(p.numel() for p in model.parameters())
    keys = [k for k, _ in LOOPS]

    warm_n = 0 if args.quick else min(n, BATCH_SIZE * 16)  # --quick: a smoke run, no warm-up
    progress(f"{name}: {n} training samples ({'synthetic' if synthetic else 'real'}), {args.epochs} epoch(s) × "
             f"{args.repeats} repeat(s)" + (f"; warm-up ({warm_n} samples, 1 epoch each)" if warm_n else "; no warm-up"))
    for key in keys if warm_n else []:
        runners[key](warm_n, 1)

    runs: dict[str, list[dict[str, float]]] = {k: [] for k in keys}
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate: no loop always runs first
        for key in order:
            seconds, samples = runners[key](n, args.epochs)
            runs[key].append({"seconds": seconds, "samples": samples, "samples_per_s": samples / seconds})
            progress(f"{name}: repeat {r + 1}/{args.repeats} {dict(LOOPS)[key]:<22} {samples / seconds:>10,.0f} samples/s ({seconds:.2f} s)")

    med = {k: statistics.median(x["samples_per_s"] for x in runs[k]) for k in keys}
    loops = {}
    for key, label in LOOPS:
        rates = [x["samples_per_s"] for x in runs[key]]
        loops[key] = {"label": label, "samples_per_s": med[key], "min": min(rates), "max": max(rates),
                      "ratio_vs_dataloader": med[key] / med["dataloader"], "ratio_vs_tensor_loop": med[key] / med["tensor_loop"],
                      "runs": runs[key]}

    def overhead(key: str) -> dict[str, Any]:
        """Training-time ratio against monitor=off, paired repeat by repeat (same load), median."""
        paired = [off["samples_per_s"] / x["samples_per_s"] for off, x in zip(runs["regexp_off"], runs[key])]
        ratio = statistics.median(paired)
        return {"time_ratio": ratio, "overhead_pct": 100 * (ratio - 1), "paired_time_ratios": paired,
                "ratio_of_medians": med["regexp_off"] / med[key]}

    return {
        "title": case["title"],
        "data": {"dataset": dataset, "synthetic": synthetic, "root": str(root), "train_samples": n,
                 "val_size": cfg.dataset.val_size, "batch_size": BATCH_SIZE, "epochs": args.epochs,
                 "repeats": args.repeats, "warm_up_samples": warm_n, "parameters": params, "regexp_overrides": [*base, f"dataset.root={root}"]},
        "loops": loops,
        "overheads": {"monitor_default_vs_off": overhead("regexp_default"), "monitor_full_vs_off": overhead("regexp_full")},
    }


# ---------------------------------------------------------------- fused jobs
FUSED_MODELS = {  # --fused-model: the model of the --fused and --sweep jobs, on MNIST
    "mlp": ("MNIST · MLP 784-256-10", ["model=mlp", "model.hidden=[256]"]),
    "cnn": ("MNIST · SimpleCNN (conv32-pool-conv64-pool-fc128-fc10)", ["model=cnn"]),
}
FUSED_LIMIT = 6400  # training samples of a --fused job (100 steps of 64) unless --limit: N = 64 in minutes on 2 cores
FUSED_QUICK_LIMIT = 256


def group_throughput(summaries: list, wall_s: float) -> dict[str, Any]:
    """Samples/s over all the runs: the samples they trained (each run's perf/samples_per_s ×
    its training time) over the time spent training, the sum of the runs' training times one
    after another, the group's when fused (each member's train_time_s is the group's)."""
    times = [s.train_time_s for s in summaries]
    samples = sum(s.metrics["perf/samples_per_s"] * t for s, t in zip(summaries, times))
    fused = summaries[0].fused is not None
    seconds = max(times) if fused else sum(times)
    return {"samples_per_s": samples / seconds, "samples": samples, "train_s": seconds, "wall_s": wall_s,
            "wall_per_job_s": wall_s / len(summaries), "threads": summaries[0].threads,
            "models_per_group": summaries[0].fused["models"] if fused else 1}


def fused_jobs(compose_cfg: Callable[..., Any], n: int, tmp: Path, fuse: bool) -> dict[str, Any]:
    """Seeds 0..n-1: trained as one fused group, or one after another (each alone); timed
    from the first job's start to the last one's end (composing the configs not counted)."""
    cfgs = [compose_cfg([f"seed={i}"]) for i in range(n)]
    run_dirs = [tmp / f"{'fused' if fuse else 'sequential'}-{n}-{i}" for i in range(n)]
    t = time.perf_counter()
    if fuse:
        summaries = train_quietly(cfgs, run_dirs, fuse=True)
    else:
        summaries = [s for cfg, run_dir in zip(cfgs, run_dirs) for s in train_quietly([cfg], [run_dir], fuse=False)]
    return group_throughput(summaries, time.perf_counter() - t)


def run_fused(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    """For each N of --fused: N seeds fused (regexp.train.train_group) against the same N jobs
    one after another in this process; --repeats rounds in alternating order, medians."""
    title, model = FUSED_MODELS[args.fused_model]
    n_train = args.limit or (FUSED_QUICK_LIMIT if args.quick else FUSED_LIMIT)
    base = [*base_overrides("mnist", args, device), f"dataset.root={mnist_root(args)}", *model, "monitor=default"]
    compose_cfg = composer([*base, f"epochs={args.epochs}", f"dataset.limit={n_train}"])
    if not args.quick:  # the first runs of a process pay for imports and caches
        progress("fused: warm-up (2 jobs alone, then fused)")
        for fuse in (False, True):
            fused_jobs(composer([*base, "epochs=1", f"dataset.limit={BATCH_SIZE * 8}"]), 2, tmp, fuse)
    rows = []
    for n in args.fused:
        runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "fused": []}
        for r in range(args.repeats):
            for mode in (["sequential", "fused"] if r % 2 == 0 else ["fused", "sequential"]):
                runs[mode].append(fused_jobs(compose_cfg, n, tmp, fuse=mode == "fused"))
                x = runs[mode][-1]
                progress(f"N={n} repeat {r + 1}/{args.repeats} {mode:<10} {x['samples_per_s']:>10,.0f} samples/s "
                         f"(training {x['train_s']:.2f} s, wall {x['wall_s']:.2f} s)")
        med = {mode: {key: statistics.median(x[key] for x in xs) for key in ("samples_per_s", "wall_per_job_s")}
               for mode, xs in runs.items()}
        paired = [f["samples_per_s"] / q["samples_per_s"] for q, f in zip(runs["sequential"], runs["fused"])]
        paired_wall = [q["wall_s"] / f["wall_s"] for q, f in zip(runs["sequential"], runs["fused"])]
        rows.append({"n": n, "sequential": med["sequential"], "fused": med["fused"],
                     "ratio": statistics.median(paired), "wall_ratio": statistics.median(paired_wall),
                     "models_per_group": runs["fused"][0]["models_per_group"], "threads": runs["fused"][0]["threads"],
                     "runs": runs})
    return {"title": f"{title} · AdamW lr 1e-3 · batch {BATCH_SIZE} · monitor=default · logger=none",
            "jobs": f"{n_train:,} training samples × {args.epochs} epoch(s) per job "
                    f"({math.ceil(n_train / BATCH_SIZE) * args.epochs} steps), seeds 0..N-1",
            "repeats": args.repeats, "overrides": [*base, f"epochs={args.epochs}", f"dataset.limit={n_train}"], "rows": rows}


# ---------------------------------------------------------------- the command line
def regexp_command() -> list[str]:
    exe = Path(sys.executable).with_name("regexp")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("regexp")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from regexp.cli import main; sys.exit(main())"]


def wall_times(cmd: list[str], repeats: int, env: dict, warm_up: bool) -> list[float]:
    """An untimed run (unless not `warm_up`), then `repeats` timed ones."""
    times = []
    for i in range(repeats + warm_up):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        if i or not warm_up:
            times.append(time.perf_counter() - t)
    return times


def first_step(args: argparse.Namespace, device: torch.device, tmp: Path, env: dict) -> dict[str, Any]:
    """`regexp train` on MNIST (the mnist_mlp config, batch 64, max_steps=1, monitor.log_every=1),
    run once untimed (it warms the decoded-data cache; --quick relies on the in-process runs
    for that), then timed: from launching the command to the moment its first metrics record
    (step 1, written right after the first optimizer step) appears in metrics.jsonl, polled
    every 5 ms. Also: when train() was entered (summary.json's started_at: after Python,
    imports, composing and checking the config twice, Hydra's set-up) and the command's total
    wall time (which adds validation, test, checkpoints, the diagnosis and the exit)."""
    root = Path(args.data_root).expanduser().resolve()
    if not has_files("mnist", root):
        return {"skipped": f"no MNIST under {root}"}
    overrides = [f"dataset.root={root}", "dataset.download=false", "logger=none", f"device={device.type}",
                 f"batch_size={BATCH_SIZE}", f"dataset.limit={BATCH_SIZE}", "epochs=1", "max_steps=1",
                 "monitor.log_every=1", *CASES["mnist_mlp"]["overrides"]]
    cmd = [*regexp_command(), "train", *overrides]
    runs = []
    # an untimed first run warms the decoded-data cache (--quick: the in-process runs did)
    warm_up = not args.quick
    for i in range(args.cli_repeats + warm_up):
        run_dir = tmp / f"cli-{i}"
        metrics = run_dir / "metrics.jsonl"
        wall0, t0 = time.time(), time.perf_counter()
        with open(tmp / f"cli-{i}.log", "w") as log:
            proc = subprocess.Popen([*cmd, f"hydra.run.dir={run_dir}"], env=env, stdout=log, stderr=subprocess.STDOUT)
            seen = None
            while proc.poll() is None:
                if seen is None and metrics.is_file() and metrics.stat().st_size > 0:
                    seen = time.perf_counter() - t0
                time.sleep(0.005)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"`{shlex.join(cmd)}` exited {proc.returncode}: {(tmp / f'cli-{i}.log').read_text()[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        to_train = datetime.fromisoformat(summary["started_at"]).timestamp() - wall0
        if i or not warm_up:
            runs.append({"to_train_s": to_train, "to_first_step_s": seen, "total_s": total,
                         "train_time_s": summary.get("train_time_s"), "wall_time_in_train_s": summary.get("wall_time_s")})
        shutil.rmtree(run_dir, ignore_errors=True)

    def median(key: str) -> Optional[float]:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {"command": shlex.join(cmd + ["hydra.run.dir=..."]), "to_train_s": median("to_train_s"),
            "to_first_step_s": median("to_first_step_s"), "total_s": median("total_s"), "runs": runs}


def cli_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of the bench's `regexp` commands: --threads as OMP_NUM_THREADS."""
    env = dict(os.environ, COLUMNS="120")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def startup(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    env = cli_env(args)
    progress("timing `regexp --help` and the first training step of `regexp train`")
    warm_up = not args.quick
    help_times = wall_times([*regexp_command(), "--help"], args.help_repeats, env, warm_up)
    python_times = wall_times([sys.executable, "-c", "pass"], args.help_repeats, env, warm_up)
    # context for the first step: what importing torch alone costs (not in --quick)
    torch_times = [] if args.quick else wall_times([sys.executable, "-c", "import torch"], args.cli_repeats, env, warm_up)
    return {
        "help": {"command": "regexp --help", "median_s": statistics.median(help_times), "runs": help_times},
        "python_startup": {"command": f"{Path(sys.executable).name} -c pass", "median_s": statistics.median(python_times)},
        "import_torch": {"command": f"{Path(sys.executable).name} -c 'import torch'",
                         "median_s": statistics.median(torch_times) if torch_times else None},
        "first_step": first_step(args, device, tmp, env),
    }


def sweep_command(args: argparse.Namespace, device: torch.device, n: int) -> list[str]:
    """`regexp train -m` over seeds 0..n-1 of one-epoch jobs (the whole train split unless --limit)."""
    seeds = ",".join(map(str, range(n)))
    return [*regexp_command(), "train", "-m", f"seed={seeds}", *FUSED_MODELS[args.fused_model][1], "epochs=1",
            f"batch_size={BATCH_SIZE}", "logger=none", f"device={device.type}", f"dataset.root={mnist_root(args)}",
            "dataset.download=false", *([f"dataset.limit={args.limit}"] if args.limit else [])]


def timed_sweep(cmd: list[str], sweep_dir: Path, env: dict) -> dict[str, Any]:
    """The sweep's wall time, once every job completed; for the fused launcher, how many
    models each job was trained with (from its summary.json)."""
    log = sweep_dir.with_suffix(".log")
    wall, code = timed_command([*cmd, f"hydra.sweep.dir={sweep_dir}"], log, env)
    summary = sweep_dir / "sweep_summary.json"
    if code != 0 or not summary.is_file() or json.loads(summary.read_text())["status"] != "completed":
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {code}: {log.read_text()[-2000:]}")
    rows = json.loads(summary.read_text())["rows"]
    jobs = [json.loads((Path(row["run_dir"]) / "summary.json").read_text()) for row in rows]
    shutil.rmtree(sweep_dir, ignore_errors=True)
    return {"wall_s": wall, "jobs": len(rows), "models_per_job": [(j.get("fused") or {}).get("models", 1) for j in jobs],
            "threads_per_job": [j.get("threads") for j in jobs], "statuses": dict(Counter(j["status"] for j in jobs)),
            "model_epochs": sum(j.get("epochs_completed", 0) for j in jobs),
            "best_val_acc": max((j["metrics"]["val/acc"] for j in jobs if "val/acc" in j.get("metrics", {})), default=None)}


def timed_command(cmd: list[str], log: Path, env: dict) -> tuple[float, int]:
    """(wall seconds, exit code) of a command, its console in `log`."""
    t = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    return time.perf_counter() - t, code


def run_sweep(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    """`regexp train -m` of --sweep seeds with the basic launcher and with hydra/launcher=fused,
    in turn (--repeats rounds, alternating which goes first); wall times of the whole command."""
    cmd = sweep_command(args, device, args.sweep)
    launchers = {"basic": cmd, "fused": [*cmd, "hydra/launcher=fused"]}
    env = cli_env(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in launchers}
    for r in range(args.repeats):
        for name in (list(launchers) if r % 2 == 0 else list(launchers)[::-1]):
            runs[name].append(timed_sweep(launchers[name], tmp / f"sweep-{name}-{r}", env))
            progress(f"sweep of {args.sweep}: repeat {r + 1}/{args.repeats} {name:<6} {runs[name][-1]['wall_s']:.1f} s")
    paired = [b["wall_s"] / f["wall_s"] for b, f in zip(runs["basic"], runs["fused"])]
    return {"commands": {name: shlex.join([*c, "hydra.sweep.dir=..."]) for name, c in launchers.items()},
            "wall_s": {name: statistics.median(x["wall_s"] for x in xs) for name, xs in runs.items()},
            "ratio": statistics.median(paired), "paired_ratios": paired,
            "models_per_job": runs["fused"][0]["models_per_job"],
            "threads_per_job": {name: xs[0]["threads_per_job"] for name, xs in runs.items()}, "runs": runs}


# ---------------------------------------------------------------- runs ended early: live stop, pruning
LIVE_STOP_CASES = {  # --live-stop: runs whose decisive finding holds early (issue: findings while it trains)
    "deep_sigmoid": ("10-layer sigmoid MLP, init normal std 0.01",
                     ["model=deep_mlp", "model.depth=10", "model.activation=sigmoid", "init=normal", "init.std=0.01"]),
    "mlp_lr10": ("MNIST MLP, AdamW lr 10", ["model=mlp", "optimizer=adamw", "optimizer.lr=10"]),
}
PRUNE_GRID = ["optimizer.lr=1e-4,1e-3,1e-2", "optimizer.weight_decay=0,1e-4,1e-2", "+regularizer=dropout",
              "regularizer.dropout.p=0.0,0.2,0.5"]  # 27 jobs
PRUNE_LAUNCHERS = {"fused": (["hydra/launcher=fused"], "asha"), "basic": ([], "median")}  # launcher -> (overrides, prune)
PRUNE_LIMIT = 6400  # training samples per job unless --limit


def cli_data(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The overrides every run of --live-stop and --prune shares: MNIST where the bench finds it, --limit."""
    return [f"batch_size={BATCH_SIZE}", "logger=none", f"device={device.type}", f"dataset.root={mnist_root(args)}",
            "dataset.download=false", *([f"dataset.limit={args.limit}"] if args.limit else [])]


def live_run(cmd: list[str], run_dir: Path, env: dict) -> dict[str, Any]:
    """One `regexp train` to its end: wall time, status, steps, why it ended (ended_by), its
    findings, and each `finding` event of metrics.jsonl (rule, step) in order."""
    wall, code = timed_command([*cmd, f"hydra.run.dir={run_dir}"], run_dir.with_suffix(".log"), env)
    if code != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {code}: {run_dir.with_suffix('.log').read_text()[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [{"rule": r["finding/rule"], "step": r.get("step")} for r in read_metrics(run_dir) if "finding/rule" in r]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"wall_s": wall, "status": summary["status"], "steps": summary.get("steps"), "ended_by": summary.get("ended_by"),
            "findings": [f.get("rule") for f in summary.get("findings", [])], "finding_events": events,
            "log_every": summary.get("config", {}).get("monitor", {}).get("log_every")}


def live_stop_row(title: str, stop: list[dict[str, Any]], warn: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's stop runs against its warn runs (the first of each for steps and findings,
    medians for wall time): where it stopped, the step its finding first held in the warn run,
    how many log steps later it stopped, and how much sooner it ended."""
    first_stop, first_warn = stop[0], warn[0]
    rule = (first_stop["ended_by"] or {}).get("rule")
    held = next((e["step"] for e in first_warn["finding_events"] if e["rule"] == rule), None)
    late = (first_stop["steps"] - held) / first_stop["log_every"] if held is not None and first_stop["log_every"] else None
    wall_stop, wall_warn = statistics.median(r["wall_s"] for r in stop), statistics.median(r["wall_s"] for r in warn)
    return {"title": title, "status": first_stop["status"], "finding": rule, "ended_by": first_stop["ended_by"],
            "stopped_step": first_stop["steps"], "first_held_step": held, "log_steps_late": late,
            "warn_steps": first_warn["steps"], "warn_findings": first_warn["findings"],
            "wall_s": {"stop": wall_stop, "warn": wall_warn}, "ratio": wall_stop / wall_warn,
            "sooner_pct": 100 * (1 - wall_stop / wall_warn), "runs": {"stop": stop, "warn": warn}}


def run_live_stop(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Each case with monitor.on_finding=stop and =warn, --repeats rounds alternating which goes first."""
    env, rows, commands = cli_env(args), {}, {}
    for case, (title, overrides) in LIVE_STOP_CASES.items():
        cmd = [*regexp_command(), "train", *overrides, f"epochs={args.epochs}", *cli_data(args, device)]
        runs: dict[str, list[dict[str, Any]]] = {"stop": [], "warn": []}
        for r in range(args.repeats):
            for setting in (["stop", "warn"] if r % 2 == 0 else ["warn", "stop"]):
                runs[setting].append(live_run([*cmd, f"monitor.on_finding={setting}"], tmp / f"{case}-{setting}-{r}", env))
                progress(f"live stop {case}: repeat {r + 1}/{args.repeats} {setting} {runs[setting][-1]['wall_s']:.1f} s "
                         f"({runs[setting][-1]['status']} at step {runs[setting][-1]['steps']})")
        rows[case] = live_stop_row(title, runs["stop"], runs["warn"])
        commands[case] = shlex.join([*cmd, "monitor.on_finding=stop|warn", "hydra.run.dir=..."])
    return {"epochs": args.epochs, "repeats": args.repeats, "commands": commands, "rows": rows}


def prune_row(launcher: str, prune: str, pruned: list[dict[str, Any]], unpruned: list[dict[str, Any]]) -> dict[str, Any]:
    """A pruned grid against the same grid unpruned, on one launcher: median wall times and
    their ratio; model-epochs, statuses and best val/acc of the first of each."""
    wall_pruned, wall_unpruned = statistics.median(r["wall_s"] for r in pruned), statistics.median(r["wall_s"] for r in unpruned)
    best_pruned, best_unpruned = pruned[0]["best_val_acc"], unpruned[0]["best_val_acc"]
    return {"launcher": launcher, "prune": prune, "jobs": pruned[0]["jobs"],
            "wall_s": {"pruned": wall_pruned, "unpruned": wall_unpruned}, "speedup": wall_unpruned / wall_pruned,
            "model_epochs": {"pruned": pruned[0]["model_epochs"], "unpruned": unpruned[0]["model_epochs"]},
            "statuses": pruned[0]["statuses"], "best_val_acc": {"pruned": best_pruned, "unpruned": best_unpruned},
            "best_gap_points": (None if best_pruned is None or best_unpruned is None
                                else 100 * (best_unpruned - best_pruned)),
            "runs": {"pruned": pruned, "unpruned": unpruned}}


def run_prune(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    """The grid on each launcher with its pruning and with prune=none, --repeats rounds alternating which goes first."""
    env, rows, commands = cli_env(args), [], {}
    base = [*regexp_command(), "train", "-m", *PRUNE_GRID, *FUSED_MODELS[args.fused_model][1], f"epochs={args.epochs}",
            *cli_data(args, device)]
    for launcher, (overrides, prune) in PRUNE_LAUNCHERS.items():
        sweeps = {prune: [*base, *overrides, f"prune={prune}"], "none": [*base, *overrides, "prune=none"]}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sweeps}
        for r in range(args.repeats):
            for name in (list(sweeps) if r % 2 == 0 else list(sweeps)[::-1]):
                runs[name].append(timed_sweep(sweeps[name], tmp / f"prune-{launcher}-{name}-{r}", env))
                progress(f"grid, {launcher} prune={name}: repeat {r + 1}/{args.repeats} {runs[name][-1]['wall_s']:.1f} s "
                         f"{runs[name][-1]['statuses']}")
        rows.append(prune_row(launcher, prune, runs[prune], runs["none"]))
        commands.update({f"{launcher} prune={name}": shlex.join([*c, "hydra.sweep.dir=..."]) for name, c in sweeps.items()})
    return {"epochs": args.epochs, "repeats": args.repeats, "commands": commands, "rows": rows}


def render_live_stop(live: dict[str, Any]) -> None:
    """A markdown table, ready for docs/benchmarks.md."""
    print(f"\nlive stop: {live['epochs']} epoch(s) planned; wall times: median of {live['repeats']}\n")
    print("| run | ended as | finding | ended at step | finding first held (warn run) | log steps later | "
          "steps with warn | wall stop | wall warn | stop / warn | sooner |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in live["rows"].values():
        late = "—" if row["log_steps_late"] is None else f"{row['log_steps_late']:g}"
        print(f"| {row['title']} | {row['status']} | {row['finding'] or '—'} | {row['stopped_step']} | "
              f"{'—' if row['first_held_step'] is None else row['first_held_step']} | {late} | {row['warn_steps']} | "
              f"{fmt_s(row['wall_s']['stop'])} | {fmt_s(row['wall_s']['warn'])} | {row['ratio']:.2f} | {row['sooner_pct']:.0f} % |")


def render_prune(prune: dict[str, Any]) -> None:
    """A markdown table, ready for docs/benchmarks.md."""
    print(f"\npruning: a grid of {prune['rows'][0]['jobs']} jobs, {prune['epochs']} epochs; wall times: median of {prune['repeats']}\n")
    print("| launcher | prune | wall pruned | wall unpruned | unpruned / pruned | model-epochs | statuses | "
          "best val/acc pruned | best val/acc unpruned | gap (points) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in prune["rows"]:
        best, gap = row["best_val_acc"], row["best_gap_points"]
        statuses = ", ".join(f"{n} {status}" for status, n in row["statuses"].items())
        print(f"| {row['launcher']} | {row['prune']} | {fmt_s(row['wall_s']['pruned'])} | {fmt_s(row['wall_s']['unpruned'])} | "
              f"{row['speedup']:.2f}× | {row['model_epochs']['pruned']} of {row['model_epochs']['unpruned']} | {statuses} | "
              f"{fmt_acc(best['pruned'])} | {fmt_acc(best['unpruned'])} | {'—' if gap is None else f'{gap:.2f}'} |")


def fmt_acc(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


# ---------------------------------------------------------------- report
def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device),
    }
    with contextlib.suppress(ImportError):
        import torchvision

        info["torchvision"] = torchvision.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt_s(x: Optional[float]) -> str:
    return "—" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:  # piped or redirected: wide enough for the table, no wrapping
        console = Console(highlight=False, width=140)
    m = result["machine"]
    console.print(f"[bold]regexp bench[/]  {result['command']}")
    console.print(f"machine: {m['cpu']} · {m['usable_cores']}/{m['logical_cores']} cores usable · torch {m['torch']} "
                  f"({m['torch_threads']} threads) · device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}")
    console.print(f"load average (1/5/15 min): before {result['load_before']} · after {result['load_after']}"
                  + ("" if result["quick"] else "  (other processes share the CPU: compare ratios, not absolute rates)"))
    if result["oversubscribed"]:
        console.print(f"[yellow]warning: {m['torch_threads']} torch threads on {m['usable_cores']} cores with a load average of "
                      f"{result['load_before'][0]}: intra-op threads wait for each other on a busy CPU, which can make every "
                      "loop many times slower and the timings erratic; --threads 1 measures more stably here[/]")
    quick = result["quick"]
    if quick:
        console.print("[yellow]--quick: a smoke run (a few hundred samples, 1 epoch, no warm-up) that checks every loop runs; "
                      "its rates are not a measurement and no ratios are shown[/]")
    if "fused" in result:
        render_fused(result["fused"], quick)
    if "sweep" in result:
        render_sweep(result["sweep"], quick)
    if "live_stop" in result:
        render_live_stop(result["live_stop"])
    if "prune" in result:
        render_prune(result["prune"])
    for case in result["cases"].values():
        d = case["data"]
        data = f"{d['dataset']} {'SYNTHETIC (random images in the real cifar-10-batches-py format)' if d['synthetic'] else 'real'}"
        table = Table(title=f"{case['title']}\n{data} · {d['train_samples']:,} training samples · {d['epochs']} epoch(s) · "
                            f"median of {d['repeats']} repeat(s) {'after a warm-up' if d['warm_up_samples'] else 'WITHOUT warm-up'} · "
                            f"{d['parameters']:,} params")
        for col in ("loop", "samples/s", "min–max", *(() if quick else ("vs dataloader", "vs tensor_loop"))):
            table.add_column(col, justify="left" if col == "loop" else "right")
        for loop in case["loops"].values():
            ratios = () if quick else (f"{loop['ratio_vs_dataloader']:.2f}×", f"{loop['ratio_vs_tensor_loop']:.2f}×")
            table.add_row(loop["label"], f"{loop['samples_per_s']:,.0f}", f"{loop['min']:,.0f}–{loop['max']:,.0f}", *ratios)
        console.print(table)
        for key, what in () if quick else (("monitor_default_vs_off", "monitor=default vs off"),
                                           ("monitor_full_vs_off", "monitor=full vs off")):
            o = case["overheads"][key]
            paired = ", ".join(f"{r:.3f}" for r in o["paired_time_ratios"])
            console.print(f"  {what}: training time ×{o['time_ratio']:.3f} ({o['overhead_pct']:+.1f} %; paired per repeat: {paired})")
    s = result.get("startup")
    if s:
        console.print(f"regexp --help: {fmt_s(s['help']['median_s'])} (python -c pass {fmt_s(s['python_startup']['median_s'])}, "
                      f"python -c 'import torch' {fmt_s(s['import_torch']['median_s'])}; medians; the commands' wall time)")
        f = s["first_step"]
        if "skipped" in f:
            console.print(f"first training step: skipped ({f['skipped']})")
        else:
            console.print(f"regexp train, MNIST, warm cache: first training step after {fmt_s(f['to_first_step_s'])} "
                          f"(train() entered after {fmt_s(f['to_train_s'])}); whole command {fmt_s(f['total_s'])} "
                          f"(+ validation, test, checkpoints, exit); median of {len(f['runs'])}")


def ratio_text(ratio: float, quick: bool) -> str:
    return "— (--quick)" if quick else f"{ratio:.2f}×"


def render_fused(fused: dict[str, Any], quick: bool) -> None:
    """A markdown table, ready for docs/benchmarks.md (without ratios for a --quick smoke run)."""
    rows = fused["rows"]
    print(f"\n{fused['title']}\n{fused['jobs']} · {plural_threads(rows[0]['threads'])} · median of "
          f"{fused['repeats']} repeat(s); ratio: fused / sequential samples/s, paired per repeat\n")
    print("| N | sequential samples/s | fused samples/s | ratio | wall per job, sequential | wall per job, fused | wall ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        split = "" if row["models_per_group"] == row["n"] else f" (groups of {row['models_per_group']})"
        print(f"| {row['n']}{split} | {row['sequential']['samples_per_s']:,.0f} | {row['fused']['samples_per_s']:,.0f} | "
              f"{ratio_text(row['ratio'], quick)} | {fmt_s(row['sequential']['wall_per_job_s'])} | "
              f"{fmt_s(row['fused']['wall_per_job_s'])} | {ratio_text(row['wall_ratio'], quick)} |")


def plural_threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def render_sweep(sweep: dict[str, Any], quick: bool) -> None:
    wall, paired = sweep["wall_s"], ", ".join(f"{r:.2f}" for r in sweep["paired_ratios"])
    print(f"\nbasic: {sweep['commands']['basic']}\nfused: {sweep['commands']['fused']}\n")
    print("| sweep | basic launcher | hydra/launcher=fused | basic / fused |")
    print("|---|---|---|---|")
    print(f"| {len(sweep['models_per_job'])} jobs, wall time (median of {len(sweep['paired_ratios'])}) | {wall['basic']:.1f} s | "
          f"{wall['fused']:.1f} s | {ratio_text(sweep['ratio'], quick)}{'' if quick else f' (paired: {paired})'} |")
    print(f"models per fused group, by job: {sweep['models_per_job']}; threads (device.threads), by job: "
          f"basic {sweep['threads_per_job']['basic']}, fused {sweep['threads_per_job']['fused']}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--case", choices=[*CASES, "all"], default="mnist_mlp")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--epochs", type=int, default=None, help="timed epochs per run (default 2; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per loop (default 3; --quick 2)")
    p.add_argument("--limit", type=int, default=None,
                   help="training samples (default: the whole train split; synthetic CIFAR-10 5000; --quick 256/128)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader num_workers of the dataloader loop")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and OMP_NUM_THREADS of the CLI runs)")
    p.add_argument("--data-root", default=os.environ.get("REGEXP_DATA_DIR") or "data",
                   help="torchvision layout: MNIST/raw, cifar-10-batches-py (default $REGEXP_DATA_DIR or data)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds, not a measurement: 256/128 samples, 1 epoch, 2 repeats, no warm-ups, 64 validation samples")
    p.add_argument("--no-startup", action="store_true", help="skip the `regexp --help` and first-step timings")
    p.add_argument("--fused", type=int, nargs="+", metavar="N",
                   help="instead of the loops: N seeds trained fused (regexp.train.train_group) vs the same N jobs one "
                        f"after another, for each N (jobs of {FUSED_LIMIT} samples unless --limit; 1 epoch unless --epochs)")
    p.add_argument("--fused-model", choices=list(FUSED_MODELS), default="mlp", help="the model of --fused and --sweep")
    p.add_argument("--sweep", type=int, metavar="N",
                   help="instead of the loops: the wall time of `regexp train -m seed=0,..,N-1 epochs=1` with the basic "
                        "launcher vs hydra/launcher=fused (the whole train split unless --limit)")
    p.add_argument("--live-stop", action="store_true",
                   help="instead of the loops: the runs of LIVE_STOP_CASES with monitor.on_finding=stop vs warn, through "
                        "`regexp train` (3 epochs unless --epochs; the whole train split unless --limit)")
    p.add_argument("--prune", action="store_true",
                   help="instead of the loops: a 27-job grid with hydra/launcher=fused prune=asha vs unpruned, and basic "
                        f"prune=median vs unpruned (4 epochs unless --epochs; jobs of {PRUNE_LIMIT} samples unless --limit)")
    p.add_argument("--json", action="store_true", help="print machine-readable results only (progress goes to stderr)")
    p.add_argument("--save", metavar="PATH", help="also write the machine-readable results to PATH")
    args = p.parse_args(argv)
    modes = [name for name in ("fused", "sweep", "live_stop", "prune") if getattr(args, name)]
    if len(modes) > 1:
        p.error(f"--{modes[0].replace('_', '-')} and --{modes[1].replace('_', '-')}: one mode at a time")
    args.mode = modes[0] if modes else None
    args.epochs = args.epochs or {"live_stop": 3, "prune": 4}.get(args.mode) or (1 if args.quick or args.mode else 2)
    args.repeats = args.repeats or (1 if args.mode in ("live_stop", "prune") else 2 if args.quick else 3)
    if args.prune:
        args.limit = args.limit or PRUNE_LIMIT
    args.cli_repeats = 1 if args.quick else 3
    args.help_repeats = 2 if args.quick else 5
    for name in ("epochs", "repeats", "limit", "sweep"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.fused and min(args.fused) < 1:
        p.error(f"--fused {min(args.fused)}: each N must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    # regexp's in-process runs: their console goes to a buffer, their log lines nowhere
    regexp_log = logging.getLogger("regexp")
    regexp_log.addHandler(logging.NullHandler())
    regexp_log.propagate = False

    result: dict[str, Any] = {"command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
                              "quick": args.quick,  # a smoke run: its rates and ratios measure nothing
                              "machine": machine(device), "load_before": [round(x, 2) for x in os.getloadavg()], "cases": {}}
    with tempfile.TemporaryDirectory(prefix="regexp-bench-") as tmp:
        if args.fused:
            result["fused"] = run_fused(args, device, Path(tmp))
        if args.sweep:
            result["sweep"] = run_sweep(args, device, Path(tmp))
        if args.live_stop:
            result["live_stop"] = run_live_stop(args, device, Path(tmp))
        if args.prune:
            result["prune"] = run_prune(args, device, Path(tmp))
        for name in (list(CASES) if args.case == "all" else [args.case]) if not args.mode else []:
            result["cases"][name] = run_case(name, args, device, Path(tmp))
        if not (args.no_startup or args.mode):
            result["startup"] = startup(args, device, Path(tmp))
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    # more runnable threads than cores: torch's intra-op threads stall on each other (the
    # in-process runs; the commands of --sweep, --live-stop and --prune choose their own threads)
    m = result["machine"]
    result["oversubscribed"] = args.mode in ("fused", None) and m["torch_threads"] > 1 and max(result["load_before"][0], result["load_after"][0]) + m["torch_threads"] - 1 > m["usable_cores"]
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
