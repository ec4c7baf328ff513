"""The registry, the config tree and the one validation path: every option composes, validates
and builds; bad values fail with the key; optional groups explain how to add them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf
from test_own_data import write_folder

from regexp.compose import compose, compose_and_validate, sweep_jobs, with_added_groups
from regexp.config import (
    OPTIONAL_GROUPS,
    REGISTRY,
    REGULARIZERS,
    ConfigError,
    TrainConfig,
    builder,
    check_writable,
    config_dir,
    dataset_shape,
    group_lines,
    options_markdown,
    validate,
    warnings_for,
)

CONF = Path(config_dir())
ENTRIES = [(g, o) for g, options in REGISTRY.items() for o in options]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(REGISTRY))
def test_registry_lists_exactly_the_yaml_options(group):
    assert options(group) == sorted(REGISTRY[group])


def test_every_group_of_the_tree_is_registered_or_a_preset():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()} - {"hydra"}
    assert groups == set(REGISTRY) | {"experiment"}
    assert set(OPTIONAL_GROUPS) == {"regularizer", "experiment"}


@pytest.mark.parametrize("group,option", [(g, o) for g, o in ENTRIES if REGISTRY[g][o].builder])
def test_every_builder_resolves(group, option):
    assert callable(builder(group, option))


def _build(group: str, cfg) -> None:
    """Realise the option chosen for `group` in `cfg` with the public builders."""
    from regexp.init import init_weights
    from regexp.models import build_model
    from regexp.optim import build_optimizer, build_scheduler, clip_gradients, lr_factor
    from regexp.regularizers import build_criterion, build_penalty

    shape, classes = dataset_shape(cfg.dataset)
    small = {"model.hidden": [8], "model.depth": 2, "model.width": 8, "model.channels": [4], "model.fc": 8, "model.widths": [4, 8]}
    for key, value in small.items():
        if OmegaConf.select(cfg, key) is not None:
            OmegaConf.update(cfg, key, value)
    model = build_model(cfg.model, cfg.norm, cfg.regularizer.dropout, shape, classes)
    init_weights(model, cfg.init, cfg.model.activation)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.optimizer.lr)
    build_scheduler(optimizer, cfg.scheduler, 100, 10, cfg.optimizer.lr)
    assert lr_factor(cfg.scheduler, 5, 100, 10, cfg.optimizer.lr) > 0
    loss = build_criterion(cfg.regularizer)(model(torch.randn(2, *shape)), torch.tensor([0, 1]))
    penalty = build_penalty(cfg.regularizer)
    (loss + (penalty(list(model.parameters())) if penalty else 0)).backward()
    clip_gradients([p for p in model.parameters()], OmegaConf.to_object(cfg.clip))


# The fast tier walks each group's first option; the slow tier every option (a composition costs ~0.5 s).
WALKED = [pytest.param(g, o, id=f"{g}={o}", marks=() if o == next(iter(REGISTRY[g])) else pytest.mark.slow)
          for g, o in ENTRIES]


# What an option needs besides its defaults (written into the test's folder)
REQUIRED = {
    ("dataset", "torchvision"): lambda tmp: ["dataset.set=CIFAR100"],
    ("dataset", "folder"): lambda tmp: [f"dataset.path={write_folder(tmp / 'pics')}"],
    ("dataset", "tensors"): lambda tmp: [f"dataset.path={write_tensors(tmp / 'arrays.npz')}"],
    ("model", "custom"): lambda tmp: ["model.target=custom_models.NestedMLP"],  # tests/custom_models.py
}


def write_tensors(path):
    np.savez(path, x=np.zeros((8, 5, 5), np.uint8), y=np.arange(8) % 4)
    return path


@pytest.mark.parametrize("group,option", WALKED)
def test_every_registry_entry_composes_validates_and_builds(group, option, tmp_path):
    """Walks the registry: a new option (one entry + one YAML file) is picked up here."""
    prefix = "+" if group in OPTIONAL_GROUPS else ""
    needs = REQUIRED.get((group, option), lambda tmp: [])(tmp_path)
    cfg = compose_and_validate([f"{prefix}{group}={option}", *needs])
    if group in OPTIONAL_GROUPS:
        assert [r for r in REGULARIZERS if cfg.regularizer[r] is not None] == [option]
    else:
        assert cfg[group].name == option
        assert OmegaConf.get_type(cfg[group]) is REGISTRY[group][option].schema
    _build(group, cfg)


def test_composed_config_is_typed_by_hydra():
    cfg = compose_train([])  # Hydra's own compose, as `regexp train --cfg job` prints it
    assert OmegaConf.get_type(cfg) is TrainConfig
    assert OmegaConf.get_type(cfg.optimizer).__name__ == "AdamConfig"
    with pytest.raises(Exception, match="epochs=abc") as err:
        compose_train(["epochs=abc"])
    assert "could not be converted to Integer" in str(err.value.__cause__)


def test_several_regularizers_compose_side_by_side():
    cfg = validate(compose_train(["+regularizer=[dropout,l2]", "regularizer.dropout.p=0.3"]))
    assert cfg.regularizer.dropout.p == 0.3 and cfg.regularizer.l2.coef == 1e-4


def test_defaults_match_design():
    cfg = validate(compose_train([]))
    chosen = {g: cfg[g].name for g in REGISTRY if g not in OPTIONAL_GROUPS}
    assert chosen == {"dataset": "mnist", "model": "mlp", "init": "default", "norm": "none", "optimizer": "adamw",
                      "scheduler": "none", "clip": "none", "accumulation": "none", "device": "auto",
                      "logger": "wandb", "monitor": "default", "prune": "none"}
    assert cfg.max_steps is None and cfg.regularizer.dropout is None


def test_monitor_off_is_a_field_not_a_name():
    assert compose_and_validate(["monitor=off"]).monitor.per_layer is False
    assert compose_and_validate(["monitor=default", "monitor.per_layer=false"]).monitor.per_layer is False
    assert compose_and_validate(["monitor=full"]).monitor.per_layer is True


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
    (["optimizer.lrr=1"], "optimizer.lrr", "unknown key; known keys here: name, lr,"),
    (["+optimizer.lrr=1"], "optimizer.lrr", "unknown key"),
    (["+foo=1"], "foo", "unknown key"),
    (["model=foo"], "model", "choose one of cnn, custom, deep_mlp, mlp, resnet"),
    (["+regularizer=foo"], "+regularizer", "choose one of augment, dropout,"),
    (["optimizer=adam,adamw"], "optimizer", "add -m"),
    (["+experiment=batchnorm_sigmoid", "model=cnn"], "model.hidden", "unknown key"),
])
def test_bad_values_name_key_value_and_rule(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        compose_and_validate(overrides)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")
    assert allowed in str(err.value)


@pytest.mark.parametrize("overrides", [["regularizer.dropout.p=0.3"], ["+regularizer=l2", "regularizer.dropout.p=0.3"],
                                       ["+regularizer=[l1,l2]", "regularizer.dropout.p_input=0.1"]])
def test_a_key_of_an_option_not_added_says_how_to_add_it(overrides):
    with pytest.raises(ConfigError) as err:
        compose_and_validate(overrides)
    assert err.value.key.startswith("regularizer.dropout.p")
    assert "add it with +regularizer=dropout" in str(err.value)


def test_a_key_of_an_option_a_preset_added_is_fine():
    cfg = compose_and_validate(["+experiment=dropout_mnist", "regularizer.dropout.p=0.3"])
    assert cfg.regularizer.dropout.p == 0.3


@pytest.mark.parametrize("typed,added", [
    (["regularizer=dropout"], ["+regularizer=dropout"]),
    (["regularizer=[dropout,l2]", "seed=1"], ["+regularizer=[dropout,l2]", "seed=1"]),
    (["experiment=cnn_cifar10"], ["+experiment=cnn_cifar10"]),
    (["experiment=dropout_mnist", "regularizer=l2"], ["+experiment=dropout_mnist", "regularizer=l2"]),  # the preset holds it
    (["+regularizer=l1", "model=cnn"], ["+regularizer=l1", "model=cnn"]),
])
def test_optional_groups_without_plus(typed, added):
    assert with_added_groups(typed) == added


def test_a_forced_regularizer_key_adds_the_regularizer_typed():
    cfg = compose_and_validate(["++regularizer.dropout.p=0.42"])  # how the Optuna preset tunes dropout
    assert cfg.regularizer.dropout.p == 0.42 and cfg.regularizer.dropout.p_input == 0.0 and cfg.regularizer.l1 is None
    with pytest.raises(ConfigError, match=r"regularizer.dropout.q=1: unknown key; known keys here: p, p_input"):
        compose_and_validate(["++regularizer.dropout.q=1"])


def test_optional_groups_without_plus_compose_as_with_plus():
    plain = compose_and_validate(["regularizer=[dropout,l2]", "regularizer.dropout.p=0.2"])
    plus = compose_and_validate(["+regularizer=[dropout,l2]", "regularizer.dropout.p=0.2"])
    assert plain == plus and plain.regularizer.dropout.p == 0.2


def test_sweep_jobs_expand_config_and_command_line_sweeps():
    assert sweep_jobs(["optimizer=adam,sgd", "seed=0,1", "epochs=1"]) == [
        ["optimizer=adam", "seed=0", "epochs=1"], ["optimizer=adam", "seed=1", "epochs=1"],
        ["optimizer=sgd", "seed=0", "epochs=1"], ["optimizer=sgd", "seed=1", "epochs=1"]]
    preset = sweep_jobs(["+experiment=batchnorm_sigmoid", "seed=0,1"])
    assert len(preset) == 4 and ["norm=batchnorm", "+experiment=batchnorm_sigmoid", "seed=1"] in preset
    assert sweep_jobs(["regularizer=dropout,l1"]) == [["+regularizer=dropout"], ["+regularizer=l1"]]
    assert sweep_jobs(["hydra/sweeper=tune", "seed=1"]) == [["hydra/sweeper=tune", "seed=1"]]  # a search draws its own


def test_compose_keeps_hydra_node_on_request():
    cfg = compose(["out_dir=elsewhere"], with_hydra=True)
    assert str(cfg.hydra.run.dir).startswith("elsewhere/")
    assert "hydra" not in validate(cfg)


def test_help_and_docs_tables_derive_from_the_registry():
    lines = "\n".join(group_lines())
    table = options_markdown()
    for group, opts in REGISTRY.items():
        assert (f"+{group}" if group in OPTIONAL_GROUPS else group) in lines
        for option in opts:
            assert option in lines and f"={option}`" in table


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


JOBS = [["seed=0"], ["seed=1", "optimizer.lr=0.01"], ["optimizer=adam", "seed=0"], ["optimizer=adam", "seed=1"],
        ["+regularizer=dropout", "regularizer.dropout.p=0.3"], ["+regularizer=[dropout,l2]", "regularizer.l2.coef=1e-3"],
        ["hydra/launcher=fused_slurm", "hydra.launcher.max_models=3", "seed=4"], ["model=cnn", "norm=batchnorm"],
        ["seed=2", "hydra.job.config.override_dirname.exclude_keys=[seed]"]]


def test_composing_many_jobs_gives_each_its_own_config_as_hydra_composes_it():
    """composing_many remembers Hydra's defaults list and file merge per set of group choices:
    every job's config (Hydra's node included: its overrides, choices, override_dirname) is the
    one Hydra composes for it alone, a bad job fails as alone, and Hydra is itself again after."""
    from hydra._internal import config_loader_impl as loader

    from regexp.compose import compose, composing_many, initialized

    with initialized():
        alone = [OmegaConf.to_container(compose(job, with_hydra=True)) for job in JOBS]
        before = loader.create_defaults_list, loader.ConfigLoaderImpl._compose_config_from_defaults_list
        with composing_many():
            together = [OmegaConf.to_container(compose(job, with_hydra=True)) for job in [*JOBS, *JOBS]]
            with pytest.raises(ConfigError, match="optimizer=nope"):
                compose(["optimizer=nope", "seed=0"], with_hydra=True)
        assert (loader.create_defaults_list, loader.ConfigLoaderImpl._compose_config_from_defaults_list) == before
    assert together == [*alone, *alone]
    assert alone[0]["hydra"]["overrides"]["task"] == ["seed=0"] and alone[1]["optimizer"]["lr"] == 0.01
