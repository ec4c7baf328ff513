"""W&B sweep configs shipped with regexp (docs/wandb-sweeps.md): `wandb sweep` takes one of
these files; `python -m regexp.wandb_sweeps [NAME...]` prints where they are installed."""

from pathlib import Path


def sweep_configs() -> dict[str, Path]:
    """Name (the file's stem) -> path of every shipped sweep config."""
    return {path.stem: path for path in sorted(Path(__file__).parent.glob("*.yaml"))}
