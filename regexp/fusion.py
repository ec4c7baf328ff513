"""Which jobs of a sweep train side by side (`hydra/launcher=fused`): the partition of a
sweep's jobs into groups of one stack of models each, with a reason line for every job
that runs alone, and a simple memory estimate that splits a group that would not fit.

Jobs fuse when their resolved configs agree on every key outside FREE (what each model of
a stack may hold for itself: seed, init, hyperparameters, regularizer strengths, names),
on the optimizer / scheduler / clip kind (KINDS), and, under resume=auto, on the step
their run dirs stand at. No torch here and Hydra only inside functions: the launcher
plugin imports this module at Hydra's plugin scan.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from regexp.config import ConfigError, dataset_shape, flat, model_parameters, user_built
from regexp.rundir import RunError, continues_under, printable, read_summary

# Dotted key prefixes each model of a stack may set for itself.
FREE = (
    "seed",
    "init",  # scheme and its numbers
    "optimizer", "scheduler", "clip",  # every field but the kind (KINDS)
    "regularizer.dropout", "regularizer.l1", "regularizer.l2", "regularizer.elastic_net",  # on or off, any strength
    "regularizer.max_norm.value",  # the value only: on in one job and off in another does not fuse
    "regularizer.label_smoothing", "regularizer.early_stopping",
    "out_dir", "logger.project", "logger.entity", "logger.tags",  # where the records go, how W&B names them
)
KINDS = ("optimizer.name", "scheduler.name", "clip.name")  # under FREE prefixes, but one kind a stack
RESUME_STEP = "step (resume=auto)"  # the key the partition adds for a continued sweep

LAUNCHER_KEYS = {"_target_", "max_models"}  # hydra.launcher's keys for the fused launcher
OUR_PLUGIN = "hydra_plugins.regexp_fused_launcher."  # regexp's launchers: fused, its cluster kinds, submitit's
MAX_MODELS = (1, 1024)  # hydra.launcher.max_models: a group's models at least and at most
MEMORY_SHARE = 0.5  # of the available memory, for the stacks' estimate
BYTES = 4  # fp32
STATE_COPIES = 4  # weights, gradients, two optimizer moments
KEPT_ACTIVATIONS = 3  # outputs, their gradients and what norms/activations keep for the backward pass


@dataclass(frozen=True)
class Candidate:
    """One job of the sweep as the partition sees it."""

    number: int  # Hydra's job number (hydra.job.num)
    config: dict[str, Any]  # the job config as recorded (config.recorded_container)
    memory: int = 0  # bytes one model of it needs (model_memory)
    step: Optional[int] = 0  # resume=auto: the step its run dir stands at; None: finished, it is skipped
    alone: Optional[str] = None  # why it runs alone, known before the partition: resume=auto's run dir, a custom model


@dataclass
class Partition:
    """Groups of candidate indices (each a stack; launch order kept) and, by index, why a job runs alone."""

    groups: list[list[int]] = field(default_factory=list)
    alone: dict[int, str] = field(default_factory=dict)

    def lines(self, jobs: list[Candidate]) -> list[str]:
        """What the launcher prints: one line per fused group, one per job that runs alone with its reason."""
        out, finished = [], []
        for group in self.groups:
            if len(group) > 1:
                out.append(f"fused: {job_numbers([jobs[i].number for i in group])} train as one group of "
                           f"{len(group)} models")
            elif jobs[group[0]].step is None:  # finished: resume=auto skips it
                finished.append(jobs[group[0]].number)
            elif group[0] in self.alone:
                out.append(f"fused: job {jobs[group[0]].number} runs alone: {self.alone[group[0]]}")
        if finished:  # they do not run: one line, not one each, before the jobs that do
            out.insert(0, f"fused: {job_numbers(finished)} finished earlier: resume=auto skips "
                          f"{'them' if len(finished) > 1 else 'it'}")
        return [printable(line) for line in out]  # a reason quotes config values: each stays one line


def candidate(sweep_config: Any) -> Candidate:
    """A job as the launcher loaded it (Hydra's node included, hydra.job.num set)."""
    from omegaconf import OmegaConf

    from regexp.config import job_config, recorded_container

    job = job_config(sweep_config)
    step: Optional[int] = 0
    alone = None
    if job.get("resume") == "auto":
        sweep_dir, subdir = (OmegaConf.select(sweep_config, f"hydra.sweep.{key}") for key in ("dir", "subdir"))
        step, alone = resume_point(Path(str(sweep_dir)) / str(subdir), job)
    if alone is None:
        alone = model_alone(job)
    return Candidate(int(sweep_config.hydra.job.num), recorded_container(job), model_memory(job), step, alone)


# ---------------------------------------------------------------- the key
def is_free(key: str) -> bool:
    return key not in KINDS and any(key == p or key.startswith(p + ".") for p in FREE)


def fused_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The keys every job of a stack must agree on, with their values."""
    return {k: v for k, v in flat(config).items() if not is_free(k)}


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in value.items())
    return value


def _keys_of(job: Candidate) -> dict[str, Any]:
    keys = fused_keys(job.config)
    if job.config.get("resume") == "auto":
        keys[RESUME_STEP] = job.step
    return keys


def fusion_key(job: Candidate) -> tuple:
    """Equal for jobs that may train as one stack."""
    return tuple((k, _hashable(v)) for k, v in _keys_of(job).items())


# ---------------------------------------------------------------- the partition
def partition(jobs: list[Candidate], max_models: int, memory_budget: Optional[int] = None) -> Partition:
    """Jobs with equal keys form groups of at most `max_models` models, and of no more than
    `memory_budget` bytes by the estimate (None: no bound); groups are ordered by their first
    job. A job whose model cannot be stacked, a finished one (resume=auto skips it) and one whose
    key no other job shares run alone, with the reason."""
    result = Partition()
    classes: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        reason = _unfusable(job)
        if reason is not None:
            result.groups.append([index])
            result.alone[index] = reason
        else:
            classes.setdefault(fusion_key(job), []).append(index)
    for members in classes.values():
        capacity, bound = _capacity(jobs[members[0]], max_models, memory_budget)
        chunks = [members[i:i + capacity] for i in range(0, len(members), capacity)]
        result.groups += chunks
        for chunk in chunks:
            if len(chunk) == 1 and len(members) > 1:
                result.alone[chunk[0]] = f"{bound} (jobs {_numbers(jobs, members)} share its config)"
            elif len(chunk) == 1 and len(jobs) > 1:
                result.alone[chunk[0]] = _difference(jobs, chunk[0])
    result.groups.sort(key=lambda group: group[0])
    return result


def model_alone(cfg: Any) -> Optional[str]:
    """Why the configured model cannot join a stack, or None: every model regexp builds
    stacks; a custom model, as its pre-flight build found it (regexp.custom)."""
    if not user_built(cfg.model):
        return None
    from regexp.custom import inspect  # torch: only for a model of the user's own (the pre-flight's answer, kept)

    return inspect(cfg).alone


def _unfusable(job: Candidate) -> Optional[str]:
    if job.step is None:
        return "its run is finished (resume=auto skips it)"
    return job.alone


def _capacity(job: Candidate, max_models: int, memory_budget: Optional[int]) -> tuple[int, str]:
    """(models a group of this job's kind may hold, what bounds it, in words)."""
    bound = f"hydra.launcher.max_models={max_models} caps a group"
    if memory_budget is None or job.memory <= 0 or memory_budget // job.memory >= max_models:
        return max_models, bound
    fits = max(1, memory_budget // job.memory)
    return fits, (f"about {_mib(job.memory)} a model and {_mib(memory_budget)} to spend fit {fits} "
                  f"model{'s' * (fits != 1)} a group")


def _difference(jobs: list[Candidate], index: int) -> str:
    """The first key on which job `index` differs from the first other job, and the jobs that share that one's keys."""
    others = [i for i in range(len(jobs)) if i != index]
    other = next((i for i in others if _unfusable(jobs[i]) is None), None)
    if other is None:  # a finished job has no keys to differ in
        return "no other job trains beside it (the others are finished or run alone)"
    mine, theirs = _keys_of(jobs[index]), _keys_of(jobs[other])
    key = next(k for k in [*mine, *theirs] if mine.get(k, _ABSENT) != theirs.get(k, _ABSENT))
    sharing = [i for i in others if _unfusable(jobs[i]) is None and _keys_of(jobs[i]) == theirs]
    have = f"jobs {_numbers(jobs, sharing)} have" if len(sharing) > 1 else f"job {jobs[other].number} has"
    return (f"{key} is {_shown(_value_at(jobs[index], key, mine))} where {have} "
            f"{_shown(_value_at(jobs[other], key, theirs))}")


_ABSENT = object()


def _value_at(job: Candidate, key: str, keys: dict[str, Any]) -> Any:
    """The value of `key` for display: a fused key's, or the whole node (e.g. regularizer.max_norm's settings)."""
    if key in keys:
        return keys[key]
    node: Any = job.config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _numbers(jobs: list[Candidate], indices: list[int]) -> str:
    return job_numbers([jobs[i].number for i in indices]).partition(" ")[2]


def job_numbers(numbers: list[int], noun: str = "job") -> str:
    """'job 3' / 'jobs 0-7' / 'jobs 0-3, 5, 8-9' (or another `noun`: 'dirs 0-7')."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"{noun}{'s' * (len(numbers) != 1)} {text}"


# ---------------------------------------------------------------- memory
def model_memory(cfg: Any) -> int:
    """Bytes one model of a stack needs, about: its parameters four times over (weights,
    gradients, two optimizer moments) plus a batch's activations, each layer's output kept
    about three times for the backward pass. `cfg`: a typed job config."""
    per_sample = ACTIVATION_UNITS.get(cfg.model.name, lambda *_: 0)(cfg.model, *dataset_shape(cfg.dataset))
    return (parameter_count(cfg) * STATE_COPIES + cfg.batch_size * per_sample * KEPT_ACTIVATIONS) * BYTES


def parameter_count(cfg: Any) -> int:
    """config.model_parameters, or a custom model's count as its pre-flight build found it
    (its activations are not estimated: its layers are its own)."""
    if user_built(cfg.model):
        from regexp.custom import inspect

        return inspect(cfg).parameters
    return model_parameters(cfg)


def _map_units(widths: list[int], shape: tuple[int, int, int]) -> int:
    """The input, then a conv's output per width, each at half the previous one's resolution."""
    channels, height, width = shape
    return channels * height * width + sum(c * (height >> i) * (width >> i) for i, c in enumerate(widths))


# Per model name: the outputs a sample leaves in each layer (its input included), summed.
ACTIVATION_UNITS = {
    "mlp": lambda m, shape, classes: _map_units([], shape) + sum(m.hidden) + classes,
    "deep_mlp": lambda m, shape, classes: _map_units([], shape) + m.width * m.depth + classes,
    "cnn": lambda m, shape, classes: _map_units(list(m.channels), shape) + m.fc + classes,
    "resnet": lambda m, shape, classes: 3 * _map_units(list(m.widths), shape) + classes,  # a stage: three convs
}


def available_memory(device: str) -> int:
    """Bytes free for training on `device` (auto, cpu, cuda): CUDA's free memory when the
    jobs train there, else the system's MemAvailable."""
    if device != "cpu":
        import torch  # only a sweep that may train on CUDA pays for it

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def memory_budget(devices: set[str]) -> Optional[int]:
    """What a group may spend: MEMORY_SHARE of the memory available on the jobs' devices (the
    least of them); None where the system does not say (no /proc/meminfo): no bound."""
    try:
        return int(min(available_memory(d) for d in devices) * MEMORY_SHARE)
    except OSError:
        return None


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


# ---------------------------------------------------------------- resume=auto
def resume_point(run_dir: Path, job: Any) -> tuple[Optional[int], Optional[str]]:
    """(the step a job's run dir stands at, why it runs alone or None), for resume=auto: the
    step of its checkpoint when the run ended unfinished (or stopped or pruned, and `job`
    continues it), 0 when there is nothing to continue, None when it finished (resume=auto skips it). A checkpoint at the end of its training
    (the run was killed in its final test) only evaluates, and one that cannot be read fails
    its job: each of those runs alone. `job`: the typed job config."""
    summary = read_summary(run_dir)
    if summary is None:
        return 0, None
    if summary.status.finished and not continues_under(summary, job):
        return None, None
    checkpoint = Path(run_dir) / "checkpoint.pt"
    if not checkpoint.is_file():
        return 0, None
    from regexp.train import read_checkpoint, trained_to_end  # torch: only for a sweep that continues runs

    try:
        saved = read_checkpoint(checkpoint)
    except RunError:
        return 0, "its checkpoint cannot be read, the job fails on its own (its line says why)"  # the error: once, there
    if trained_to_end(job, saved):
        return saved["step"], (f"its checkpoint stands at the end of its training (step {saved['step']}): "
                               "it only finishes its evaluation")
    return saved["step"], None


# ---------------------------------------------------------------- the launcher's settings
def launcher_target(hydra_cfg: Any) -> str:
    """The class of the sweep's launcher, as hydra.launcher._target_ names it ("" when none)."""
    return str((hydra_cfg.get("launcher") or {}).get("_target_", ""))


def launcher_class(hydra_cfg: Any) -> str:
    """The class name alone (FusedSlurmLauncher), without its module."""
    return launcher_target(hydra_cfg).rsplit(".", 1)[-1]


def check_launcher(hydra_cfg: Any) -> None:
    """The pre-flight of hydra.launcher for regexp's launchers: ConfigError (one line) for a
    max_models out of MAX_MODELS, a key the in-process fused launcher does not take, or a
    requeue count (max_num_timeout) other than 0: regexp's submitit launchers never requeue a
    job (one out of time ends interrupted, with its checkpoint, for resume=auto)."""
    from omegaconf import OmegaConf

    if not launcher_target(hydra_cfg).startswith(OUR_PLUGIN):
        return
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=False)
    unknown = sorted(set(launcher) - LAUNCHER_KEYS) if launcher_class(hydra_cfg) == "FusedLauncher" else []
    if unknown:
        raise ConfigError(f"hydra.launcher.{unknown[0]}", launcher[unknown[0]],
                          "unknown key; the fused launcher takes max_models")
    value = launcher.get("max_models", 1)  # an integer: the schemas (hydra_plugins.regexp_fused_launcher.config) type it
    if not MAX_MODELS[0] <= value <= MAX_MODELS[1]:
        raise ConfigError("hydra.launcher.max_models", value,
                          f"must be an integer from {MAX_MODELS[0]} to {MAX_MODELS[1]} (models trained side by side)")
    if launcher.get("max_num_timeout", 0) != 0:
        raise ConfigError("hydra.launcher.max_num_timeout", launcher["max_num_timeout"],
                          "must be 0: regexp requeues no job; one that runs out of time ends interrupted with its "
                          "checkpoint, and the same command with resume=auto continues it")


def cluster_budget(jobs: list[Candidate], mem_gb: Optional[float]) -> Optional[int]:
    """What a cluster job's group may spend: MEMORY_SHARE of the memory it asks for
    (hydra.launcher.mem_gb) when its jobs train on the CPU; None (max_models bounds the group)
    when they may train on a GPU, whose memory the launching host cannot know, or mem_gb is unset."""
    on_cpu = all(job.config["device"]["name"] == "cpu" for job in jobs)
    return int(mem_gb * 2**30 * MEMORY_SHARE) if mem_gb and on_cpu else None
