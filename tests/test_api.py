"""The Python API: regexp.run / load / compare, on the CLI's compose, validation and records."""

import signal
import warnings

import pytest
import torch

import regexp

TINY = ["dataset.limit=256", "dataset.val_size=128", "batch_size=64", "epochs=1", "monitor.log_every=2", "logger=none"]


@pytest.fixture
def data_env(data_root, monkeypatch):
    monkeypatch.setenv("REGEXP_DATA_DIR", str(data_root))


@pytest.mark.parametrize("overrides,key", [
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["+regularizer=dropout", "regularizer.dropout.p=1.5"], "regularizer.dropout.p"),
    (["model=transformer"], "model"),
    (["no_such_key=1"], "no_such_key"),
])
def test_bad_input_raises_config_error_and_writes_nothing(tmp_path, overrides, key):
    with pytest.raises(regexp.ConfigError) as e:
        regexp.run(overrides, run_dir=tmp_path / "run")
    assert isinstance(e.value, ValueError) and str(e.value).startswith(key)
    assert not (tmp_path / "run").exists()


def global_settings() -> tuple:
    return (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


@pytest.mark.slow
def test_two_runs_in_one_process_match_and_leave_nothing_changed(tmp_path, data_env):
    before = global_settings()
    first = regexp.run([*TINY, "device.deterministic=true", "device.threads=1"], run_dir=tmp_path / "a")
    filters = list(warnings.filters)  # after the first run: libraries add theirs when first imported
    second = regexp.run([*TINY, "device.deterministic=true", "device.threads=1"], run_dir=tmp_path / "b")
    assert global_settings() == before and warnings.filters == filters
    assert first.status == second.status == "completed"
    same = {k: v for k, v in first.metrics.items() if not k.startswith("perf/")}
    assert same == {k: v for k, v in second.metrics.items() if not k.startswith("perf/")}
    assert first.overrides == [*TINY, "device.deterministic=true", "device.threads=1"] and first.choices["optimizer"] == "adamw"

    run = regexp.load(tmp_path / "a")
    assert run.summary.metrics == first.metrics and run.findings == first.findings
    assert [r["step"] for r in run.metrics if "train/loss" in r] == [2, 4]
    assert (tmp_path / "a" / ".hydra" / "overrides.yaml").is_file() and "epoch 1/1" in (tmp_path / "a" / "train.log").read_text()

    table = regexp.compare([tmp_path], by=["seed"])
    assert [(g["label"], g["runs"], g["stats"]["test/acc"]["mean"]) for g in table["groups"]] == [
        ("seed=0", 2, pytest.approx(first.metrics["test/acc"]))]
    with pytest.raises(regexp.ConfigError, match="no_such_key"):
        regexp.compare([tmp_path], by=["no_such_key"])


def test_load_of_a_dir_that_is_no_run(tmp_path):
    with pytest.raises(regexp.RunError, match="summary.json"):
        regexp.load(tmp_path)
