"""Hydra's own launcher test suites (hydra.test_utils.launcher_common_tests), run on
`hydra/launcher=fused` as Hydra's launcher plugins run them: apps that are not regexp's, whose
jobs the fused launcher runs as Hydra's basic launcher does."""

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase, __compat_version__

from hydra_plugins.regexp_fused_launcher.fused_launcher import FusedLauncher


@pytest.fixture(autouse=True)
def fresh_version_base():
    """The suites expect a fresh process's version base (1.1: a job runs in its own dir);
    regexp's tests that ran before in this process set Hydra's global one to 1.3."""
    version_base = VersionBase.instance()
    before = version_base.getbase()
    version_base.setbase(__compat_version__)  # what Hydra takes when no app said
    yield
    version_base.version_base = before


def test_discovery():
    assert FusedLauncher.__name__ in [c.__name__ for c in Plugins.instance().discover(Launcher)]


def test_the_schema_is_in_the_config_store():
    node = ConfigStore.instance().load("hydra/launcher/fused.yaml")
    assert node.provider == "regexp"
    assert node.node == {"_target_": f"{FusedLauncher.__module__}.FusedLauncher", "max_models": 64}


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
