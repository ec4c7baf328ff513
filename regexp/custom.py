"""model=custom: the user's own nn.Module, `model.target(**model.kwargs)`.

The pre-flight (`inspect`, called by compose.check_job for every job and by the fused
launcher's partition) imports the class, builds it, and runs one forward on a tiny batch of
zeros of the data set's shape: a target that does not import, is not a Module, takes other
arguments or returns anything but finite (N, classes) logits is one ConfigError line naming
model.target or model.kwargs, before anything is written. It also decides whether the fused
engine can replay the model (`Inspection.alone`): an nn.Sequential (nested ones too) of the
layers regexp.stack stacks, whose stacked forward gives the model's own outputs.

Only imported once a config asks for model=custom: torch stays out of `regexp --help`.
"""

import copy
import functools
import importlib
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from regexp.config import MAX_PARAMETERS, ConfigError, dataset_shape
from regexp.models import Residual

PROBE_BATCH = 2  # images in the pre-flight's forward: a BatchNorm in training mode needs two
PROBE_BATCHES = (PROBE_BATCH, PROBE_BATCH + 1)  # two sizes: a forward that fixes its batch size is caught
# what the user's code may raise while imported, built or run: sys.exit() too (it would end regexp with
# its status, 0 included, and nothing said); Ctrl-C still stops regexp
USER_CODE_ERRORS = (Exception, SystemExit)


@dataclass(frozen=True)
class Inspection:
    """What the pre-flight learnt of a custom model."""

    parameters: int
    alone: Optional[str]  # why the fused engine cannot stack it; None: it can


def custom(model_cfg: Any, norm_cfg: Any, input_shape: tuple[int, int, int], num_classes: int,
           p: float, p_input: float) -> nn.Module:
    """The model builder of model=custom (config.REGISTRY): `target(**kwargs)`. norm= and
    dropout are refused for it (config._check_custom_model), so their arguments are unused."""
    return build(model_class(model_cfg.target), model_cfg.target, kwargs_of(model_cfg))


def kwargs_of(model_cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(model_cfg.kwargs, resolve=True)


def inspect(cfg: Any) -> Inspection:
    """The pre-flight of a typed job config with model=custom; once per model and data shape
    in a process (a sweep's jobs share the answer). Raises ConfigError."""
    shape, classes = dataset_shape(cfg.dataset)
    return _inspect(cfg.model.target, json.dumps(kwargs_of(cfg.model), sort_keys=True), tuple(shape), classes,
                    cfg.dataset.name)


@functools.lru_cache(maxsize=16)
def _inspect(target: str, kwargs: str, shape: tuple[int, int, int], classes: int, dataset: str) -> Inspection:
    with torch.random.fork_rng(devices=[]):  # its random init and dropout leave the process's generator as it was
        return _try(model_class(target), target, kwargs, shape, classes, dataset)


def _try(make: Any, target: str, kwargs: str, shape: tuple[int, int, int], classes: int, dataset: str) -> Inspection:
    """Size it on the meta device, build it, one forward, and whether it stacks."""
    with torch.device("meta"):  # sized first without memory: an extra zero in a width is refused, not allocated
        sized = _meta_build(make, json.loads(kwargs))
    if sized is not None:
        check_size(sized, target, kwargs)
    model = build(make, target, json.loads(kwargs))
    count = check_size(model, target, kwargs)
    check_forward(model, target, shape, classes, dataset)
    return Inspection(count, stack_refusal(model, target, shape))


def _meta_build(make: Any, kwargs: dict) -> Optional[nn.Module]:
    """The model on the meta device; None when its constructor needs real tensors (build then says what fails)."""
    try:
        model = make(**kwargs)
    except USER_CODE_ERRORS:
        return None
    return model if isinstance(model, nn.Module) else None


def check_size(model: nn.Module, target: str, kwargs: str) -> int:
    """Its parameter count: at least one, at most the cap built-in models have (config.MAX_PARAMETERS)."""
    count = sum(p.numel() for p in model.parameters())
    if count == 0:
        raise ConfigError("model.target", target, "has no parameters to train")
    if count > MAX_PARAMETERS:
        raise ConfigError(*blamed(target, json.loads(kwargs)), f"{count:,} parameters; at most 2**30 = {MAX_PARAMETERS:,} "
                                                  "(4 GiB of fp32 weights)")
    return count


def model_class(target: str) -> Any:
    """The class (or function) `target` names, imported. ConfigError (model.target) when it cannot be."""
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        where = f"no module named {module_name}" if e.name == module_name or module_name.startswith(f"{e.name}.") \
            else f"importing {module_name} failed: {e}"
        raise ConfigError("model.target", target, f"{where} (its folder must be on PYTHONPATH, e.g. PYTHONPATH=.)") from None
    except USER_CODE_ERRORS as e:  # its own code failed: SyntaxError, a raise (or sys.exit) at import
        raise ConfigError("model.target", target, f"importing {module_name} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        raise ConfigError("model.target", target, f"module {module_name} has no {name}")
    found = getattr(module, name)
    if not callable(found):
        raise ConfigError("model.target", target, f"is of type {type(found).__name__}, not a class (or function) that "
                                                  "builds a torch.nn.Module")
    return found


def blamed(target: str, kwargs: dict) -> tuple[str, str]:
    """The key a failed build is told under: model.kwargs when any were given, else model.target."""
    return ("model.kwargs", json.dumps(kwargs)) if kwargs else ("model.target", target)


def build(make: Any, target: str, kwargs: dict) -> nn.Module:
    """make(**kwargs), which must be an nn.Module. ConfigError naming model.kwargs when the
    constructor refuses them, model.target when it builds something else."""
    try:
        model = make(**kwargs)
    except USER_CODE_ERRORS as e:
        raise ConfigError(*blamed(target, kwargs), f"{target}(**model.kwargs) failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.target", target, f"builds an object of type {type(model).__name__}, not a torch.nn.Module")
    return model


def check_forward(model: nn.Module, target: str, shape: tuple[int, int, int], classes: int, dataset: str) -> None:
    """Forwards on zeros of each PROBE_BATCHES size return finite floating (batch, classes) logits."""
    for batch in PROBE_BATCHES:
        check_one_forward(model, target, batch, shape, classes, dataset)


@torch.no_grad()
def check_one_forward(model: nn.Module, target: str, batch: int, shape: tuple[int, int, int], classes: int,
                      dataset: str) -> None:
    want = (batch, classes)
    try:
        out = model(torch.zeros(batch, *shape))
    except USER_CODE_ERRORS as e:
        raise ConfigError("model.target", target, f"its forward on a batch of zeros {[batch, *shape]} "
                                                  f"failed: {type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError("model.target", target, f"its forward returns a {type(out).__name__}, not a tensor of logits")
    if tuple(out.shape) != want:
        raise ConfigError("model.target", target, f"returns shape {list(out.shape)} for {batch} images of "
                                                  f"{dataset} {list(shape)}; must be {list(want)} (logits over its "
                                                  f"{classes} classes)")
    if not out.is_floating_point():
        raise ConfigError("model.target", target, f"returns {out.dtype} logits; must be floating point")
    if not torch.isfinite(out).all():
        raise ConfigError("model.target", target, "returns non-finite logits (NaN or Inf) for a batch of zeros")


# ---------------------------------------------------------------- fusing
def stack_refusal(model: nn.Module, target: str, shape: tuple[int, int, int]) -> Optional[str]:
    """Why the fused engine cannot stack `model` (None: it can): not a Sequential, a layer it
    does not stack, or a stacked forward that differs from the model's own."""
    from regexp.stack import STACKABLE

    if type(model) is not nn.Sequential:
        kind = "a subclass of nn.Sequential (its forward may be its own)" if isinstance(model, nn.Sequential) \
            else "not an nn.Sequential"
        return f"model.target={target} is a {type(model).__name__}, {kind}: the fused engine replays " \
               "only plain Sequential models of the layers it stacks"
    for name, module in model.named_modules():
        if name and type(module) not in (nn.Sequential, Residual, *STACKABLE):
            return f"its layer {name} is a {type(module).__name__}, which the fused engine does not stack " \
                   f"(it stacks {', '.join(t.__name__ for t in STACKABLE)})"
    return replay_refusal(model, shape)


def replay_refusal(model: nn.Module, shape: tuple[int, int, int]) -> Optional[str]:
    """Two copies of `model` stacked: their stacked forward must give the model's own logits
    (a layer on the wrong kind of input, a Flatten of other dims, would not)."""
    from regexp.stack import Stack

    model = copy.deepcopy(model).eval()
    x = torch.randn(PROBE_BATCH, *shape, generator=torch.Generator().manual_seed(0))
    no_loss_terms = SimpleNamespace(criterion=SimpleNamespace(label_smoothing=0.0), penalty=None)  # forward only
    with torch.no_grad():
        own = model(x)
        try:
            stack = Stack(model, [copy.deepcopy(model) for _ in range(2)], [0.0] * 2, [0.0] * 2, [no_loss_terms] * 2,
                          own_dropout=True)
            stacked = stack.forward(x, False)
        except USER_CODE_ERRORS as e:
            return f"the fused engine's replay of it fails: {type(e).__name__}: {e}"
    if stacked.shape != (2, *own.shape) or not all(torch.allclose(s, own, rtol=1e-4, atol=1e-5) for s in stacked):
        return "the fused engine's replay of it differs from its own forward"
    return None
