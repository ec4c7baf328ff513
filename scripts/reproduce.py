#!/usr/bin/env python3
"""Run an experiment preset's sweep, compare its runs, and print the values its expected
outcome is about (README, "Experiment presets").

    python scripts/reproduce.py --list
    python scripts/reproduce.py dropout_mnist                          # the preset as shipped
    python scripts/reproduce.py init_deep_mlp logger=none max_steps=50 # any regexp override
    python scripts/reproduce.py sparsity_fashion_mnist --sweep-dir runs/l1 resume=auto   # finish it
    python scripts/reproduce.py sparsity_fashion_mnist --sweep-dir runs/l1 --report-only

Three steps: `regexp train -m +experiment=PRESET hydra.sweep.dir=DIR OVERRIDES...`, then
`regexp compare DIR`, then one row per run with the preset's own columns: per-layer values
from metrics.jsonl (at the first or last log step that has them, or an epoch's row) and
final metrics from summary.json. The exit code is regexp train's (1 if a job failed).
"""

import argparse
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from regexp.comparison import find_runs, fmt, key_value, swept_keys
from regexp.config import config_dir

# What each preset's outcome is read from, one column each:
#   "first NAME" / "last NAME"  the value at the first / last metrics.jsonl record that has NAME
#   "epoch1 NAME"               NAME in epoch 1's row of metrics.jsonl
#   "final NAME"                NAME in summary.json's final metrics
#   "max |Δw|"                  largest weight difference from the first run's final weights
COLUMNS: dict[str, list[str]] = {
    "dropout_mnist": ["final train/acc", "final test/acc", "final train/loss", "final test/loss"],
    "batchnorm_sigmoid": ["epoch1 val/acc", "final val/acc", "final test/acc"],
    "init_deep_mlp": ["first act/std/act1", "first act/std/act5", "first act/std/act10", "first grad/norm/fc1",
                      "first grad/norm/fc11", "final test/acc"],
    "adamw_vs_adam": ["last weight/norm/fc1", "last weight/norm/fc2", "last weight/norm/fc3", "final test/acc"],
    "clip_deep_relu": ["first grad/global_norm", "first nonfinite/where", "last grad/clip_frac", "final test/acc"],
    "accumulation_mnist": ["last weight/norm/fc1", "final test/loss", "final test/acc", "max |Δw|"],
    "sparsity_fashion_mnist": ["last weight/sparsity/fc1", "last weight/sparsity/fc2", "last weight/norm/fc1",
                               "final test/acc"],
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def description(preset: str) -> str:
    """The preset's header comment, without the `@package` line."""
    lines = (Path(config_dir()) / "experiment" / f"{preset}.yaml").read_text().splitlines()
    return "\n".join(line[2:] for line in lines if line.startswith("# ") and not line.startswith("# @package"))


def regexp(*args: str) -> int:
    installed = Path(sys.executable).with_name("regexp")  # the regexp of this Python's environment
    command = str(installed) if installed.is_file() else shutil.which("regexp") or "regexp"
    print("$ regexp " + " ".join(args), flush=True)
    return subprocess.call([command, *args])


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def final_weights(run_dir: Path) -> Optional[dict[str, Any]]:
    import torch

    path = run_dir / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["model"] if path.is_file() else None


def column_value(column: str, run_dir: Path, summary: dict[str, Any], reference: Optional[dict[str, Any]]) -> Any:
    if column == "max |Δw|":
        weights = final_weights(run_dir)
        if weights is None or reference is None:
            return None
        return max((weights[name] - reference[name]).abs().max().item() for name in reference)
    where, name = column.split(" ", 1)
    if where == "final":
        return (summary.get("metrics") or {}).get(name)
    rows = [r for r in records(run_dir) if name in r]
    if where == "epoch1":
        rows = [r for r in rows if r.get("epoch") == 1 and "val/loss" in r]  # the epoch's own row
    if not rows:
        return None
    return rows[-1 if where == "last" else 0][name]


def report(preset: str, sweep_dir: Path) -> None:
    """One row per run: the swept values, its status and the preset's columns."""
    runs = sorted(find_runs([sweep_dir]), key=lambda run: int(run.run_dir.name) if run.run_dir.name.isdigit() else 0)
    keys = swept_keys(runs)
    columns = COLUMNS.get(preset, ["final test/acc"])
    reference = final_weights(runs[0].run_dir) if "max |Δw|" in columns else None
    table = Table(title=f"{preset}: what the outcome is read from", title_justify="left")
    for heading in [*keys, "status", *columns]:
        table.add_column(heading, justify="left" if heading in keys or heading == "status" else "right")
    for run in runs:
        summary = json.loads((run.run_dir / "summary.json").read_text())
        values = [column_value(column, run.run_dir, summary, reference) for column in columns]
        table.add_row(*(key_value(run, key) or "—" for key in keys), run.status,
                      *(fmt(v) if isinstance(v, (int, float)) else str(v or "—") for v in values))
    Console(width=max(Console().width, 160)).print(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("preset", nargs="?", help="a file name of conf/experiment/ (see --list)")
    p.add_argument("overrides", nargs="*", help="regexp train overrides added to the preset's, e.g. logger=none epochs=5")
    p.add_argument("--sweep-dir", type=Path, help="where the runs go (default outputs/reproduce/PRESET/<date>_<time>)")
    p.add_argument("--report-only", action="store_true", help="compare and report on --sweep-dir; train nothing")
    p.add_argument("--list", action="store_true", help="list the presets with their expected outcomes")
    options = p.parse_intermixed_args()
    if options.list or options.preset is None:
        for preset in preset_names():
            print(f"{preset}\n  " + description(preset).replace("\n", "\n  ") + "\n")
        return 0
    if options.preset not in preset_names():
        p.error(f"unknown preset {options.preset!r}; one of: {', '.join(preset_names())}")
    if options.report_only and options.sweep_dir is None:
        p.error("--report-only needs --sweep-dir")
    sweep_dir = options.sweep_dir or Path("outputs/reproduce") / options.preset / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")

    print(description(options.preset) + "\n")
    code = 0
    if not options.report_only:
        code = regexp("train", "-m", f"+experiment={options.preset}", f"hydra.sweep.dir={sweep_dir}", *options.overrides)
        if code not in (0, 1):  # 1: some jobs failed, the others are still worth comparing
            return code
    if regexp("compare", str(sweep_dir)) == 0:
        report(options.preset, sweep_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
