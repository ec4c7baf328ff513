"""regexp's launchers' schemas in Hydra's ConfigStore (group hydra/launcher), registered when
Hydra's plugin scan imports this module, so any Hydra app finds `hydra/launcher=fused` (and,
with Hydra's submitit plugin installed, `fused_slurm` and `fused_local`) once regexp is
installed. regexp's conf/ holds no yaml of these names: one would shadow its node, and its
values are these defaults."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

PLUGIN = "hydra_plugins.regexp_fused_launcher"


@dataclass
class FusedLauncherConf:
    _target_: str = f"{PLUGIN}.fused_launcher.FusedLauncher"
    max_models: int = 64  # models in one group at most; a memory estimate may split a group further


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="regexp")

try:
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
except ModuleNotFoundError:  # regexp without its launchers extra: no cluster launchers
    pass
else:
    @dataclass
    class FusedSlurmConf(SlurmQueueConf):
        """Each fused group one SLURM job (an array per sweep), as hydra/launcher=submitit_slurm
        asks for each job: one GPU, a few cores; max_models members a job at most."""

        _target_: str = f"{PLUGIN}._submitit_jobs.FusedSlurmLauncher"
        max_models: int = 64
        submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
        timeout_min: int = 240
        cpus_per_task: int = 8
        gpus_per_node: int = 1
        mem_gb: int = 32

    @dataclass
    class FusedLocalConf(LocalQueueConf):
        """Each fused group one process of this machine, through submitit's local executor."""

        _target_: str = f"{PLUGIN}._submitit_jobs.FusedLocalLauncher"
        max_models: int = 64

    ConfigStore.instance().store(group="hydra/launcher", name="fused_slurm", node=FusedSlurmConf, provider="regexp")
    ConfigStore.instance().store(group="hydra/launcher", name="fused_local", node=FusedLocalConf, provider="regexp")
