"""The test suite's own rules: real data found through REGEXP_DATA_DIR, and a run without
it says so in one summary line (outside CI) or fails (in CI)."""

import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

REAL_DATA_TESTS = '''
from conftest import require_shared_data

def test_mnist():
    require_shared_data("MNIST")

def test_fashion():
    require_shared_data("FashionMNIST")

def test_without_data():
    pass
'''


def run_copied_suite(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """pytest on a copy of conftest.py and three tests, in a tree with no ../shared/data."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    (tmp_path / "repo" / "pytest.ini").write_text("[pytest]\n")
    (tests / "conftest.py").write_text(Path(conftest.__file__).read_text())
    (tests / "test_real.py").write_text(REAL_DATA_TESTS)
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "REGEXP_DATA_DIR")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          cwd=tmp_path / "repo", env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_data_dir_is_looked_up_in_regexp_data_dir_first(tmp_path, monkeypatch):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    monkeypatch.setenv("REGEXP_DATA_DIR", str(tmp_path))
    assert conftest.data_dirs()[0] == tmp_path.resolve()
    assert conftest.require_shared_data("MNIST") == tmp_path.resolve()


@pytest.mark.slow
def test_missing_data_is_one_summary_line_outside_ci(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_copied_suite(tmp_path, REGEXP_DATA_DIR=str(empty))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("real data:")]
    assert len(lines) == 1, out.stdout
    assert "2 tests skipped" in lines[0] and "FashionMNIST, MNIST" in lines[0]
    assert str(empty.resolve()) in lines[0] and str(tmp_path / "shared" / "data") in lines[0]


@pytest.mark.slow
def test_missing_data_fails_in_ci(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_copied_suite(tmp_path, REGEXP_DATA_DIR=str(empty), CI="true")
    assert out.returncode == 1
    assert "2 failed, 1 passed" in out.stdout
    assert "real data:" not in out.stdout
