"""`regexp check`: the recipe checks before a long run (docs/check.md), on the composed config.

Each check builds what `regexp train` builds (regexp.train.build_state / build_recipe) and
steps it with regexp.step.train_step, on a few batches, seeded from cfg.seed. Nothing is
written: no run dir, no W&B. `run_checks(cfg, data)` is the same from Python, on any
DataSplits (tests hand it broken data directly).
"""

import hashlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from omegaconf import DictConfig

from regexp.config import resolve_precision
from regexp.data import DataSplits
from regexp.state import TrainState, seed_everything
from regexp.step import MicroBatch, Recipe, forward_backward, train_step
from regexp.train import Plan, build_recipe, build_state, evaluate

# The thresholds (docs/check.md says why each)
INIT_RANGE = (0.5, 2.0)  # loss at init between these multiples of ln(classes)
INIT_BATCH = 512  # samples the loss at init is measured on
OVERFIT_BATCH = 32  # samples of the batch to overfit
OVERFIT_STEPS = 200  # step budget to reach 100% accuracy on it
OVERFIT_EVERY = 10  # steps between looks at its accuracy (one host sync each)
DEPENDENCE_STEPS = 30  # training steps before the input dependence is measured
DEPENDENCE_SAMPLES = 1024  # held-out samples it is measured on
DEPENDENCE_MARGIN = 0.1  # zeroed inputs must raise the held-out loss by this share of ln(classes)
BALANCE_RATIO = 0.5  # the smallest class at least this share of the largest
MEAN_LIMIT = 0.2  # |per-channel mean| at most this
STD_RANGE = (2 / 3, 3 / 2)  # per-channel std within this
DUPLICATE_LIMIT = 0.01  # share of the test set that may have an exact copy among the training images
EXIT_FAILED = 3


@dataclass(frozen=True)
class CheckResult:
    """One check: whether it passed, what it measured (a line with its numbers), and what to do
    when it fails."""

    name: str
    passed: bool
    measured: str
    advice: str
    seconds: float = 0.0

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        todo = "" if self.passed else f"; try: {self.advice}"
        return f"{verdict}  {self.name:<18} {self.measured}{todo}  ({self.seconds:.1f} s)"


@dataclass
class Bench:
    """What every check reads: the config, the data, where they live, and the check's own draws."""

    cfg: DictConfig
    data: DataSplits
    precision: str

    def fresh_state(self) -> tuple[TrainState, Recipe]:
        """The run's model at init, its optimizer at its configured lr (no schedule: a warmup
        would hold a short check near lr 0), and its step recipe; uncompiled."""
        seed_everything(self.cfg.seed)
        state = build_state(self.cfg, self.data, self.data.train_y.device, self.precision,
                            Plan.from_config(self.cfg, len(self.data.train_y)))
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 1.0)
        state.net = state.model
        return state, build_recipe(self.cfg, self.data, self.precision)

    def sample(self, n: int, salt: int) -> torch.Tensor:
        """`n` training indices (fewer when the split is smaller), drawn from the seed and `salt`."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + salt)
        picked = torch.randperm(len(self.data.train_y), generator=generator)[:n]
        return picked.to(self.data.train_y.device)

    def evaluate(self, state: TrainState, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return evaluate(state.model, x, y, self.cfg.eval_batch_size, self.precision)

    @property
    def chance_loss(self) -> float:
        return math.log(self.data.num_classes)


def one_batch(index: torch.Tensor) -> list[MicroBatch]:
    return [MicroBatch(index, len(index), 1.0)]


def loss_at_init(bench: Bench) -> CheckResult:
    """Cross-entropy of the model at init against ln(classes): logits near zero give it."""
    state, _ = bench.fresh_state()
    index = bench.sample(INIT_BATCH, 1)
    loss = bench.evaluate(state, bench.data.train_x[index], bench.data.train_y[index])["loss"]
    expected = bench.chance_loss
    low, high = INIT_RANGE
    return CheckResult("loss at init", low * expected <= loss <= high * expected,
                       f"{loss:.4g} vs ln({bench.data.num_classes}) = {expected:.4g} (allowed {low * expected:.3g}.."
                       f"{high * expected:.3g})",
                       "the output layer starts too large (or too confident): a smaller init scale (init.std, "
                       "init=default or a scheme matching the activation), or scale the final layer's weights down")


def overfit_one_batch(bench: Bench) -> CheckResult:
    """The configured optimizer on one small batch, again and again, must reach 100% accuracy
    on it within the step budget."""
    state, recipe = bench.fresh_state()
    recipe.augment = None  # the same batch each step: it is memorized, not generalized
    index = bench.sample(OVERFIT_BATCH, 2)
    x, y = bench.data.train_x[index], bench.data.train_y[index]
    result = {"loss": math.nan, "acc": 0.0}
    steps = 0
    while steps < OVERFIT_STEPS and result["acc"] < 1.0:
        for _ in range(OVERFIT_EVERY):
            train_step(state, recipe, one_batch(index))
        steps += OVERFIT_EVERY
        result = bench.evaluate(state, x, y)
    return CheckResult("overfit one batch", result["acc"] == 1.0,
                       f"{len(y)} samples: accuracy {result['acc']:.0%}, loss {result['loss']:.3g} after {steps} steps "
                       f"(budget {OVERFIT_STEPS})",
                       "the model cannot fit even this: raise optimizer.lr (or lower it if the loss is rising), "
                       "lower the regularization, check the labels match the inputs")


def gradients_reach(bench: Bench) -> CheckResult:
    """One backward at init: every trainable parameter's gradient exists, is finite and not all zero."""
    state, recipe = bench.fresh_state()
    index = bench.sample(bench.cfg.batch_size, 3)
    recipe.augment = None
    forward_backward(state, recipe, one_batch(index), state.model)
    params = [(name, p) for name, p in state.model.named_parameters() if p.requires_grad]
    missing = [name for name, p in params
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum()]
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return CheckResult("gradients", not missing,
                       f"{len(params) - len(missing)} of {len(params)} parameters get a finite non-zero gradient"
                       + (f"; none for: {shown}" if missing else ""),
                       "a parameter outside the loss's path (unused layer, detached tensor), a dead activation "
                       "or a non-finite loss: check the forward pass and the init")


def output_depends_on_input(bench: Bench) -> CheckResult:
    """After a short training on real batches, the held-out loss with the inputs zeroed (the
    data set's mean image) must be worse than with the real inputs."""
    state, recipe = bench.fresh_state()
    generator = torch.Generator().manual_seed(bench.cfg.seed * 1000 + 4)
    n, batch = len(bench.data.train_y), min(bench.cfg.batch_size, len(bench.data.train_y))
    for _ in range(DEPENDENCE_STEPS):
        train_step(state, recipe, one_batch(torch.randint(n, (batch,), generator=generator).to(bench.data.train_y.device)))
    split, x, y = held_out(bench.data)
    real = bench.evaluate(state, x, y)["loss"]
    zeroed = bench.evaluate(state, torch.zeros_like(x), y)["loss"]
    margin = DEPENDENCE_MARGIN * bench.chance_loss
    return CheckResult("output uses input", zeroed - real >= margin,
                       f"{split} loss {real:.3g} with real inputs, {zeroed:.3g} with inputs zeroed after "
                       f"{DEPENDENCE_STEPS} steps (zeroed must be worse by ≥ {margin:.3g})",
                       "the model learns nothing from the images: check that labels belong to their images "
                       "(not shuffled), that the inputs reach the model, and the lr")


def held_out(data: DataSplits) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The validation split, else the test split, else the training split: up to DEPENDENCE_SAMPLES."""
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y),
                        ("train", data.train_x, data.train_y)):
        if len(y):
            return split, x[:DEPENDENCE_SAMPLES], y[:DEPENDENCE_SAMPLES]
    raise ValueError("no samples in any split")


def labels_balanced(bench: Bench) -> CheckResult:
    counts = torch.bincount(bench.data.train_y, minlength=bench.data.num_classes).tolist()
    smallest, largest = min(counts), max(counts)
    ratio = smallest / largest if largest else 0.0
    return CheckResult("labels balanced", ratio >= BALANCE_RATIO,
                       f"training classes {smallest}..{largest} samples (class {counts.index(smallest)} smallest, "
                       f"{counts.index(largest)} largest): ratio {ratio:.2f} (at least {BALANCE_RATIO})",
                       "rebalance the training set (resample, or more data for the small classes), check the "
                       "labels, or read accuracy per class rather than overall")


def inputs_normalized(bench: Bench) -> CheckResult:
    x = bench.data.train_x
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
    low, high = STD_RANGE
    passed = all(abs(m) <= MEAN_LIMIT and low <= s <= high for m, s in zip(mean, std))
    return CheckResult("inputs normalized", passed,
                       f"per-channel mean {numbers(mean)}, std {numbers(std)} "
                       f"(|mean| ≤ {MEAN_LIMIT}, std in {low:.2f}..{high:.2f})",
                       "normalize the inputs: subtract the training set's per-channel mean and divide by its std "
                       "(images in 0..255 or 0..1 are not normalized)")


def numbers(values: list[float]) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def no_test_duplicates(bench: Bench) -> CheckResult:
    """Exact copies: test images whose bytes hash as a training (or validation) image's do."""
    data = bench.data
    if not len(data.test_y):
        return CheckResult("train/test copies", True, "no test split: nothing to compare", "")
    seen = image_hashes(data.train_x) | image_hashes(data.val_x)
    copies = sum(h in seen for h in hash_list(data.test_x))
    share = copies / len(data.test_y)
    return CheckResult("train/test copies", share <= DUPLICATE_LIMIT,
                       f"{copies} of {len(data.test_y)} test images ({share:.2%}) are exact copies of training "
                       f"images (at most {DUPLICATE_LIMIT:.0%})",
                       "remove the copies from one split: a test score on them measures memory, not generalization")


def hash_list(x: torch.Tensor) -> list[bytes]:
    rows = x.detach().to("cpu", torch.float32).contiguous().flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def image_hashes(x: torch.Tensor) -> set[bytes]:
    return set(hash_list(x))


CHECKS: tuple[Callable[[Bench], CheckResult], ...] = (
    loss_at_init, overfit_one_batch, gradients_reach, output_depends_on_input,
    labels_balanced, inputs_normalized, no_test_duplicates,
)


def run_checks(cfg: DictConfig, data: DataSplits) -> list[CheckResult]:
    """Every check on the validated config `cfg` and `data` (on the device the checks run on),
    in order, each timed."""
    device = data.train_y.device
    bench = Bench(cfg, data, resolve_precision(cfg, device.type))
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(check_threads(cfg, device))
    try:
        for check in CHECKS:
            started = time.perf_counter()
            result = check(bench)
            results.append(replace(result, seconds=time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    return results


def check_threads(cfg: DictConfig, device: torch.device) -> int:
    """device.threads when set; else on the CPU one thread: the checks' small steps gain little
    from two, and lose much when other processes hold the cores (their numbers, like a
    deterministic run's, do not depend on the count)."""
    if cfg.device.threads != "auto":
        return int(cfg.device.threads)
    return 1 if device.type == "cpu" else torch.get_num_threads()


# ---------------------------------------------------------------- the command
def main(args: list[str]) -> int:
    """`regexp check [OVERRIDES]`: the config composed, validated and its data found as
    `regexp train`'s pre-flight does; then each check's line. 0 all pass, 3 a check failed;
    bad input raises ConfigError / UsageError (exit 2)."""
    from regexp.compose import check_job, compose, refuse_sweep, with_added_groups, with_resumed_run
    from regexp.config import resolve_device
    from regexp.data import load_data

    overrides = with_added_groups(with_resumed_run(overrides_of(args)))  # resume=RUN_DIR: that run's config
    refuse_sweep(overrides, "regexp check checks one config: give one value (a sweep's jobs one at a time)")
    cfg = check_job(compose(overrides))
    data = load_data(cfg.dataset, torch.device(resolve_device(cfg)))
    print(f"regexp check: {cfg.dataset.name} ({len(data.train_y)} train / {len(data.val_y)} val / "
          f"{len(data.test_y)} test) · {cfg.model.name} · {cfg.optimizer.name} lr {cfg.optimizer.lr:g} · "
          f"{data.train_y.device} · seed {cfg.seed}", flush=True)
    results = []
    for result in run_checks(cfg, data):
        print(result.line(), flush=True)
        results.append(result)
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks pass"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return EXIT_FAILED if failed else 0


def overrides_of(args: list[str]) -> list[str]:
    """The command line as overrides; a flag or a word that is none is a UsageError."""
    from regexp.compose import is_override
    from regexp.rundir import UsageError

    for arg in args:
        if arg in ("-m", "--multirun"):
            raise UsageError(f"{arg}: regexp check checks one config, not a sweep; drop -m and give one value of "
                             "each swept key (e.g. seed=0)")
        if arg.startswith("-"):
            raise UsageError(f"{arg}: not a flag of regexp check; values are overrides: key=value (regexp check --help)")
        if not is_override(arg):
            raise UsageError(f"{arg}: neither an override nor a flag; overrides are key=value or group=option "
                             "(regexp check --help)")
    return list(args)
