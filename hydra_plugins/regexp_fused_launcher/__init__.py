"""regexp's fused launcher (`hydra/launcher=fused`), where Hydra's plugin scan finds it."""
