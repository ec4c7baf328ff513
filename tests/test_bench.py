"""Smoke test of scripts/bench.py: its tiniest settings end to end, the JSON it prints.
No timing threshold is asserted: the numbers of a seconds-long run on a shared machine mean nothing."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # a training benchmark in a subprocess

LOOPS = ["dataloader", "tensor_loop", "regexp_off", "regexp_default", "regexp_full"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_json(data_root, tmp_path):
    # MNIST (real) and CIFAR-10 (no real copy under data_root: synthetic, in the real format)
    env = dict(os.environ, REGEXP_DATA_DIR=str(data_root))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--repeats", "1", "--case", "all", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # --json: nothing else on stdout

    assert {"command", "machine", "load_before", "load_after", "oversubscribed", "cases", "startup"} <= result.keys()
    assert result["machine"]["device"] == "cpu" or result["machine"]["device"].startswith("cuda")
    assert set(result["cases"]) == {"mnist_mlp", "cifar_cnn"}
    assert result["cases"]["mnist_mlp"]["data"]["synthetic"] is False
    cifar_real = (data_root / "cifar-10-batches-py").is_dir()
    assert result["cases"]["cifar_cnn"]["data"]["synthetic"] is not cifar_real
    for case in result["cases"].values():
        data = case["data"]
        assert data["train_samples"] > 0 and data["batch_size"] == 64
        assert list(case["loops"]) == LOOPS
        for loop in case["loops"].values():
            assert positive(loop["samples_per_s"]) and positive(loop["ratio_vs_dataloader"]) and positive(loop["ratio_vs_tensor_loop"])
            assert len(loop["runs"]) == data["repeats"]
            assert all(r["samples"] == data["train_samples"] * data["epochs"] for r in loop["runs"])
        assert case["loops"]["dataloader"]["ratio_vs_dataloader"] == 1.0
        assert case["loops"]["tensor_loop"]["ratio_vs_tensor_loop"] == 1.0
        for overhead in case["overheads"].values():
            assert positive(overhead["time_ratio"])
            assert math.isclose(overhead["overhead_pct"], 100 * (overhead["time_ratio"] - 1))

    startup = result["startup"]
    assert positive(startup["help"]["median_s"])
    first = startup["first_step"]
    assert positive(first["to_train_s"]) and positive(first["to_first_step_s"]) and positive(first["total_s"])
    assert first["to_train_s"] < first["to_first_step_s"] < first["total_s"]
