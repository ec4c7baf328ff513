"""`regexp lr-find`: Smith's learning-rate range test, a few seeds at once.

Each seed's model trains from its own initialization on its own batches while the learning
rate rises exponentially from `--start` to `--end` over `--steps` optimizer steps; the loss
of each step is recorded and smoothed (an exponential moving average, bias-corrected). A
seed stops when its smoothed loss passes DIVERGED x its best (or is not finite). The seeds
train as one fused group (regexp.stack) when the model fuses, else one after another.

The suggestion of a seed follows one rule (RULES; docs/lr-find.md says why "steepest" is
the default); the overall suggestion is the geometric mean of the seeds' suggestions, and
their spread is max / min. Everything else is the training of `regexp train`: the same
composed and validated config, model, init, optimizer, regularizers, clipping and
accumulation; the lr schedule is left out (the test sets the lr of every step itself).
"""

import math
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

USAGE = """\
usage: regexp lr-find [OVERRIDES...] [--start LR] [--end LR] [--steps N] [--seeds N] [--rule RULE] [--solo]

Smith's learning-rate range test on the composed config (the overrides of regexp train):
the lr rises exponentially from --start to --end over --steps optimizer steps, for --seeds
models with seeds seed, seed+1, ... trained side by side; each seed's suggestion follows
--rule, the overall one is their geometric mean, the spread their max/min ratio.
  --start LR    first lr (default 1e-07, at least {min_lr:g})
  --end LR      last lr (default 10, at most {max_lr:g}, as optimizer.lr)
  --steps N     lr steps from start to end (default 100, {min_steps} to {max_steps})
  --seeds N     models, each with its own seed (default 4, at most {max_seeds})
  --rule RULE   steepest: the lr where the smoothed loss falls fastest (default);
                min10: a tenth of the lr of the lowest smoothed loss
  --solo        train the seeds one after another instead of side by side
Writes lr_find.json and lr_find.png to ${{out_dir}}/lr-find/<date>/<time>/ and prints the
suggestion as an override: optimizer.lr=...
"""

MIN_STEPS = 10  # fewer points do not make a curve to read a slope from
# 100 steps a decade over the widest range (MIN_LR to MAX_STEP) take 1800: more add no point a
# slope needs, and only make the command run for hours before it says anything
MAX_STEPS = 10000
MIN_LR = 1e-12  # smaller: lr x gradient falls below float32's resolution of a weight, the step does nothing
SMOOTHING = 0.9  # the loss's moving-average factor: about the last 10 steps
DIVERGED = 4.0  # a smoothed loss this many times the best so far ends a seed's test
ONE_VALUE = "lr-find takes one value per key and draws its seeds with --seeds (seed= sets the first)"
FLAGS = {"--start": float, "--end": float, "--steps": int, "--seeds": int, "--rule": str}


# ---------------------------------------------------------------- the suggestion rules
def steepest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr where the smoothed loss falls fastest per decade of lr, up to its minimum:
    the middle of the range where a larger lr still buys a faster fall."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    if lowest == 0:  # the loss only rose: no fall to find; the smallest lr tried
        return lrs[0]
    slopes = [(smoothed[i + 1] - smoothed[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(lowest)]
    best = min(range(lowest), key=slopes.__getitem__)
    return math.sqrt(lrs[best] * lrs[best + 1])  # the slope lies between the two points


def min10(lrs: list[float], smoothed: list[float]) -> float:
    """A tenth of the lr of the lowest smoothed loss (fastai's `minimum`)."""
    return lrs[min(range(len(smoothed)), key=smoothed.__getitem__)] / 10


RULES: dict[str, Callable[[list[float], list[float]], float]] = {"steepest": steepest, "min10": min10}
RULE_TEXT = {"steepest": "the lr of the steepest fall of the smoothed loss (per decade of lr), before its minimum",
             "min10": "a tenth of the lr of the lowest smoothed loss"}


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average, bias-corrected (so the first points are not pulled to 0)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def diverged_at(smoothed: list[float]) -> Optional[int]:
    """The first step whose smoothed loss is not finite or passes DIVERGED x the best before it."""
    best = math.inf
    for i, value in enumerate(smoothed):
        if not math.isfinite(value) or value > DIVERGED * best:
            return i
        best = min(best, value)
    return None


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


# ---------------------------------------------------------------- the command line
@dataclass(frozen=True)
class Request:
    overrides: list[str]
    start: float = 1e-7
    end: float = 10.0
    steps: int = 100
    seeds: int = 4
    rule: str = "steepest"
    solo: bool = False


def parse_args(args: list[str]) -> Request:
    """The overrides and the flags (`--steps 50` or `--steps=50`); ConfigError / UsageError naming the flag."""
    from regexp.compose import is_override
    from regexp.rundir import ConfigError, UsageError

    values: dict[str, Any] = {}
    overrides, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if is_override(arg):
            overrides.append(arg)
            continue
        if arg in ("-m", "--multirun"):
            raise UsageError(f"{arg}: not a sweep: {ONE_VALUE}")
        name, given, value = arg.partition("=")
        if name == "--solo" and not given:
            values["solo"] = True
            continue
        if name not in FLAGS:
            raise UsageError(f"{arg}: not a flag of regexp lr-find ({', '.join([*FLAGS, '--solo'])}); "
                             "overrides are key=value (regexp lr-find --help)")
        if not given:
            if not rest or is_override(rest[0]) or rest[0].startswith("--"):
                raise UsageError(f"{name}: takes a value (regexp lr-find --help)")
            value = rest.pop(0)
        try:
            values[name[2:]] = FLAGS[name](value)
        except ValueError:
            raise ConfigError(name, value, f"must be {'an integer' if FLAGS[name] is int else 'a number'}") from None
    request = Request(overrides, **values)
    check_request(request)
    return request


def check_request(r: Request) -> None:
    from regexp.compose import refuse_sweep
    from regexp.config import MAX_STEP
    from regexp.fusion import MAX_MODELS
    from regexp.rundir import ConfigError

    if not (math.isfinite(r.start) and MIN_LR <= r.start <= MAX_STEP):
        raise ConfigError("--start", r.start, f"must be a finite lr >= {MIN_LR:g} (a smaller step changes no float32 "
                                              f"weight) and <= {MAX_STEP:g}")
    if not (math.isfinite(r.end) and r.start < r.end <= MAX_STEP):
        raise ConfigError("--end", r.end, f"must be a finite lr above --start ({r.start:g}): the range rises; and "
                                          f"<= {MAX_STEP:g}, regexp train's largest optimizer.lr")
    if not MIN_STEPS <= r.steps <= MAX_STEPS:
        raise ConfigError("--steps", r.steps, f"must be >= {MIN_STEPS} and <= {MAX_STEPS}")
    if not MAX_MODELS[0] <= r.seeds <= MAX_MODELS[1]:
        raise ConfigError("--seeds", r.seeds, f"must be >= {MAX_MODELS[0]} and <= {MAX_MODELS[1]} "
                                              "(the fused launcher's hydra.launcher.max_models)")
    if r.rule not in RULES:
        raise ConfigError("--rule", r.rule, f"one of {', '.join(RULES)}")
    for override in r.overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") in ("resume", "optimizer.lr"):
            raise ConfigError(key, value, "has no place in lr-find: the test sets the lr of each step and starts "
                                          "each seed afresh")
    refuse_sweep(r.overrides, ONE_VALUE)


def main(args: list[str]) -> int:
    """`regexp lr-find`: bad input raises ConfigError / UsageError before anything is written."""
    if "-h" in args or "--help" in args:
        from regexp.config import MAX_STEP
        from regexp.fusion import MAX_MODELS

        print(USAGE.format(min_steps=MIN_STEPS, max_steps=MAX_STEPS, max_seeds=MAX_MODELS[1], min_lr=MIN_LR,
                           max_lr=MAX_STEP), end="")
        return 0
    request = parse_args(args)
    cfg, out_dir = precheck(request.overrides)
    check_memory(cfg, request.seeds)
    from regexp.lock import writing

    with removed_on_failure(out_dir), writing([out_dir], "out_dir"):
        result = find(cfg, request)
        write_results(out_dir, result, request)
    print_result(result, request, out_dir)
    return 0


def check_memory(cfg: Any, seeds: int) -> None:
    """ConfigError naming --seeds when more seeds than the fused launcher would put in one group
    (the same estimate against the same budget; one model always) are asked for: every seed's
    model is built up front, fused or not."""
    from regexp.fusion import memory_budget, model_memory
    from regexp.rundir import ConfigError

    budget, each = memory_budget({cfg.device.name}), model_memory(cfg)
    if budget is None or each <= 0:
        return
    fits = max(1, budget // each)
    if seeds > fits:
        raise ConfigError("--seeds", seeds, f"{seeds} models need about {seeds * each / 2**20:,.0f} MiB, more than "
                                            f"the {budget / 2**20:,.0f} MiB to spend: at most {fits} seeds fit this "
                                            "config")


@contextmanager
def removed_on_failure(out_dir: Path) -> Iterator[None]:
    """On an error, the run dir and the parents this command created are removed again while
    empty (its lock released first), so a crash leaves nothing; the error goes on as it is."""
    from regexp.rundir import missing_dirs, remove_empty_dirs

    created = missing_dirs(out_dir)
    try:
        yield
    except BaseException:
        remove_empty_dirs(created)
        raise


def precheck(overrides: list[str]) -> tuple[Any, Path]:
    """The config as `regexp train` composes and validates it (data found), and the output dir,
    writable and free: ConfigError / RunError before anything is written."""
    from regexp.compose import check_job, compose
    from regexp.config import check_run_dir_text, check_writable
    from regexp.lock import check_free

    cfg = check_job(compose(overrides))
    out_dir = Path(str(cfg.out_dir)) / "lr-find" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    check_run_dir_text(str(out_dir), "out_dir", cfg.out_dir)
    check_writable(out_dir, "out_dir", cfg.out_dir)
    check_free(out_dir, "out_dir", cfg.out_dir)
    return cfg, out_dir


# ---------------------------------------------------------------- the test
@dataclass
class Curve:
    seed: int
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = math.nan
    diverged_at_lr: Optional[float] = None


@dataclass
class Result:
    curves: list[Curve]
    rule: str
    fused: bool
    why_alone: Optional[str]
    seconds: float
    config: dict
    suggestion: float = math.nan
    spread: float = math.nan

    def as_json(self, request: Request) -> dict:
        return {"suggestion": self.suggestion, "spread": self.spread, "rule": self.rule,
                "rule_text": RULE_TEXT[self.rule],
                "overall": "geometric mean of the seeds' suggestions; spread: max / min of them",
                "range": {"start": request.start, "end": request.end, "steps": request.steps},
                "smoothing": SMOOTHING, "diverged": f"smoothed loss > {DIVERGED:g} x the best, or not finite",
                "fused": self.fused, "seconds": round(self.seconds, 3), "overrides": request.overrides,
                "seeds": [vars(c) for c in self.curves], "config": self.config}


def find(cfg: Any, request: Request) -> Result:
    """The range test of every seed (fused when the model allows), each curve cut where it
    diverged, and the suggestions."""
    import torch
    from omegaconf import open_dict

    from regexp.config import recorded_container, resolve_device
    from regexp.fusion import model_alone
    from regexp.train import torch_settings

    configs = []
    for i in range(request.seeds):
        seeded = cfg.copy()
        with open_dict(seeded):
            seeded.seed = cfg.seed + i
        configs.append(seeded)
    model_reason = model_alone(cfg)
    fuse = request.seeds > 1 and not request.solo and model_reason is None
    why_alone = None if fuse or request.seeds == 1 else "--solo" if request.solo else model_reason
    lrs = lr_schedule(request.start, request.end, request.steps)
    began = time.perf_counter()
    with torch_settings(cfg, torch.device(resolve_device(cfg))):
        losses = run_seeds(configs, lrs, fuse)
    seconds = time.perf_counter() - began
    curves = [curve_of(c.seed, lrs, seed_losses, request.rule) for c, seed_losses in zip(configs, losses)]
    result = Result(curves, request.rule, fuse, why_alone, seconds, recorded_container(cfg))
    suggestions = [c.suggestion for c in curves]
    result.suggestion = math.exp(sum(map(math.log, suggestions)) / len(suggestions))
    result.spread = max(suggestions) / min(suggestions)
    return result


def curve_of(seed: int, lrs: list[float], losses: list[float], rule: str) -> Curve:
    """A seed's curve up to where it diverged (that step left out), and its suggestion."""
    smoothed = smooth(losses)
    end = diverged_at(smoothed)
    kept = len(losses) if end is None else max(end, 1)
    curve = Curve(seed, lrs[:kept], losses[:kept], smoothed[:kept])
    curve.diverged_at_lr = None if end is None else lrs[end]
    curve.suggestion = RULES[rule](curve.lrs, curve.smoothed)
    return curve


def run_seeds(configs: list, lrs: list[float], fuse: bool) -> list[list[float]]:
    """Each seed's training loss per step at the lrs given; a seed stops when its curve diverges."""
    import torch

    from regexp.config import resolve_device, resolve_precision
    from regexp.data import load_data
    from regexp.state import rng_state, seed_everything
    from regexp.stack import fused_step
    from regexp.step import NO_PROBE, train_step
    from regexp.train import Plan, build_recipe, build_state, threads_for

    cfg = configs[0]
    device = torch.device(resolve_device(cfg))
    precision = resolve_precision(cfg, device.type)
    data = load_data(cfg.dataset, device)
    plan = Plan.from_config(cfg, len(data.train_y))
    states, recipes = [], []
    for c in configs:
        seed_everything(c.seed)
        state = build_state(c, data, device, precision, plan)
        state.rng = rng_state()  # its own data order, as a fused member of regexp train draws it
        state.model.train()
        states.append(state)
        recipes.append(build_recipe(c, data, precision))
    threads_for(cfg, states[0].model, data, device, None)

    def windows(state) -> list:
        """The state's next window of batches; past the epoch's last one, a new epoch's order."""
        if state.perm is None or state.window == len(plan.windows):
            with state.own_random():
                state.perm = torch.randperm(len(data.train_y), device=data.train_y.device)
            state.window = 0
        state.window += 1
        return plan.batches(state.perm, state.window - 1)

    if fuse:
        stack = stack_of(cfg, data, states, recipes)
        return steps(lrs, states, configs, lambda: fused_step(stack, states, [windows(s) for s in states],
                                                              [NO_PROBE] * len(states), [False] * len(states)))
    return [steps(lrs, [state], [c], lambda: [train_step(state, recipe, windows(state))])[0]
            for state, recipe, c in zip(states, recipes, configs)]


def stack_of(cfg: Any, data: Any, states: list, recipes: list) -> Any:
    """The seeds' models as one stack (regexp.stack), their optimizers stepping at once where they allow."""
    import torch

    from regexp.models import build_model, dropout_rates
    from regexp.stack import Stack, StackedUpdate
    from regexp.state import seed_everything

    with torch.device("meta"):  # the architecture only: no memory, no random draws
        template = build_model(cfg.model, cfg.norm, cfg.regularizer.dropout, data.input_shape, data.num_classes)
    p, p_input = dropout_rates(cfg.regularizer.dropout)
    stack = Stack(template, [s.model for s in states], [p] * len(states), [p_input] * len(states), recipes)
    optimizers = [s.optimizer for s in states]
    if StackedUpdate.fits(optimizers, any(s.scaler.is_enabled() for s in states)):
        stack.update = StackedUpdate(stack, optimizers)
    seed_everything(cfg.seed)  # the group's dropout masks and augmentation draw from here
    return stack


def steps(lrs: list[float], states: list, configs: list, step: Callable[[], list]) -> list[list[float]]:
    """The range test of `states` (one, or a fused group's): `step()` takes one step of all
    of them; each seed's lr set before it. A seed leaves the test when its curve diverges."""
    from regexp.optim import scaled_lr

    losses: list[list[float]] = [[] for _ in states]
    live = list(range(len(states)))  # the seeds whose test goes on
    for lr in lrs:
        for i in live:
            for group in states[i].optimizer.param_groups:
                group["lr"] = scaled_lr(lr, configs[i].accumulation.steps, configs[i].accumulation.scale_lr)
        results = step()
        for i in live:
            losses[i].append(float(results[i].loss_sum) / results[i].samples)
        live = [i for i in live if diverged_at(smooth(losses[i])) is None]
        if not live:
            break
    return losses


# ---------------------------------------------------------------- outputs
def write_results(out_dir: Path, result: Result, request: Request) -> None:
    """lr_find.json and lr_find.png, each written whole (atomically)."""
    from regexp.plotting import save_figure
    from regexp.rundir import write_json

    write_json(out_dir / "lr_find.json", result.as_json(request))
    save_figure(figure(result), out_dir / "lr_find.png")


def figure(result: Result) -> Any:
    """Each seed's raw (faint) and smoothed loss against the lr (log), its suggestion marked,
    and the overall suggestion as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for curve, color in zip(result.curves, [f"C{i % 10}" for i in range(len(result.curves))]):
        ax.plot(curve.lrs, curve.losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(curve.lrs, curve.smoothed, color=color, linewidth=1.5, label=f"seed {curve.seed}")
        ax.axvline(curve.suggestion, color=color, linestyle=":", linewidth=1)
    ax.axvline(result.suggestion, color="black", linestyle="--", linewidth=1.2,
               label=f"suggestion {result.suggestion:.2g} (spread {result.spread:.2f}x)")
    ax.set_xscale("log")
    start = max(c.smoothed[0] for c in result.curves)
    lowest = min(min(c.smoothed) for c in result.curves)
    ax.set_ylim(max(0.0, lowest - 0.1 * (start - lowest)), start + 0.5 * (start - lowest) + 1e-3)  # raw spikes cut off
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test · rule {result.rule}" + (" · seeds fused" if result.fused else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def print_result(result: Result, request: Request, out_dir: Path) -> None:
    """The table of seeds, the suggestion as an override and as the whole train command."""
    from regexp.tracking import plural

    if result.why_alone:
        print(f"lr-find: the seeds trained one after another ({result.why_alone})")
    print(f"{'seed':>6}  {'suggestion':>10}  {'lowest loss':>11}  {'at lr':>8}  {'diverged at':>11}")
    for c in result.curves:
        lowest = min(range(len(c.smoothed)), key=c.smoothed.__getitem__)
        diverged = f"{c.diverged_at_lr:.2g}" if c.diverged_at_lr is not None else "-"
        print(f"{c.seed:>6}  {c.suggestion:>10.2g}  {c.smoothed[lowest]:>11.4f}  {c.lrs[lowest]:>8.2g}  {diverged:>11}")
    print(f"suggestion {result.suggestion:.2g}: geometric mean of {plural(len(result.curves), 'seed')}, spread "
          f"{result.spread:.2f}x (max/min); rule {result.rule}: {RULE_TEXT[result.rule]} · {result.seconds:.1f} s")
    print(f"{out_dir}: lr_find.json, lr_find.png")
    line = f"optimizer.lr={result.suggestion:.2g}"
    print(line)
    print(shlex.join(["regexp", "train", *request.overrides, line]))
