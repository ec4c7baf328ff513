"""regexp: an experiment runner for studying how training choices shape a neural network.

From Python, as from the command line (`regexp train ...`):

    import regexp
    summary = regexp.run(["model=cnn", "+regularizer=dropout"], run_dir="runs/cnn-dropout")
    run = regexp.load("runs/cnn-dropout")          # summary, metric records, findings
    table = regexp.compare(["runs"], by=["optimizer"], metric="test/acc")

Bad input raises `regexp.ConfigError` (a ValueError) naming the key. Importing regexp
imports neither torch nor Hydra; a call does.
"""

from regexp.rundir import ConfigError, RunError, Status, Summary

__version__ = "0.1.0"


def run(overrides=(), run_dir=None) -> Summary:
    """Train one run of `overrides` (as `regexp train` takes them) into `run_dir`; returns its Summary."""
    from regexp.api import run as _run

    return _run(overrides, run_dir)


def load(run_dir):
    """A run dir's summary, metric records and findings (a regexp.api.Run)."""
    from regexp.api import load as _load

    return _load(run_dir)


def compare(paths, by=None, metric: str = "test/acc", baseline=None) -> dict:
    """The table `regexp compare` prints, as data (groups and runs; with `baseline`, each
    group against that one)."""
    from regexp.api import compare as _compare

    return _compare(paths, by, metric, baseline)


__all__ = ["run", "load", "compare", "ConfigError", "RunError", "Status", "Summary"]
