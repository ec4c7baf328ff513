"""The pre-flight of a SLURM launcher's request (hydra/launcher=submitit_slurm or fused_slurm:
any launcher whose class name ends with `SlurmLauncher`), once per command, before Hydra
writes the sweep dir. Without it, a request the cluster cannot run is a submitit traceback
after the sweep dir and multirun.yaml exist. Each refusal is one line (ConfigError, exit 2):

0. What no cluster is asked about, for the local submitit launchers too (check_settings): a
   time limit under a minute, a submitit folder that cannot be written, no node or task, a
   time-limit warning (signal_delay_s) not within the time limit.

1. `sbatch` or `sinfo` not on PATH: this machine submits nothing.
2. hydra.launcher.partition unknown to the cluster (`sinfo`; null: the default partition):
   the line names the partitions there are.
3. A request no node of the partition can hold, checked in this order, each among the nodes
   that hold the ones before it: GPUs a node (gpus_per_node, then gpus_per_task x
   tasks_per_node, then gres' gpu count), CPUs a node (cpus_per_gpu x GPUs, else
   cpus_per_task x tasks_per_node), memory a node (mem_gb), then the node count (nodes). GPUs
   come first: a GPU request is what a CPU cluster cannot hold at all, and the preset's
   defaults (1 GPU, 8 CPUs, 32 GB) on such a cluster are refused naming gpus_per_node. The line
   names the key to set and the value that fits.
4. The whole request, with the options submitit gives sbatch, through `sbatch --test-only`
   (which submits and writes nothing): what else the cluster refuses (a qos, an account, a
   constraint, a time limit) is sbatch's own error line, naming the key where it can.

A cluster that does not answer within ANSWER_TIMEOUT_S, or whose `sinfo` fails, is one line
too (RunError, exit 1: the request may be fine). The standard library, OmegaConf,
regexp.rundir, regexp.fusion (launcher_target) and regexp.config (check_writable) only: no torch.
"""

import re
import shutil
import subprocess
from typing import Any, NamedTuple, Optional

from omegaconf import OmegaConf

from regexp.fusion import launcher_target
from regexp.rundir import ConfigError, RunError

ANSWER_TIMEOUT_S = 30  # a busy controller answers within its MessageTimeout (10 s by default)
ELSEWHERE = "run the sweep there, or use hydra/launcher=submitit_local / joblib / fused"
# launcher key -> the sbatch option submitit gives it (submitit.slurm.slurm._make_sbatch_string)
SBATCH_OPTIONS = {
    "name": "job-name", "timeout_min": "time", "nodes": "nodes", "tasks_per_node": "ntasks-per-node",
    "cpus_per_task": "cpus-per-task", "gpus_per_node": "gpus-per-node", "mem_gb": "mem", "partition": "partition",
    "qos": "qos", "comment": "comment", "constraint": "constraint", "exclude": "exclude", "gres": "gres",
    "cpus_per_gpu": "cpus-per-gpu", "gpus_per_task": "gpus-per-task", "mem_per_gpu": "mem-per-gpu",
    "mem_per_cpu": "mem-per-cpu", "account": "account",
}
# words of sbatch's error lines -> the option they are about (first match wins: an account
# error also says "partition")
ERROR_WORDS = (("feature", "constraint"), ("time limit", "time"), ("qos", "qos"), ("account", "account"),
               ("partition", "partition"), ("gres", "gres"))


class Node(NamedTuple):
    """One line of `sinfo`: nodes of a partition alike in what they hold (None: not known)."""

    cpus: Optional[int]
    memory_mb: Optional[int]
    gpus: int
    count: int


class Need(NamedTuple):
    """What one node must hold of a resource for a launcher key: `amount` of the Node field
    `resource`, which is the key's value times `per`."""

    key: str
    value: Any
    amount: int
    resource: str  # gpus, cpus or memory_mb
    per: int


UNITS = {"gpus": "GPU", "cpus": "CPU", "memory_mb": "MB"}


class ClusterRefuses(ConfigError):
    """`sbatch --test-only` refuses the request: its error line, under the key it names when
    one can be told (`hydra.launcher` otherwise)."""

    def __init__(self, key: Optional[str], value: Any, error: str):
        allowed = f"the cluster refuses this request: {error}"
        super().__init__(key or "hydra.launcher", value, allowed)
        if key is None:
            self.args = (f"hydra.launcher: {allowed}",)


def is_slurm(hydra_cfg: Any) -> bool:
    """Whether the sweep's launcher submits to SLURM (Hydra's SlurmLauncher and its subclasses)."""
    return launcher_target(hydra_cfg).endswith("SlurmLauncher")


def check_request(hydra_cfg: Any) -> None:
    """The pre-flight of a submitit launcher's settings (check_settings) and of a SLURM
    launcher's request (the module's docstring); nothing for other launchers."""
    if not is_slurm(hydra_cfg) and not launcher_target(hydra_cfg).endswith("LocalLauncher"):
        return
    check_settings(hydra_cfg.launcher, is_slurm(hydra_cfg))
    if not is_slurm(hydra_cfg):
        return
    launcher = hydra_cfg.launcher
    choice = hydra_cfg.runtime.choices.get("hydra/launcher") or launcher._target_
    for tool in ("sbatch", "sinfo"):
        if shutil.which(tool) is None:
            raise ConfigError("hydra/launcher", choice,
                              f"{tool} not found on PATH: this machine is not a SLURM submit host; {ELSEWHERE}")
    partitions, default = read_partitions(choice)
    asked = launcher.get("partition")
    names = str(asked).split(",") if asked is not None else [default] if default else []
    unknown = [name for name in names if name not in partitions] if partitions else []  # none read: sbatch decides
    if unknown:
        there = ", ".join(f"{p} (the default)" if p == default else p for p in partitions)
        raise ConfigError("hydra.launcher.partition", asked, f"no partition {unknown[0] or repr('')} on this cluster; "
                                                              f"its partitions: {there}")
    misfits = [misfit(name, partitions[name], launcher) for name in names if name in partitions]
    if misfits and all(misfits):  # a request fits where any of its partitions can hold it
        raise misfits[0]
    dry_submit(sbatch_options(launcher), choice)


def check_settings(launcher: Any, slurm: bool) -> None:
    """What no cluster is asked about (sbatch --test-only takes --nodes=0 and --time=-5): a
    time limit of at least a minute, a folder for submitit's files that can be written, and on
    SLURM at least one node and task, and a time-limit warning (signal_delay_s) that comes
    before the limit, not before the job starts."""
    from regexp.config import check_writable

    minutes = launcher.get("timeout_min")
    if not isinstance(minutes, int) or minutes < 1:
        raise ConfigError("hydra.launcher.timeout_min", minutes, "must be an integer >= 1 (a job's time limit, minutes)")
    folder = str(launcher.submitit_folder)
    check_writable(folder.split("%j")[0] or ".", "hydra.launcher.submitit_folder", folder)
    if not slurm:
        return
    for key in ("nodes", "tasks_per_node"):
        if launcher.get(key) is not None and launcher.get(key) < 1:
            raise ConfigError(f"hydra.launcher.{key}", launcher.get(key), "must be an integer >= 1")
    delay = launcher.get("signal_delay_s")
    if delay is not None and not 0 <= delay < minutes * 60:
        raise ConfigError("hydra.launcher.signal_delay_s", delay,
                          f"must be from 0 to less than the time limit ({minutes * 60} s: hydra.launcher.timeout_min="
                          f"{minutes}): the warning comes this long before the limit")


def answer(command: list[str], choice: str) -> subprocess.CompletedProcess:
    """A SLURM command's answer; RunError when the cluster does not give one in time."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=ANSWER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RunError(f"hydra/launcher={choice}: the cluster did not answer `{command[0]}` within "
                       f"{ANSWER_TIMEOUT_S} s; is its controller up (scontrol ping)? Try again later") from None


def read_partitions(choice: str) -> tuple[dict[str, list[Node]], Optional[str]]:
    """The cluster's partitions, each with its node lines, and the default one (None: none)."""
    out = answer(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"], choice)
    if out.returncode != 0:
        raise RunError(f"hydra/launcher={choice}: sinfo failed: {last_line(out)}")
    partitions: dict[str, list[Node]] = {}
    default = None
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, memory, gres, count = fields
        if name.endswith("*"):
            name = default = name[:-1]
        partitions.setdefault(name, []).append(Node(number(cpus), number(memory), gpu_count(gres),
                                                    number(count) or 1))
    return partitions, default


def number(text: str) -> Optional[int]:
    """An amount as sinfo prints it ("8", "8+" when nodes differ): None when it gives none."""
    digits = text.strip().rstrip("+")
    return int(digits) if digits.isdigit() else None


def gpu_count(gres: Optional[str]) -> int:
    """GPUs in a gres text: "gpu:4", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2", "gpu" (one),
    "(null)" (none)."""
    count = 0
    for item in re.sub(r"\([^)]*\)", "", str(gres or "")).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            count += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return count


def misfit(partition: str, nodes: list[Node], launcher: Any) -> Optional[ConfigError]:
    """Why no node of `partition` holds the request (the module's order), or None: it fits."""
    fitting = nodes
    for need in needs(launcher):
        holding = [n for n in fitting if getattr(n, need.resource) is None or getattr(n, need.resource) >= need.amount]
        if not holding:
            return too_much(partition, need, sorted({getattr(n, need.resource) for n in fitting}))
        fitting = holding
    asked, count = launcher.get("nodes") or 1, sum(n.count for n in fitting)
    if asked > count:
        held = " with room for the rest of this request" if len(fitting) < len(nodes) else ""
        return ConfigError("hydra.launcher.nodes", asked, f"partition {partition} has {amount(count, 'node')}{held}; "
                                                          f"set hydra.launcher.nodes to {count} or less")
    return None


def needs(launcher: Any) -> list[Need]:
    """What a node must hold, in the module's order. A key left null asks for nothing; SLURM's
    own defaults (one CPU a task) need no check."""
    tasks = launcher.get("tasks_per_node") or 1
    gpus = [Need("gpus_per_node", launcher.get("gpus_per_node"), launcher.get("gpus_per_node") or 0, "gpus", 1),
            Need("gpus_per_task", launcher.get("gpus_per_task"), (launcher.get("gpus_per_task") or 0) * tasks,
                 "gpus", tasks),
            Need("gres", launcher.get("gres"), gpu_count(launcher.get("gres")), "gpus", 1)]
    found = [need for need in gpus if need.amount]
    gpus_needed = max((need.amount for need in found), default=0)
    cpus = [Need("tasks_per_node", tasks, tasks, "cpus", 1)]
    if launcher.get("cpus_per_gpu") and gpus_needed:
        per_gpu = launcher.get("cpus_per_gpu")
        cpus.append(Need("cpus_per_gpu", per_gpu, per_gpu * gpus_needed, "cpus", gpus_needed))
    elif launcher.get("cpus_per_task"):
        per_task = launcher.get("cpus_per_task")
        cpus.append(Need("cpus_per_task", per_task, per_task * tasks, "cpus", tasks))
    mem_gb = launcher.get("mem_gb")
    memory = [Need("mem_gb", mem_gb, int(mem_gb * 1024), "memory_mb", 1024)] if mem_gb else []
    return [*found, *cpus, *memory]


def too_much(partition: str, need: Need, amounts: list) -> ConfigError:
    """The line for a key that asks a node for more than any of `partition`'s nodes (those the
    checks before left) holds: `amounts`, each amount such nodes hold."""
    most, unit = amounts[-1], UNITS[need.resource]
    held = amount(most, unit) if len(amounts) == 1 else f"at most {amount(most, unit)}"
    fit = most // need.per
    if need.resource == "gpus" and not most:
        held = "no GPUs"
    if fit < 1:  # ask for none (a null memory request: the partition's default)
        advice = f"hydra.launcher.{need.key}={0 if need.key == 'gpus_per_node' else 'null'}"
    elif need.key == "gres":
        advice = f"hydra.launcher.gres to gpu:{fit} or less"
    else:
        advice = f"hydra.launcher.{need.key} to {fit} or less"
    return ConfigError(f"hydra.launcher.{need.key}", need.value, f"partition {partition}'s nodes have {held}; "
                                                                 f"set {advice}")


def amount(count: int, unit: str) -> str:
    """ "1 GPU", "2 CPUs", "21694 MB". """
    return f"{count} {unit}" if unit == "MB" or count == 1 else f"{count} {unit}s"


def sbatch_options(launcher: Any) -> dict[str, tuple[Optional[str], Any, Any]]:
    """The sbatch options submitit gives the launcher's request: option -> (the launcher key it
    comes from, None for submitit's own wckey; the key's value; the option's value).
    additional_parameters override the others, as in submitit."""
    options: dict[str, tuple[Optional[str], Any, Any]] = {"wckey": (None, None, "submitit")}
    for key, option in SBATCH_OPTIONS.items():
        value = launcher.get(key)
        if value is not None:
            options[option] = (f"hydra.launcher.{key}", value, memory_text(value) if key == "mem_gb" else value)
    extra = OmegaConf.to_container(launcher.additional_parameters, resolve=True) \
        if launcher.get("additional_parameters") else {}
    for key, value in extra.items():
        options[key.replace("_", "-")] = (f"hydra.launcher.additional_parameters.{key}", value, value)
    return options


def memory_text(mem_gb: float) -> str:
    """mem_gb as submitit writes it (submitit.slurm.slurm._convert_mem)."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def dry_submit(options: dict[str, tuple[Optional[str], Any, Any]], choice: str) -> None:
    """`sbatch --test-only` of a one-line job with the request's options: ClusterRefuses when
    the cluster would not take it."""
    flags = [f"--{option}" if value is True else f"--{option}={value}" for option, (_, _, value) in options.items()]
    out = answer(["sbatch", "--test-only", *flags, "--wrap", "true"], choice)
    if out.returncode == 0:
        return
    error = last_line(out)
    about = next((option for words, option in ERROR_WORDS if words in error.lower()), None)
    about = next((option for option in options if re.search(rf"--{re.escape(option)}(?![\w-])", error)), about)
    key, value, _ = options.get(about, (None, None, None))
    raise ClusterRefuses(key, value, error)


def last_line(out: subprocess.CompletedProcess) -> str:
    """A SLURM command's verdict: the last line it printed that is no warning."""
    lines = [line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    verdicts = [line for line in lines if "warning" not in line.lower() and not line.startswith("Try ")] or lines
    return verdicts[-1] if verdicts else f"exit code {out.returncode}, no message"
