"""Typed configuration: one dataclass schema per config-group option, plus validation.

Hydra composes `conf/` into an untyped DictConfig; `validate` merges every group into its
option's schema (types, unknown keys) and then checks ranges and cross-field rules, so a
bad value fails with one line naming the key, the value and what is allowed, before any
data is touched. This module must not import torch: `regexp --help` stays instant.
"""

import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def config_dir() -> str:
    """`conf/`: inside the installed package, or at the repository root in a checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else packaged.parent.parent / "conf")


class ConfigError(ValueError):
    """A bad configuration value: `key=value: allowed`. Exit code 2 at the CLI."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return str(value)


class RunError(RuntimeError):
    """A problem with a file the run needs or writes (data, checkpoint, output): the
    message says which file and what to do. Exit code 1, one line, no traceback."""


@dataclass(frozen=True)
class Rule:
    """A range/choice check attached to a schema field through `metadata`."""

    ok: Callable[[Any], bool]
    allowed: str


def choice(*options: str) -> dict:
    return {"rule": Rule(lambda v: v in options, "must be one of " + ", ".join(options))}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


POSITIVE = {"rule": Rule(lambda v: _finite(v) and v > 0, "must be > 0")}
NON_NEGATIVE = {"rule": Rule(lambda v: _finite(v) and v >= 0, "must be >= 0")}
AT_LEAST_ONE = {"rule": Rule(lambda v: v >= 1, "must be an integer >= 1")}
PROBABILITY = {"rule": Rule(lambda v: _finite(v) and 0 <= v < 1, "must satisfy 0 <= p < 1")}
FRACTION = {"rule": Rule(lambda v: _finite(v) and 0 <= v <= 1, "must be between 0 and 1")}
OPTIONAL_AT_LEAST_ONE = {
    "rule": Rule(lambda v: v is None or v >= 1, "must be an integer >= 1 or null (off)")
}
POSITIVE_WIDTHS = {
    "rule": Rule(lambda v: len(v) > 0 and all(w >= 1 for w in v), "must be a non-empty list of integers >= 1")
}
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")


# ---------------------------------------------------------------- dataset
@dataclass
class AugmentRecipe:
    """The augmentation that suits a data set; `+regularizer=augment` switches it on."""

    crop: int = field(default=0, metadata=NON_NEGATIVE)  # random-crop padding in pixels
    flip: bool = False  # random horizontal flip


@dataclass
class DatasetConfig:
    name: str = field(default="mnist", metadata=choice("mnist", "fashion_mnist", "cifar10"))
    root: str = "data"
    download: bool = True
    val_size: int = field(default=5000, metadata=NON_NEGATIVE)
    limit: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)
    augment: AugmentRecipe = field(default_factory=AugmentRecipe)


# ---------------------------------------------------------------- model
@dataclass
class MLPConfig:
    name: str = "mlp"
    activation: str = field(default="relu", metadata=choice(*ACTIVATIONS))
    hidden: List[int] = field(default_factory=lambda: [512, 256], metadata=POSITIVE_WIDTHS)


@dataclass
class DeepMLPConfig:
    name: str = "deep_mlp"
    activation: str = field(default="relu", metadata=choice(*ACTIVATIONS))
    depth: int = field(default=10, metadata=AT_LEAST_ONE)  # hidden layers
    width: int = field(default=512, metadata=AT_LEAST_ONE)


@dataclass
class CNNConfig:
    name: str = "cnn"
    activation: str = field(default="relu", metadata=choice(*ACTIVATIONS))
    channels: List[int] = field(default_factory=lambda: [32, 64], metadata=POSITIVE_WIDTHS)
    fc: int = field(default=128, metadata=AT_LEAST_ONE)


@dataclass
class ResNetConfig:
    name: str = "resnet"
    activation: str = field(default="relu", metadata=choice(*ACTIVATIONS))
    widths: List[int] = field(default_factory=lambda: [64, 128, 256], metadata=POSITIVE_WIDTHS)


# ---------------------------------------------------------------- init / norm
@dataclass
class InitConfig:
    name: str = "default"
    gain: Optional[float] = field(default=None, metadata={"rule": Rule(lambda v: v is None or (_finite(v) and v > 0), "must be > 0 or null (from the activation)")})
    mode: str = field(default="fan_in", metadata=choice("fan_in", "fan_out"))  # kaiming
    std: float = field(default=0.01, metadata=POSITIVE)  # normal


@dataclass
class NormConfig:
    name: str = "none"
    placement: str = field(default="before", metadata=choice("before", "after"))  # vs activation
    affine: bool = True
    momentum: float = field(default=0.1, metadata=FRACTION)  # batchnorm running stats
    eps: float = field(default=1e-5, metadata=POSITIVE)


# ---------------------------------------------------------------- regularizers
@dataclass
class DropoutConfig:
    p: float = field(default=0.5, metadata=PROBABILITY)
    p_input: float = field(default=0.0, metadata=PROBABILITY)


@dataclass
class PenaltyConfig:
    coef: float = field(default=1e-4, metadata=NON_NEGATIVE)


@dataclass
class ElasticNetConfig:
    coef: float = field(default=1e-4, metadata=NON_NEGATIVE)
    l1_ratio: float = field(default=0.5, metadata=FRACTION)


@dataclass
class MaxNormConfig:
    value: float = field(default=3.0, metadata=POSITIVE)


@dataclass
class AugmentConfig:
    crop: Optional[int] = field(default=None, metadata={"rule": Rule(lambda v: v is None or v >= 0, "must be >= 0 or null (the data set's recipe)")})
    flip: Optional[bool] = None  # null: the data set's recipe


@dataclass
class LabelSmoothingConfig:
    smoothing: float = field(default=0.1, metadata=PROBABILITY)


@dataclass
class EarlyStoppingConfig:
    monitor: str = field(default="val/loss", metadata=choice("val/loss", "val/acc"))
    mode: str = field(default="min", metadata=choice("min", "max"))
    patience: int = field(default=3, metadata=AT_LEAST_ONE)  # evaluations without improvement
    min_delta: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass
class RegularizerConfig:
    """`+regularizer=a` or `+regularizer=[a,b]`: each chosen option fills its own key."""

    dropout: Optional[DropoutConfig] = None
    l1: Optional[PenaltyConfig] = None
    l2: Optional[PenaltyConfig] = None
    elastic_net: Optional[ElasticNetConfig] = None
    max_norm: Optional[MaxNormConfig] = None
    augment: Optional[AugmentConfig] = None
    label_smoothing: Optional[LabelSmoothingConfig] = None
    early_stopping: Optional[EarlyStoppingConfig] = None


# ---------------------------------------------------------------- optimization
@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = field(default=0.1, metadata=POSITIVE)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    momentum: float = field(default=0.0, metadata=PROBABILITY)  # optimizer=nesterov: Nesterov momentum
    decay_norm_and_bias: bool = False


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = field(default=1e-3, metadata=POSITIVE)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"rule": Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")})
    eps: float = field(default=1e-8, metadata=POSITIVE)
    decay_norm_and_bias: bool = False


@dataclass
class SchedulerConfig:
    name: str = "none"
    step_size: int = field(default=10, metadata=AT_LEAST_ONE)  # step: epochs between decays
    gamma: float = field(default=0.1, metadata=POSITIVE)  # step: decay factor
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)  # optimizer steps
    min_lr: float = field(default=0.0, metadata=NON_NEGATIVE)  # cosine floor
    pct_start: float = field(default=0.3, metadata=FRACTION)  # onecycle: share spent rising
    div_factor: float = field(default=25.0, metadata=POSITIVE)  # onecycle: start = lr / div
    final_div_factor: float = field(default=1e4, metadata=POSITIVE)  # onecycle: end = start / final


@dataclass
class ClipConfig:
    name: str = "none"
    max_norm: float = field(default=1.0, metadata=POSITIVE)
    norm_type: float = field(default=2.0, metadata=POSITIVE)
    clip_value: float = field(default=1.0, metadata=POSITIVE)


@dataclass
class AccumulationConfig:
    name: str = "none"
    steps: int = field(default=1, metadata=AT_LEAST_ONE)
    scale_lr: str = field(default="off", metadata=choice("off", "linear", "sqrt"))


# ---------------------------------------------------------------- runtime
@dataclass
class DeviceConfig:
    name: str = "auto"
    precision: str = field(default="auto", metadata=choice("auto", "fp32", "bf16", "fp16"))  # auto: bf16 on CUDA, else fp32
    compile: bool = False
    channels_last: bool = True  # convs on CUDA only
    deterministic: bool = False


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "regexp"
    entity: Optional[str] = None  # null: the account's default entity
    mode: str = field(default="auto", metadata=choice("auto", "online", "offline", "disabled"))
    tags: List[str] = field(default_factory=list, metadata={"rule": Rule(lambda v: all(1 <= len(t) <= 64 for t in v), "must be tags of 1 to 64 characters")})


@dataclass
class MonitorConfig:
    name: str = "default"
    log_every: int = field(default=50, metadata=AT_LEAST_ONE)  # optimizer steps
    histogram_every: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)  # log steps
    on_nonfinite: str = field(default="stop", metadata=choice("stop", "skip", "continue"))


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)  # besides each epoch's end


@dataclass
class TrainConfig:
    """Top-level keys; each group is typed by its own option schema (GROUP_SCHEMAS)."""

    seed: int = field(default=0, metadata=NON_NEGATIVE)
    epochs: int = field(default=10, metadata=AT_LEAST_ONE)
    max_steps: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)
    batch_size: int = field(default=128, metadata=AT_LEAST_ONE)
    eval_every: int = field(default=1, metadata=AT_LEAST_ONE)  # epochs
    eval_batch_size: int = field(default=1024, metadata=AT_LEAST_ONE)
    out_dir: str = "outputs"
    resume: Optional[str] = None  # a run dir (or its checkpoint.pt) to continue; `auto` in sweeps
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dataset: Any = None
    model: Any = None
    init: Any = None
    norm: Any = None
    regularizer: Any = None
    optimizer: Any = None
    scheduler: Any = None
    clip: Any = None
    accumulation: Any = None
    device: Any = None
    logger: Any = None
    monitor: Any = None


# Each group's options and the schema that types them. The `name` key of an option's
# YAML selects its schema; the code's registries are keyed by the same names.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {n: DatasetConfig for n in ("mnist", "fashion_mnist", "cifar10")},
    "model": {"mlp": MLPConfig, "deep_mlp": DeepMLPConfig, "cnn": CNNConfig, "resnet": ResNetConfig},
    "init": {n: InitConfig for n in ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "normal")},
    "norm": {n: NormConfig for n in ("none", "batchnorm", "layernorm")},
    "optimizer": {"sgd": SGDConfig, "momentum": SGDConfig, "nesterov": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig},
    "scheduler": {n: SchedulerConfig for n in ("none", "step", "cosine", "warmup_cosine", "onecycle")},
    "clip": {n: ClipConfig for n in ("none", "norm", "value")},
    "accumulation": {n: AccumulationConfig for n in ("none", "steps")},
    "device": {n: DeviceConfig for n in ("auto", "cpu", "cuda")},
    "logger": {n: LoggerConfig for n in ("wandb", "none")},
    "monitor": {n: MonitorConfig for n in ("default", "full", "off")},
}
REGULARIZERS = tuple(f.name for f in fields(RegularizerConfig))


def _typed(schema: type, node: Any, prefix: str) -> DictConfig:
    """Merge `node` into `schema`, turning OmegaConf's errors into a ConfigError."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
    except OmegaConfBaseException as e:
        inner = re.sub(r"\[\d+\]$", "", str(e.full_key or ""))  # a list element: report the list
        key = ".".join(k for k in (prefix, inner) if k)
        owner, last = _field_owner(schema, inner)
        if last not in {f.name for f in fields(owner)}:
            known = ", ".join(f.name for f in fields(owner))
            raise ConfigError(key, _lookup(node, inner), f"unknown key; known keys here: {known}") from None
        raise ConfigError(key, _lookup(node, inner), f"must be {_describe_type(owner, last)}") from None


def _lookup(node: Any, dotted: str) -> Any:
    for part in [p for p in dotted.split(".") if p]:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _dataclass_of(tp: Any) -> Optional[type]:
    """The dataclass inside a field type (X or Optional[X]), if any."""
    if is_dataclass(tp):
        return tp
    return next((a for a in getattr(tp, "__args__", ()) if is_dataclass(a)), None)


def _field_owner(schema: type, dotted: str) -> tuple[type, str]:
    """The dataclass that owns the last key of `dotted`, and that key."""
    parts = [p for p in dotted.split(".") if p] or [""]
    for part in parts[:-1]:
        f = {f.name: f for f in fields(schema)}.get(part)
        inner = _dataclass_of(f.type) if f is not None else None
        if inner is None:
            break
        schema = inner
    return schema, parts[-1]


_TYPE_WORDS = {
    int: "an integer", float: "a number", bool: "true or false", str: "a string",
    Optional[int]: "an integer or null", Optional[float]: "a number or null",
    Optional[bool]: "true, false or null", List[int]: "a list of integers", List[float]: "a list of numbers",
    List[str]: "a list of strings",
}


def _describe_type(owner: type, name: str) -> str:
    tp = {f.name: f.type for f in fields(owner)}[name]
    return _TYPE_WORDS.get(tp, "a mapping of its own keys" if _dataclass_of(tp) else str(tp))


def _check_rules(node: DictConfig, schema: type, prefix: str) -> None:
    for f in fields(schema):
        value = node[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        rule: Optional[Rule] = f.metadata.get("rule")
        if rule is not None and not rule.ok(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value):
            raise ConfigError(key, value, rule.allowed)
        inner = _dataclass_of(f.type)
        if isinstance(value, DictConfig) and inner is not None:
            _check_rules(value, inner, key)


def resolved_container(cfg: DictConfig) -> dict:
    """The config as plain data with interpolations resolved, without Hydra's own node
    (whose job-time keys do not resolve outside a running job)."""
    return {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in cfg.items() if k != "hydra"}


def validate(cfg: DictConfig) -> DictConfig:
    """Type- and range-check a composed config; return it typed. Raises ConfigError."""
    raw = resolved_container(cfg)
    groups = {g: raw.pop(g, None) for g in list(GROUP_SCHEMAS) + ["regularizer"]}
    typed = _typed(TrainConfig, raw, "")
    _check_rules(typed, TrainConfig, "")
    for group, options in GROUP_SCHEMAS.items():
        node = groups[group]
        name = node.get("name") if isinstance(node, dict) else None
        if name not in options:
            raise ConfigError(group, name, "unknown option; choose one of " + ", ".join(sorted(options)))
        typed[group] = _typed(options[name], node, group)
        _check_rules(typed[group], options[name], group)
    typed.regularizer = _typed(RegularizerConfig, groups["regularizer"], "regularizer")
    _check_rules(typed.regularizer, RegularizerConfig, "regularizer")
    _check_cross_fields(typed)
    return typed


def _check_cross_fields(cfg: DictConfig) -> None:
    reg = cfg.regularizer
    if reg.early_stopping is not None and cfg.dataset.val_size == 0:
        raise ConfigError("dataset.val_size", 0, "must be > 0 with +regularizer=early_stopping (it watches a validation metric)")
    if cfg.model.name in ("cnn", "resnet") and cfg.norm.name == "layernorm" and cfg.norm.placement != "before":
        raise ConfigError("norm.placement", cfg.norm.placement, "layernorm on conv models supports only 'before'")


def warnings_for(cfg: DictConfig) -> list[str]:
    """Legal but probably unintended combinations, logged at the start of a run."""
    out = []
    if cfg.optimizer.weight_decay > 0 and cfg.regularizer.l2 is not None:
        out.append(
            f"optimizer.weight_decay={cfg.optimizer.weight_decay} and regularizer.l2.coef={cfg.regularizer.l2.coef} "
            "are both on: the weights are shrunk twice"
        )
    if cfg.optimizer.name == "adam" and cfg.optimizer.weight_decay > 0:
        out.append("optimizer=adam with weight_decay couples decay to the adaptive step (L2); optimizer=adamw decouples it")
    return out


def resolve_device(cfg: DictConfig) -> str:
    """'cpu' or 'cuda' for device=auto|cpu|cuda; ConfigError when CUDA is asked for and absent."""
    import torch

    name = cfg.device.name
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise ConfigError("device", "cuda", "no CUDA device is available here; use device=cpu or device=auto")
    resolved = "cuda" if name == "cuda" or (name == "auto" and has_cuda) else "cpu"
    if resolved == "cpu" and cfg.device.precision == "fp16":
        raise ConfigError("device.precision", "fp16", "fp16 needs CUDA; on the CPU use fp32 or bf16")
    return resolved


def resolve_precision(cfg: DictConfig, device: str) -> str:
    """fp32, bf16 or fp16: `auto` is bf16 autocast on a CUDA device that supports it, else fp32."""
    if cfg.device.precision != "auto":
        return cfg.device.precision
    import torch

    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def check_writable(path: str | os.PathLike, key: str, value: Any = None) -> None:
    """ConfigError unless `path` is, or can be created as, a writable directory. Creating a
    file is the only honest test: root passes os.access() even on read-only mounts."""
    value = str(path) if value is None else value
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, value, f"output directory cannot be created: {probe} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".regexp-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(key, value, f"output directory cannot be written: {probe}: {e.strerror}") from None
