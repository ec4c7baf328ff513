"""The fused launcher's schema in Hydra's ConfigStore (group hydra/launcher), registered when
Hydra's plugin scan imports this module, so any Hydra app finds `hydra/launcher=fused` once
regexp is installed. regexp's conf/ holds no fused.yaml: a yaml of that name would shadow this
node, and its values are these defaults. Another fused launcher is one more dataclass and entry here."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.regexp_fused_launcher.fused_launcher.FusedLauncher"
    max_models: int = 64  # models in one group at most; a memory estimate may split a group further


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="regexp")
