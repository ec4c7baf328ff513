"""The pre-flight refuses what must not run (issue 12, items 1, 2 and 8): a resume takes only
config keys and group choices from a run dir; no secret reaches a config through `${oc.env:}`;
bad input is one ConfigError line before torch or a run dir. In-process through the compose
functions (fast), plus one end-to-end CLI test per class (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REGEXP, TINY, run_cli, summaries
from omegaconf import OmegaConf

from regexp.compose import compose, compose_and_validate, hydra_quoted, initialized, with_resumed_run
from regexp.config import ConfigError, RunError, check_writable, model_parameters, validate

FAKE_KEY = "fake0123456789abcdefKEYVALUE"


# ---------------------------------------------------------------- resume takes only config keys and group choices
def run_dir_with(tmp_path: Path, lines) -> Path:
    """A run dir as a resume finds it: checkpoint.pt and .hydra/overrides.yaml holding `lines`."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    (run_dir / ".hydra" / "overrides.yaml").write_text(lines if isinstance(lines, str) else yaml.safe_dump(lines))
    return run_dir


HOSTILE = [
    "+hydra.callbacks.x._target_=builtins.open",  # Hydra instantiates its callbacks
    "hydra.job_logging.handlers.file.filename=/tmp/victim",
    "hydra.run.dir=/elsewhere",
    "hydra/launcher=joblib",
    "+model._target_=builtins.open",
    "+optimizer.x={_target_: os.system}",
    "~model",  # a deletion is no value
    "++foo=1",  # not a key of the schemas
    "model.nope=1",
    "regularizer.nope.p=1",
    "model=nope",  # not an option of the registry
    "+regularizer=[dropout,nope]",
    "+experiment=not_a_preset",
    "experiment.x=1",
    "model@elsewhere=cnn",  # a package
    "seed=1 )(",  # not an override at all
]


@pytest.mark.parametrize("line", HOSTILE)
def test_resume_refuses_what_is_no_config_key_or_group_choice(tmp_path, line):
    run_dir = run_dir_with(tmp_path, ["seed=1", line])
    with pytest.raises(ConfigError) as refused:
        with_resumed_run([f"resume={run_dir}"])
    message = str(refused.value)
    assert message.startswith(f"{run_dir / '.hydra' / 'overrides.yaml'}: {line}: ")
    assert "takes only config keys and group choices" in message and "\n" not in message


def test_resume_takes_config_keys_and_group_choices(tmp_path):
    saved = ["resume=/old/place", "seed=1", "model=cnn", "+regularizer=[dropout,l2]", "+experiment=dropout_mnist",
             "regularizer.dropout.p=0.3", "++regularizer.l1.coef=0.1", "dataset.augment.crop=4",
             "checkpoint.every_steps=3", "model.channels=[8,16]", "logger.tags=[a,b]", "optimizer=sgd",
             "optimizer.momentum=0.9"]
    run_dir = run_dir_with(tmp_path, saved)
    args = with_resumed_run([f"resume={run_dir}", "seed=2"])
    assert args == [*saved[2:], f"resume={run_dir}", "seed=2", f"hydra.run.dir='{run_dir.resolve()}'"]


@pytest.mark.parametrize("name", ["ünï cödé ✓", "it's", "back\\slash\\", "a,b=[c]"])
def test_a_resumed_run_dir_of_any_name_is_one_hydra_value(tmp_path, name):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = run_dir_with(tmp_path / name, ["seed=1"])
    args = with_resumed_run([f"resume={hydra_quoted(str(run_dir))}"])
    parsed = OverridesParser.create().parse_overrides(args)
    assert parsed[-1].key_or_group == "hydra.run.dir" and parsed[-1].value() == str(run_dir.resolve())


@pytest.mark.parametrize("text", ["a: 1\n", "- seed=1\n- 3\n", "- [seed=1]\n", ": : [\n"])
def test_resume_refuses_overrides_that_are_no_list_of_strings(tmp_path, text):
    run_dir = run_dir_with(tmp_path, text)
    with pytest.raises(RunError, match="overrides.yaml: ") as refused:
        with_resumed_run([f"resume={run_dir}"])
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- secrets never reach a config
@pytest.fixture
def secrets(monkeypatch):
    for name in ("WANDB_API_KEY", "MY_GITHUB_TOKEN", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY", "WANDB_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, FAKE_KEY)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "run1")


@pytest.mark.parametrize("override,key,variable", [
    ("logger.tags=[${oc.env:WANDB_API_KEY}]", "logger.tags", "WANDB_API_KEY"),
    ("out_dir=${oc.env:MY_GITHUB_TOKEN}", "out_dir", "MY_GITHUB_TOKEN"),  # the run dir's path is in every record
    ("hydra.run.dir=out/${seed}", "hydra.run.dir", "DB_PASSWORD"),  # through another key: seed=${oc.env:DB_PASSWORD}
    ("logger.project=${oc.env:MY_GITHUB_TOKEN}", "logger.project", "MY_GITHUB_TOKEN"),
    ("logger.project=x${oc.env:db_password,none}", "logger.project", "db_password"),  # with a default, any case
    ("logger.entity=${oc.env:'AWS_SECRET_ACCESS_KEY'}", "logger.entity", "AWS_SECRET_ACCESS_KEY"),
    ("logger.project=${oc.env:WANDB_CREDENTIALS_FILE}", "logger.project", "WANDB_CREDENTIALS_FILE"),
    ("hydra.run.dir=out/${oc.env:WANDB_API_KEY}", "hydra.run.dir", "WANDB_API_KEY"),
])
def test_secret_environment_interpolations_are_refused_where_their_value_is_recorded(secrets, override, key, variable):
    overrides = ["+regularizer=dropout", "seed=${oc.env:DB_PASSWORD,0}", override]
    with initialized():
        cfg = compose(overrides, with_hydra=True)
        with pytest.raises(ConfigError) as refused:
            validate(cfg)
    message = str(refused.value)
    assert message.startswith(f"{key}=") and variable in message and "secret" in message
    assert FAKE_KEY not in message


def test_a_secret_in_a_preset_value_is_refused(secrets):
    """Values from YAML files are checked as written, whatever file brought them."""
    preset = OmegaConf.create("logger:\n  tags: ['${oc.env:WANDB_API_KEY}']\n")
    cfg = OmegaConf.merge(compose([]), preset)
    with pytest.raises(ConfigError, match=r"^logger\.tags=.*WANDB_API_KEY") as refused:
        validate(cfg)
    assert FAKE_KEY not in str(refused.value)


def test_run_identifiers_of_a_wandb_sweep_stay_allowed(secrets):
    """The shipped W&B sweeps name the run dir after the agent's sweep and run ids."""
    with initialized():
        cfg = compose(["hydra.run.dir=outputs/wandb-sweeps/${oc.env:WANDB_SWEEP_ID}/${oc.env:WANDB_RUN_ID}"], with_hydra=True)
        validate(cfg)
        assert cfg.hydra.run.dir == "outputs/wandb-sweeps/sweep1/run1"


def test_an_unset_variable_is_one_line_naming_it_and_the_key(monkeypatch):
    monkeypatch.delenv("REGEXP_NOPE", raising=False)
    with pytest.raises(ConfigError, match=r"^seed=\$\{oc.env:REGEXP_NOPE\}: the environment variable REGEXP_NOPE is not set"):
        compose_and_validate(["seed=${oc.env:REGEXP_NOPE}"])
    assert compose_and_validate(["seed=${oc.env:REGEXP_NOPE,3}"]).seed == 3


@pytest.mark.parametrize("override,value,expected", [
    ("seed=${oc.env:REGEXP_SOME}", "notanumber987", "must be an integer"),
    ("optimizer.lr=${oc.env:REGEXP_SOME}", "-987", "must be > 0"),
    ("logger.project=${oc.env:REGEXP_SOME}${nope}", "x987", "does not resolve"),
])
def test_errors_show_the_interpolation_never_the_value_it_reached(monkeypatch, override, value, expected):
    monkeypatch.setenv("REGEXP_SOME", value)
    with pytest.raises(ConfigError) as refused:
        compose_and_validate([override])
    message = str(refused.value)
    assert message.startswith(override) and expected in message and "987" not in message


# ---------------------------------------------------------------- bad input: one line, before torch
BAD_INPUT = [
    (["model.hidden=[100000000]"], "model.hidden=[100000000]", "<= 65536"),
    (["model=deep_mlp", "model.width=100000000"], "model.width=100000000", "<= 65536"),
    (["model=deep_mlp", "model.depth=100000"], "model.depth=100000", "<= 1024"),
    (["model=cnn", "model.channels=[32,100000000]"], "model.channels=[32, 100000000]", "<= 65536"),
    (["model=cnn", "model.fc=100000000"], "model.fc=100000000", "<= 65536"),
    (["model.hidden=[65536,65536]"], "model.hidden=[65536, 65536]", "parameters"),  # legal widths, too many weights
    (["model=deep_mlp", "model.width=40000"], "model.width=40000", "with model.depth=10: about"),
    (["model=cnn", "model.channels=[8,8,8,8,8]"], "model.channels=", "5 2x2 poolings"),
    (["model=resnet", "model.widths=[8,8,8,8,8,8,8]"], "model.widths=", "6 2x2 poolings"),
    (["batch_size=100000000"], "batch_size=100000000", "<= 2**20"),
    (["seed=4294967296"], "seed=4294967296", "<= 2**32 - 1"),
    (["seed=-1"], "seed=-1", ">= 0"),
    (["epochs=1.5"], "epochs=1.5", "integer"),
    (["max_steps=0"], "max_steps=0", ">= 1"),
    (["eval_every=0"], "eval_every=0", ">= 1"),
    (["optimizer.lr=1e308"], "optimizer.lr=1e+308", "<= 1e+06"),
    (["optimizer.lr=inf"], "optimizer.lr=inf", "> 0"),
    (["optimizer.lr=nan"], "optimizer.lr=nan", "> 0"),
    (["optimizer.weight_decay=1e300"], "optimizer.weight_decay=1e+300", "<= 1e+06"),
    (["scheduler=step", "scheduler.gamma=1e300"], "scheduler.gamma=1e+300", "<= 1 (a decay"),
    (["scheduler=cosine", "scheduler.min_lr=1e300"], "scheduler.min_lr=1e+300", "<= 1e+06"),
    (["scheduler=onecycle", "scheduler.div_factor=1e-300"], "scheduler.div_factor=1e-300", ">= 1"),
    (["scheduler=onecycle", "scheduler.final_div_factor=0.5"], "scheduler.final_div_factor=0.5", ">= 1"),
    (["dataset.name=svhn"], "dataset.name=svhn", "mnist"),
    (["~model"], "model=???", "must be set"),
]


@pytest.mark.parametrize("overrides,start,allowed", BAD_INPUT, ids=[" ".join(o) for o, _, _ in BAD_INPUT])
def test_bad_input_is_one_config_error_line(overrides, start, allowed):
    with pytest.raises(ConfigError) as refused:
        compose_and_validate(overrides)
    message = str(refused.value)
    assert message.startswith(start) and allowed in message and "\n" not in message


def test_bad_sizes_are_refused_before_torch_is_imported():
    code = ("import sys; from regexp.compose import compose_and_validate\n"
            "try: compose_and_validate(['model.hidden=[100000000]'])\n"
            "except ValueError as e: print(e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.splitlines() == ["model.hidden=[100000000]: must be a non-empty list of integers >= 1 and <= 65536",
                                       "False"], out.stderr


@pytest.mark.parametrize("model", [["model=mlp"], ["model=deep_mlp"], ["model=cnn"], ["model=resnet", "dataset=cifar10"],
                                   ["model=cnn", "model.channels=[8,16,32,64]"]])
def test_the_parameter_estimate_counts_the_built_model(model):
    from regexp.config import dataset_shape
    from regexp.models import build_model

    cfg = compose_and_validate(model)
    built = build_model(cfg.model, cfg.norm, None, *dataset_shape(cfg.dataset))
    assert model_parameters(cfg) == sum(p.numel() for p in built.parameters())


def test_an_overlong_path_part_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^out_dir=.*: a path part of 300 bytes .*at most 255 bytes"):
        check_writable(tmp_path / ("x" * 300) / "run", "out_dir", str(tmp_path / ("x" * 300)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,start,allowed", [
    (["dataset.val_size=60000"], "dataset.val_size=60000", "smaller than the 60000 training samples of mnist"),
])
def test_split_sizes_beyond_the_data_are_refused_in_the_preflight(data_root, monkeypatch, overrides, start, allowed):
    from regexp.compose import check_job

    monkeypatch.setenv("REGEXP_DATA_DIR", str(data_root))
    with initialized():
        cfg = compose(["dataset.download=false", *overrides])
        with pytest.raises(ConfigError) as refused:
            check_job(cfg)
    assert str(refused.value).startswith(start) and allowed in str(refused.value)


# ---------------------------------------------------------------- through the CLI, one per class
def assert_refused(out, start: str) -> None:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"regexp: error: {start}"), out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cli_hostile_resume_leaves_the_victim_and_the_run_untouched(tmp_path, data_root):
    run_dir = tmp_path / "run"
    first = run_cli(["train", *TINY, "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    assert first.returncode == 0, first.stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    overrides = run_dir / ".hydra" / "overrides.yaml"
    hostile = ["+hydra.callbacks.x._target_=builtins.open", f"+hydra.callbacks.x.file={victim}", "+hydra.callbacks.x.mode=w"]
    overrides.write_text(yaml.safe_dump(yaml.safe_load(overrides.read_text()) + hostile))
    before = tree(tmp_path)
    out = run_cli(["train", f"resume={run_dir}", "epochs=2"], tmp_path, data_root)
    assert_refused(out, f"{overrides}: +hydra.callbacks.x._target_=builtins.open: a resumed run takes only")
    assert victim.read_text() == "precious\n" and tree(tmp_path) == before


@pytest.mark.slow
def test_cli_secret_interpolation_is_refused_and_written_nowhere(tmp_path, data_root):
    env = dict(os.environ, WANDB_API_KEY=FAKE_KEY, REGEXP_DATA_DIR=str(data_root), COLUMNS="200")
    out = subprocess.run([REGEXP, "train", *TINY, "logger=wandb", "logger.mode=disabled",
                          "logger.tags=[${oc.env:WANDB_API_KEY}]", f"hydra.run.dir={tmp_path}/out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert_refused(out, "logger.tags=${oc.env:WANDB_API_KEY}: refused: WANDB_API_KEY looks like a secret")
    assert FAKE_KEY not in out.stdout + out.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,start", [
    (["dataset.val_size=999999"], "dataset.val_size=999999: must be smaller than the 60000 training samples"),
    (["model.hidden=[100000000]"], "model.hidden=[100000000]: must be a non-empty list of integers >= 1 and <= 65536"),
    (["seed=${oc.env:REGEXP_UNSET_VARIABLE}"], "seed=${oc.env:REGEXP_UNSET_VARIABLE}: the environment variable"),
    ([f"hydra.run.dir=out/{'x' * 300}"], "hydra.run.dir=out/xxx"),
])
def test_cli_bad_input_is_one_line_and_leaves_no_run_dir(tmp_path, data_root, args, start):
    out = run_cli(["train", *TINY, "logger=none", *args], tmp_path, data_root)
    assert_refused(out, start)
    assert not summaries(tmp_path) and not list(tmp_path.iterdir())
