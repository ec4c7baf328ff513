"""The training loop (DESIGN §4). `fit` reads top to bottom: set-up, then per epoch the
micro-batch windows, the optimizer step in the seeds' order, log steps, evaluation.

The hot path keeps running sums on the device and syncs with the host only on log steps
and at the end of an epoch.
"""

import contextlib
import logging
import math
import random
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from regexp.config import resolve_device, resolved_container, validate, warnings_for
from regexp.data import augment_batch, check_available, load_data
from regexp.init import init_weights
from regexp.models import build_model
from regexp.optim import build_optimizer, build_scheduler, clip_gradients, scaled_lr
from regexp.regularizers import EarlyStopping, apply_max_norm, build_criterion, build_penalty, weights
from regexp.tracking import MetricsFile, Reporter, Tracker, atomic_write, write_json

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
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
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


def fit(cfg: DictConfig, run_dir: Path, summary: dict[str, Any], reporter: Reporter, metrics: Tracker) -> None:
    """Train, evaluate and checkpoint one run; fill `summary` as it goes."""
    t_start = time.perf_counter()
    seed_everything(cfg.seed, cfg.device.deterministic)
    device = torch.device(resolve_device(cfg))
    precision = cfg.device.precision
    data = load_data(cfg.dataset, device)

    model = build_model(cfg.model, cfg.norm, cfg.regularizer.dropout, data.input_shape, data.num_classes)
    init_weights(model, cfg.init, cfg.model.activation)
    model.to(device)
    if device.type == "cuda" and cfg.device.channels_last and len(data.input_shape) == 3 and cfg.model.name in ("cnn", "resnet"):
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.device.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    penalized = weights(model)

    k = cfg.accumulation.steps
    n_train = len(data.train_y)
    windows = window_sizes(n_train, cfg.batch_size, k)
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
    measure_grads = cfg.monitor.name != "off"

    summary.update(device=str(device), parameters=sum(p.numel() for p in params), steps_per_epoch=steps_per_epoch,
                   effective_batch=k * cfg.batch_size, train_samples=n_train)
    reporter.line(
        f"{cfg.dataset.name} ({n_train} train / {len(data.val_y)} val / {len(data.test_y)} test) · {cfg.model.name} "
        f"({summary['parameters']:,} params) · {cfg.optimizer.name} lr {base_lr:g} · {device} {precision} · "
        f"{cfg.epochs} epochs × {steps_per_epoch} steps · batch {cfg.batch_size}×{k} · run dir {run_dir}"
    )
    for warning in warnings_for(cfg):
        reporter.warn(warning)

    zero = torch.zeros((), device=device)
    step, train_seconds, samples_trained, status = 0, 0.0, 0, "completed"
    epoch_row: dict[str, Any] = {}
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(n_train, device=device)
        epoch_loss, epoch_correct, epoch_n = zero.clone(), zero.clone(), 0
        interval_loss, interval_correct, interval_penalty, interval_n = zero.clone(), zero.clone(), zero.clone(), 0
        clipped_steps, interval_steps = zero.clone(), 0
        t_epoch = t_interval = time.perf_counter()
        start = 0
        with reporter.epoch_progress(epoch, cfg.epochs, n_train) as bar:
            for sizes in windows:
                # forward/backward over the window's micro-batches (k = 1: one batch)
                for n_i, share in zip(sizes, micro_batch_weights(sizes)):
                    idx = perm[start : start + n_i]
                    start += n_i
                    x, y = data.train_x[idx], data.train_y[idx]
                    if augment is not None:
                        x = augment_batch(x, *augment)
                    with autocast(device.type, precision):
                        logits = forward(x)
                    loss = criterion(logits.float(), y)
                    total = loss
                    if penalty is not None:
                        pen = penalty(penalized)
                        total = loss + pen
                        interval_penalty += pen.detach() * n_i
                    scaler.scale(total * share).backward()
                    correct = (logits.argmax(1) == y).sum()
                    interval_loss += loss.detach() * n_i
                    interval_correct += correct
                    interval_n += n_i
                    bar.advance(n_i)

                # the step: unscale -> clip (pre/post norms) -> step -> max-norm -> schedule -> zero
                log_step = (step + 1) % cfg.monitor.log_every == 0
                scaler.unscale_(optimizer)
                pre_norm, post_norm, clipped = clip_gradients(params, cfg.clip, measure=log_step and measure_grads)
                if clipped is not None:
                    clipped_steps += clipped
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                if max_norm is not None:
                    apply_max_norm(penalized, max_norm)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                interval_steps += 1

                if log_step:  # the only per-interval host sync
                    values = [interval_loss, interval_correct, interval_penalty, clipped_steps]
                    values += [n for n in (pre_norm, post_norm) if n is not None and measure_grads]
                    synced = torch.stack([v.float() for v in values]).tolist()
                    now = time.perf_counter()
                    record = {
                        "step": step, "epoch": epoch,
                        "train/loss": synced[0] / interval_n, "train/acc": synced[1] / interval_n,
                        "opt/lr": lr, "opt/effective_batch": sum(sizes),
                        "perf/samples_per_s": interval_n / (now - t_interval),
                        "perf/step_ms": 1000 * (now - t_interval) / interval_steps,
                    }
                    if penalty is not None:
                        record["train/penalty"] = synced[2] / interval_n
                    if len(synced) > 4:
                        record["grad/global_norm"], record["grad/global_norm_clipped"] = synced[4], synced[5]
                        if cfg.clip.name != "none":
                            record["grad/clip_frac"] = synced[3] / interval_steps
                    metrics.write(record)
                    bar.show(record["train/loss"], record["perf/samples_per_s"])
                    epoch_loss += interval_loss
                    epoch_correct += interval_correct
                    epoch_n += interval_n
                    interval_loss, interval_correct, interval_penalty, interval_n = zero.clone(), zero.clone(), zero.clone(), 0
                    clipped_steps, interval_steps, t_interval = zero.clone(), 0, time.perf_counter()
                    bad = [name for name in ("train/loss", "grad/global_norm") if name in record and not math.isfinite(record[name])]
                    if bad:
                        status = "diverged"
                        metrics.write({"step": step, "nonfinite/step": step, "nonfinite/where": bad[0]})
                        break
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break

        # end of epoch: one sync for the epoch's training metrics, then evaluation
        epoch_loss += interval_loss
        epoch_correct += interval_correct
        epoch_n += interval_n
        loss_sum, correct_sum = torch.stack([epoch_loss, epoch_correct.float()]).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t_epoch
        samples_trained += epoch_n
        epoch_row = {"epoch": epoch, "step": step}
        if epoch_n:
            epoch_row.update({"train/loss": loss_sum / epoch_n, "train/acc": correct_sum / epoch_n})
        if status != "diverged" and not math.isfinite(loss_sum):
            status = "diverged"
            metrics.write({"step": step, "nonfinite/step": step, "nonfinite/where": "train/loss"})
        if status == "diverged":
            break

        last_epoch = epoch == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if epoch % cfg.eval_every == 0 or last_epoch:
            for name, value in evaluate(model, data.val_x, data.val_y, cfg.eval_batch_size, precision).items():
                epoch_row[f"val/{name}"] = value
            if best.monitor in epoch_row and best.update(epoch_row[best.monitor], epoch):
                best_state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
                save_checkpoint(run_dir / "best.pt", {"model": best_state, "epoch": epoch, "step": step, best.monitor: best.best})
        epoch_row["opt/lr"] = optimizer.param_groups[0]["lr"]
        epoch_row["perf/samples_per_s"] = samples_trained / train_seconds
        metrics.write(epoch_row)
        reporter.epoch_line(epoch, cfg.epochs, {k_: v for k_, v in epoch_row.items() if k_ not in ("epoch", "step")})
        save_checkpoint(run_dir / "checkpoint.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "early_stopping": best.state_dict(), "epoch": epoch, "step": step,
            "config": OmegaConf.to_container(cfg, resolve=True),
        })
        if best.should_stop:
            status = "early_stopped"
            break
        if last_epoch:
            break

    final = {k_: v for k_, v in epoch_row.items() if k_.startswith(("train/", "val/"))}
    if status == "early_stopped" and best_state is not None:
        model.load_state_dict(best_state)  # report the weights early stopping chose
        final.update({best.monitor: best.best, "best_epoch": best.best_epoch})
    if status != "diverged":
        final.update({f"test/{k_}": v for k_, v in evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size, precision).items()})
    final["perf/samples_per_s"] = samples_trained / train_seconds if train_seconds else 0.0
    summary.update(status=status, metrics=final, steps=step, epochs_completed=epoch_row.get("epoch", 0),
                   train_time_s=round(train_seconds, 3), wall_time_s=round(time.perf_counter() - t_start, 3))


def train(cfg: DictConfig, run_dir: Path, choices: Optional[dict] = None, overrides: Optional[list] = None,
          composed: Optional[DictConfig] = None, reporter: Optional[Reporter] = None) -> dict[str, Any]:
    """Run one validated config into `run_dir`. summary.json says `running` until the run
    ends, then its status: completed, early_stopped, diverged, failed or interrupted."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = reporter or Reporter()
    started = time.perf_counter()
    resolved = resolved_container(composed if composed is not None else cfg)
    summary: dict[str, Any] = {
        "status": "running", "run_dir": str(run_dir), "started_at": datetime.now(timezone.utc).isoformat(),
        "choices": choices or {}, "overrides": overrides or [], "config": resolved,
    }
    write_json(run_dir / "summary.json", summary)
    tracker = Tracker([MetricsFile(run_dir / "metrics.jsonl")])
    exit_code = 1
    try:
        fit(cfg, run_dir, summary, reporter, tracker)
        exit_code = 0
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        exit_code = 130 if interrupted else 1
        summary.update(status="interrupted" if interrupted else "failed", error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(), wall_time_s=round(time.perf_counter() - started, 3))
        raise
    finally:
        summary["finished_at"] = datetime.now(timezone.utc).isoformat()
        write_json(run_dir / "summary.json", summary)
        tracker.close(exit_code)
    style = {"completed": "green", "early_stopped": "green", "diverged": "red"}.get(summary["status"], "yellow")
    reporter.summary(f"regexp · {summary['status']}", {**summary["metrics"], "wall_time_s": summary["wall_time_s"], "run_dir": str(run_dir)}, style)
    return summary


def prepare(cfg: DictConfig) -> DictConfig:
    """Every check on the config that must pass before any work: schema, ranges, device,
    data files. Raises ConfigError."""
    typed = validate(cfg)
    resolve_device(typed)
    check_available(typed.dataset)
    return typed
