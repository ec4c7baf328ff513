"""One run: build the TrainState, then `fit`, the epoch/window loop (each step as regexp.step orders it), then the
records. `train` wraps `fit` with what every run gets: summary.json from start to end, the
metric sinks, W&B, signals, the diagnosis and the console.

The hot path keeps running sums on the device and syncs with the host only on log steps
and at the end of an epoch.
"""

import contextlib
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from regexp.config import flat, recorded_container, resolve_device, resolve_precision, user_built, warnings_for
from regexp.data import DataSplits, load_data
from regexp.diagnose import Watch, diagnose
from regexp.init import init_weights
from regexp.live import LiveFindings
from regexp.lock import LOCK, writing
from regexp.models import build_model, dropout_rates
from regexp.monitor import Monitor, NonfiniteGuard, NonfinitePolicy, trace_nonfinite
from regexp.optim import build_optimizer, build_scheduler, scaled_lr, schedule_warnings
from regexp.prune import prune_at_rung
from regexp.regularizers import EarlyStopping, build_criterion, build_penalty, weights
from regexp.rundir import (
    CONTINUATION,
    DIAGNOSIS,
    ENDED_EARLY,
    METRICS,
    SUMMARY,
    ConfigError,
    Interrupted,
    MetricsFile,
    RunError,
    Status,
    Summary,
    SummaryRecord,
    atomic_write,
    continues_under,
    keep_metrics_up_to,
    load_summary,
    open_regular,
    read_metrics,
    read_summary,
    split_finite,
    write_diagnosis,
)
from regexp.stack import Stack, StackedUpdate, evaluate_stack, fused_step
from regexp.state import TrainState, move_to, rng_state, seed_everything
from regexp.step import Recipe, StepResult, autocast, forward_backward, train_step, window_batches, window_sizes
from regexp.threads import fastest_threads
from regexp.tracking import GroupConsole, HistogramFile, Reporter, Tracker, plural, why_ended
from regexp.wandb_logger import WandbServer, wandb_sinks

log = logging.getLogger("regexp")

SMOKE_STEPS = 2  # a smoke run's optimizer steps (accumulation windows), whatever epochs and max_steps say
SMOKE_SETS_ASIDE = ("epochs", "max_steps", "eval_every", "monitor.log_every", "checkpoint.every_steps")  # Plan.from_config


# ---------------------------------------------------------------- building a run
@dataclass
class Plan:
    """The run's shape: each epoch's accumulation windows and where each starts, when to
    log, save, evaluate and stop."""

    windows: list[list[int]]
    offsets: list[int]  # first sample of each window in the epoch's order
    epochs: int
    max_steps: Optional[int]
    log_every: int
    histogram_every: Optional[int]
    checkpoint_every: Optional[int]
    eval_every: int

    @classmethod
    def from_config(cls, cfg: DictConfig, n_train: int) -> "Plan":
        windows = window_sizes(n_train, cfg.batch_size, cfg.accumulation.steps, 2 if cfg.norm.batch_statistics else 1)
        offsets = list(accumulate(map(sum, windows), initial=0))[:-1]
        if cfg.smoke:  # smoke wins: SMOKE_STEPS steps, each a log step, one evaluation at the end
            epochs = math.ceil(SMOKE_STEPS / len(windows))  # an epoch of fewer windows: the next one's too
            return cls(windows, offsets, epochs, SMOKE_STEPS, 1, cfg.monitor.histogram_every, None, epochs)
        return cls(windows, offsets, cfg.epochs, cfg.max_steps, cfg.monitor.log_every, cfg.monitor.histogram_every,
                   cfg.checkpoint.every_steps, cfg.eval_every)

    @property
    def total_steps(self) -> int:
        return min(self.epochs * len(self.windows), self.max_steps or self.epochs * len(self.windows))

    def batches(self, perm: torch.Tensor, window: int) -> list:
        return window_batches(perm, self.offsets[window], self.windows[window])

    def last_epoch(self, epoch: int, step: int) -> bool:
        return epoch >= self.epochs or self.steps_reached(step)

    def steps_reached(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps


def augmentation(cfg: DictConfig) -> Optional[tuple[int, bool]]:
    """(crop padding, flip) when +regularizer=augment is on; null fields take the data set's recipe."""
    aug = cfg.regularizer.augment
    if aug is None:
        return None
    crop = aug.crop if aug.crop is not None else cfg.dataset.augment.crop
    flip = aug.flip if aug.flip is not None else cfg.dataset.augment.flip
    return (crop, flip) if (crop or flip) else None


def build_state(cfg: DictConfig, data: DataSplits, device: torch.device, precision: str, plan: Plan) -> TrainState:
    """Model (initialized from the seed), optimizer, schedule, scaler and early stopping."""
    model = build_model(cfg.model, cfg.norm, cfg.regularizer.dropout, data.input_shape, data.num_classes)
    init_weights(model, cfg.init, cfg.model.activation)
    model.to(device)
    if device.type == "cuda" and cfg.device.channels_last and model_has_convs(model):
        model.to(memory_format=torch.channels_last)
    base_lr = scaled_lr(cfg.optimizer.lr, cfg.accumulation.steps, cfg.accumulation.scale_lr)
    optimizer = build_optimizer(model, cfg.optimizer, base_lr)
    return TrainState(
        model=model, net=torch.compile(model) if cfg.device.compile else model, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.scheduler, plan.total_steps, len(plan.windows), base_lr),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        early_stopping=early_stopping(cfg), params=[p for p in model.parameters() if p.requires_grad],
        penalized=weights(model))


def early_stopping(cfg: DictConfig) -> EarlyStopping:
    es = cfg.regularizer.early_stopping  # without it, best.pt still keeps the best val/acc
    return EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta) if es is not None else EarlyStopping("val/acc", "max")


def model_has_convs(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_recipe(cfg: DictConfig, data: DataSplits, precision: str) -> Recipe:
    max_norm = cfg.regularizer.max_norm
    return Recipe(data.train_x, data.train_y, build_criterion(cfg.regularizer), build_penalty(cfg.regularizer),
                  clip=OmegaConf.to_object(cfg.clip), max_norm=max_norm.value if max_norm is not None else None,
                  augment=augmentation(cfg), precision=precision)


# ---------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, precision: str) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and accuracy, in eval mode; one host sync."""
    if len(y) == 0:
        return {}
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast(x.device.type, precision):
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    loss, acc = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return {"loss": loss / len(y), "acc": acc / len(y)}


def to_host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host-device sync for every value of a log step."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()))


class Meters:
    """Device-side sums over the current log interval and epoch (no host sync per step), and
    the run's training time, samples and whole epochs (evaluation excluded)."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), device=device)
        self.guard = NonfiniteGuard(device)
        self.train_seconds, self.samples_trained, self.epochs_completed = 0.0, 0, 0
        self.start_interval()
        self.start_epoch()

    def start_interval(self) -> None:
        self.loss, self.correct, self.penalty, self.clipped = self.zero, self.zero, self.zero, self.zero
        self.samples, self.steps, self.started = 0, 0, time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_correct, self.epoch_samples, self.epoch_seconds = self.zero, self.zero, 0, 0.0

    def add_time(self, seconds: float) -> None:
        self.epoch_seconds += seconds
        self.train_seconds += seconds

    def add(self, step: int, result: StepResult) -> None:
        self.guard.watch(step, result.loss_sum, result.pre_norm)
        self.loss, self.correct = self.loss + result.loss_sum, self.correct + result.correct
        self.penalty = self.penalty + result.penalty_sum
        if result.clipped is not None:
            self.clipped = self.clipped + result.clipped
        self.samples += result.samples
        self.steps += 1

    def close_interval(self) -> None:
        """The interval's sums move into the epoch's."""
        self.epoch_loss, self.epoch_correct = self.epoch_loss + self.loss, self.epoch_correct + self.correct
        self.epoch_samples += self.samples
        self.samples_trained += self.samples
        self.start_interval()
        self.guard.reset()

    def state_dict(self, uncounted_seconds: float = 0.0) -> dict[str, Any]:
        """`uncounted_seconds`: training time of the epoch in progress, not added yet."""
        return {"interval": [self.loss, self.correct, self.penalty, self.clipped, self.samples, self.steps],
                "epoch": [self.epoch_loss, self.epoch_correct, self.epoch_samples, self.epoch_seconds + uncounted_seconds],
                "train_seconds": self.train_seconds + uncounted_seconds, "samples_trained": self.samples_trained,
                "epochs_completed": self.epochs_completed}

    def load_state_dict(self, state: dict[str, Any], epoch: int, mid_epoch: bool) -> None:
        """`epoch`: the checkpoint's; a checkpoint of an earlier version has no count of whole
        epochs: those up to its epoch are, but the one it stopped in."""
        self.loss, self.correct, self.penalty, self.clipped, self.samples, self.steps = state["interval"]
        if mid_epoch:
            self.epoch_loss, self.epoch_correct, self.epoch_samples, self.epoch_seconds = state["epoch"]
        self.train_seconds, self.samples_trained = state["train_seconds"], state["samples_trained"]
        self.epochs_completed = state.get("epochs_completed", epoch - mid_epoch)


def interval_record(state: TrainState, meters: Meters, result: StepResult, lr: float, monitor: Monitor,
                    has_penalty: bool) -> tuple[dict[str, Any], int]:
    """The log step's metrics (one host sync) and the interval's first non-finite step (-1: none)."""
    device_values = {"loss": meters.loss, "correct": meters.correct, "penalty": meters.penalty,
                     "clipped": meters.clipped, "first_bad": meters.guard.first_bad_step()}
    if monitor.enabled:
        device_values.update({"grad/global_norm": result.pre_norm, "grad/global_norm_clipped": result.post_norm})
        device_values.update(monitor.pop())
    host = to_host(device_values)
    elapsed = time.perf_counter() - meters.started
    record = {"step": state.step, "epoch": state.epoch,
              "train/loss": host.pop("loss") / meters.samples, "train/acc": host.pop("correct") / meters.samples,
              "opt/lr": lr, "opt/effective_batch": result.samples,
              "perf/samples_per_s": meters.samples / elapsed, "perf/step_ms": 1000 * elapsed / meters.steps}
    penalty_sum, clipped_steps, first_bad = host.pop("penalty"), host.pop("clipped"), int(host.pop("first_bad"))
    if has_penalty:
        record["train/penalty"] = penalty_sum / meters.samples
    if result.clipped is not None and monitor.enabled:  # a clipping option is on
        record["grad/clip_frac"] = clipped_steps / meters.steps
    record.update(host)
    return record, first_bad


# ---------------------------------------------------------------- checkpoints
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "early_stopping", "rng", "epoch", "window", "step",
                   "perm", "meters", "config")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without executing pickled code; RunError naming the file."""
    try:
        with open_regular(path) as f:  # a FIFO or a device is refused, never waited on
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no checkpoint there; resume= takes a run directory that holds checkpoint.pt") from None
    except RunError:
        raise
    except Exception as e:  # truncated, corrupted, or not a checkpoint at all
        raise RunError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                       "it is truncated or corrupted: resume from another run or start afresh") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"{path}: not a regexp training checkpoint (missing {', '.join(missing)})")
    return state


# What a resumed run may change: how long it goes on and how it is watched and logged. The rest
# (model, data, optimizer and its numbers, schedule, regularizers, seed, ...) is the checkpoint's:
# a changed value would not take effect (the optimizer's state brings back its own lr) or not fit.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "eval_every", "eval_batch_size", "out_dir", "resume", "checkpoint",
                     "logger", "monitor", "prune", "device", "dataset.root", "dataset.download", "dataset.cache")


def check_checkpoint_fits(path: Path, state: dict[str, Any], cfg: DictConfig) -> None:
    """The checkpoint must come from this run's config, but for RESUME_MAY_CHANGE: another
    model, norm or data set is a RunError (the file does not fit), any other change bad input.
    Both as recorded: `${oc.env:NAME}` as written, so the variable may hold another value now."""
    saved, config = state["config"], recorded_container(cfg)
    for key in ("model", "norm"):
        if saved.get(key) != config[key]:
            raise RunError(f"{path}: the checkpoint is of another {key} ({saved.get(key)}); resume with that run's own config")
    if saved.get("dataset", {}).get("name") != config["dataset"]["name"]:
        raise RunError(f"{path}: the checkpoint was trained on {saved.get('dataset', {}).get('name')}, not {config['dataset']['name']}")
    now = flat(config)
    before = flat(saved)
    for key in sorted(set(now) | set(before), key=lambda k: (not k.endswith(".name"), k)):  # a changed option first
        if not key.startswith(tuple(p + "." for p in RESUME_MAY_CHANGE) + RESUME_MAY_CHANGE) and now.get(key) != before.get(key):
            trained = f"with {key}={before[key]}" if key in before else f"without {key}"
            raise ConfigError(key, now.get(key), f"the run in {path.parent} was trained {trained}; "
                                                 f"a resumed run may change only {', '.join(RESUME_MAY_CHANGE)}")


@dataclass
class Start:
    """Where a run starts (check_resume): afresh, from a checkpoint, or nowhere: a finished
    run at its end has nothing left to do (`finished`, its summary)."""

    resumed: Optional[tuple[Path, dict[str, Any]]] = None  # the checkpoint to continue from, and its state
    finished: Optional[Summary] = None


def check_resume(cfg: DictConfig, run_dir: Path, key: str) -> Start:
    """The pre-flight of what a run finds in its run dir, before anything is written: a new
    run never goes where a run is recorded; a resume needs its checkpoint (readable, of this
    config) and readable records, and has nothing to do when the run finished at its end."""
    checkpoint = resume_checkpoint(cfg.resume, run_dir)
    if checkpoint is None:
        earlier = read_summary(run_dir) if (run_dir / SUMMARY).exists() else None
        if (run_dir / SUMMARY).exists() and not (cfg.resume == "auto" and earlier is not None and not earlier.status.finished):
            raise ConfigError(key, str(run_dir), f"holds a run already; {next_step(run_dir, earlier)}")
        foreign = foreign_entries(run_dir, RUN_ENTRIES if earlier is not None else JOB_ENTRIES)
        if foreign:  # the user's own files (or /): a run would write among them, over any of a run's names
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(key, str(run_dir), f"holds files that are not a run's ({shown}); "
                                                 "choose a new or empty run dir")
        return Start()  # a fresh start (resume=auto over a run that ended without a checkpoint starts it again)
    state = read_checkpoint(checkpoint)
    check_checkpoint_fits(checkpoint, state, cfg)
    earlier = load_summary(run_dir) if (run_dir / SUMMARY).exists() else None
    read_metrics(run_dir)
    if (run_dir / "best.pt").exists():
        read_weights(run_dir / "best.pt")
    finished = finished_at_end(cfg, state, earlier)
    if not finished:
        check_plan_ahead(cfg, state, run_dir)
    return Start((checkpoint, state), earlier if finished else None)


def check_plan_ahead(cfg: DictConfig, saved: dict[str, Any], run_dir: Path) -> None:
    """A resume's epochs and max_steps must not end before where the checkpoint stands: a
    max_steps behind its step, or epochs before the epoch it is in the middle of, would
    train past them (or record an end it never reached)."""
    step, epoch = saved["step"], saved["epoch"]
    if cfg.max_steps is not None and cfg.max_steps < step:
        raise ConfigError("max_steps", cfg.max_steps, f"the run in {run_dir} stands at step {step} already; "
                                                      f"give max_steps >= {step} (or null) to continue it")
    mid_epoch = saved["perm"] is not None and saved["window"] < len(Plan.from_config(cfg, len(saved["perm"])).windows)
    if mid_epoch and cfg.epochs < epoch:
        raise ConfigError("epochs", cfg.epochs, f"the run in {run_dir} is in epoch {epoch} already; "
                                                f"give epochs >= {epoch} to continue it")


def next_step(run_dir: Path, earlier: Optional[Summary]) -> str:
    """What a run dir that holds a run takes instead of a new run: a resume needs its
    checkpoint; a run that saved none starts again under resume=auto, unless it finished."""
    if (run_dir / "checkpoint.pt").exists():
        return f"continue it with resume={run_dir} (or resume=auto), or choose another run dir"
    if earlier is not None and not earlier.status.finished:
        return "it saved no checkpoint: start it again there with resume=auto, or choose another run dir"
    return "it saved no checkpoint to continue from: choose another run dir"


# What Hydra's job runner writes into a job's dir before the job starts, and what a run writes
# after its summary.json (a dir without one holds no run); anything else there is someone else's
JOB_ENTRIES = frozenset({".hydra", "train.log"})
RUN_ENTRIES = JOB_ENTRIES | {"wandb", SUMMARY, METRICS, DIAGNOSIS, CONTINUATION, "checkpoint.pt", "best.pt",
                             "histograms.jsonl"}


def foreign_entries(run_dir: Path, own: frozenset[str]) -> list[str]:
    """The names in `run_dir` outside `own`, sorted (none when it does not exist). The lock's
    files and the temp files of atomic writes and write probes are always a run's own."""
    try:
        names = os.listdir(run_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n not in own and not n.startswith((LOCK, ".regexp-write-probe-"))
                  and not (n.startswith(".") and n.endswith(".tmp")))


def trained_to_end(cfg: DictConfig, saved: dict[str, Any]) -> bool:
    """The checkpoint `saved` stands where the run's plan (of `cfg`) stops training: max_steps
    reached, or its epoch recorded (window at the epoch's end) and that epoch the last or early
    stopping decided. Only an epoch's record saves a checkpoint at either place."""
    if saved["perm"] is None:  # no epoch drawn yet
        return False
    plan = Plan.from_config(cfg, len(saved["perm"]))
    if plan.steps_reached(saved["step"]):
        return True
    stopper = early_stopping(cfg)
    stopper.load_state_dict(saved["early_stopping"])
    return saved["window"] >= len(plan.windows) and (saved["epoch"] >= plan.epochs or stopper.should_stop)


def finished_at_end(cfg: DictConfig, saved: dict[str, Any], earlier: Optional[Summary]) -> bool:
    """A run recorded finished with nothing left to do: trained to its plan's end, or
    diverged and resumed with the same on_nonfinite (it would retrace the same steps), stopped
    by a finding or pruned and resumed under the setting that ended it."""
    if earlier is None or not earlier.status.finished:
        return False
    if earlier.status in ENDED_EARLY:
        return not continues_under(earlier, cfg)
    if earlier.status == Status.DIVERGED:
        return saved["config"].get("monitor", {}).get("on_nonfinite") == cfg.monitor.on_nonfinite
    return trained_to_end(cfg, saved)


def finished_line(run_dir: Path, summary: Summary) -> str:
    """What a resume of a finished run says: it is complete, where and why, and what would go on."""
    if summary.status == Status.DIVERGED:
        return (f"{run_dir}: diverged after step {summary.last_finite_step or summary.steps}: the run is finished and "
                "nothing was written; a resume with the same monitor.on_nonfinite would retrace it "
                "(on_nonfinite=skip steps past a non-finite step)")
    if summary.status in ENDED_EARLY:
        why = summary.ended_by or {}
        what, setting = ((f"a decisive finding ({why.get('rule')})", "monitor.on_finding=warn")
                         if summary.status == Status.STOPPED else (f"pruning at epoch {why.get('epoch')}", "prune=none"))
        return (f"{run_dir}: {summary.status} at step {summary.steps} by {what}: the run is finished and nothing was "
                f"written; resume it with {setting} to train it on")
    more = ("early stopping ended it" if summary.status == Status.EARLY_STOPPED
            else "raise epochs= or max_steps= to train it further")
    return (f"{run_dir}: {summary.status} at step {summary.steps} ({plural(summary.epochs_completed, 'whole epoch')}): "
            f"the run is complete and nothing was written; {more}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """best.pt's weights; RunError naming the file when it cannot be read."""
    try:
        with open_regular(path) as f:  # a FIFO or a device is refused, never waited on
            return torch.load(f, map_location="cpu", weights_only=True)["model"]
    except RunError:
        raise
    except Exception as e:
        raise RunError(f"{path}: cannot read the best weights ({type(e).__name__}); the file is truncated or "
                       "corrupted: restore it, or move it away to resume without it") from None


def resume_checkpoint(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from: `resume` names a run dir or a checkpoint file;
    `auto` continues this run dir's own checkpoint when there is one."""
    if resume is None:
        return None
    if resume == "auto":
        own = run_dir / "checkpoint.pt"
        return own if own.is_file() else None
    path = Path(resume)
    return path / "checkpoint.pt" if path.is_dir() else path


# ---------------------------------------------------------------- signals
class StopSignal:
    """The first SIGINT/SIGTERM, or a cluster's time-limit or preemption warning (SLURM's
    `--signal`, cluster_warnings), asks the loop to save a checkpoint and stop at the next step;
    a second one stops at once. The previous handlers come back on exit. A SIGINT that the
    process was started ignoring (a script's `regexp train &`) stays ignored, as Python itself
    leaves it: Ctrl-C on the script is not meant for its background jobs."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM, *cluster_warnings()):
                if signum != signal.SIGINT or signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.received is not None:
            raise Interrupted(signum)
        self.received = signum
        why = (f" ({signal.Signals(signum).name}: the cluster's time-limit or preemption warning)"
               if signum in cluster_warnings() else "")
        log.warning("signal %d%s: saving a checkpoint and stopping (again to stop at once)", signum, why)

    def __exit__(self, *exc: Any) -> None:
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def cluster_warnings() -> list[int]:
    """The signals SLURM sends a job before its time limit or a preemption, as submitit asks for
    them (`--signal=USR2@signal_delay_s`): SIGUSR2 from submitit 1.5 on, SIGUSR1 before it, or
    the one $SUBMITIT_PREEMPT_SIGNAL names (USR1, ...). Outside a cluster nobody sends them but
    a user, whom the same checkpoint and stop serve."""
    import signal

    named = getattr(signal, f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}", None)
    return list(dict.fromkeys(s for s in (signal.SIGUSR1, signal.SIGUSR2, named) if isinstance(s, signal.Signals)))


@contextlib.contextmanager
def torch_settings(cfg: DictConfig, device: torch.device) -> Iterator[None]:
    """The process-wide switches a run sets (deterministic kernels, TF32 on CUDA, threads), put back
    as they were afterwards: two runs in one process behave like two separate commands."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             torch.get_num_threads())
    try:
        if cfg.device.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if device.type == "cuda":  # TF32 matmuls and convs: fp32 range, tensor-core speed
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        deterministic, benchmark, tf32_matmul, tf32_cudnn, workspace, threads = saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_matmul, tf32_cudnn
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ---------------------------------------------------------------- the loop
@dataclass
class Loop:
    """What the epoch loop works with; `fit` builds it, the helpers below read it."""

    cfg: DictConfig
    run_dir: Path
    data: DataSplits
    plan: Plan
    state: TrainState
    recipe: Recipe
    meters: Meters
    monitor: Monitor
    summary: Summary
    reporter: Reporter
    tracker: Tracker
    stop_signal: StopSignal
    precision: str
    policy: NonfinitePolicy = field(init=False)
    live: LiveFindings = field(init=False)  # the diagnosis rules, fed each record as it is written
    status: Status = Status.COMPLETED  # until the run ends otherwise
    row: dict[str, Any] = field(default_factory=dict)  # the last epoch's record
    label: str = ""  # which run an epoch line is about, when several train at once
    at_end: bool = False  # resumed where its training ended (killed in its final test): it only evaluates
    left_at: Optional[float] = None  # when it stopped stepping in this epoch (it diverged or reached max_steps)
    stepping_since: Optional[float] = None  # when this epoch's training began, until the meters count its time
    left_group_at: Optional[float] = None  # when it ended while other members of its group trained on
    sweep_dir: Optional[Path] = None  # a sweep job's: where its peers' run dirs are (regexp.prune)

    def __post_init__(self) -> None:
        self.policy = NonfinitePolicy(self.cfg.monitor.on_nonfinite, self.replay, self.report_nonfinite)
        self.live = LiveFindings(Watch(self.summary.config), self.tracker, self.reporter,
                                 stop=self.cfg.monitor.on_finding == "stop")

    def uncounted_seconds(self, now: float) -> float:
        """This epoch's training time that the meters do not hold yet (up to `now`, or to when it stopped stepping)."""
        return (self.left_at or now) - self.stepping_since if self.stepping_since is not None else 0.0

    def checkpoint(self, name: str = "checkpoint.pt") -> None:
        meters = self.meters.state_dict(self.uncounted_seconds(time.perf_counter()))  # a mid-epoch one keeps its time
        save_checkpoint(self.run_dir / name, {**self.state.state_dict(), "meters": meters,
                                              "nonfinite_reported": self.policy.reported, "threads": self.summary.threads,
                                              "config": recorded_container(self.cfg)})

    def replay(self, snapshot: dict[str, Any], bad_step: int) -> dict[str, Any]:
        """Re-run from `snapshot` (same data order, same RNG) up to the first bad step and
        trace that step's batches with hooks on every layer."""
        state = self.state
        state.load_state_dict(snapshot)
        for w in range(snapshot["window"], len(self.plan.windows)):
            batches = self.plan.batches(snapshot["perm"], w)
            if state.step == bad_step:
                found = trace_nonfinite(state.model, lambda: forward_backward(state, self.recipe, batches, state.model)[0])
                state.optimizer.zero_grad(set_to_none=True)
                return found
            train_step(state, self.recipe, batches)
        return {"where": None, "layer": None}

    def report_nonfinite(self, found: dict[str, Any], bad_step: int) -> None:
        where = " ".join(str(v) for v in (found.get("where"), found.get("layer")) if v) or "not reproduced"
        action = self.policy.action
        event = {"step": bad_step + 1, "nonfinite/step": bad_step + 1, "nonfinite/where": where,
                 "nonfinite/kind": found.get("where"), "nonfinite/layer": found.get("layer"), "nonfinite/action": action}
        self.tracker.write(event)
        self.reporter.warn(f"{self.label + ' · ' if self.label else ''}non-finite loss or gradient at step {bad_step + 1}: "
                           f"first in {where} (on_nonfinite={action})")
        self.live.observe(event, self.label)
        if self.summary.nonfinite is None:
            self.summary.nonfinite = event


class Group:
    """The runs one loop drives: a single run, its model called as an nn.Module, or N runs
    whose models are fused (regexp.stack) and take each window's step at once."""

    def __init__(self, loops: list[Loop], template: Optional[torch.nn.Module] = None):
        self.loops, self.template = loops, template
        self.stack: Optional[Stack] = None  # the last one built: the members' parameters live in it

    def stack_of(self, loops: list[Loop]) -> Stack:
        """The stack of exactly these members (rebuilt when one has left it)."""
        models = [loop.state.model for loop in loops]
        if self.stack is None or self.stack.models != models:
            p, p_input = zip(*(dropout_rates(loop.cfg.regularizer.dropout) for loop in loops))
            self.stack = Stack(self.template, models, list(p), list(p_input), [loop.recipe for loop in loops],
                               own_dropout=user_built(loops[0].cfg.model))
            optimizers = [loop.state.optimizer for loop in loops]
            if StackedUpdate.fits(optimizers, any(loop.state.scaler.is_enabled() for loop in loops)):
                self.stack.update = StackedUpdate(self.stack, optimizers)
        return self.stack

    def step(self, loops: list[Loop], window: int, log_steps: list[bool]) -> list[StepResult]:
        states = [loop.state for loop in loops]
        windows = [loop.plan.batches(state.perm, window) for loop, state in zip(loops, states)]
        probes = [loop.monitor.probe(log_step) for loop, log_step in zip(loops, log_steps)]
        skips = [loop.policy.skips for loop in loops]
        if self.template is None:
            return [train_step(states[0], loops[0].recipe, windows[0], probes[0], skips[0])]
        return fused_step(self.stack_of(loops), states, windows, probes, skips)

    def evaluate(self, loops: list[Loop], x: torch.Tensor, y: torch.Tensor) -> list[dict[str, float]]:
        if not loops:
            return []
        first = loops[0]
        if self.template is None:
            return [evaluate(loop.state.model, x, y, loop.cfg.eval_batch_size, loop.precision) for loop in loops]
        return evaluate_stack(self.stack_of(loops), x, y, first.cfg.eval_batch_size, first.precision)


def train_epoch(group: Group, loops: list[Loop]) -> Status:
    """The windows of one epoch from the members' `state.window` on: one step for all of them
    (fused, or the single run's), a record on each member's log steps. A member that diverges
    or reaches max_steps stops stepping; INTERRUPTED when a signal came."""
    first, plan = loops[0], loops[0].plan
    with first.reporter.epoch_progress(first.state.epoch, plan.epochs, len(first.data.train_y)) as bar:
        bar.advance(plan.offsets[first.state.window] if first.state.window < len(plan.windows) else len(first.data.train_y))
        stepping = list(loops)
        for w in range(first.state.window, len(plan.windows)):
            stepping = [loop for loop in stepping if still_stepping(loop)]
            if not stepping:
                break
            for loop in stepping:
                loop.state.window = w
            if first.stop_signal.received is not None:  # Ctrl-C / SIGTERM: the caller saves where we are
                return Status.INTERRUPTED
            log_steps = [(loop.state.step + 1) % plan.log_every == 0 for loop in stepping]
            lrs = [loop.state.optimizer.param_groups[0]["lr"] for loop in stepping]
            results = group.step(stepping, w, log_steps)
            bar.advance(results[0].samples)
            for loop, result, log_step, lr in zip(stepping, results, log_steps, lrs):
                loop.state.window = w + 1
                record = after_step(loop, result, log_step, lr)
                if record is not None and loop is first:
                    bar.show(record["train/loss"], record["perf/samples_per_s"])
    return Status.COMPLETED


def still_stepping(loop: Loop) -> bool:
    """Whether the loop takes the next step; one that stops notes when (its own training time)."""
    if loop.status == Status.COMPLETED and not loop.plan.steps_reached(loop.state.step):  # not ended otherwise
        return True
    if loop.left_at is None:
        if loop.data.train_y.is_cuda:
            torch.cuda.synchronize()
        loop.left_at = time.perf_counter()
    return False


def after_step(loop: Loop, result: StepResult, log_step: bool, lr: float) -> Optional[dict[str, Any]]:
    """A member's bookkeeping after its step: meters, the log step's record, the non-finite
    policy, checkpoints. Returns the record written on a log step."""
    state, meters, policy = loop.state, loop.meters, loop.policy
    if not result.applied:
        loop.summary.skipped_steps += 1
        policy.handle(state, state.step)
        end_on_finding(loop)  # its non-finite event may have tripped one
        return None
    meters.add(state.step - 1, result)
    record = None
    if log_step:
        record, first_bad = interval_record(state, meters, result, lr, loop.monitor, loop.recipe.penalty is not None)
        loop.tracker.write(record)
        loop.live.observe(record, loop.label)
        if loop.plan.histogram_every and (state.step // loop.plan.log_every) % loop.plan.histogram_every == 0:
            loop.tracker.write_histograms(state.step, loop.monitor.histograms())
        meters.close_interval()
        if first_bad >= 0 and policy.handle(state, first_bad):
            loop.status = Status.DIVERGED
            return record
        if first_bad < 0:
            policy.keep(state)
        end_on_finding(loop)  # within this step: the next window is not trained
    if (loop.plan.checkpoint_every is not None and state.step % loop.plan.checkpoint_every == 0
            and state.window < len(loop.plan.windows) and not loop.plan.steps_reached(state.step)):
        loop.checkpoint()  # not at the epoch's or the run's end: the epoch record's checkpoint follows there
    return record


def end_on_finding(loop: Loop) -> None:
    """monitor.on_finding=stop: a decisive finding ends the run as `stopped`, unless it ended
    otherwise already or its plan ends here anyway (it trained every step: not stopped)."""
    finding, state, plan = loop.live.decisive, loop.state, loop.plan
    at_plan_end = plan.steps_reached(state.step) or (state.window >= len(plan.windows) and state.epoch >= plan.epochs)
    if finding is not None and loop.status == Status.COMPLETED and not at_plan_end:
        loop.status = Status.STOPPED
        loop.summary.ended_by = {"rule": finding.rule, "title": finding.title, "step": finding.step}


# The epoch means of the log-step series, named as those series (docs/diagnostics.md) on the console
# and in the summary; metrics.jsonl keeps the epoch/* names, which W&B plots against `epoch`.
SHOWN_AS = {"epoch/train_loss": "train/loss", "epoch/train_acc": "train/acc", "epoch/lr": "opt/lr",
            "epoch/samples_per_s": "perf/samples_per_s"}


def close_epoch(loop: Loop, seconds: float) -> None:
    """One sync for the epoch's training metrics and the guard; a divergence ends the run here
    (its last finite state checkpointed). The epoch's row goes to `loop.row`."""
    state, meters = loop.state, loop.meters
    bad = meters.guard.first_bad_step()
    meters.close_interval()
    loss_sum, correct_sum, first_bad = to_host({"l": meters.epoch_loss, "c": meters.epoch_correct, "b": bad}).values()
    meters.add_time(seconds)
    loop.stepping_since = None
    if loop.status != Status.DIVERGED and first_bad >= 0 and loop.policy.handle(state, int(first_bad)):
        loop.status = Status.DIVERGED
    if loop.status != Status.DIVERGED and state.window == len(loop.plan.windows):  # every window trained
        meters.epochs_completed = state.epoch
    loop.row = {"epoch": state.epoch, "step": state.step}
    if meters.epoch_samples:
        loop.row.update({"epoch/train_loss": loss_sum / meters.epoch_samples, "epoch/train_acc": correct_sum / meters.epoch_samples})
    if loop.status == Status.DIVERGED:
        loop.summary.last_finite_step = state.step
        loop.checkpoint()


def evaluates(loop: Loop) -> bool:
    return loop.status != Status.DIVERGED and (loop.state.epoch % loop.plan.eval_every == 0 or loop.status in ENDED_EARLY
                                               or loop.plan.last_epoch(loop.state.epoch, loop.state.step))


def record_epoch(loop: Loop, val: Optional[dict[str, float]]) -> None:
    """The epoch's validation metrics (when it evaluated), best.pt, the epoch record and the
    checkpoint; early stopping decides here."""
    state, row, best = loop.state, loop.row, loop.state.early_stopping
    for name, value in (val or {}).items():
        row[f"val/{name}"] = value
    if best.monitor in row and best.update(row[best.monitor], state.epoch):
        weights_now = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        save_checkpoint(loop.run_dir / "best.pt", {"model": weights_now, "epoch": state.epoch, "step": state.step,
                                                   best.monitor: best.best})
    row["epoch/lr"] = state.optimizer.param_groups[0]["lr"]
    row["epoch/samples_per_s"] = loop.meters.epoch_samples / loop.meters.epoch_seconds  # this epoch's own, eval excluded
    loop.tracker.write(row)
    loop.live.observe(row, loop.label)
    loop.reporter.epoch_line(state.epoch, loop.plan.epochs, {SHOWN_AS.get(k, k): v for k, v in row.items() if k not in ("epoch", "step")},
                             loop.label)
    loop.checkpoint()  # its window: the epoch's end, or where max_steps stopped it (a larger max_steps goes on from there)
    state.perm = None  # the next epoch draws its own order
    if state.early_stopping.should_stop and loop.status == Status.COMPLETED:
        loop.status = Status.EARLY_STOPPED
    end_on_finding(loop)


def begin_epoch(loop: Loop) -> None:
    state = loop.state
    state.model.train()
    loop.left_at = None
    if state.perm is None:
        with state.own_random():
            state.perm = torch.randperm(len(loop.data.train_y), device=loop.data.train_y.device)
        loop.meters.start_epoch()
    loop.policy.keep(state)


def fit(group: Group) -> None:
    """Epochs of windows until the schedule, max_steps, early stopping or a divergence ends
    each run; then the final metrics (of the best weights, when early stopping chose them).
    The members of a group share the epochs and windows; each ends on its own."""
    running = [loop for loop in group.loops if not loop.at_end]
    while running:
        for loop in running:
            begin_epoch(loop)
        t_epoch = time.perf_counter()
        for loop in running:
            loop.stepping_since = t_epoch
        if train_epoch(group, running) == Status.INTERRUPTED:
            for loop in running:
                loop.meters.add_time(loop.uncounted_seconds(time.perf_counter()))
                loop.stepping_since = None
                loop.checkpoint()
                loop.summary.steps, loop.summary.train_time_s = loop.state.step, round(loop.meters.train_seconds, 3)
                loop.summary.epochs_completed = loop.meters.epochs_completed
            raise Interrupted(running[0].stop_signal.received, saved=True)
        if running[0].data.train_y.is_cuda:
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        for loop in running:  # each its own time: a member that stopped early trained less of the epoch
            close_epoch(loop, loop.uncounted_seconds(t_end))
        evaluated = [loop for loop in running if evaluates(loop)]
        val = dict(zip(map(id, evaluated), group.evaluate(evaluated, running[0].data.val_x, running[0].data.val_y)))
        for loop in running:
            if loop.status != Status.DIVERGED:
                record_epoch(loop, val.get(id(loop)))
        prune_at_rung(running, fused=group.template is not None)  # a pruned loop's records and checkpoint are written
        staying = [loop for loop in running if loop.status == Status.COMPLETED
                   and not loop.plan.last_epoch(loop.state.epoch, loop.state.step)]
        if staying:  # who ends here while others train on: its wall time ends now, not with the group's
            now, kept = time.perf_counter(), set(map(id, staying))
            for loop in running:
                if id(loop) not in kept:
                    loop.left_group_at = now
                    loop.reporter.left_group(loop.status.value)
        running = staying
        for loop in running:
            loop.state.epoch, loop.state.window = loop.state.epoch + 1, 0
    for loop in group.loops:
        if loop.status == Status.EARLY_STOPPED and (loop.run_dir / "best.pt").is_file():
            loop.state.model.load_state_dict(read_weights(loop.run_dir / "best.pt"))  # the weights early stopping chose
    tested = [loop for loop in group.loops if loop.status != Status.DIVERGED]
    first = group.loops[0]
    test = dict(zip(map(id, tested), group.evaluate(tested, first.data.test_x, first.data.test_y)))
    for loop in group.loops:
        finish(loop, test.get(id(loop), {}))


def finish(loop: Loop, test: dict[str, float]) -> None:
    state, meters, best, status = loop.state, loop.meters, loop.state.early_stopping, loop.status
    final = {SHOWN_AS.get(k, k): v for k, v in loop.row.items() if k.startswith(("epoch/train_", "val/"))}
    if status == Status.EARLY_STOPPED and (loop.run_dir / "best.pt").is_file():
        final.update({best.monitor: best.best, "best_epoch": best.best_epoch})
    final.update({f"test/{k}": v for k, v in test.items()})
    final["perf/samples_per_s"] = meters.samples_trained / meters.train_seconds if meters.train_seconds else 0.0
    s = loop.summary
    s.status, s.metrics, s.steps, s.epochs_completed = status, split_finite(final)[0], state.step, meters.epochs_completed
    s.train_time_s = round(meters.train_seconds, 3)


def start(run: "Run", data: DataSplits, device: torch.device, precision: str, stop_signal: StopSignal,
          own_random: bool) -> Loop:
    """One run's TrainState and loop parts, from its seed or from its checkpoint. A member of
    a fused group draws its data order from a random stream of its own (`own_random`)."""
    cfg, summary = run.cfg, run.summary
    seed_everything(cfg.seed)
    plan = Plan.from_config(cfg, len(data.train_y))
    state = build_state(cfg, data, device, precision, plan)
    if own_random:
        state.rng = rng_state()  # where the solo run's stream stands when it draws its first order
    loop = Loop(cfg, run.run_dir, data, plan, state, build_recipe(cfg, data, precision), Meters(device),
                Monitor(state.model, cfg.monitor), summary, run.reporter, run.tracker, stop_signal, precision,
                sweep_dir=run.sweep_dir)
    summary.device, summary.parameters, summary.steps_per_epoch = str(device), sum(p.numel() for p in state.params), len(plan.windows)
    summary.effective_batch, summary.train_samples = cfg.accumulation.steps * cfg.batch_size, len(data.train_y)
    summary.data = {"input_shape": list(data.input_shape), "classes": data.num_classes}
    if run.resumed is not None:
        continue_from(loop, *run.resumed)
    keep_metrics_up_to(run.run_dir, state.step)  # a fresh start keeps no records of a run that ended without a checkpoint
    if run.resumed is not None:
        loop.live.replay(read_metrics(run.run_dir))
    return loop


def start_group(runs: list["Run"], stop_signal: StopSignal, fuse: bool) -> Group:
    """The data once, then each run's loop; the threads once, for the group."""
    cfg = runs[0].cfg
    device = torch.device(resolve_device(cfg))
    precision = resolve_precision(cfg, device.type)
    data = load_data(cfg.dataset, device)
    if cfg.smoke:
        data = smoke_data(data, cfg.eval_batch_size)
    loops = [start(run, data, device, precision, stop_signal, own_random=fuse) for run in runs]
    if any(loop.plan != loops[0].plan for loop in loops):
        raise ValueError("the runs of a fused group must share their epochs, steps and batches")
    resumed = runs[0].resumed
    threads = threads_for(cfg, loops[0].state.model, data, device, resumed[1] if resumed else None)
    group = Group(loops, fused_template(loops) if fuse else None)
    if fuse:
        seed_everything(cfg.seed)  # the group's dropout masks and augmentation draw from here
    for loop in loops:
        loop.summary.threads = threads
        if fuse:
            loop.summary.fused = {"models": len(loops), "runs": [str(other.run_dir) for other in loops]}
            loop.label = loop.run_dir.name
        announce(loop, device)
    return group


def smoke_data(data: DataSplits, batch: int) -> DataSplits:
    """A smoke run's data: every training sample (its steps draw their batches as a run's do) and
    the first `batch` validation and test samples, one evaluation batch each."""
    return replace(data, val_x=data.val_x[:batch], val_y=data.val_y[:batch], test_x=data.test_x[:batch],
                   test_y=data.test_y[:batch])


def fused_template(loops: list[Loop]) -> torch.nn.Module:
    """The members' architecture on the meta device (no memory, no random draws), with a
    Dropout wherever any member has one (a member's own p may be 0)."""
    cfg, shape, classes = loops[0].cfg, loops[0].data.input_shape, loops[0].data.num_classes
    p, p_input = zip(*(dropout_rates(loop.cfg.regularizer.dropout) for loop in loops))
    rates = SimpleNamespace(p=0.5 if any(p) else 0.0, p_input=0.5 if any(p_input) else 0.0)
    with torch.device("meta"):
        return build_model(cfg.model, cfg.norm, rates, shape, classes)


def announce(loop: Loop, device: torch.device) -> None:
    cfg, state, summary, plan = loop.cfg, loop.state, loop.summary, loop.plan
    fused = f" · fused with {summary.fused['models'] - 1} more" if summary.fused else ""
    loop.reporter.header(
        f"{cfg.dataset.name} ({len(loop.data.train_y)} train / {len(loop.data.val_y)} val / {len(loop.data.test_y)} test) · "
        f"{cfg.model.name} ({summary.parameters:,} params) · {cfg.optimizer.name} lr "
        f"{state.optimizer.param_groups[0]['initial_lr']:g} · {device} {loop.precision} · {plural(summary.threads, 'thread')} · "
        f"{length(plan, cfg.smoke)} · batch {cfg.batch_size}×{cfg.accumulation.steps}{fused} · "
        f"run dir {loop.run_dir}"
    )
    if cfg.smoke:
        loop.reporter.header(smoke_line(cfg, loop.data))
    if loop.at_end:
        loop.reporter.header(f"{summary.resumed_from} stands at the end of its training (step {state.step}): "
                             "finishing its final evaluation, no step is trained")
    elif summary.resumed_from is not None:
        loop.reporter.header(f"resumed from {summary.resumed_from} at step {state.step} (epoch {state.epoch})")
    for warning in [*warnings_for(cfg), *schedule_warnings(cfg.scheduler, plan.total_steps)]:
        loop.reporter.warn(warning)
    if loop.live.inactive:
        loop.reporter.line(f"per-layer metrics are off (monitor.per_layer=false): the rules {', '.join(loop.live.inactive)} "
                           "do not run, while it trains or at its end; the loss rules do")


def smoke_line(cfg: DictConfig, data: DataSplits) -> str:
    """What a smoke run runs, and the settings it sets aside."""
    values = {key: OmegaConf.select(cfg, key) for key in SMOKE_SETS_ASIDE}
    aside = ", ".join(f"{key}={'null' if value is None else value}" for key, value in values.items())
    return (f"smoke run (smoke=true): {SMOKE_STEPS} optimizer steps, a record each, then one validation batch "
            f"({len(data.val_y)} samples) and one test batch ({len(data.test_y)}), recorded as a run is; set aside: "
            f"{aside}; marked smoke: compare and sweep summaries count it, never average it")


def length(plan: Plan, smoke: bool = False) -> str:
    """How long the run trains, as it will: epochs of steps, or max_steps when that ends it sooner."""
    if smoke:
        return f"{plural(plan.total_steps, 'step')} (smoke)"
    epochs = f"{plural(plan.epochs, 'epoch')} × {len(plan.windows)} steps"
    if plan.total_steps < plan.epochs * len(plan.windows):
        return f"{plural(plan.total_steps, 'step')} (max_steps; {epochs} would be {plan.epochs * len(plan.windows)})"
    return epochs


def continue_from(loop: Loop, checkpoint: Path, saved: dict[str, Any]) -> None:
    """The loop where the checkpoint left it: state, meters, the non-finite report. Saved at
    the end of its training (killed in its final test), it only evaluates: its last epoch's
    record is the one in metrics.jsonl."""
    state, saved = loop.state, move_to(saved, loop.data.train_y.device)
    state.load_state_dict(saved)
    loop.policy.reported = saved["nonfinite_reported"]
    mid_epoch = state.window < len(loop.plan.windows)
    loop.meters.load_state_dict(saved["meters"], state.epoch, mid_epoch)
    loop.at_end = trained_to_end(loop.cfg, saved)
    if loop.at_end:
        records = reversed(read_metrics(loop.run_dir))
        loop.row = next((r for r in records if r.get("epoch") == state.epoch and "epoch/lr" in r), {})  # record_epoch's
        if state.early_stopping.should_stop:
            loop.status = Status.EARLY_STOPPED
    if not mid_epoch:  # saved at the end of an epoch: start the next one
        state.epoch, state.window, state.perm = state.epoch + 1, 0, None
    loop.summary.resumed_from, loop.summary.resumed_at_step = str(checkpoint), state.step


def threads_for(cfg: DictConfig, model: torch.nn.Module, data: DataSplits, device: torch.device,
                saved: Optional[dict[str, Any]]) -> int:
    """The CPU threads of this run, decided once: the number asked for; on a resume, the
    count the run started with; on a GPU, torch's default; deterministic on the CPU, one
    (the count changes the order of float sums, so a timed choice would make two runs of
    one config differ with the machine's load); else the fastest, timed."""
    if cfg.device.threads != "auto":
        threads = int(cfg.device.threads)
    elif saved is not None and "threads" in saved:
        threads = saved["threads"]
    elif device.type != "cpu":
        threads = torch.get_num_threads()
    elif cfg.device.deterministic:
        threads = 1
    else:
        batch = slice(0, cfg.batch_size)
        threads = fastest_threads(model, data.train_x[batch], data.train_y[batch], cap=torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------- runs, with their records
@dataclass
class RunSpec:
    """One job: its typed config, run dir and how it was asked for (see `train`)."""

    cfg: DictConfig
    run_dir: Path
    choices: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    name: Optional[str] = None
    group: Optional[str] = None
    start: Optional[Start] = None  # what check_resume found, when the job's own checks ran it already
    sweep_dir: Optional[Path] = None  # a sweep job's sweep dir (hydra.sweep.dir): its peers, for pruning


@dataclass
class Run:
    """A run being recorded: what `start` builds its loop from."""

    cfg: DictConfig
    run_dir: Path
    summary: Summary
    tracker: Tracker
    reporter: Reporter
    resumed: Optional[tuple[Path, dict[str, Any]]]
    sweep_dir: Optional[Path] = None
    left_group_at: Optional[float] = None  # its loop's: when it ended while its group trained on


def write_final_summary(record: SummaryRecord, summary: Summary) -> None:
    """The run's last word. When the disk that failed the run refuses it, a smaller summary
    (no config, no traceback) may still fit: a summary never stays `running` after the end."""
    try:
        record.write(summary, final=True)
        if record.guarded and not record.replaces_earlier(summary):
            log.warning("this continuation ended %s: %s keeps the earlier %s result; its own record is %s",
                        summary.status, SUMMARY, record.earlier.status, CONTINUATION)
    except RunError as e:  # keep the first error
        log.error("%s", e)
        brief = Summary(status=summary.status, run_dir=summary.run_dir, started_at=summary.started_at,
                        finished_at=summary.finished_at, error=summary.error or str(e))
        try:
            record.write(brief, final=True)
        except RunError:
            pass


@contextlib.contextmanager
def recorded(spec: RunSpec, resumed: Optional[tuple[Path, dict[str, Any]]], reporter: Reporter,
             wandb_server: Optional[WandbServer], concurrent: bool) -> Iterator[Run]:
    """summary.json from start (`running`) to end (the run's status, or failed/interrupted with
    the error when an exception ends the block), the metric sinks, W&B and the diagnosis.
    `concurrent`: other runs of this process are open at the same time (a fused group)."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = SummaryRecord(run_dir, read_summary(run_dir))
    started = time.perf_counter()
    config = recorded_container(spec.cfg)  # the typed job: every key, each regularizer None unless added
    summary = Summary(run_dir=str(run_dir), started_at=datetime.now(timezone.utc).isoformat(),
                      choices=spec.choices or {}, overrides=spec.overrides or [], config=config,
                      smoke=True if spec.cfg.smoke else None)
    tracker = Tracker([MetricsFile(run_dir / "metrics.jsonl"), HistogramFile(run_dir / "histograms.jsonl")])
    exit_code = 1
    try:
        record.write(summary)  # `running`; if even this write fails, the final one below says why
        # in here, a W&B start that fails or is interrupted (it may wait for the server) is recorded like any crash
        earlier_id = record.earlier.wandb_id if resumed is not None and record.earlier is not None else None
        name = spec.name or run_dir.name
        tracker.sinks += wandb_sinks(spec.cfg, config, run_dir, name, spec.group or name, reporter, earlier_id,
                                     wandb_server, concurrent)
        summary.wandb_id = next((sink.run_id for sink in tracker.sinks if hasattr(sink, "run_id")), None)
        run = Run(spec.cfg, run_dir, summary, tracker, reporter, resumed, spec.sweep_dir)
        yield run
        if run.left_group_at is not None:  # pruned, stopped or ended while its group trained on: its own end
            ago = timedelta(seconds=time.perf_counter() - run.left_group_at)
            summary.finished_at = (datetime.now(timezone.utc) - ago).isoformat()
        summary.wall_time_s = round((run.left_group_at or time.perf_counter()) - started, 3)
        summary.findings = diagnose(read_metrics(run_dir), summary)
        if record.replaces_earlier(summary):
            write_diagnosis(run_dir, summary.findings)
        exit_code = 0
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, Interrupted))
        exit_code = 128 + e.signum if isinstance(e, Interrupted) else 130 if interrupted else 1
        summary.status = Status.INTERRUPTED if interrupted else Status.FAILED
        if isinstance(e, Interrupted):  # what a sweep's report reads, whichever process or host ran it
            summary.interrupted = {"signal": e.signum, "saved": e.saved}
        summary.error, summary.traceback = f"{type(e).__name__}: {e}", traceback.format_exc()
        summary.wall_time_s = round(time.perf_counter() - started, 3)
        raise
    finally:
        summary.finished_at = summary.finished_at or datetime.now(timezone.utc).isoformat()
        write_final_summary(record, summary)
        if record.replaces_earlier(summary):
            tracker.summary(summary)
        tracker.close(exit_code)
    style = {Status.COMPLETED: "green", Status.EARLY_STOPPED: "green", Status.DIVERGED: "red"}.get(summary.status, "yellow")
    ended = {"ended_by": why_ended(summary.ended_by)} if summary.ended_by else {}  # what stopped or pruned it
    reporter.run_ended(summary.status.value, {**ended, **summary.metrics, "wall_time_s": summary.wall_time_s,
                                              "run_dir": str(run_dir)}, style)
    reporter.diagnosis(summary.findings)


def position(resumed: Optional[tuple[Path, dict[str, Any]]]) -> tuple[int, int, int]:
    """Where a run starts: (epoch, window, step) of its checkpoint, or the beginning."""
    return (resumed[1]["epoch"], resumed[1]["window"], resumed[1]["step"]) if resumed is not None else (1, 0, 0)


def train_group(specs: list[RunSpec], reporter: Optional[Reporter] = None, wandb_server: Optional[WandbServer] = None,
                fuse: bool = True) -> list[Summary]:
    """Train the specs' models side by side in one process (regexp.stack): one batched step
    for all, each model with its own seed, data order, hyperparameters, clipping, early
    stopping, non-finite handling, diagnostics and checkpoints; each run dir gets a solo
    run's records, its summary `fused: {models: N, runs: [...]}`. The specs must fuse
    (regexp.fusion); runs resumed from checkpoints at different steps train as separate
    groups. Nothing is written when a run dir refuses its run (check_resume) or another
    process writes it (regexp.lock: each run dir is locked while it trains), nor for a
    finished run at its end (its summary is returned). A crash is recorded in every member's
    summary (failed, traceback) and raised."""
    with writing([spec.run_dir for spec in specs], "run_dir"):
        return _train_group(specs, reporter, wandb_server, fuse)


def _train_group(specs: list[RunSpec], reporter: Optional[Reporter], wandb_server: Optional[WandbServer],
                 fuse: bool) -> list[Summary]:
    starts = [spec.start or check_resume(spec.cfg, Path(spec.run_dir), "run_dir") for spec in specs]  # before anything is written
    reporter = reporter or Reporter()
    positions = [None if start.finished else position(start.resumed) for start in starts]
    if len(set(positions)) > 1 or None in positions:
        summaries: dict[int, Summary] = {i: start.finished for i, start in enumerate(starts) if start.finished}
        for where in dict.fromkeys(p for p in positions if p is not None):
            members = [i for i, p in enumerate(positions) if p == where]
            summaries.update(zip(members, _train_group([replace(specs[i], start=starts[i]) for i in members], reporter,
                                                       wandb_server, fuse)))
        return [summaries[i] for i in range(len(specs))]
    resumed = [start.resumed for start in starts]
    fuse = fuse and len(specs) > 1
    console = GroupConsole(reporter.console, [Path(spec.run_dir).name for spec in specs]) if fuse else None
    with contextlib.ExitStack() as records:
        if console is not None:  # its table shows until the members' records are closed (left last)
            records.enter_context(console.showing())
        runs = [records.enter_context(recorded(spec, r, console.member(i) if console else reporter, wandb_server,
                                               concurrent=fuse)) for i, (spec, r) in enumerate(zip(specs, resumed))]
        with StopSignal() as stop_signal, torch_settings(specs[0].cfg, torch.device(resolve_device(specs[0].cfg))):
            group = start_group(runs, stop_signal, fuse)
            fit(group)
            for run, loop in zip(runs, group.loops):
                run.left_group_at = loop.left_group_at
        if stop_signal.received is not None:
            for run in runs:
                reporter.warn(f"signal {stop_signal.received} came during the final evaluation; {run.run_dir} ended "
                              f"{run.summary.status} and its records are whole")
    return [run.summary for run in runs]


def train(cfg: DictConfig, run_dir: Path, choices: Optional[dict] = None, overrides: Optional[list] = None,
          reporter: Optional[Reporter] = None,
          name: Optional[str] = None, group: Optional[str] = None, wandb_server: Optional[WandbServer] = None) -> Summary:
    """Run one validated config into `run_dir`. summary.json says `running` until the run
    ends, then its status: completed, early_stopped, diverged, stopped, pruned, failed or interrupted.
    `name` and `group` name the W&B run (default: the run dir's name, for both); the jobs of
    one process share a `wandb_server`, so an unreachable server costs its timeout once."""
    return train_group([RunSpec(cfg, Path(run_dir), choices or {}, overrides or [], name, group)], reporter, wandb_server)[0]
