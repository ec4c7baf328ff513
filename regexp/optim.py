"""Optimizers with decay/no-decay parameter groups, lr schedules as pure functions, clipping."""

import math
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from regexp.config import builder
from regexp.tracking import plural


def is_weight(p: torch.Tensor) -> bool:
    """Matrices and conv kernels; biases and norm scales/shifts are 1-D (nanoGPT's rule)."""
    return p.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Weight decay on weights only, unless `decay_norm_and_bias` asks for all parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if decay_norm_and_bias or is_weight(p)]
    kept = [p for p in params if not (decay_norm_and_bias or is_weight(p))]
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": kept, "weight_decay": 0.0},
    ]


def _kernels(groups: list[dict]) -> dict:
    """One fused kernel per step on CUDA; elsewhere PyTorch's default (foreach where it helps)."""
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    return {"fused": True} if on_cuda else {}


# ---------------------------------------------------------------- optimizers (REGISTRY["optimizer"])
def sgd(groups: list[dict], cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """Plain SGD, or heavy-ball momentum when cfg.momentum > 0 (optimizer=momentum)."""
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **_kernels(groups))


def nesterov(groups: list[dict], cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, **_kernels(groups))


def adam(groups: list[dict], cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """Adam adds weight_decay * w to the gradient (coupled L2, then adapted)."""
    return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **_kernels(groups))


def adamw(groups: list[dict], cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW shrinks w directly: w -= lr * weight_decay * w (decoupled)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **_kernels(groups))


def scaled_lr(lr: float, accumulation_steps: int, scale_lr: str) -> float:
    """The base lr for an effective batch `accumulation_steps` times larger."""
    return {"off": lr, "linear": lr * accumulation_steps, "sqrt": lr * math.sqrt(accumulation_steps)}[scale_lr]


def build_optimizer(model: nn.Module, cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    return builder("optimizer", cfg.name)(groups, cfg, lr)


# ---------------------------------------------------------------- schedules (REGISTRY["scheduler"])
# Each is a pure function of the optimizer step: (cfg, step, total_steps, steps_per_epoch,
# base_lr) -> multiplier of the base lr. No state, so a stack of models can carry its own numbers.
def _cosine(t: float, start: float, end: float) -> float:
    """Cosine from `start` (t=0) to `end` (t=1)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def constant(cfg: Any, step: int, total_steps: int, steps_per_epoch: int, base_lr: float) -> float:
    return 1.0


def step_decay(cfg: Any, step: int, total_steps: int, steps_per_epoch: int, base_lr: float) -> float:
    """x gamma every `step_size` epochs."""
    return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)


def cosine(cfg: Any, step: int, total_steps: int, steps_per_epoch: int, base_lr: float) -> float:
    """From the base lr down to min_lr over the run."""
    return _cosine(step / max(total_steps, 1), 1.0, cfg.min_lr / base_lr)


def warmup_cosine(cfg: Any, step: int, total_steps: int, steps_per_epoch: int, base_lr: float) -> float:
    """Linear warmup from 0 over `warmup_steps`, then cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    return _cosine((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0, cfg.min_lr / base_lr)


def one_cycle(cfg: Any, step: int, total_steps: int, steps_per_epoch: int, base_lr: float) -> float:
    """Cosine up from lr / div_factor for pct_start of the run, then down to start / final_div_factor."""
    start = 1.0 / cfg.div_factor
    rise = peak_step(cfg, total_steps)
    if step < rise:
        return _cosine(step / rise, start, 1.0)
    return _cosine((step - rise) / max(total_steps - rise, 1), 1.0, start / cfg.final_div_factor)


def peak_step(cfg: Any, total_steps: int) -> Optional[int]:
    """The step (0-based) at which a schedule that warms up reaches the base lr; None for one that starts there."""
    if cfg.name == "warmup_cosine":
        return cfg.warmup_steps
    if cfg.name == "onecycle":
        return max(int(cfg.pct_start * total_steps), 1)
    return None


def schedule_warnings(cfg: Any, total_steps: int) -> list[str]:
    """A warmup as long as the run or longer: its lr never reaches optimizer.lr."""
    peak = peak_step(cfg, total_steps)
    if peak is None or peak < total_steps:
        return []
    why = f"warmup_steps={cfg.warmup_steps}" if cfg.name == "warmup_cosine" else f"pct_start={cfg.pct_start} rises for {peak}"
    return [f"scheduler={cfg.name}: {why} of the run's {plural(total_steps, 'step')}: the lr never reaches optimizer.lr "
            f"(at most {lr_factor(cfg, total_steps - 1, total_steps, 1, 1.0):.3g} of it); shorten the warmup or train longer"]


def lr_factor(cfg: Any, step: int, total_steps: int, steps_per_epoch: int, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): a pure function."""
    return builder("scheduler", cfg.name)(cfg, step, total_steps, steps_per_epoch, base_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, total_steps: int, steps_per_epoch: int, base_lr: float):
    plain = OmegaConf.to_object(cfg)  # a dataclass: read every step, at Python attribute speed
    schedule = builder("scheduler", cfg.name)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(plain, step, total_steps, steps_per_epoch, base_lr)
    )


# ------------------------------------------------------------------ clipping
def global_grad_norm(params: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients as one vector, on the device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, norm_type)), norm_type)


# clip functions (REGISTRY["clip"]): clip in place (after unscaling) and return, as device
# tensors, the pre-clip global norm when clipping computed it anyway, and whether this step was clipped.
def no_clip(params: list[torch.Tensor], cfg: Any) -> tuple[None, None]:
    return None, None


def clip_norm(params: list[torch.Tensor], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale all gradients together when their global norm exceeds max_norm."""
    pre = torch.nn.utils.clip_grad_norm_(params, cfg.max_norm, norm_type=cfg.norm_type, foreach=True)
    return pre, pre > cfg.max_norm


def clip_value(params: list[torch.Tensor], cfg: Any) -> tuple[None, torch.Tensor]:
    """Clamp each gradient element to [-clip_value, clip_value]."""
    grads = [p.grad for p in params if p.grad is not None]
    clipped = torch.stack(torch._foreach_norm(grads, float("inf"))).amax() > cfg.clip_value
    torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
    return None, clipped


def clip_gradients(params: list[torch.Tensor], cfg: Any) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Clip as option `cfg.name` says: (pre-clip global norm or None, clipped or None). `cfg` is
    a ClipConfig; the loop passes the plain dataclass (DictConfig reads cost µs per step)."""
    return builder("clip", cfg.name)(params, cfg)
