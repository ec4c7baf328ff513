"""Shared fixtures: the real data sets, the real CLI, and a small composed config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
REGEXP = str(Path(sys.executable).with_name("regexp"))  # the installed console script


def require_shared_data(folder: str = "MNIST") -> Path:
    """../shared/data holding `folder`, or skip — but never skip in CI, where real-data
    tests must run."""
    if (SHARED_DATA / folder / "raw").is_dir():
        return SHARED_DATA
    if os.environ.get("CI") == "true":
        pytest.fail(f"real data missing at {SHARED_DATA / folder} (CI=true: real-data tests may not skip)")
    pytest.skip(f"real data not found at {SHARED_DATA / folder}")


@pytest.fixture
def data_root() -> Path:
    return require_shared_data()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No W&B, and decoded-data caches in a temp dir (never beside the shared data)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "regexp-cache"))


# Small and fast: a few hundred real samples, a few optimizer steps.
TINY = ["dataset.limit=256", "dataset.val_size=256", "batch_size=32", "epochs=1", "max_steps=4", "monitor.log_every=2"]


def run_cli(args: list[str], cwd: Path, data_root: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `regexp` as a user would, from `cwd`."""
    env = dict(os.environ, COLUMNS="200")
    if data_root is not None:
        env["REGEXP_DATA_DIR"] = str(data_root)
    return subprocess.run([REGEXP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def compose_train(overrides: list[str]):
    """The real config tree composed with `overrides` (as `regexp train` would)."""
    from hydra import compose, initialize_config_dir

    from regexp.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=overrides)
