"""Hydra's own launcher test suites (hydra.test_utils.launcher_common_tests), run on
`hydra/launcher=fused`, `fused_local` and `fused_slurm` (the local one-node cluster) as Hydra's
launcher plugins run them: apps that are not regexp's, whose jobs the fused launcher runs as
Hydra's basic launcher does, and the cluster kinds as Hydra's submitit plugin does."""

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase, __compat_version__

from hydra_plugins.regexp_fused_launcher.fused_launcher import FusedLauncher
from hydra_plugins.regexp_fused_launcher.submitit_jobs import FusedLocalLauncher, FusedSlurmLauncher

# what the one-node cluster of the tests holds (scripts/local-slurm): no GPU, 2 cores; the time-limit
# warning well inside the limit (the preset's 120 s before a 2-minute limit would stop each job as it starts)
ON_THIS_MACHINE = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5}
ON_THE_NODE = {**ON_THIS_MACHINE, "signal_delay_s": 10}


@pytest.fixture(autouse=True)
def fresh_version_base():
    """The suites expect a fresh process's version base (1.1: a job runs in its own dir);
    regexp's tests that ran before in this process set Hydra's global one to 1.3."""
    version_base = VersionBase.instance()
    before = version_base.getbase()
    version_base.setbase(__compat_version__)  # what Hydra takes when no app said
    yield
    version_base.version_base = before


@pytest.mark.parametrize("launcher", [FusedLauncher, FusedLocalLauncher, FusedSlurmLauncher])
def test_discovery(launcher):
    found = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
    assert f"{launcher.__module__}.{launcher.__name__}" in found


@pytest.mark.parametrize("name, launcher", [("fused", FusedLauncher), ("fused_local", FusedLocalLauncher),
                                            ("fused_slurm", FusedSlurmLauncher)])
def test_the_schema_is_in_the_config_store(name, launcher):
    node = ConfigStore.instance().load(f"hydra/launcher/{name}.yaml")
    assert node.provider == "regexp"
    assert node.node["_target_"] == f"{launcher.__module__}.{launcher.__name__}" and node.node["max_models"] == 64


@pytest.mark.parametrize("launcher_name, overrides", [("fused", [])])
class TestFusedLauncher(LauncherTestSuite):
    """Hydra's launcher suite: in-process sweeps through hydra/launcher=fused."""


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [
    ({"defaults": [{"override hydra/launcher": "fused"}, {"override hydra/hydra_logging": "hydra_debug"},
                  {"override hydra/job_logging": "disabled"}]},
     ["-m"]),
])
class TestFusedLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite: Hydra apps of their own, each run as a subprocess."""


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name, overrides", [
    ("fused_local", [f"hydra.launcher.{key}={value}" for key, value in ON_THIS_MACHINE.items()]),
])
class TestFusedLocalLauncher(LauncherTestSuite):
    """Hydra's launcher suite through hydra/launcher=fused_local: each job in a process of its own."""


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [
    ({"defaults": [{"override hydra/launcher": "fused_local"}, {"override hydra/hydra_logging": "hydra_debug"},
                  {"override hydra/job_logging": "disabled"}],
      "hydra": {"launcher": ON_THIS_MACHINE}},
     ["-m"]),
])
class TestFusedLocalLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite through hydra/launcher=fused_local."""


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("local_slurm")
@pytest.mark.parametrize("launcher_name, overrides", [
    ("fused_slurm", [f"hydra.launcher.{key}={value}" for key, value in ON_THE_NODE.items()]),
])
class TestFusedSlurmLauncher(LauncherTestSuite):
    """Hydra's launcher suite through hydra/launcher=fused_slurm, on the local cluster."""


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("local_slurm")
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [
    ({"defaults": [{"override hydra/launcher": "fused_slurm"}, {"override hydra/hydra_logging": "hydra_debug"},
                  {"override hydra/job_logging": "disabled"}],
      "hydra": {"launcher": ON_THE_NODE}},
     ["-m"]),
])
class TestFusedSlurmLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite through hydra/launcher=fused_slurm, on the local cluster."""
