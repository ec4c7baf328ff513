"""Typed configuration: one registry per config group, schemas in Hydra's ConfigStore, range
rules beside their fields.

`REGISTRY[group][option]` names the dataclass that types the option's YAML file
(`conf/<group>/<option>.yaml`, which extends `/schema/<group>/<option>` in its defaults list)
and the function that realises the option. Hydra types every value while it composes
(regexp/compose.py); `validate` then checks the range rules declared beside each field and
the cross-field rules, so a bad value fails with one line naming the key, the value and what
is allowed, before any data is touched.

No torch here, and Hydra only inside functions: `regexp --help` reads the registry and stays instant.
"""

import functools
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from regexp.rundir import ConfigError, RunError  # noqa: F401  (re-exported: config.ConfigError)


# ---------------------------------------------------------------- range rules, declared beside fields
@dataclass(frozen=True)
class Rule:
    """A range/choice check attached to a schema field through `metadata`."""

    ok: Callable[[Any], bool]
    allowed: str


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def rule(ok: Callable[[Any], bool], allowed: str) -> dict:
    return {"rule": Rule(ok, allowed)}


def choice(*options: str) -> dict:
    return rule(lambda v: v in options, "must be one of " + ", ".join(options))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _integer_in(low: int, high: int, words: str) -> dict:
    return rule(lambda v: isinstance(v, int) and low <= v <= high, f"must be an integer >= {low} and <= {words}")


POSITIVE = rule(lambda v: _finite(v) and v > 0, "must be > 0")
NON_NEGATIVE = rule(lambda v: _finite(v) and v >= 0, "must be >= 0")
AT_LEAST_ONE = rule(lambda v: v >= 1, "must be an integer >= 1")
PROBABILITY = rule(lambda v: _finite(v) and 0 <= v < 1, "must satisfy 0 <= p < 1")
FRACTION = rule(lambda v: _finite(v) and 0 <= v <= 1, "must be between 0 and 1")
OPTIONAL_AT_LEAST_ONE = rule(lambda v: v is None or v >= 1, "must be an integer >= 1 or null (off)")
# Sizes are capped so that a typo (an extra zero or three) is refused here, before torch is
# imported, not by the allocator minutes later; the parameter estimate (model_parameters)
# catches combinations of legal sizes that are still too large.
MAX_WIDTH, MAX_DEPTH, MAX_BATCH = 65536, 1024, 2**20
MAX_PARAMETERS = 2**30  # 4 GiB of fp32 weights, about 16 GiB with gradients and Adam's moments
MAX_STEP = 1e6  # lr, weight_decay: larger factors overflow float32 inside torch's optimizers
WIDTH = _integer_in(1, MAX_WIDTH, str(MAX_WIDTH))
WIDTHS = rule(lambda v: len(v) > 0 and all(1 <= w <= MAX_WIDTH for w in v),
              f"must be a non-empty list of integers >= 1 and <= {MAX_WIDTH}")
LEARNING_RATE = rule(lambda v: _finite(v) and 0 < v <= MAX_STEP, f"must be > 0 and <= {MAX_STEP:g} (larger overflow float32)")
CAPPED_NON_NEGATIVE = rule(lambda v: _finite(v) and 0 <= v <= MAX_STEP, f"must be >= 0 and <= {MAX_STEP:g} (larger overflow float32)")
# A schedule moves the lr below optimizer.lr, never above it (where LEARNING_RATE's cap would not hold)
DECAY = rule(lambda v: _finite(v) and 0 < v <= 1, "must be > 0 and <= 1 (a decay; larger grows the lr without bound)")
DIVISOR = rule(lambda v: _finite(v) and v >= 1, "must be >= 1 (onecycle starts and ends below the peak lr)")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")  # models.ACTIVATIONS holds their modules


# ---------------------------------------------------------------- dataset
@dataclass
class AugmentRecipe:
    """The augmentation that suits a data set; `+regularizer=augment` switches it on."""

    crop: int = field(default=0, metadata=NON_NEGATIVE)  # random-crop padding in pixels
    flip: bool = False  # random horizontal flip


# The image shape (C, H, W) and class count of each set regexp knows by name: the pre-flight
# sizes a model (model_parameters) from these without importing torch; data.SPECS reads them too.
BUILTIN_SETS = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}
TORCHVISION_SETS = {"KMNIST": ((1, 28, 28), 10), "EMNIST": ((1, 28, 28), None), "SVHN": ((3, 32, 32), 10),
                    "CIFAR100": ((3, 32, 32), 100)}  # EMNIST: its split's classes (EMNIST_SPLITS)
EMNIST_SPLITS = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}
OWN_DATA = ("folder", "tensors")  # dataset.path: the user's files, whose headers say shape and classes
TEST_SIZE = rule(lambda v: _finite(v) and 0 < v < 1, "must be a fraction > 0 and < 1")


@dataclass
class DatasetBase:
    """What every data set has: how much of it a run uses and the augmentation that suits it."""

    name: str = MISSING
    val_size: int = field(default=5000, metadata=NON_NEGATIVE)
    limit: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)
    augment: AugmentRecipe = field(default_factory=AugmentRecipe)


@dataclass
class DatasetConfig(DatasetBase):
    """A set torchvision reads and downloads (found under dataset.root)."""

    name: str = field(default=MISSING, metadata=choice(*BUILTIN_SETS))
    root: str = "data"
    download: bool = True
    cache: str = field(default="user", metadata=choice("user", "beside_data", "off"))  # decoded tensors (data.py)


@dataclass
class TorchvisionDatasetConfig(DatasetConfig):
    name: str = field(default=MISSING, metadata=choice("torchvision"))
    set: str = field(default=MISSING, metadata=choice(*TORCHVISION_SETS))
    split: str = field(default="balanced", metadata=choice(*EMNIST_SPLITS))  # EMNIST's only


@dataclass
class OwnDataConfig(DatasetBase):
    """The user's own files (docs/data.md): a folder of images, or arrays in a .npz/.pt file."""

    name: str = field(default=MISSING, metadata=choice(*OWN_DATA))
    path: str = MISSING
    test_size: float = field(default=0.2, metadata=TEST_SIZE)  # held out when the data have no test split
    normalize: bool = True  # per-channel mean/std of the training split; false: values as stored


@dataclass
class FolderDatasetConfig(OwnDataConfig):
    cache: str = field(default="user", metadata=choice("user", "off"))  # decoded images (data.py)


@dataclass
class TensorsDatasetConfig(OwnDataConfig):
    classes: Optional[int] = field(default=None, metadata=rule(
        lambda v: v is None or v >= 2, "must be an integer >= 2 or null (the largest label + 1)"))


# ---------------------------------------------------------------- model
@dataclass
class ModelConfig:
    convolutional: ClassVar[bool] = False  # takes images as (C, H, W) maps: channels_last, spatial norms
    user_built: ClassVar[bool] = False  # the user's own module (imported from model.target), not layers regexp builds

    name: str = MISSING
    activation: str = field(default="relu", metadata=choice(*ACTIVATIONS))


@dataclass
class MLPConfig(ModelConfig):
    size_keys: ClassVar[tuple[str, ...]] = ("hidden",)  # what the parameter count grows with

    hidden: List[int] = field(default_factory=lambda: [512, 256], metadata=WIDTHS)

    @staticmethod
    def parameters(cfg: Any, shape: tuple[int, int, int], classes: int) -> int:
        return _dense([math.prod(shape), *cfg.hidden, classes])


@dataclass
class DeepMLPConfig(ModelConfig):
    size_keys: ClassVar[tuple[str, ...]] = ("width", "depth")
    depth: int = field(default=10, metadata=_integer_in(1, MAX_DEPTH, str(MAX_DEPTH)))  # hidden layers
    width: int = field(default=512, metadata=WIDTH)

    @staticmethod
    def parameters(cfg: Any, shape: tuple[int, int, int], classes: int) -> int:
        return _dense([math.prod(shape), *[cfg.width] * cfg.depth, classes])


@dataclass
class CNNConfig(ModelConfig):
    convolutional: ClassVar[bool] = True
    size_keys: ClassVar[tuple[str, ...]] = ("channels", "fc")

    channels: List[int] = field(default_factory=lambda: [32, 64], metadata=WIDTHS)
    fc: int = field(default=128, metadata=WIDTH)

    @staticmethod
    def parameters(cfg: Any, shape: tuple[int, int, int], classes: int) -> int:
        """conv3x3 + 2x2 max-pool per width, then fc -> classes (models.cnn)."""
        channels, height, width = shape
        _require_pixels("model.channels", list(cfg.channels), len(cfg.channels), shape)
        total = 0
        for out in cfg.channels:
            total += 9 * channels * out + out
            channels, height, width = out, height // 2, width // 2
        return total + _dense([channels * height * width, cfg.fc, classes])


@dataclass
class ResNetConfig(ModelConfig):
    convolutional: ClassVar[bool] = True
    size_keys: ClassVar[tuple[str, ...]] = ("widths",)

    widths: List[int] = field(default_factory=lambda: [64, 128, 256], metadata=WIDTHS)

    @staticmethod
    def parameters(cfg: Any, shape: tuple[int, int, int], classes: int) -> int:
        """A stem conv, then per further width a conv, a 2x2 max-pool and two residual convs (models.resnet)."""
        widths = list(cfg.widths)
        _require_pixels("model.widths", widths, len(widths) - 1, shape)
        stages = sum(9 * a * b + 2 * 9 * b * b + 3 * b for a, b in zip(widths, widths[1:]))
        return 9 * shape[0] * widths[0] + widths[0] + stages + _dense([widths[-1], classes])


# package.module.Class: Python identifiers joined by dots, at least a module and a name
DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@dataclass
class CustomModelConfig(ModelConfig):
    """model=custom: `target(**kwargs)`, the user's own nn.Module (regexp/custom.py imports,
    builds and tries it in the pre-flight). `activation` only tells the init schemes which gain
    to use; the model's own layers decide what it computes."""

    user_built: ClassVar[bool] = True
    size_keys: ClassVar[tuple[str, ...]] = ("kwargs",)

    target: str = field(default=MISSING, metadata=rule(lambda v: DOTTED_PATH.fullmatch(v) is not None,
                                                       "must be an importable package.module.Class"))
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def parameters(cfg: Any, shape: tuple[int, int, int], classes: int) -> int:
        return 0  # unknown without building it: regexp.custom counts and caps them in the pre-flight


def _dense(sizes: list[int]) -> int:
    """Weights and biases of Linear layers through `sizes` (norm parameters are left out: a few per unit)."""
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def _require_pixels(key: str, value: list[int], poolings: int, shape: tuple[int, int, int]) -> None:
    """Each 2x2 max-pool halves the map: more of them than the image has halvings leave nothing."""
    if min(shape[1:]) >> poolings < 1:
        raise ConfigError(key, value, f"{poolings} 2x2 poolings shrink a {shape[1]}x{shape[2]} input to nothing; "
                          f"use at most {min(shape[1:]).bit_length() - 1}")


def dataset_shape(ds_cfg: Any) -> tuple[tuple[int, int, int], int]:
    """The configured data set's image shape (C, H, W) and class count, without torch: the
    pre-flight sizes models with it before any data are loaded. A set known by name answers
    from its table; the user's own data from their headers (a .pt file needs torch)."""
    if ds_cfg.name in OWN_DATA:
        from regexp import datafiles

        return datafiles.shape(ds_cfg)
    if ds_cfg.name == "torchvision":
        shape, classes = TORCHVISION_SETS[ds_cfg.set]
        return shape, classes or EMNIST_SPLITS[ds_cfg.split]
    return BUILTIN_SETS[ds_cfg.name]


def model_parameters(cfg: DictConfig) -> int:
    """About how many parameters the configured model has on the configured data set."""
    return OmegaConf.get_type(cfg.model).parameters(cfg.model, *dataset_shape(cfg.dataset))


def convolutional(model_cfg: Any) -> bool:
    """Whether the configured model is a conv net (its schema says so, not its name)."""
    return _schema_of(model_cfg).convolutional


def user_built(model_cfg: Any) -> bool:
    """Whether the configured model is the user's own module (model=custom: its schema says so)."""
    return _schema_of(model_cfg).user_built


def _schema_of(model_cfg: Any) -> Any:
    return OmegaConf.get_type(model_cfg) if isinstance(model_cfg, DictConfig) else model_cfg


# ---------------------------------------------------------------- init / norm
@dataclass
class InitConfig:
    name: str = MISSING
    gain: Optional[float] = field(default=None, metadata=rule(lambda v: v is None or (_finite(v) and v > 0), "must be > 0 or null (from the activation)"))
    mode: str = field(default="fan_in", metadata=choice("fan_in", "fan_out"))  # kaiming
    std: float = field(default=0.01, metadata=POSITIVE)  # normal


@dataclass
class NormConfig:
    name: str = MISSING
    placement: str = field(default="before", metadata=choice("before", "after"))  # vs activation
    affine: bool = True
    momentum: float = field(default=0.1, metadata=FRACTION)  # batchnorm running stats
    eps: float = field(default=1e-5, metadata=POSITIVE)
    batch_statistics: bool = False  # normalizes with the batch's own statistics: training needs >= 2 samples a batch


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
    crop: Optional[int] = field(default=None, metadata=rule(lambda v: v is None or v >= 0, "must be >= 0 or null (the data set's recipe)"))
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


# ---------------------------------------------------------------- optimization
@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = field(default=1e-3, metadata=LEARNING_RATE)
    weight_decay: float = field(default=0.0, metadata=CAPPED_NON_NEGATIVE)
    decay_norm_and_bias: bool = False


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = field(default=0.0, metadata=PROBABILITY)


@dataclass
class AdamConfig(OptimizerConfig):
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], metadata=rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"))
    eps: float = field(default=1e-8, metadata=POSITIVE)


@dataclass
class SchedulerConfig:
    name: str = MISSING
    step_size: int = field(default=10, metadata=AT_LEAST_ONE)  # step: epochs between decays
    gamma: float = field(default=0.1, metadata=DECAY)  # step: decay factor
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)  # optimizer steps
    min_lr: float = field(default=0.0, metadata=CAPPED_NON_NEGATIVE)  # cosine floor
    pct_start: float = field(default=0.3, metadata=FRACTION)  # onecycle: share spent rising
    div_factor: float = field(default=25.0, metadata=DIVISOR)  # onecycle: start = lr / div
    final_div_factor: float = field(default=1e4, metadata=DIVISOR)  # onecycle: end = start / final


@dataclass
class ClipConfig:
    name: str = MISSING
    max_norm: float = field(default=1.0, metadata=POSITIVE)
    norm_type: float = field(default=2.0, metadata=POSITIVE)
    clip_value: float = field(default=1.0, metadata=POSITIVE)


@dataclass
class AccumulationConfig:
    name: str = MISSING
    steps: int = field(default=1, metadata=AT_LEAST_ONE)
    scale_lr: str = field(default="off", metadata=choice("off", "linear", "sqrt"))


# ---------------------------------------------------------------- runtime
@dataclass
class DeviceConfig:
    name: str = MISSING  # auto, cpu or cuda: the device asked for
    precision: str = field(default="auto", metadata=choice("auto", "fp32", "bf16", "fp16"))  # auto: bf16 on CUDA, else fp32
    compile: bool = False
    channels_last: bool = True  # convs on CUDA only
    deterministic: bool = False
    # CPU threads: auto times a few steps of the run's model at 1..free cores and keeps the fastest; never more
    # threads than the cores this process may use (torch crashes on a hundred thousand)
    threads: str = field(default="auto", metadata=rule(
        lambda v: v == "auto" or (v.isascii() and v.isdigit() and len(v) <= 6 and 1 <= int(v) <= usable_cores()),
        f"must be auto or an integer from 1 to {usable_cores()} (the cores this process may use)"))


@dataclass
class LoggerConfig:
    name: str = MISSING
    project: str = "regexp"
    entity: Optional[str] = None  # null: the account's default entity
    mode: str = field(default="auto", metadata=choice("auto", "online", "offline", "disabled"))
    tags: List[str] = field(default_factory=list, metadata=rule(lambda v: all(1 <= len(t) <= 64 for t in v), "must be tags of 1 to 64 characters"))


@dataclass
class MonitorConfig:
    name: str = MISSING
    per_layer: bool = True  # hooks and per-layer metrics on log steps; false: the loop runs bare
    log_every: int = field(default=50, metadata=AT_LEAST_ONE)  # optimizer steps
    histogram_every: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)  # log steps
    on_nonfinite: str = field(default="stop", metadata=choice("stop", "skip", "continue"))
    # a decisive finding (docs/diagnostics.md) while it trains: warn (a line, the run goes on) or stop (status stopped)
    on_finding: str = field(default="warn", metadata=choice("warn", "stop"))


@dataclass
class PruneConfig:
    """Pruning in sweeps (regexp/prune.py): at each rung epoch a job worse than its peers stops
    as `pruned`. none: off; median: the median stopping rule; asha: successive halving."""

    name: str = MISSING
    rungs: List[int] = field(default_factory=lambda: [1, 2], metadata=rule(
        lambda v: len(v) >= 1 and all(isinstance(r, int) and r >= 1 for r in v) and list(v) == sorted(set(v)),
        "must be a non-empty list of increasing epochs >= 1"))
    reduction_factor: int = field(default=3, metadata=rule(lambda v: v >= 2, "must be an integer >= 2"))
    metric: str = "val/loss"  # an epoch record's val/* metric (or epoch/train_loss, epoch/train_acc)
    mode: str = field(default="auto", metadata=choice("auto", "min", "max"))  # auto: max for */acc, else min


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Option:
    """One option of a config group: the dataclass that types its YAML file and, where one
    function realises the option, that function's dotted path (imported when first built)."""

    schema: type
    builder: Optional[str] = None


def _same(schema: type, *names: str) -> dict[str, Option]:
    """Options that differ only in their YAML values (no builder of their own)."""
    return {name: Option(schema) for name in names}


REGISTRY: dict[str, dict[str, Option]] = {
    "dataset": {**_same(DatasetConfig, *BUILTIN_SETS), "torchvision": Option(TorchvisionDatasetConfig),
                "folder": Option(FolderDatasetConfig), "tensors": Option(TensorsDatasetConfig)},
    "model": {
        "mlp": Option(MLPConfig, "regexp.models.mlp"),
        "deep_mlp": Option(DeepMLPConfig, "regexp.models.deep_mlp"),
        "cnn": Option(CNNConfig, "regexp.models.cnn"),
        "resnet": Option(ResNetConfig, "regexp.models.resnet"),
        "custom": Option(CustomModelConfig, "regexp.custom.custom"),
    },
    "init": {
        "default": Option(InitConfig, "regexp.init.keep_pytorch_default"),
        "xavier_uniform": Option(InitConfig, "regexp.init.xavier_uniform"),
        "xavier_normal": Option(InitConfig, "regexp.init.xavier_normal"),
        "kaiming_uniform": Option(InitConfig, "regexp.init.kaiming_uniform"),
        "kaiming_normal": Option(InitConfig, "regexp.init.kaiming_normal"),
        "orthogonal": Option(InitConfig, "regexp.init.orthogonal"),
        "normal": Option(InitConfig, "regexp.init.normal"),
    },
    "norm": {
        "none": Option(NormConfig, "regexp.models.no_norm"),
        "batchnorm": Option(NormConfig, "regexp.models.batch_norm"),
        "layernorm": Option(NormConfig, "regexp.models.layer_norm"),
    },
    "regularizer": {  # added with '+', several at once: each option fills regularizer.<option>
        "dropout": Option(DropoutConfig),  # read by build_model
        "l1": Option(PenaltyConfig),  # l1, l2, elastic_net: build_penalty
        "l2": Option(PenaltyConfig),
        "elastic_net": Option(ElasticNetConfig),
        "max_norm": Option(MaxNormConfig),  # apply_max_norm after each update
        "augment": Option(AugmentConfig),  # the data set's recipe, on the device
        "label_smoothing": Option(LabelSmoothingConfig),  # build_criterion
        "early_stopping": Option(EarlyStoppingConfig),  # EarlyStopping on a validation metric
    },
    "optimizer": {
        "sgd": Option(SGDConfig, "regexp.optim.sgd"),
        "momentum": Option(SGDConfig, "regexp.optim.sgd"),
        "nesterov": Option(SGDConfig, "regexp.optim.nesterov"),
        "adam": Option(AdamConfig, "regexp.optim.adam"),
        "adamw": Option(AdamConfig, "regexp.optim.adamw"),
    },
    "scheduler": {
        "none": Option(SchedulerConfig, "regexp.optim.constant"),
        "step": Option(SchedulerConfig, "regexp.optim.step_decay"),
        "cosine": Option(SchedulerConfig, "regexp.optim.cosine"),
        "warmup_cosine": Option(SchedulerConfig, "regexp.optim.warmup_cosine"),
        "onecycle": Option(SchedulerConfig, "regexp.optim.one_cycle"),
    },
    "clip": {
        "none": Option(ClipConfig, "regexp.optim.no_clip"),
        "norm": Option(ClipConfig, "regexp.optim.clip_norm"),
        "value": Option(ClipConfig, "regexp.optim.clip_value"),
    },
    "accumulation": _same(AccumulationConfig, "none", "steps"),
    "device": _same(DeviceConfig, "auto", "cpu", "cuda"),
    "logger": _same(LoggerConfig, "wandb", "none"),
    "monitor": _same(MonitorConfig, "default", "full", "off"),
    "prune": _same(PruneConfig, "none", "median", "asha"),
}
# Groups outside train.yaml's defaults list: added with `+group=option` (or `group=option`, see
# with_added_groups). `experiment` holds presets (`# @package _global_`), so it has no schema.
OPTIONAL_GROUPS = ("experiment", "regularizer")  # in this order: a preset may add regularizers
REGULARIZERS = tuple(REGISTRY["regularizer"])
GROUP_SCHEMAS = {g: {n: o.schema for n, o in opts.items()} for g, opts in REGISTRY.items() if g not in OPTIONAL_GROUPS}

# cfg.regularizer: one optional key per regularizer, None unless added
RegularizerConfig = make_dataclass(
    "RegularizerConfig", [(name, Optional[opt.schema], None) for name, opt in REGISTRY["regularizer"].items()]
)
RegularizerConfig.__module__ = __name__  # importable by name: configs travel pickled to launcher workers


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)  # besides each epoch's end


@dataclass
class TrainConfig:
    """Top-level keys; each group's node is typed by its chosen option's schema."""

    seed: int = field(default=0, metadata=_integer_in(0, 2**32 - 1, "2**32 - 1 (numpy's seed range)"))
    epochs: int = field(default=10, metadata=AT_LEAST_ONE)
    max_steps: Optional[int] = field(default=None, metadata=OPTIONAL_AT_LEAST_ONE)
    batch_size: int = field(default=128, metadata=_integer_in(1, MAX_BATCH, "2**20"))
    eval_every: int = field(default=1, metadata=AT_LEAST_ONE)  # epochs
    eval_batch_size: int = field(default=1024, metadata=_integer_in(1, MAX_BATCH, "2**20"))
    out_dir: str = "outputs"
    resume: Optional[str] = None  # a run dir (or its checkpoint.pt) to continue; `auto` in sweeps
    smoke: bool = False  # a smoke run (docs/runs.md): 2 steps, 1 validation and 1 test batch, marked; never resumed
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dataset: DatasetBase = MISSING
    model: ModelConfig = MISSING
    init: InitConfig = MISSING
    norm: NormConfig = MISSING
    # `+regularizer=X` fills regularizer.X, typed by X's schema; `++regularizer.X.k=v` may add
    # one too (Optuna's search does), which a None-valued typed key could not take in
    # OmegaConf, so: open here, a RegularizerConfig once validated (a key per regularizer).
    regularizer: Any = field(default_factory=dict)
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    clip: ClipConfig = MISSING
    accumulation: AccumulationConfig = MISSING
    device: DeviceConfig = MISSING
    logger: LoggerConfig = MISSING
    monitor: MonitorConfig = MISSING
    prune: PruneConfig = MISSING


@functools.cache
def builder(group: str, option: str) -> Callable:
    """The function that realises `group=option` (a registry entry's builder)."""
    from hydra.utils import get_method

    if option not in REGISTRY[group]:
        raise ConfigError(group, option, "unknown option; choose one of " + ", ".join(sorted(REGISTRY[group])))
    path = REGISTRY[group][option].builder
    if path is None:
        raise KeyError(f"{group}={option} has no builder: its fields say what it does")
    return get_method(path)


@functools.cache  # once per process: the ConfigStore keeps them
def register_schemas() -> None:
    """Store every option's schema as `schema/<group>/<option>` (its `name` filled in) and
    the top level as `schema/train`, where the YAML files' defaults lists extend them."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=TrainConfig)
    for group, options in REGISTRY.items():
        for name, opt in options.items():
            named = "name" in {f.name for f in fields(opt.schema)}
            store.store(group=f"schema/{group}", name=name, node=opt.schema(name=name) if named else opt.schema)


def config_dir() -> str:
    """`conf/` (inside the installed package, or at the repository root in a checkout), ready to
    compose: its YAML files extend the schemas, so this registers them in the ConfigStore."""
    register_schemas()
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else packaged.parent.parent / "conf")


# ---------------------------------------------------------------- validation
def validate(cfg: DictConfig) -> DictConfig:
    """Check a composed (hence typed) config: its environment interpolations (before anything
    resolves one), no keys outside the schemas, the range rules beside each field, the
    cross-field rules. Returns it as the job reads it (`job_config`). Raises ConfigError."""
    check_environment(cfg)
    job = job_config(cfg)
    _check_fields(job, "")
    _check_cross_fields(job)
    return job


def job_config(cfg: DictConfig) -> DictConfig:
    """A composed config as the job reads it: without Hydra's node, and with a key for every
    regularizer, None unless added (a RegularizerConfig). No range checks: see validate."""
    from omegaconf.errors import OmegaConfBaseException

    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    try:
        job.regularizer = OmegaConf.merge(OmegaConf.structured(RegularizerConfig), cfg.regularizer)
    except OmegaConfBaseException as e:  # a key or value that `++regularizer.X.k=v` brought in
        raise explain(e, f"regularizer.{e.full_key}", OmegaConf.select(cfg.regularizer, str(e.full_key))) from None
    return job


def explain(e: Any, key: str, value: Any) -> ConfigError:
    """OmegaConf's refusal of `key=value` (an unknown key, a wrong type) as one ConfigError line.
    The error's own fields say where: the owning dataclass, or the list an element belongs to."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    owner = e.object_type
    if isinstance(e, (ConfigAttributeError, ConfigKeyError)):
        if not is_dataclass(owner):
            return ConfigError(key, value, "unknown key (regexp train --cfg job shows the keys)")
        return ConfigError(key, value, "unknown key; known keys here: " + ", ".join(f.name for f in fields(owner)))
    expected = {f.name: f.type for f in fields(owner)}.get(e.key) if is_dataclass(owner) else e.ref_type
    return ConfigError(key, value, f"must be {_TYPE_WORDS.get(expected, str(expected))}")


_TYPE_WORDS = {
    int: "an integer", float: "a number", bool: "true or false", str: "a string",
    Optional[int]: "an integer or null", Optional[float]: "a number or null", Optional[str]: "a string or null",
    Optional[bool]: "true, false or null", List[int]: "a list of integers", List[float]: "a list of numbers",
    List[str]: "a list of strings", Dict[str, Any]: "a mapping of keys to values, e.g. {width: 8}",
}


def _check_fields(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    declared = {f.name: f for f in fields(schema)} if is_dataclass(schema) else {}
    for key in node:
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in declared:  # only `+key=value` gets past Hydra's typed merge
            raise ConfigError(full, _as_written(node, key), "unknown key; known keys here: " + ", ".join(declared))
        check: Optional[Rule] = declared[key].metadata.get("rule")
        value = _resolved(node, key, full, check)
        if check is not None and not check.ok(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value):
            raise ConfigError(full, _as_written(node, key), check.allowed)
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):  # not a free mapping (model.kwargs)
            _check_fields(value, full)


def _as_written(node: DictConfig, key: str) -> Any:
    """A value as the config spells it: an interpolation's text, never what it resolves to
    (which may come from the environment)."""
    return OmegaConf.to_container(node, resolve=False)[key]


def _resolved(node: DictConfig, key: str, full: str, check: Optional[Rule]) -> Any:
    """node[key], its interpolation resolved and typed; what does not resolve is one ConfigError
    that shows the interpolation, not the value it reached. A value left unset (???) is told with
    what its rule allows."""
    from omegaconf.errors import InterpolationValidationError, MissingMandatoryValue, OmegaConfBaseException

    try:
        return node[key]
    except MissingMandatoryValue:
        allowed = f": {check.allowed.removeprefix('must be ')}" if check is not None else ""
        raise ConfigError(full, "???", f"must be set{allowed}") from None
    except InterpolationValidationError as e:  # resolved, but not to the field's type
        raise explain(e, full, _as_written(node, key)) from None
    except OmegaConfBaseException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(full, _as_written(node, key), f"does not resolve: {reason}") from None


# ---------------------------------------------------------------- environment interpolations
# `${oc.env:NAME}` or `${oc.env:NAME,default}`; NAME is checked to be a literal variable name.
ENV_INTERPOLATION = re.compile(r"\$\{\s*oc\.env\s*:\s*(?P<name>[^,}]*?)\s*(?P<default>,|\})")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
# W&B's variables hold its credentials and settings; a config may name only those that say
# which run this is (the shipped W&B sweeps put WANDB_SWEEP_ID and WANDB_RUN_ID in hydra.run.dir).
WANDB_RUN_VARIABLES = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP",
                       "WANDB_JOB_TYPE", "WANDB_NAME", "WANDB_TAGS", "WANDB_MODE")
# The records hold every environment interpolation as written, never its value (recorded_container).
# These keys are the exception: their values are recorded as values, the run dir's path in every
# record and W&B's names for the run in W&B's, so a variable that looks like a credential is refused there.
VALUE_KEYS = ("out_dir", "logger.project", "logger.entity", "logger.tags",  # these first: they name where it is written
              "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
# The ids `wandb agent` sets, which the shipped W&B sweeps make path parts of the run dir: W&B's
# own rules for a run id (wandb.sdk.wandb_settings: not empty, no surrounding space, none of
# `:;,#?/'`), and those of one path part.
WANDB_IDS = ("WANDB_SWEEP_ID", "WANDB_RUN_ID")
WANDB_ID_RESERVED = ":;,#?/'\\%"
WANDB_ID_MAX = 128
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # wandb.sdk.wandb_settings.Settings.mode


def is_secret(variable: str) -> bool:
    """Whether an environment variable looks like it holds a credential."""
    name = variable.upper()
    return any(word in name for word in SECRET_WORDS) or (name.startswith("WANDB_") and name not in WANDB_RUN_VARIABLES)


def check_environment(cfg: DictConfig) -> None:
    """Every `${oc.env:...}` in the composed config (Hydra's node and the presets' values
    included), read from the raw, unresolved values: one that is not set and has no default is
    refused, and so is a secret-looking variable whose value would reach a VALUE_KEYS key; then
    the W&B agent's ids (check_wandb_ids) and, for logger=wandb, WANDB_MODE. ConfigError names
    the key and the variable, never its value."""
    written = OmegaConf.to_container(cfg, resolve=False)
    # Hydra's node last: it records the overrides' text too, and the key they set is the one to name
    hydra_last = dict(sorted(written.items(), key=lambda item: item[0] == "hydra"))
    found = [(key, text, match["name"].strip("'\""), match["default"])
             for key, text in _written_strings(hydra_last, "") for match in ENV_INTERPOLATION.finditer(text)]
    for key, text, name, _ in found:
        if not VARIABLE_NAME.fullmatch(name):
            raise ConfigError(key, text, "an environment interpolation must name its variable: ${oc.env:NAME}")
    _check_recorded_values(cfg, written)  # a secret where its value is recorded: refused, set or not
    for key, text, name, default in found:
        if default == "}" and name not in os.environ:
            raise ConfigError(key, text, f"the environment variable {name} is not set (set it, or give a default: "
                              f"${{oc.env:{name},DEFAULT}})")
    check_wandb_ids()
    if OmegaConf.select(cfg, "logger.name") == "wandb":
        check_wandb_mode()


def _check_recorded_values(cfg: DictConfig, written: dict) -> None:
    """No secret-looking variable reaches a VALUE_KEYS key, directly or through another key."""
    kept = OmegaConf.create(_environment_as_text(written))
    for key in VALUE_KEYS:
        for text in _reaching(kept, key):
            secret = next((m["name"].strip("'\"") for m in ENV_INTERPOLATION.finditer(text)
                           if is_secret(m["name"].strip("'\""))), None)
            if secret is not None:
                shown = next((t for _, t in _written_strings(_at(written, key), key) if secret in t), _at(written, key))
                raise ConfigError(key, shown, f"refused: {secret} looks like a secret (key, token, "
                                  "password, W&B credentials) and this value is recorded as it is (the run dir's path, "
                                  "W&B's names for the run); W&B reads its own key itself")


def _at(written: dict, key: str) -> Any:
    for part in key.split("."):
        written = written[part]
    return written


def _shown(value: str) -> str:
    """A variable's value in a message: printable, and short."""
    if not value.isprintable():
        return ascii(value)
    return value if len(value) <= 64 else f"{value[:32]}... ({len(value)} characters)"


def _reaching(kept: DictConfig, key: str) -> list[str]:
    """The strings of `key` in a config whose environment interpolations are text: resolved
    where the rest resolves (the text of the variables it reaches through other keys), else as written."""
    from omegaconf.errors import OmegaConfBaseException

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(kept, parent) if parent else kept
    if not isinstance(node, DictConfig) or leaf not in node:
        return []
    try:
        value = OmegaConf.to_container(node, resolve=True)[leaf]
    except OmegaConfBaseException:  # e.g. hydra.job.num, set only when Hydra runs the job
        value = OmegaConf.to_container(node, resolve=False)[leaf]
    return [text for _, text in _written_strings(value, key)]


def check_wandb_ids() -> None:
    """WANDB_SWEEP_ID and WANDB_RUN_ID, where set, follow W&B's rules for an id and make one path part."""
    for name in WANDB_IDS:
        value = os.environ.get(name)
        if value is None:
            continue
        if not (0 < len(value) <= WANDB_ID_MAX and value.isprintable() and value == value.strip()
                and value not in (".", "..") and not set(WANDB_ID_RESERVED) & set(value)):
            raise ConfigError(name, _shown(value), f"a W&B id must be 1 to {WANDB_ID_MAX} printable characters without "
                              f"surrounding spaces, none of {' '.join(WANDB_ID_RESERVED)}, and not . or .. "
                              "(it names the run dir of a W&B sweep's run)")


def check_wandb_mode() -> None:
    """WANDB_MODE, where set, is one W&B takes (wandb.init fails on any other, with a traceback
    once the run dir is made)."""
    value = os.environ.get("WANDB_MODE")
    if value is not None and value not in WANDB_MODES:
        raise ConfigError("WANDB_MODE", _shown(value), f"must be one of {', '.join(WANDB_MODES)} "
                          "(W&B's modes; or unset it, or logger=none)")


def _written_strings(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """(dotted key, string) for every string in a plain container; list items under their list's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _written_strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _written_strings(v, key)
    elif isinstance(node, str):
        yield key, node


def _check_cross_fields(cfg: DictConfig) -> None:
    count = model_parameters(cfg)
    if count > MAX_PARAMETERS:
        model_type = OmegaConf.get_type(cfg.model)
        first, *others = [f"model.{k}" for k in model_type.size_keys]
        also = "".join(f" with {k}={OmegaConf.select(cfg, k)}" for k in others)
        raise ConfigError(first, OmegaConf.select(cfg, first),
                          f"{also.strip() + ': ' if also else ''}about {count:,} parameters on {cfg.dataset.name}; "
                          f"at most 2**30 = {MAX_PARAMETERS:,} (4 GiB of fp32 weights)")
    if cfg.regularizer.early_stopping is not None and cfg.dataset.val_size == 0:
        raise ConfigError("dataset.val_size", 0, "must be > 0 with +regularizer=early_stopping (it watches a validation metric)")
    if cfg.norm.batch_statistics and cfg.batch_size < 2:
        raise ConfigError("batch_size", cfg.batch_size, "must be >= 2 with norm=batchnorm (batch statistics need two samples)")
    if cfg.norm.batch_statistics and cfg.dataset.limit == 1:
        raise ConfigError("dataset.limit", 1, "must be >= 2 with norm=batchnorm (batch statistics need two samples)")
    if convolutional(cfg.model) and cfg.norm.name == "layernorm" and cfg.norm.placement != "before":
        raise ConfigError("norm.placement", cfg.norm.placement, "layernorm on conv models supports only 'before'")
    if cfg.prune.name != "none":
        _check_prune(cfg)
    if cfg.smoke and cfg.resume is not None:
        raise ConfigError("resume", cfg.resume, "smoke=true (given, or recorded by the smoke run resumed) always starts "
                                                "afresh: a smoke run is never continued; drop resume=, or leave out smoke=true")
    if user_built(cfg.model):
        _check_custom_model(cfg)


def _check_custom_model(cfg: DictConfig) -> None:
    """norm= and +regularizer=dropout shape the layers regexp builds; a custom model builds its own."""
    if cfg.norm.name != "none":
        raise ConfigError("norm", cfg.norm.name, "model=custom builds its own layers; put the norm in your model")
    if cfg.regularizer.dropout is not None:
        raise ConfigError("regularizer", "dropout", "model=custom builds its own layers; put the dropout in your model")


def _check_prune(cfg: DictConfig) -> None:
    """A rung is an epoch the run trains, and the metric one its epoch record holds there."""
    from regexp.prune import EPOCH_METRICS

    prune, rungs = cfg.prune, list(cfg.prune.rungs)
    beyond = [r for r in rungs if r > cfg.epochs]
    if beyond:
        raise ConfigError("prune.rungs", rungs, f"epoch {beyond[0]} is beyond epochs={cfg.epochs}: each rung must be "
                                                f"an epoch the run trains (1 to {cfg.epochs})")
    if prune.metric not in EPOCH_METRICS:
        raise ConfigError("prune.metric", prune.metric,
                          f"must be a metric of the epoch record: {', '.join(EPOCH_METRICS)}")
    if prune.metric.startswith("val/") and cfg.dataset.val_size == 0:
        raise ConfigError("prune.metric", prune.metric, "needs validation, which dataset.val_size=0 turns off; "
                                                        "rank on epoch/train_loss, or set dataset.val_size > 0")
    unvalidated = [r for r in rungs if r % cfg.eval_every and r != cfg.epochs]
    if prune.metric.startswith("val/") and unvalidated:
        raise ConfigError("prune.metric", prune.metric, f"validation runs every eval_every={cfg.eval_every} epochs, "
                                                        f"not at rung {unvalidated[0]}: choose rungs among its epochs, "
                                                        "or rank on epoch/train_loss")


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


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer.lr": 0.001, ...}: a nested config's leaves by dotted key (a list is one
    value; an empty mapping or an absent regularizer, None, one key)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recorded_container(cfg: DictConfig) -> dict:
    """The config as a run's records hold it (summary.json, checkpoint.pt, W&B's config, the
    fused plan): plain data, its interpolations resolved, but every environment interpolation
    kept as written (`${oc.env:NAME}`), wherever its value would reach, directly or through
    another key. The value is resolved in memory where it is used, never recorded, whatever
    the variable's name. Without Hydra's node (whose job-time keys do not resolve outside a
    running job)."""
    keys = [k for k in cfg if k != "hydra"]
    resolved = {k: _container(cfg, k) for k in keys}
    # untyped: the interpolation's text may stand where the schema types a number
    written = OmegaConf.create(_environment_as_text(OmegaConf.to_container(cfg, resolve=False)))
    return _kept_as_written(resolved, {k: _container(written, k) for k in keys})


def _container(cfg: DictConfig, key: str) -> Any:
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _environment_as_text(node: Any) -> Any:
    """A plain container whose `${oc.env:...}` interpolations are escaped (`\\${oc.env:...}`):
    resolving it leaves their text in place."""
    if isinstance(node, dict):
        return {k: _environment_as_text(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_environment_as_text(v) for v in node]
    if isinstance(node, str):
        return _ESCAPABLE_ENV.sub(lambda m: m[1] + "\\" + m[2], node)
    return node


# an oc.env interpolation that is live: preceded by an even number of backslashes (each pair one literal backslash)
_ESCAPABLE_ENV = re.compile(r"((?<!\\)(?:\\\\)*)(\$\{\s*oc\.env\s*:)")


def _kept_as_written(resolved: Any, kept: Any) -> Any:
    """`resolved`, but where `kept` (resolved with the environment's interpolations as text)
    holds such a text, that text."""
    if isinstance(resolved, dict) and isinstance(kept, dict):
        return {k: _kept_as_written(v, kept.get(k)) for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(kept, list) and len(resolved) == len(kept):
        return [_kept_as_written(r, k) for r, k in zip(resolved, kept)]
    return kept if isinstance(kept, str) and ENV_INTERPOLATION.search(kept) else resolved


# ---------------------------------------------------------------- runtime checks
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


def check_run_dir_text(path: str, key: str, value: Any) -> None:
    """ConfigError if the resolved path of a run (or sweep) dir holds `${`: Hydra reads that
    path as config text again (hydra.runtime.output_dir, train.log's file name), so a value
    resolved once, from the environment say, would be resolved a second time there."""
    if "${" in path:
        raise ConfigError(key, value, f"resolves to {path}, which holds `${{`: Hydra would resolve the run dir's "
                          "path again; a value that reaches it may not hold `${`")


NAME_MAX = 255  # bytes in one file or folder name (ext4, xfs, btrfs, apfs, ntfs)


def check_writable(path: str | os.PathLike, key: str, value: Any = None) -> None:
    """ConfigError unless `path` is, or can be created as, a writable directory. Creating a
    file is the only honest test: root passes os.access() even on read-only mounts."""
    value = str(path) if value is None else value
    too_long = next((part for part in Path(path).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long is not None:
        raise ConfigError(key, value, f"a path part of {len(os.fsencode(too_long))} bytes ({too_long[:16]}...); "
                          f"file systems allow at most {NAME_MAX} bytes a name")
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


# ---------------------------------------------------------------- listings derived from the registry
def group_lines() -> list[str]:
    """One line per config group and its options, for `regexp --help`."""
    lines = []
    for group, options in REGISTRY.items():
        shown = f"+{group}" if group in OPTIONAL_GROUPS else group
        lines.append(f"  {shown:<13} {' '.join(options)}")
    return lines


def options_markdown() -> str:
    """The configuration reference table (docs): group, option, schema, keys, builder."""
    rows = ["| group | option | schema | keys | realised by |", "|---|---|---|---|---|"]
    for group, options in REGISTRY.items():
        for name, opt in options.items():
            keys = ", ".join(f"`{f.name}`" for f in fields(opt.schema) if f.name != "name")
            shown = f"`+{group}={name}`" if group in OPTIONAL_GROUPS else f"`{group}={name}`"
            rows.append(f"| {group} | {shown} | {opt.schema.__name__} | {keys} | {f'`{opt.builder}`' if opt.builder else 'its fields'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_markdown())
