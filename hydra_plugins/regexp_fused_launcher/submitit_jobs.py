"""regexp's submitit launchers (hydra/launcher=submitit_slurm, submitit_local, fused_slurm,
fused_local), where Hydra's plugin scan finds them. They live in _submitit_jobs, which needs
Hydra's submitit plugin (pip install 'regexp[launchers]'): without it there are none, and no
import error at each start (the scan skips modules named with a leading underscore)."""

try:
    from ._submitit_jobs import FusedLocalLauncher, FusedSlurmLauncher, LocalLauncher, SlurmLauncher
except ModuleNotFoundError as e:
    if not (e.name or "").startswith(("hydra_plugins.hydra_submitit_launcher", "submitit")):
        raise
else:
    __all__ = ["FusedLocalLauncher", "FusedSlurmLauncher", "LocalLauncher", "SlurmLauncher"]
