"""N models of one architecture trained side by side: one batched forward and backward.

Each member stays an ordinary nn.Module with its own optimizer, scheduler, loss scaler and
early stopping (a TrainState). `Stack` moves every member's parameters and buffers into
stacked tensors ([N, ...], one per name) and points the member's own tensors at their
slice, so the member's optimizer, clipping, max-norm, checkpoints and diagnostics act on
its slice in place, and the batched forward reads all of them at once (HFTA's horizontal
fusion): a Linear is one bmm, a Conv2d one grouped convolution, a BatchNorm one norm over
N x C channels. Dropout takes each member's own p (0 included).

Activations travel in one of two layouts: dense ones as [N, B, F] ("nb"); feature maps as
[B, N, C, H, W] ("bn"), which is [B, N*C, H, W] for a grouped conv, a norm or a pool
without a copy.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from regexp.data import augment_batch
from regexp.models import ACTIVATIONS, Residual
from regexp.state import TrainState
from regexp.step import NO_PROBE, MicroBatch, Probe, Recipe, StepResult, apply_update, autocast, check_and_clip

ACTIVATION_TYPES = tuple(type(make()) for make in ACTIVATIONS.values())
POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)  # per channel: the template's module runs as is
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
# the layers `Stack._layer` replays (inside nn.Sequential and Residual): a custom model of them fuses (regexp.custom)
STACKABLE = (nn.Linear, nn.Conv2d, *NORMS, *ACTIVATION_TYPES, *POOLS, nn.Flatten, nn.Dropout)

CHUNK_BYTES = 4 << 20  # a stacked optimizer update works on about this much of each tensor at a time (L3-sized)
Observer = Callable[[str, Callable[[int], torch.Tensor]], None]  # (layer name, member i -> its output)


class Stack:
    """The members' parameters and buffers as stacked tensors, and the batched forward.

    `template` is one member's architecture (on the meta device) with a Dropout wherever any
    member has one; `p` and `p_input` give each member's dropout rates. With `own_dropout` (a
    custom model, whose members share their layers' settings) each Dropout keeps its own p."""

    def __init__(self, template: nn.Module, models: list[nn.Module], p: list[float], p_input: list[float],
                 recipes: list[Recipe], own_dropout: bool = False):
        self.template, self.models, self.recipes, self.own_dropout = template, models, recipes, own_dropout
        device = next(models[0].parameters()).device
        self.p = torch.tensor(p, device=device)
        self.p_input = torch.tensor(p_input, device=device)
        self.update: Optional["StackedUpdate"] = None  # the members' optimizer steps at once, when they allow it
        self.smoothing = torch.tensor([r.criterion.label_smoothing for r in recipes], device=device)
        self.l1 = torch.tensor([r.penalty.l1 if r.penalty is not None else 0.0 for r in recipes], device=device)
        self.l2 = torch.tensor([r.penalty.l2 if r.penalty is not None else 0.0 for r in recipes], device=device)
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for name, _ in models[0].named_parameters():
            self.params[name] = self._alias([m.get_parameter(name) for m in models]).requires_grad_()
        for name, _ in models[0].named_buffers():
            self.buffers[name] = self._alias([m.get_buffer(name) for m in models])

    @staticmethod
    def _alias(tensors: list[torch.Tensor]) -> torch.Tensor:
        """One stacked tensor holding `tensors`; each of them becomes a view of its slice (the
        same Parameter object, so optimizer state keyed by it stays valid)."""
        stacked = torch.stack([t.detach() for t in tensors])
        for i, t in enumerate(tensors):
            t.data = stacked[i]
        return stacked

    def __len__(self) -> int:
        return len(self.models)

    # ------------------------------------------------------------ gradients
    def share_grads(self) -> None:
        """After backward: each member's parameter .grad is its slice of the stacked gradient."""
        for name, stacked in self.params.items():
            grad = stacked.grad
            for i, model in enumerate(self.models):
                model.get_parameter(name).grad = None if grad is None else grad[i]

    def zero_grad(self) -> None:
        for stacked in self.params.values():
            stacked.grad = None

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, training: bool, observe: Optional[Observer] = None) -> torch.Tensor:
        """Logits [N, B, classes] of inputs [N, B, ...] (each member its own batch) or [B, ...]
        (one batch for all: evaluation)."""
        if x.dim() in (2, 4):  # one batch for every member
            x = x.expand(len(self), *x.shape)
        out, layout = self._run(self.template, "", x, "nb", training, observe)
        return out if layout == "nb" else out.transpose(0, 1)

    def _run(self, module: nn.Module, name: str, x: torch.Tensor, layout: str, training: bool,
             observe: Optional[Observer]) -> tuple[torch.Tensor, str]:
        if isinstance(module, nn.Sequential):
            start, start_layout = x, layout
            for child_name, child in module.named_children():
                x, layout = self._run(child, f"{name}.{child_name}" if name else child_name, x, layout, training, observe)
            if isinstance(module, Residual):
                assert layout == start_layout
                x = start + x
            return x, layout
        x, layout = self._layer(module, name, x, layout, training)
        if observe is not None and isinstance(module, ACTIVATION_TYPES):
            out = x
            observe(name, (lambda i: out[i]) if layout == "nb" else (lambda i: out[:, i]))
        return x, layout

    def _layer(self, module: nn.Module, name: str, x: torch.Tensor, layout: str, training: bool
               ) -> tuple[torch.Tensor, str]:
        n = len(self)
        if isinstance(module, ACTIVATION_TYPES):  # elementwise, in either layout
            return module(x), layout
        if isinstance(module, nn.Flatten):
            return (x.flatten(2) if layout == "nb" else x.transpose(0, 1).flatten(2)), "nb"
        if isinstance(module, nn.Dropout):
            return self._dropout(x, layout, self._rate(module, name), training), layout
        if isinstance(module, nn.Linear):  # W x^T: the weight's gradient comes out in its own layout (no copy)
            w, bias = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
            out = torch.bmm(w, x.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(2), w, x.transpose(1, 2))
            return out.transpose(1, 2), "nb"
        if isinstance(module, nn.LayerNorm):
            out = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            if module.elementwise_affine:
                out = torch.addcmul(self.params[f"{name}.bias"].unsqueeze(1), out, self.params[f"{name}.weight"].unsqueeze(1))
            return out, layout
        if isinstance(module, nn.BatchNorm1d):  # [N, B, C] -> [B, N*C] and back
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            out = self._batch_norm(module, name, flat, training)
            return out.view(x.shape[1], n, -1).transpose(0, 1), layout
        if layout == "nb":  # a feature map's layer: members' maps side by side as channels
            x, layout = x.transpose(0, 1).contiguous(), "bn"
        batch, maps = x.shape[0], x.flatten(1, 2)  # [B, N*C, H, W]
        if isinstance(module, nn.Conv2d):
            weight = self.params[f"{name}.weight"].flatten(0, 1)
            bias = self.params.get(f"{name}.bias")
            out = F.conv2d(maps, weight, None if bias is None else bias.flatten(), module.stride, module.padding,
                           module.dilation, groups=n)
        elif isinstance(module, nn.BatchNorm2d):
            out = self._batch_norm(module, name, maps, training)
        elif isinstance(module, nn.GroupNorm):  # GroupNorm(1, C) per member = N groups over N*C channels
            weight, bias = (self.params[f"{name}.weight"].flatten(), self.params[f"{name}.bias"].flatten()) if module.affine else (None, None)
            out = F.group_norm(maps, n * module.num_groups, weight, bias, module.eps)
        elif isinstance(module, POOLS):
            out = module(maps)
        else:
            raise TypeError(f"{name}: a {type(module).__name__} layer cannot be stacked")
        return out.view(batch, n, -1, *out.shape[2:]), layout

    def _batch_norm(self, module: nn.modules.batchnorm._BatchNorm, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        """One batch norm over the members' channels; running stats update in place, as each member's would."""
        weight = self.params[f"{name}.weight"].flatten() if module.affine else None
        bias = self.params[f"{name}.bias"].flatten() if module.affine else None
        if training:
            self.buffers[f"{name}.num_batches_tracked"].add_(1)
        return F.batch_norm(x, self.buffers[f"{name}.running_mean"].view(-1), self.buffers[f"{name}.running_var"].view(-1),
                            weight, bias, training, module.momentum, module.eps)

    def _rate(self, module: nn.Dropout, name: str) -> torch.Tensor:
        """Each member's dropout rate at this layer [N]."""
        if self.own_dropout:
            return torch.full_like(self.p, module.p)
        return self.p_input if name == "drop_input" else self.p

    def _dropout(self, x: torch.Tensor, layout: str, p: torch.Tensor, training: bool) -> torch.Tensor:
        """Each member's own rate; p = 0 leaves its activations exactly as they are."""
        if not training:
            return x
        shape = [1] * x.dim()
        shape[0 if layout == "nb" else 1] = len(self)
        keep = (1 - p).view(shape)
        return x * (torch.rand_like(x) < keep) / keep

    # ------------------------------------------------------------ losses
    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's mean cross-entropy [N] with its own label smoothing (PyTorch's formula:
        (1 - s) * nll + s * mean over classes of -log p)."""
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
        if not self.smoothing.any():
            return nll
        return nll + self.smoothing * (-logp.mean(-1).mean(1) - nll)

    def penalties(self) -> torch.Tensor:
        """Each member's l1 * sum|w| + l2 * sum w^2 over its weights [N] (regularizers.Penalty)."""
        weights = [w for w in self.params.values() if w.dim() >= 3]  # a member's matrices and kernels
        total = torch.zeros_like(self.l1)
        if self.l1.any():
            total = total + self.l1 * sum(w.abs().flatten(1).sum(1) for w in weights)
        if self.l2.any():
            total = total + self.l2 * sum(w.pow(2).flatten(1).sum(1) for w in weights)
        return total

    @property
    def penalized(self) -> bool:
        return bool(self.l1.any() or self.l2.any())


class StackedUpdate:
    """The members' optimizer steps as one step over the stacked tensors: torch's
    single-tensor SGD (momentum, Nesterov) / Adam / AdamW formulas with each member's own lr,
    weight decay, momentum, betas and eps as [N, 1, ...] factors. Each member's optimizer
    keeps its own state (its tensors are slices of the stacked state), so its checkpoint and a
    solo resume read it as if that optimizer had stepped. Without loss scaling only (an fp16
    scaler may skip one member's step); other optimizers step one by one."""

    def __init__(self, stack: Stack, optimizers: list[torch.optim.Optimizer]):
        self.stack, self.optimizers = stack, optimizers
        self.adam = isinstance(optimizers[0], torch.optim.Adam)
        self.decoupled = [opt.param_groups[0].get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
                          for opt in optimizers]
        # each stacked name's parameter group, per member (decay / no decay)
        self.group_of = {name: [next(g for g, group in enumerate(opt.param_groups)
                                     if any(q is model.get_parameter(name) for q in group["params"]))
                                for opt, model in zip(optimizers, stack.models)] for name in stack.params}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def fits(optimizers: list[torch.optim.Optimizer], scalers_enabled: bool) -> bool:
        kinds = {type(opt) for opt in optimizers}
        if scalers_enabled or len(kinds) != 1 or not issubclass(kinds.pop(), (torch.optim.SGD, torch.optim.Adam)):
            return False
        return all(not group.get(flag) for opt in optimizers for group in opt.param_groups
                   for flag in ("amsgrad", "maximize", "dampening", "differentiable", "capturable"))

    def _factors(self, name: str, key: str, dims: int) -> torch.Tensor:
        values = [opt.param_groups[g][key] for opt, g in zip(self.optimizers, self.group_of[name])]
        return self._column(values, dims)

    def _column(self, values: list, dims: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.stack.p.device).view(-1, *[1] * (dims - 1))

    def _stacked_state(self, name: str, key: str, initial: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, list[bool]]:
        """The members' state `key` of parameter `name`, stacked and aliased; a member without
        one yet starts from `initial(i)`. Returns it and which members had none."""
        if key in self.state.setdefault(name, {}):
            return self.state[name][key], [False] * len(self.optimizers)
        states = [opt.state[model.get_parameter(name)] for opt, model in zip(self.optimizers, self.stack.models)]
        fresh = [key not in state for state in states]
        stacked = torch.stack([initial(i) if new else state[key].detach() for i, (state, new) in enumerate(zip(states, fresh))])
        for i, state in enumerate(states):
            state[key] = stacked[i]
        self.state[name][key] = stacked
        return stacked, fresh

    @torch.no_grad()
    def step(self, steps: list[int]) -> None:
        """Every member's optimizer step; `steps`: each member's count of steps, this one included."""
        for name, param in self.stack.params.items():
            grad, dims = param.grad, param.dim()
            lr, wd = self._factors(name, "lr", dims), self._factors(name, "weight_decay", dims)
            if self.adam:
                self._adam(name, param.detach(), grad, lr, wd, dims, steps)
            else:
                self._sgd(name, param.detach(), grad, lr, wd, dims)

    def _sgd(self, name: str, p: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor, dims: int) -> None:
        grad = grad + wd * p
        momentum = self._factors(name, "momentum", dims)
        buf, fresh = self._stacked_state(name, "momentum_buffer", lambda i: grad[i].clone())
        if not all(fresh):  # a new buffer is the gradient itself (as torch's first step)
            updated = buf * momentum + grad
            buf.copy_(torch.where(self._column(fresh, dims).bool(), buf, updated))
        nesterov = [opt.param_groups[0]["nesterov"] for opt in self.optimizers]
        step = torch.where(self._column(nesterov, dims).bool(), grad + momentum * buf, buf)
        p.sub_(lr * step)

    def _adam(self, name: str, p: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor, dims: int,
              steps: list[int]) -> None:
        """In place, a few members at a time: each chunk's tensors stay in the CPU's cache across
        the update's passes (the whole stack's would not)."""
        step_counts, _ = self._stacked_state(name, "step", lambda i: torch.zeros((), dtype=torch.float32))
        exp_avg, _ = self._stacked_state(name, "exp_avg", lambda i: torch.zeros_like(p[i]))
        exp_avg_sq, _ = self._stacked_state(name, "exp_avg_sq", lambda i: torch.zeros_like(p[i]))
        step_counts.add_(1)
        groups = [opt.param_groups[g] for opt, g in zip(self.optimizers, self.group_of[name])]
        decoupled = self._column(self.decoupled, dims).bool()
        decay = torch.where(decoupled, 1 - lr * wd, 1)
        coupled = None if all(self.decoupled) else torch.where(decoupled, 0, wd)  # into the gradient (Adam)
        beta1, beta2 = (self._column([g["betas"][k] for g in groups], dims) for k in (0, 1))
        one_beta2 = groups[0]["betas"][1] if len({g["betas"][1] for g in groups}) == 1 else None
        # bias corrections from Python numbers, as torch's own (no host sync)
        step_size = -lr / self._column([1 - g["betas"][0] ** t for g, t in zip(groups, steps)], dims)
        bc2_sqrt = self._column([(1 - g["betas"][1] ** t) ** 0.5 for g, t in zip(groups, steps)], dims)
        eps = self._column([g["eps"] for g in groups], dims)
        chunk = max(1, CHUNK_BYTES // (p[0].numel() * p.element_size()))
        for rows in (slice(i, i + chunk) for i in range(0, len(p), chunk)):
            pc, gc, m, v = p[rows], grad[rows], exp_avg[rows], exp_avg_sq[rows]
            pc.mul_(decay[rows])
            if coupled is not None:
                gc.addcmul_(pc, coupled[rows])
            m.lerp_(gc, 1 - beta1[rows])
            if one_beta2 is not None:
                v.mul_(one_beta2).addcmul_(gc, gc, value=1 - one_beta2)
            else:
                v.mul_(beta2[rows]).addcmul_(gc * (1 - beta2[rows]), gc)
            scratch = torch.sqrt(v, out=self.scratch(name, p, chunk)[: len(v)])
            scratch.div_(bc2_sqrt[rows]).add_(eps[rows])
            torch.div(m, scratch, out=scratch)
            pc.addcmul_(scratch, step_size[rows])

    def scratch(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A buffer kept between steps: a fresh one per step costs page faults on the CPU."""
        if name not in self.buffers:
            self.buffers[name] = like.new_empty((rows, *like.shape[1:]))
        return self.buffers[name]


def stacked_forward_backward(stack: Stack, states: list[TrainState], windows: list[list[MicroBatch]],
                             probes: list[Probe]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward of every member's window at once (step.forward_backward, stacked):
    each member's loss weighted by its micro-batch's share, scaled by its own loss scaler.
    Returns the members' (loss, correct, penalty) sums, [N] each."""
    recipe = stack.recipes[0]  # the data, augmentation and precision every member shares
    watching = [(i, probe) for i, probe in enumerate(probes) if probe is not NO_PROBE]
    observe = (lambda name, member_output: [probe.activation(name, member_output(i)) for i, probe in watching]) if watching else None
    scaled = any(state.scaler.is_enabled() for state in states)
    loss_sum = correct = penalty_sum = torch.zeros(len(stack), device=recipe.train_y.device)
    for batches in zip(*windows):
        index = torch.stack([batch.index for batch in batches])  # [N, b]: each member its own samples
        x, y = recipe.train_x[index], recipe.train_y[index]
        if recipe.augment is not None:
            x = augment_batch(x.flatten(0, 1), *recipe.augment).view_as(x)
        with autocast(recipe.train_y.device.type, recipe.precision):
            logits = stack.forward(x, True, observe)
        losses = stack.losses(logits.float(), y)
        total = losses
        if stack.penalized:
            penalties = stack.penalties()
            total = losses + penalties
            penalty_sum = penalty_sum + penalties.detach() * batches[0].size
        total = total * batches[0].share if batches[0].share != 1.0 else total
        if scaled:
            total = torch.stack([state.scaler.scale(t) for state, t in zip(states, total)])
        total.sum().backward()
        loss_sum = loss_sum + losses.detach() * batches[0].size
        correct = correct + (logits.argmax(-1) == y).sum(1)
    return loss_sum, correct, penalty_sum


def fused_step(stack: Stack, states: list[TrainState], windows: list[list[MicroBatch]], probes: list[Probe],
               skips: list[bool]) -> list[StepResult]:
    """One window for every member: the stacked forward/backward, each member's own clipping
    (and non-finite skip), then the members' updates: at once (StackedUpdate) when every
    member takes its step, else each optimizer on its own slice, as train_step would."""
    sums = stacked_forward_backward(stack, states, windows, probes)
    stack.share_grads()
    samples = sum(b.size for b in windows[0])
    results = [check_and_clip(state, recipe, probe, skip, (sums[0][i], sums[1][i], sums[2][i]), samples)
               for i, (state, recipe, probe, skip) in enumerate(zip(states, stack.recipes, probes, skips))]
    at_once = stack.update is not None and all(result.applied for result in results)
    applied = [i for i, result in enumerate(results) if result.applied]
    for i in applied:
        probes[i].before_update()
    if at_once:
        stack.update.step([state.step + 1 for state in states])
    for i in applied:
        apply_update(states[i], stack.recipes[i], optimizer_step=not at_once)
        probes[i].after_update()
    stack.zero_grad()
    return results


@torch.no_grad()
def evaluate_stack(stack: Stack, x: torch.Tensor, y: torch.Tensor, batch_size: int, precision: str) -> list[dict[str, float]]:
    """train.evaluate for every member at once: mean cross-entropy and accuracy each, one host sync."""
    if len(y) == 0:
        return [{} for _ in range(len(stack))]
    loss_sum = torch.zeros(len(stack), device=x.device)
    correct = torch.zeros(len(stack), device=x.device)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast(x.device.type, precision):
            logits = stack.forward(xb, False)
        yb = yb.expand(len(stack), -1)
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none").view_as(yb).sum(1)
        correct += (logits.argmax(-1) == yb).sum(1)
    losses, accs = torch.stack([loss_sum, correct]).tolist()
    return [{"loss": loss / len(y), "acc": acc / len(y)} for loss, acc in zip(losses, accs)]
