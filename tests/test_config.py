"""The config tree composes for every option and the schema rejects bad values with the key."""

from pathlib import Path

import pytest
from conftest import compose_train

from regexp.config import GROUP_SCHEMAS, REGULARIZERS, ConfigError, check_writable, config_dir, validate, warnings_for

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_schema_lists_exactly_the_yaml_options(group):
    assert options(group) == sorted(GROUP_SCHEMAS[group])


def test_regularizer_options_match_schema():
    assert options("regularizer") == sorted(REGULARIZERS)


def test_registries_cover_every_option():
    from regexp.init import INITS
    from regexp.models import MODELS
    from regexp.optim import OPTIMIZERS, SCHEDULERS

    assert sorted(MODELS) == sorted(GROUP_SCHEMAS["model"])
    assert sorted(INITS) == sorted(GROUP_SCHEMAS["init"])
    assert sorted(OPTIMIZERS) == sorted(GROUP_SCHEMAS["optimizer"])
    assert sorted(SCHEDULERS) == sorted(GROUP_SCHEMAS["scheduler"])


@pytest.mark.parametrize("group,option", [(g, o) for g in sorted(GROUP_SCHEMAS) for o in sorted(GROUP_SCHEMAS[g])])
def test_every_option_composes_and_validates(group, option):
    cfg = validate(compose_train([f"{group}={option}"]))
    assert cfg[group].name == option


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_every_regularizer_appends(reg):
    cfg = validate(compose_train([f"+regularizer={reg}"]))
    assert cfg.regularizer[reg] is not None
    assert all(cfg.regularizer[r] is None for r in REGULARIZERS if r != reg)


def test_several_regularizers_compose_side_by_side():
    cfg = validate(compose_train(["+regularizer=[dropout,l2]", "regularizer.dropout.p=0.3"]))
    assert cfg.regularizer.dropout.p == 0.3 and cfg.regularizer.l2.coef == 1e-4


def test_defaults_match_design():
    cfg = validate(compose_train([]))
    chosen = {g: cfg[g].name for g in GROUP_SCHEMAS}
    assert chosen == {"dataset": "mnist", "model": "mlp", "init": "default", "norm": "none", "optimizer": "adamw",
                      "scheduler": "none", "clip": "none", "accumulation": "none", "device": "auto",
                      "logger": "wandb", "monitor": "default"}
    assert cfg.max_steps is None and cfg.regularizer.dropout is None


@pytest.mark.parametrize("overrides,key,allowed", [
    (["optimizer.lr=-1"], "optimizer.lr", "> 0"),
    (["optimizer.lr=0"], "optimizer.lr", "> 0"),
    (["+regularizer=dropout", "regularizer.dropout.p=1.5"], "regularizer.dropout.p", "0 <= p < 1"),
    (["+regularizer=dropout", "regularizer.dropout.p_input=-0.1"], "regularizer.dropout.p_input", "0 <= p < 1"),
    (["accumulation.steps=0"], "accumulation.steps", ">= 1"),
    (["accumulation.scale_lr=cubic"], "accumulation.scale_lr", "off, linear, sqrt"),
    (["batch_size=0"], "batch_size", ">= 1"),
    (["epochs=abc"], "epochs", "an integer"),
    (["epochs=2.5"], "epochs", "an integer"),
    (["max_steps=0"], "max_steps", ">= 1"),
    (["model.activation=swish"], "model.activation", "relu, tanh, sigmoid, gelu"),
    (["model.hidden=[]"], "model.hidden", "non-empty"),
    (["model.hidden=[64,abc]"], "model.hidden", "list of integers"),
    (["init=normal", "init.std=0"], "init.std", "> 0"),
    (["optimizer=momentum", "optimizer.momentum=1.0"], "optimizer.momentum", "0 <= p < 1"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "two numbers"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", ">= 0"),
    (["clip=norm", "clip.max_norm=0"], "clip.max_norm", "> 0"),
    (["device.precision=fp8"], "device.precision", "fp32, bf16, fp16"),
    (["+regularizer=elastic_net", "regularizer.elastic_net.l1_ratio=2"], "regularizer.elastic_net.l1_ratio", "between 0 and 1"),
    (["+regularizer=early_stopping", "regularizer.early_stopping.mode=up"], "regularizer.early_stopping.mode", "min, max"),
    (["+regularizer=early_stopping", "dataset.val_size=0"], "dataset.val_size", "early_stopping"),
    (["dataset.val_size=-1"], "dataset.val_size", ">= 0"),
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size", ">= 1"),
])
def test_bad_values_name_key_value_and_rule(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate(compose_train(overrides))
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")
    assert allowed in str(err.value)


def test_weight_decay_with_l2_warns():
    cfg = validate(compose_train(["+regularizer=l2", "optimizer.weight_decay=0.01"]))
    assert any("shrunk twice" in w for w in warnings_for(cfg))
    assert warnings_for(validate(compose_train([]))) == []


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "dir", "out_dir")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="out_dir="):
        check_writable(blocker / "sub", "out_dir")
