"""`regexp check`: the recipe checks pass on a sound config and catch each broken one, through
the Python API (broken data handed in directly) and the CLI (exit codes, nothing written)."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from conftest import run_cli

SMALL = ["dataset.limit=1024", "logger=none"]
NAMES = ["loss at init", "overfit one batch", "gradients", "output uses input", "labels balanced",
         "inputs normalized", "train/test copies"]


def checked(overrides: list[str]):
    """The validated config of `overrides` (on SMALL) and its data, on the CPU."""
    from regexp.compose import check_job, compose
    from regexp.data import load_data

    cfg = check_job(compose([*SMALL, "device=cpu", *overrides]))
    return cfg, load_data(cfg.dataset, torch.device("cpu"))


def by_name(results) -> dict:
    return {r.name: r for r in results}


def test_a_sound_config_passes_every_check_the_same_each_time(data_root):
    from regexp.check import run_checks

    cfg, data = checked([])
    first, second = run_checks(cfg, data), run_checks(cfg, data)
    assert [r.name for r in first] == NAMES
    assert all(r.passed for r in first), "\n".join(r.line() for r in first)
    assert [r.measured for r in first] == [r.measured for r in second]  # seeded from cfg.seed


def shuffled_labels(data):
    generator = torch.Generator().manual_seed(1)
    return dataclasses.replace(data, train_y=data.train_y[torch.randperm(len(data.train_y), generator=generator)])


def not_normalized(data):
    return dataclasses.replace(data, train_x=data.train_x * 0.3081 + 0.1307)  # MNIST's pixels back in 0..1


def copies_in_test(data):
    test_x = data.test_x.clone()
    test_x[:200] = data.train_x[:200]  # 2% of the 10,000 test images
    return dataclasses.replace(data, test_x=test_x)


def one_class_dominating(data):
    train_y = data.train_y.clone()
    train_y[: len(train_y) * 3 // 4] = 0
    return dataclasses.replace(data, train_y=train_y)


@pytest.mark.parametrize("break_data, caught, shown", [
    (shuffled_labels, "output uses input", "with inputs zeroed"),
    (not_normalized, "inputs normalized", "std 0.30"),
    (copies_in_test, "train/test copies", "200 of 10000 test images (2.00%)"),
    (one_class_dominating, "labels balanced", "0 largest): ratio 0.03"),
])
def test_broken_data_is_caught(data_root, break_data, caught, shown):
    from regexp.check import run_checks

    cfg, data = checked([])
    result = by_name(run_checks(cfg, break_data(data)))[caught]
    assert not result.passed and shown in result.measured, result.line()
    assert "FAIL" in result.line() and "try:" in result.line()


@pytest.mark.parametrize("overrides, caught", [
    (["init=normal", "init.std=1"], "loss at init"),  # the final layer starts too large
    (["optimizer.lr=1e-5"], "overfit one batch"),  # too small a step to fit even one batch
])
def test_broken_configs_are_caught(data_root, overrides, caught):
    from regexp.check import run_checks

    results = by_name(run_checks(*checked(overrides)))
    assert not results[caught].passed, results[caught].line()


def test_a_parameter_without_gradient_is_named(data_root, monkeypatch):
    import regexp.check
    from regexp.train import build_state

    def with_unused_parameter(*args):
        state = build_state(*args)
        state.model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # outside the forward pass
        return state

    monkeypatch.setattr(regexp.check, "build_state", with_unused_parameter)
    result = by_name(regexp.check.run_checks(*checked([])))["gradients"]
    assert not result.passed and result.measured.endswith("none for: unused"), result.line()


def test_cli_on_a_sound_config_prints_every_check_writes_nothing(tmp_path, data_root):
    out = run_cli(["check", *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in NAMES:
        assert any(line.startswith(f"PASS  {name}") for line in lines), out.stdout
    assert lines[-1] == "7 of 7 checks pass"
    assert list(tmp_path.iterdir()) == []  # no outputs/, no wandb/


@pytest.mark.parametrize("overrides, caught", [
    (["init=normal", "init.std=1"], "loss at init"),
    (["optimizer.lr=1e-5"], "overfit one batch"),
])
def test_cli_exits_3_when_a_check_fails(tmp_path, data_root, overrides, caught):
    out = run_cli(["check", *SMALL, *overrides], cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert any(line.startswith(f"FAIL  {caught}") for line in out.stdout.splitlines()), out.stdout
    assert caught in out.stdout.splitlines()[-1].partition("failed: ")[2]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, start", [
    (["optimizer.lr=-1"], "regexp: error: optimizer.lr=-1"),
    (["model=foo"], "regexp: error: model=foo: unknown option"),
    (["seed=0,1"], "regexp: error: seed=0,1: regexp check checks one config"),
    (["-m", "seed=0,1"], "regexp: error: -m: regexp check checks one config"),
    (["--epochs", "1"], "regexp: error: --epochs: not a flag of regexp check"),
    (["seed"], "regexp: error: seed: neither an override nor a flag"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, data_root, monkeypatch, capsys, args, start):
    from regexp.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["check", *args])
    out = capsys.readouterr()
    assert exited.value.code == 2, out.out + out.err
    assert out.err.startswith(start) and len(out.err.splitlines()) == 1, out.err
    assert out.out == "" and list(tmp_path.iterdir()) == []


def test_bad_input_through_the_installed_command(tmp_path, data_root):
    out = run_cli(["check", "optimizer.lr=-1"], cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("regexp: error: optimizer.lr=-1"), out.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_checks_without_torch(tmp_path):
    code = ("import sys; from regexp.cli import main; main(['check', '--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: regexp check [OVERRIDES...]")
    assert "Exit codes: 0 all checks pass, 3 a check failed, 1 a crash, 2 bad input." in out.stdout
    assert "check [OVERRIDES...]" in run_cli(["--help"], cwd=tmp_path).stdout
