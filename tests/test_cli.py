"""The real `regexp` command: help, config printing, bad input, and every option trained."""

import subprocess
import sys

import pytest
from conftest import TINY, run_cli, summaries
from omegaconf import OmegaConf

from regexp.config import GROUP_SCHEMAS, REGISTRY, REGULARIZERS
from regexp.synthetic import write_cifar10


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from regexp.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "regexp train" in out.stdout and "+regularizer" in out.stdout


def test_importing_regexp_leaves_warning_filters_alone():
    code = ("import warnings; n = len(warnings.filters); import regexp.cli, regexp.compose, regexp.config; "
            "assert len(warnings.filters) == n, warnings.filters[:3]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unknown_command(tmp_path):
    out = run_cli(["fly"], tmp_path)
    assert out.returncode == 2 and "unknown command" in out.stderr


@pytest.mark.slow
def test_train_help_lists_groups(tmp_path):
    out = run_cli(["train", "--help"], tmp_path)
    assert out.returncode == 0
    for group in ("dataset", "model", "optimizer", "regularizer"):
        assert group in out.stdout
    for group, options in REGISTRY.items():  # from the registry, so a new option shows up by itself
        assert all(option in out.stdout for option in options), group
    assert "Without the '+'" in out.stdout and "--cfg job" in out.stdout


@pytest.mark.slow
@pytest.mark.slow  # ~10 s: Hydra's own --cfg path imports the training module (torch)
def test_optional_groups_work_without_plus(tmp_path):
    """What a W&B sweep agent passes (no '+'): regularizer=... and experiment=... add the group."""
    out = run_cli(["train", "--cfg", "job", "experiment=cnn_cifar10", "regularizer=[dropout,l2]",
                   "regularizer.dropout.p=0.25"], tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model.name == "cnn" and cfg.dataset.name == "cifar10"  # the preset's choices
    assert cfg.regularizer.dropout.p == 0.25 and cfg.regularizer.l2.coef == 1e-4


@pytest.mark.slow
def test_a_run_started_without_plus_is_the_run_with_plus(tmp_path, data_root):
    out = run_cli(["train", *TINY, "regularizer=dropout", "regularizer.dropout.p=0.3", "logger=none", f"out_dir={tmp_path}/out"],
                  tmp_path, data_root)
    assert out.returncode == 0, out.stderr
    [summary] = summaries(tmp_path / "out")
    assert summary["status"] == "completed"
    assert "+regularizer=dropout" in summary["overrides"] and summary["config"]["regularizer"]["dropout"]["p"] == 0.3


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(tmp_path):
    out = run_cli(["train", "--cfg", "job", "+regularizer=[dropout,l2]", "optimizer=sgd"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "dropout:" in out.stdout and "l2:" in out.stdout and "name: sgd" in out.stdout
    assert not list(tmp_path.rglob("summary.json"))


BAD_INPUT = [
    (["model=foo"], "model=foo", "choose one of cnn, custom, deep_mlp, mlp, resnet"),
    (["optimizer.lr=-1"], "optimizer.lr=-1", "must be > 0"),
    (["+regularizer=dropout", "regularizer.dropout.p=1.5"], "regularizer.dropout.p=1.5", "0 <= p < 1"),
    (["accumulation.steps=0"], "accumulation.steps=0", ">= 1"),
    (["batch_size=0"], "batch_size=0", ">= 1"),
    (["epochs=abc"], "epochs=abc", "an integer"),
    (["dataset.root=/nonexistent", "dataset.download=false"], "dataset.root=/nonexistent", "dataset.download=false"),
    (["device.precision=fp16", "device=cpu"], "device.precision=fp16", "fp16 needs CUDA"),
    (["out_dir=/proc/regexp-out"], "out_dir=/proc/regexp-out", "cannot be written"),
    (["+regularizer=foo"], "+regularizer=foo", "choose one of"),
    (["optimizer.lrr=1"], "optimizer.lrr=1", "unknown key"),
    (["optimizer=adam,adamw"], "optimizer=adam,adamw", "-m"),
    (["epochs=-1"], "epochs=-1", ">= 1"),
    (["seed=-3"], "seed=-3", ">= 0"),
    (["batch_size=abc"], "batch_size=abc", "an integer"),
    (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9]", "two numbers"),
    (["model.activation=swish"], "model.activation=swish", "relu, tanh, sigmoid, gelu"),
    (["init=normal", "init.std=0"], "init.std=0", "> 0"),
    (["clip=norm", "clip.max_norm=-1"], "clip.max_norm=-1", "> 0"),
    (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma=0", "> 0"),
    (["monitor.on_nonfinite=explode"], "monitor.on_nonfinite=explode", "stop, skip, continue"),
    (["monitor.log_every=0"], "monitor.log_every=0", ">= 1"),
    (["dataset=imagenet"], "dataset=imagenet", "choose one of cifar10, fashion_mnist, folder, mnist, tensors, torchvision"),
    (["norm=batchnorm", "norm.placement=middle"], "norm.placement=middle", "before, after"),
    (["+regularizer=early_stopping", "dataset.val_size=0"], "dataset.val_size=0", "early_stopping"),
    (["checkpoint.every_steps=0"], "checkpoint.every_steps=0", ">= 1"),
    (["resume=/nonexistent"], "resume=/nonexistent", "checkpoint.pt"),
    (["eval_every=0"], "eval_every=0", ">= 1"),
    (["dataset.limit=0"], "dataset.limit=0", ">= 1"),
    (["device.precision=fp8"], "device.precision=fp8", "fp32, bf16, fp16"),
    (["optimizer=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas=[0.9,0.99]", "unknown key"),
    (["model.hidden=[64,-1]"], "model.hidden=[64, -1]", ">= 1"),
    (["regularizer.dropout.p=0.3"], "regularizer.dropout.p=0.3", "add it with +regularizer=dropout"),
    (["+regularizer=l2", "regularizer.dropout.p_input=0.2"], "regularizer.dropout.p_input=0.2", "add it with +regularizer=dropout"),
]


def assert_bad_input(out, expected_start, allowed, where):
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith(f"regexp: error: {expected_start}"), out.stderr
    assert allowed in lines[0]
    assert not [s for s in summaries(where) if s["status"] == "completed"]
    assert not list(where.rglob("summary.json"))  # nothing recorded at all


@pytest.mark.parametrize("args,expected_start,allowed", BAD_INPUT, ids=[" ".join(a) for a, _, _ in BAD_INPUT])
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(tmp_path, data_root, args, expected_start, allowed):
    out_dir = [] if any(a.startswith("out_dir=") for a in args) else [f"out_dir={tmp_path}/out"]
    out = run_cli(["train", *args, *out_dir], tmp_path, data_root)
    assert_bad_input(out, expected_start, allowed, tmp_path)


@pytest.mark.slow
def test_unwritable_output_dir_is_bad_input(tmp_path, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = run_cli(["train", f"out_dir={blocker}/runs"], tmp_path, data_root)
    assert_bad_input(out, f"out_dir={blocker}/runs", "is a file", tmp_path)


@pytest.mark.slow
def test_cuda_without_cuda_is_bad_input(tmp_path, data_root):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_cli(["train", "device=cuda", f"out_dir={tmp_path}/out"], tmp_path, data_root)
    assert_bad_input(out, "device=cuda", "no CUDA device", tmp_path)


@pytest.mark.slow
def test_bad_value_in_one_sweep_job_fails_before_any_job(tmp_path, data_root):
    out = run_cli(["train", "-m", "optimizer.lr=0.1,-1", f"out_dir={tmp_path}/out"], tmp_path, data_root)
    assert_bad_input(out, "optimizer.lr=-1", "> 0", tmp_path)


@pytest.mark.slow
def test_single_run_from_another_directory(tmp_path, data_root):
    """Installed regexp finds its configs from any directory; relative roots resolve there."""
    (tmp_path / "data").symlink_to(data_root)
    out = run_cli(["train", *TINY, "dataset.root=data", "out_dir=runs", "+regularizer=dropout"], tmp_path)
    assert out.returncode == 0, out.stderr
    [summary] = summaries(tmp_path / "runs")
    assert summary["status"] == "completed" and summary["choices"]["model"] == "mlp"
    assert 0 <= summary["metrics"]["test/acc"] <= 1
    assert "epoch 1/1" in out.stdout and "completed" in out.stdout  # readable without a terminal
    run_dir = next((tmp_path / "runs").rglob("summary.json")).parent
    for name in ("metrics.jsonl", "checkpoint.pt", "best.pt", "train.log", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    assert "epoch 1/1" in (run_dir / "train.log").read_text()


def sweep(tmp_path, data_root, args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = run_cli(["train", "-m", *TINY, f"hydra.sweep.dir={tmp_path}/sweep", *args], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    return summaries(tmp_path / "sweep")


# Every option of every group trains a few steps through the real CLI; one process per sweep:
# name -> (overrides, number of jobs).
GROUP_SWEEPS = {g: ([f"{g}={','.join(sorted(o))}"], len(o)) for g, o in GROUP_SCHEMAS.items() if g not in ("dataset", "device", "model")}
GROUP_SWEEPS["device"] = (["device=auto,cpu"], 2)
GROUP_SWEEPS["model"] = (["model=mlp,cnn"], 2)
GROUP_SWEEPS["deep_mlp"] = (["model=deep_mlp", "model.depth=3", "model.width=64"], 1)
GROUP_SWEEPS["prune"] = (["prune=asha,median,none", "prune.rungs=[1]"], 3)  # TINY trains 1 epoch: a rung at 1
GROUP_SWEEPS["regularizer"] = (["+regularizer=" + ",".join(REGULARIZERS) + ",[dropout,l2]"], len(REGULARIZERS) + 1)


@pytest.mark.parametrize("group", sorted(GROUP_SWEEPS))
@pytest.mark.slow
def test_every_option_trains_through_the_cli(tmp_path, data_root, group):
    overrides, jobs = GROUP_SWEEPS[group]
    results = sweep(tmp_path, data_root, overrides)
    assert len(results) == jobs
    for summary in results:
        assert summary["status"] in ("completed", "early_stopped"), summary.get("error")
        assert summary["steps"] >= 1 and "test/acc" in summary["metrics"]


@pytest.mark.slow
def test_resnet_and_datasets_train(tmp_path, data_root):
    cifar_root = write_cifar10(tmp_path / "cifar", per_batch=40, n_test=40)
    small = ["dataset.val_size=40", "eval_batch_size=64"]
    cifar = sweep(tmp_path / "c", data_root, ["dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false",
                                              "model=cnn,resnet", "+regularizer=augment", *small])
    assert [s["choices"]["model"] for s in cifar] == ["cnn", "resnet"]
    assert all(s["status"] == "completed" for s in cifar)
    fashion = sweep(tmp_path / "f", data_root, ["dataset=fashion_mnist,mnist", "+regularizer=augment"])
    assert [s["choices"]["dataset"] for s in fashion] == ["fashion_mnist", "mnist"]
