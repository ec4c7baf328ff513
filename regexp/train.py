"""The training loop (DESIGN §4). `fit` reads top to bottom: set-up, then per epoch the
micro-batch windows, the optimizer step in the seeds' order, log steps, evaluation.

The hot path keeps running sums on the device and syncs with the host only on log steps
and at the end of an epoch.
"""

import contextlib
import copy
import json
import logging
import random
import time
import traceback
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from regexp.config import RunError, resolve_device, resolve_precision, resolved_container, validate, warnings_for
from regexp.data import augment_batch, check_available, load_data
from regexp.diagnose import diagnose, read_run
from regexp.init import init_weights
from regexp.models import build_model
from regexp.monitor import Monitor, NonfiniteGuard, trace_nonfinite
from regexp.optim import build_optimizer, build_scheduler, clip_gradients, global_grad_norm, scaled_lr
from regexp.regularizers import EarlyStopping, apply_max_norm, build_criterion, build_penalty, weights
from regexp.tracking import (
    HistogramFile,
    MetricsFile,
    Reporter,
    Tracker,
    atomic_write,
    read_summary,
    split_finite,
    write_json,
)
from regexp.wandb_logger import wandb_sinks

log = logging.getLogger("regexp")


def window_sizes(n: int, batch_size: int, k: int) -> list[list[int]]:
    """One epoch's micro-batch sizes, grouped into accumulation windows of k micro-batches.
    The last micro-batch and the last window may be short."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return [sizes[i : i + k] for i in range(0, len(sizes), k)]


def micro_batch_weights(sizes: list[int]) -> list[float]:
    """Each micro-batch's share of its window's samples. Scaling each mean loss by it makes
    the summed gradients equal one batch of sum(sizes), also for a short window (dividing
    by k, as Lightning does, over-weights the samples of a short final window)."""
    total = sum(sizes)
    return [n / total for n in sizes]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    np.random.seed(seed)
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def autocast(device_type: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def augmentation(cfg: DictConfig) -> Optional[tuple[int, bool]]:
    """(crop padding, flip) when +regularizer=augment is on; null fields take the data set's recipe."""
    aug = cfg.regularizer.augment
    if aug is None:
        return None
    crop = aug.crop if aug.crop is not None else cfg.dataset.augment.crop
    flip = aug.flip if aug.flip is not None else cfg.dataset.augment.flip
    return (crop, flip) if (crop or flip) else None


def window_batches(perm: torch.Tensor, offset: int, sizes: list[int]) -> list[tuple[torch.Tensor, int, float]]:
    """(sample indices, size, share of the window) of each micro-batch of one window."""
    batches = []
    for n_i, share in zip(sizes, micro_batch_weights(sizes)):
        batches.append((perm[offset : offset + n_i], n_i, share))
        offset += n_i
    return batches


def to_host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host-device sync for every value of a log step."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()))


class RunningSums:
    """Device-side sums over the steps since the last log step: no host sync per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.loss, self.correct, self.penalty, self.clipped = zero, zero.clone(), zero.clone(), zero.clone()
        self.samples, self.steps, self.started = 0, 0, time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "correct": self.correct, "penalty": self.penalty, "clipped": self.clipped,
                "samples": self.samples, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss, self.correct, self.penalty, self.clipped = state["loss"], state["correct"], state["penalty"], state["clipped"]
        self.samples, self.steps, self.started = state["samples"], state["steps"], time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, penalty: torch.Tensor, samples: int) -> None:
        self.loss = self.loss + loss
        self.correct = self.correct + correct
        self.penalty = self.penalty + penalty
        self.samples += samples


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM after the checkpoint was saved; exit code 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopSignal:
    """The first SIGINT/SIGTERM asks the loop to save a checkpoint and stop at the next
    step; a second one stops at once."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise Interrupted(signum)
        self.received = signum
        log.warning("signal %d: saving a checkpoint and stopping (again to stop at once)", signum)

    def __exit__(self, *exc: Any) -> None:
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without executing pickled code; RunError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no checkpoint there; resume= takes a run directory that holds checkpoint.pt") from None
    except Exception as e:  # truncated, corrupted, or not a checkpoint at all
        raise RunError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                       "it is truncated or corrupted: resume from another run or start afresh") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"{path}: not a regexp training checkpoint (missing {', '.join(missing)})")
    return state


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "window", "step", "perm", "config")


def check_checkpoint_fits(path: Path, state: dict[str, Any], cfg: DictConfig) -> None:
    """The checkpoint must come from the same model, norm and data set (a resumed run may
    change anything else, e.g. epochs)."""
    saved = state["config"]
    for key in ("model", "norm"):
        if saved.get(key) != OmegaConf.to_container(cfg[key], resolve=True):
            raise RunError(f"{path}: the checkpoint is of another {key} ({saved.get(key)}); resume with that run's own config")
    if saved.get("dataset", {}).get("name") != cfg.dataset.name:
        raise RunError(f"{path}: the checkpoint was trained on {saved.get('dataset', {}).get('name')}, not {cfg.dataset.name}")


def fit(cfg: DictConfig, run_dir: Path, summary: dict[str, Any], reporter: Reporter, tracker: Tracker,
        stop_signal: "StopSignal", resumed: Optional[tuple[Path, dict[str, Any]]] = None) -> None:
    """Train, evaluate and checkpoint one run (from a checkpoint's (path, state) when
    `resumed`); fill `summary` as it goes."""
    t_start = time.perf_counter()
    seed_everything(cfg.seed, cfg.device.deterministic)
    device = torch.device(resolve_device(cfg))
    precision = resolve_precision(cfg, device.type)
    if device.type == "cuda":  # TF32 matmuls and convs: fp32 range, tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = load_data(cfg.dataset, device)

    model = build_model(cfg.model, cfg.norm, cfg.regularizer.dropout, data.input_shape, data.num_classes)
    init_weights(model, cfg.init, cfg.model.activation)
    model.to(device)
    if device.type == "cuda" and cfg.device.channels_last and cfg.model.name in ("cnn", "resnet"):
        model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model) if cfg.device.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    penalized = weights(model)

    k = cfg.accumulation.steps
    n_train = len(data.train_y)
    windows = window_sizes(n_train, cfg.batch_size, k)
    offsets = list(accumulate(map(sum, windows), initial=0))[:-1]  # first sample of each window
    steps_per_epoch = len(windows)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    base_lr = scaled_lr(cfg.optimizer.lr, k, cfg.accumulation.scale_lr)
    optimizer = build_optimizer(model, cfg.optimizer, base_lr)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps, steps_per_epoch, base_lr)
    criterion = build_criterion(cfg.regularizer)
    penalty = build_penalty(cfg.regularizer)
    max_norm = cfg.regularizer.max_norm.value if cfg.regularizer.max_norm is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    augment = augmentation(cfg)
    es = cfg.regularizer.early_stopping
    best = EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta) if es is not None else EarlyStopping("val/acc", "max")
    best_state: Optional[dict[str, torch.Tensor]] = None
    monitor = Monitor(model, cfg.monitor)
    guard = NonfiniteGuard(device)
    on_nonfinite = cfg.monitor.on_nonfinite
    skip_bad_steps = on_nonfinite == "skip"
    # read on every step: plain Python values (a DictConfig read costs microseconds)
    clip = OmegaConf.to_object(cfg.clip)
    log_every, histogram_every = cfg.monitor.log_every, cfg.monitor.histogram_every
    every_steps, max_steps = cfg.checkpoint.every_steps, cfg.max_steps
    zero = torch.zeros((), device=device)

    summary.update(device=str(device), parameters=sum(p.numel() for p in params), steps_per_epoch=steps_per_epoch,
                   effective_batch=k * cfg.batch_size, train_samples=n_train)
    reporter.line(
        f"{cfg.dataset.name} ({n_train} train / {len(data.val_y)} val / {len(data.test_y)} test) · {cfg.model.name} "
        f"({summary['parameters']:,} params) · {cfg.optimizer.name} lr {base_lr:g} · {device} {precision} · "
        f"{cfg.epochs} epochs × {steps_per_epoch} steps · batch {cfg.batch_size}×{k} · run dir {run_dir}"
    )
    for warning in warnings_for(cfg):
        reporter.warn(warning)

    def forward_backward(batches: list, net: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """Forward + backward over one window's micro-batches, each loss weighted by its share
        of the window's samples. Returns the window's (loss, correct, penalty) sums."""
        loss_sum = correct = penalty_sum = zero
        for idx, n_i, share in batches:
            x, y = data.train_x[idx], data.train_y[idx]
            if augment is not None:
                x = augment_batch(x, *augment)
            with autocast(device.type, precision):
                logits = net(x)
            loss = criterion(logits.float(), y)
            total = loss
            if penalty is not None:
                pen = penalty(penalized)
                total = loss + pen
                penalty_sum = penalty_sum + pen.detach() * n_i
            scaler.scale(total * share if share != 1.0 else total).backward()
            loss_sum = loss_sum + loss.detach() * n_i
            correct = correct + (logits.argmax(1) == y).sum()
        return loss_sum, correct, penalty_sum

    def unscale_and_clip(measure: bool, per_layer: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Unscale (fp16), clip; (pre-clip global norm when measured or computed anyway, clipped?).
        With `per_layer` (log steps) each layer's norm is recorded before and after clipping."""
        scaler.unscale_(optimizer)
        if per_layer:
            monitor.grads("norm")
        pre = global_grad_norm(params) if measure and clip.name != "norm" else None
        clip_norm, clipped = clip_gradients(params, clip)
        if per_layer:
            monitor.grads("norm_clipped")
        return (clip_norm if clip_norm is not None else pre), clipped

    def apply_update() -> None:
        scaler.step(optimizer)
        scaler.update()
        if max_norm is not None:
            apply_max_norm(penalized, max_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def capture(epoch: int, window: int, perm: torch.Tensor) -> dict[str, Any]:
        """The full training state on the device: where a replay starts, the last finite state."""
        return {"model": {n: t.detach().clone() for n, t in model.state_dict().items()},
                "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(), "epoch": epoch, "window": window,
                "step": step, "perm": perm}

    def restore(snap: dict[str, Any]) -> None:
        model.load_state_dict(snap["model"])
        optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        scheduler.load_state_dict(snap["scheduler"])
        scaler.load_state_dict(snap["scaler"])
        set_rng_state(snap["rng"])
        optimizer.zero_grad(set_to_none=True)

    def replay_and_trace(snap: dict[str, Any], bad_step: int) -> dict[str, Any]:
        """Re-run from `snap` (same data order, same RNG) up to the first bad step and trace
        that step's batch with hooks on every layer."""
        restore(snap)
        for w in range(snap["window"], len(windows)):
            batches = window_batches(snap["perm"], offsets[w], windows[w])
            if snap["step"] + w - snap["window"] == bad_step:
                found = trace_nonfinite(model, lambda: forward_backward(batches, model)[0])
                optimizer.zero_grad(set_to_none=True)
                return found
            forward_backward(batches, model)
            unscale_and_clip(measure=False)
            apply_update()
        return {"where": None, "layer": None}

    def nonfinite_event(found: dict[str, Any], bad_step: int) -> dict[str, Any]:
        where = " ".join(str(v) for v in (found.get("where"), found.get("layer")) if v) or "not reproduced"
        event = {"step": bad_step + 1, "nonfinite/step": bad_step + 1, "nonfinite/where": where,
                 "nonfinite/kind": found.get("where"), "nonfinite/layer": found.get("layer"), "nonfinite/action": on_nonfinite}
        tracker.write(event)
        reporter.warn(f"non-finite loss or gradient at step {bad_step + 1}: first in {where} (on_nonfinite={on_nonfinite})")
        summary.setdefault("nonfinite", event)
        return event

    def checkpoint_state(epoch: int, window: int, perm: torch.Tensor) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one is: the next
        window `window` of epoch `epoch` (window == len(windows): the epoch is done)."""
        return {**capture(epoch, window, perm), "early_stopping": best.state_dict(),
                "train_seconds": train_seconds, "samples_trained": samples_trained,
                "epoch_sums": {"loss": epoch_loss, "correct": epoch_correct, "samples": epoch_samples},
                "interval": sums.state_dict(), "nonfinite_reported": nonfinite_reported,
                "model_name": cfg.model.name, "config": OmegaConf.to_container(cfg, resolve=True)}

    sums = RunningSums(device)
    step, train_seconds, samples_trained, status = 0, 0.0, 0, "completed"
    nonfinite_reported = False
    epoch_row: dict[str, Any] = {}
    start_epoch, start_window, resumed_perm = 1, 0, None
    epoch_loss = epoch_correct = torch.zeros((), device=device)
    epoch_samples = 0
    if resumed is not None:
        resume_from, state = resumed
        state = move_to(state, device)
        restore(state)
        best.load_state_dict(state["early_stopping"])
        step, train_seconds, samples_trained = state["step"], state["train_seconds"], state["samples_trained"]
        sums.load_state_dict(state["interval"])
        nonfinite_reported = state["nonfinite_reported"]
        start_epoch, start_window = state["epoch"], state["window"]
        if start_window >= len(windows):  # saved at the end of an epoch: start the next one
            start_epoch, start_window = start_epoch + 1, 0
        else:
            resumed_perm = state["perm"]
            epoch_loss, epoch_correct = state["epoch_sums"]["loss"], state["epoch_sums"]["correct"]
            epoch_samples = state["epoch_sums"]["samples"]
        if (run_dir / "best.pt").is_file():
            best_state = torch.load(run_dir / "best.pt", map_location=device, weights_only=True)["model"]
        keep_records_up_to(run_dir / "metrics.jsonl", step)
        summary.update(resumed_from=str(resume_from), resumed_at_step=step)
        reporter.line(f"resumed from {resume_from} at step {step} (epoch {start_epoch})")

    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        perm = resumed_perm if resumed_perm is not None else torch.randperm(n_train, device=device)
        first_window, resumed_perm, start_window = start_window, None, 0
        if first_window == 0:
            epoch_loss = epoch_correct = torch.zeros((), device=device)
            epoch_samples = 0
        snapshot = capture(epoch, first_window, perm)
        t_epoch = time.perf_counter()
        with reporter.epoch_progress(epoch, cfg.epochs, n_train) as bar:
            bar.advance(offsets[first_window] if first_window < len(windows) else n_train)
            for w in range(first_window, len(windows)):
                sizes = windows[w]
                if stop_signal.received is not None:  # Ctrl-C / SIGTERM: save where we are, then stop
                    train_seconds += time.perf_counter() - t_epoch
                    save_checkpoint(run_dir / "checkpoint.pt", checkpoint_state(epoch, w, perm))
                    summary.update(steps=step, train_time_s=round(train_seconds, 3))
                    raise Interrupted(stop_signal.received)
                log_step = (step + 1) % log_every == 0
                batches = window_batches(perm, offsets[w], sizes)
                rng_before = rng_state() if skip_bad_steps else None
                # log steps run eager (hooks) and measure each layer; other steps only the guard's values
                with monitor.activations() if log_step and monitor.enabled else contextlib.nullcontext():
                    window_sums = forward_backward(batches, model if log_step else compiled)
                pre_norm, clipped = unscale_and_clip(measure=(log_step and monitor.enabled) or skip_bad_steps,
                                                     per_layer=log_step and monitor.enabled)
                if skip_bad_steps and not torch.isfinite(torch.stack([window_sums[0], pre_norm])).all().item():  # one sync per step
                    optimizer.zero_grad(set_to_none=True)
                    if not nonfinite_reported:
                        set_rng_state(rng_before)
                        nonfinite_event(trace_nonfinite(model, lambda: forward_backward(batches, model)[0]), step)
                        optimizer.zero_grad(set_to_none=True)
                        nonfinite_reported = True
                    summary["skipped_steps"] = summary.get("skipped_steps", 0) + 1
                    bar.advance(sum(sizes))
                    continue
                guard.watch(step, window_sums[0], pre_norm)
                sums.add(*window_sums, samples=sum(sizes))
                if clipped is not None:
                    sums.clipped = sums.clipped + clipped
                lr = optimizer.param_groups[0]["lr"]
                if log_step and monitor.enabled:
                    post_norm = global_grad_norm(params) if clip.name != "none" else pre_norm
                    monitor.before_update()
                apply_update()
                step += 1
                sums.steps += 1
                bar.advance(sum(sizes))

                if log_step:
                    if monitor.enabled:
                        monitor.after_update()
                    device_values = {"loss": sums.loss, "correct": sums.correct, "penalty": sums.penalty,
                                     "clipped": sums.clipped, "first_bad": guard.first_bad_step()}
                    if monitor.enabled:
                        device_values.update({"grad/global_norm": pre_norm, "grad/global_norm_clipped": post_norm})
                        device_values.update(monitor.pop())
                    host = to_host(device_values)  # the only sync of the interval
                    now = time.perf_counter()
                    record = {"step": step, "epoch": epoch,
                              "train/loss": host.pop("loss") / sums.samples, "train/acc": host.pop("correct") / sums.samples,
                              "opt/lr": lr, "opt/effective_batch": sum(sizes),
                              "perf/samples_per_s": sums.samples / (now - sums.started),
                              "perf/step_ms": 1000 * (now - sums.started) / sums.steps}
                    penalty_sum, clipped_steps, first_bad = host.pop("penalty"), host.pop("clipped"), int(host.pop("first_bad"))
                    if penalty is not None:
                        record["train/penalty"] = penalty_sum / sums.samples
                    if clip.name != "none" and monitor.enabled:
                        record["grad/clip_frac"] = clipped_steps / sums.steps
                    record.update(host)
                    tracker.write(record)
                    if histogram_every and (step // log_every) % histogram_every == 0:
                        tracker.write_histograms(step, monitor.histograms())
                    bar.show(record["train/loss"], record["perf/samples_per_s"])
                    epoch_loss, epoch_correct = epoch_loss + sums.loss, epoch_correct + sums.correct
                    epoch_samples += sums.samples
                    sums.reset()
                    if first_bad >= 0 and not nonfinite_reported:
                        current = capture(epoch, w + 1, perm) if on_nonfinite == "continue" else None
                        nonfinite_event(replay_and_trace(snapshot, first_bad), first_bad)
                        nonfinite_reported = True
                        if on_nonfinite == "stop":
                            restore(snapshot)  # the last finite state is what gets saved
                            step, status = snapshot["step"], "diverged"
                            break
                        restore(current)
                    guard.reset()
                    if first_bad < 0:
                        snapshot = capture(epoch, w + 1, perm)
                if every_steps is not None and step % every_steps == 0:
                    save_checkpoint(run_dir / "checkpoint.pt", checkpoint_state(epoch, w + 1, perm))
                if max_steps is not None and step >= max_steps:
                    break

        # end of epoch: one sync for the epoch's training metrics and the guard, then evaluation
        epoch_loss, epoch_correct = epoch_loss + sums.loss, epoch_correct + sums.correct
        epoch_samples += sums.samples
        loss_sum, correct_sum, first_bad = to_host({"l": epoch_loss, "c": epoch_correct, "b": guard.first_bad_step()}).values()
        sums.reset()
        guard.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t_epoch
        samples_trained += epoch_samples
        if status != "diverged" and first_bad >= 0 and not nonfinite_reported:
            nonfinite_event(replay_and_trace(snapshot, int(first_bad)), int(first_bad))
            nonfinite_reported = True
            if on_nonfinite == "stop":
                restore(snapshot)
                step, status = snapshot["step"], "diverged"
        epoch_row = {"epoch": epoch, "step": step}
        if epoch_samples:
            epoch_row.update({"epoch/train_loss": loss_sum / epoch_samples, "epoch/train_acc": correct_sum / epoch_samples})
        if status == "diverged":
            summary["last_finite_step"] = snapshot["step"]
            save_checkpoint(run_dir / "checkpoint.pt", checkpoint_state(snapshot["epoch"], snapshot["window"], snapshot["perm"]))
            break

        last_epoch = epoch == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if epoch % cfg.eval_every == 0 or last_epoch:
            for name, value in evaluate(model, data.val_x, data.val_y, cfg.eval_batch_size, precision).items():
                epoch_row[f"val/{name}"] = value
            if best.monitor in epoch_row and best.update(epoch_row[best.monitor], epoch):
                best_state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
                save_checkpoint(run_dir / "best.pt", {"model": best_state, "epoch": epoch, "step": step, best.monitor: best.best})
        epoch_row["epoch/lr"] = optimizer.param_groups[0]["lr"]
        epoch_row["epoch/samples_per_s"] = samples_trained / train_seconds  # over the run so far, eval excluded
        tracker.write(epoch_row)
        reporter.epoch_line(epoch, cfg.epochs, {k_.replace("epoch/", ""): v for k_, v in epoch_row.items() if k_ not in ("epoch", "step")})
        save_checkpoint(run_dir / "checkpoint.pt", checkpoint_state(epoch, len(windows), perm))
        if best.should_stop:
            status = "early_stopped"
            break
        if last_epoch:
            break

    final = {k_.replace("epoch/train_", "train/"): v for k_, v in epoch_row.items() if k_.startswith(("epoch/train_", "val/"))}
    if status == "early_stopped" and best_state is not None:
        model.load_state_dict(best_state)  # report the weights early stopping chose
        final.update({best.monitor: best.best, "best_epoch": best.best_epoch})
    if status != "diverged":
        final.update({f"test/{k_}": v for k_, v in evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size, precision).items()})
    final["perf/samples_per_s"] = samples_trained / train_seconds if train_seconds else 0.0
    summary.update(status=status, metrics=split_finite(final)[0], steps=step, epochs_completed=epoch_row.get("epoch", 0),
                   train_time_s=round(train_seconds, 3), wall_time_s=round(time.perf_counter() - t_start, 3))


def move_to(state: Any, device: torch.device) -> Any:
    """A checkpoint's tensors on `device`, except RNG states, which stay on the CPU."""
    if isinstance(state, dict):
        return {k: v if k == "rng" else move_to(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [move_to(v, device) for v in state]
    return state.to(device) if isinstance(state, torch.Tensor) else state


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values (checkpoints load with
    weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: DictConfig, run_dir: Path, choices: Optional[dict] = None, overrides: Optional[list] = None,
          composed: Optional[DictConfig] = None, reporter: Optional[Reporter] = None,
          name: Optional[str] = None, group: Optional[str] = None) -> dict[str, Any]:
    """Run one validated config into `run_dir`. summary.json says `running` until the run
    ends, then its status: completed, early_stopped, diverged, failed or interrupted.
    `name` and `group` name the W&B run (default: the run dir's name, for both)."""
    run_dir = Path(run_dir)
    checkpoint = resume_checkpoint(cfg.resume, run_dir)
    resumed = None
    if checkpoint is not None:  # checked before anything is written: a bad one leaves the run dir as it was
        state = read_checkpoint(checkpoint)
        check_checkpoint_fits(checkpoint, state, cfg)
        resumed = (checkpoint, state)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous_summary = read_summary(run_dir) or {}
    reporter = reporter or Reporter()
    started = time.perf_counter()
    resolved = resolved_container(composed if composed is not None else cfg)
    summary: dict[str, Any] = {
        "status": "running", "run_dir": str(run_dir), "started_at": datetime.now(timezone.utc).isoformat(),
        "choices": choices or {}, "overrides": overrides or [], "config": resolved,
    }
    write_json(run_dir / "summary.json", summary)
    tracker = Tracker([MetricsFile(run_dir / "metrics.jsonl"), HistogramFile(run_dir / "histograms.jsonl")])
    name = name or run_dir.name
    exit_code = 1
    try:
        # in here, a W&B start that fails or is interrupted (it may wait for the server) is recorded like any crash
        earlier_id = previous_summary.get("wandb_id") if resumed is not None else None
        tracker.sinks += wandb_sinks(cfg, resolved, run_dir, name, group or name, reporter.warn, earlier_id)
        summary.update({"wandb_id": sink.run_id for sink in tracker.sinks if hasattr(sink, "run_id")})
        with StopSignal() as stop_signal:
            fit(cfg, run_dir, summary, reporter, tracker, stop_signal, resumed)
        summary["findings"] = diagnose(read_run(run_dir)[0], summary)
        write_json(run_dir / "diagnosis.json", {"findings": summary["findings"]})
        exit_code = 0
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, Interrupted))
        exit_code = 128 + e.signum if isinstance(e, Interrupted) else 130 if interrupted else 1
        summary.update(status="interrupted" if interrupted else "failed", error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(), wall_time_s=round(time.perf_counter() - started, 3))
        raise
    finally:
        summary["finished_at"] = datetime.now(timezone.utc).isoformat()
        try:
            write_json(run_dir / "summary.json", summary)
        except RunError as e:  # e.g. the disk that failed the run: keep the first error
            log.error("%s", e)
        tracker.summary(summary)
        tracker.close(exit_code)
    style = {"completed": "green", "early_stopped": "green", "diverged": "red"}.get(summary["status"], "yellow")
    reporter.summary(f"regexp · {summary['status']}", {**summary["metrics"], "wall_time_s": summary["wall_time_s"], "run_dir": str(run_dir)}, style)
    reporter.diagnosis(summary["findings"])
    return summary


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


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the metrics a resumed run will write again (those after its checkpoint's step)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept)))


def prepare(cfg: DictConfig) -> DictConfig:
    """Every check on the config that must pass before any work: schema, ranges, device,
    data files. Raises ConfigError."""
    typed = validate(cfg)
    resolve_device(typed)
    check_available(typed.dataset)
    return typed
