"""CUDA paths (precision, channels_last, fused optimizers, compile); skipped without a GPU.
scripts/gpu_check.sh runs them on a machine that has one."""

import io

import pytest
import torch
from conftest import compose_train
from rich.console import Console

from regexp.config import validate
from regexp.tracking import Reporter
from regexp.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("overrides", [
    ["device.precision=bf16"],
    ["device.precision=fp16", "clip=norm"],  # grad scaler: unscale before clipping
    ["model=cnn", "device.channels_last=true", "device.precision=bf16"],
    ["model=cnn", "device.compile=true"],
], ids=["bf16", "fp16+scaler+clip", "cnn-channels_last", "cnn-compile"])
def test_trains_on_cuda(tmp_path, data_root, overrides):
    cfg = validate(compose_train([f"dataset.root={data_root}", "device=cuda", "logger=none", "dataset.limit=2048",
                                  "dataset.val_size=512", "epochs=2", "monitor.log_every=4", *overrides]))
    summary = train(cfg, tmp_path / "run", reporter=Reporter(Console(file=io.StringIO())))
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert summary["metrics"]["test/acc"] > 0.5
