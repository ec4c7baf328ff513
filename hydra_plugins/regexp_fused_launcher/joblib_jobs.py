"""regexp's joblib launcher (hydra/launcher=joblib), where Hydra's plugin scan finds it. It
lives in _joblib_jobs, which needs Hydra's joblib plugin (pip install 'regexp[launchers]'):
without it there is none, and no import error at each start."""

try:
    from ._joblib_jobs import JoblibLauncher
except ModuleNotFoundError as e:
    if not (e.name or "").startswith(("hydra_plugins.hydra_joblib_launcher", "joblib")):
        raise
else:
    __all__ = ["JoblibLauncher"]
