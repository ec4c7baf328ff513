"""`hydra/launcher=fused`: a sweep's jobs that can share one stack of models train side by
side (regexp.train.train_group); the others run one after another, as with Hydra's basic
launcher. Which jobs fuse is regexp.fusion's partition.

Hydra imports this module at every start (its plugin scan): only Hydra's launcher base and
the standard library at module level; regexp (and torch, through it) when a sweep launches.
"""

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict


class FusedLauncher(Launcher):
    def __init__(self, max_models: int = 64) -> None:
        self.max_models = max_models  # models a group holds at most (the pre-flight checked it)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Partition the jobs, print the plan, then run each group (in the order of its
        first job); the returns come back in job order, as the sweeper expects them. Another
        app's jobs (its task is not regexp's) run one after another in this process, by
        Hydra's basic launcher."""
        from hydra.core.utils import configure_log, setup_globals

        from regexp import fusion
        from regexp.compose import composing_many
        from regexp.sweep import jobs_ended

        if not is_regexp_task(self.task_function):
            return self.basic_launcher().launch(job_overrides, initial_job_idx)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        with composing_many():
            configs = [self.sweep_config(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        jobs = [fusion.candidate(cfg) for cfg in configs]
        plan = fusion.partition(jobs, self.max_models, fusion.memory_budget({j.config["device"]["name"] for j in jobs}))
        for line in plan.lines(jobs):
            print(line, flush=True)
        returns: dict[int, JobReturn] = {}
        for group in plan.groups:
            members = [configs[i] for i in group]
            returns.update(zip(group, [self.run(members[0])] if len(group) == 1 else self.run_fused(members)))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            jobs_ended(self.hydra_context.callbacks)  # a group's members end together, after Hydra's on_job_end
        return [returns[i] for i in range(len(configs))]

    @classmethod
    def beside(cls, launcher: Launcher, max_models: int = 64) -> "FusedLauncher":
        """One that runs `launcher`'s jobs in this process (a job resume=auto skips, a cluster
        job's group, a config loaded here), with its context, task and config."""
        here = cls(max_models)
        here.setup(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=launcher.config)
        return here

    def basic_launcher(self) -> Launcher:
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        launcher = BasicLauncher()
        launcher.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        return launcher

    def sweep_config(self, overrides: Sequence[str], number: int, job_id: Any = None) -> DictConfig:
        """A job's config, as Hydra's BasicLauncher loads it (a cluster job's id: `job_id`)."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = number
        return self.with_id(sweep_config, number if job_id is None else job_id)

    @staticmethod
    def with_id(sweep_config: DictConfig, job_id: Any) -> DictConfig:
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = job_id
        return sweep_config

    def run(self, sweep_config: DictConfig, task_function: Optional[TaskFunction] = None) -> JobReturn:
        """One job in Hydra's job context (run dir, .hydra files, callbacks), as BasicLauncher runs it."""
        from hydra.core.utils import run_job

        return run_job(hydra_context=self.hydra_context, task_function=task_function or self.task_function,
                       config=sweep_config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def run_fused(self, configs: list[DictConfig]) -> list[JobReturn]:
        """Each job's context and checks (cli.prepare_member through Hydra's run_job), then one
        training of the group (cli.run_group); each job's return gets its own value."""
        from regexp.cli import prepare_member, run_group

        members: list[Any] = []
        returns = [self.run(cfg, lambda job_cfg: members.append(prepare_member(job_cfg))) for cfg in configs]
        prepared = [r for r in returns if r.status is JobStatus.COMPLETED]  # a search sweeper's refused draw is FAILED
        with logging_into_each([m.hydra_cfg for m in members]):
            values = run_group(members, self.task_function.wandb_server)
        for job_return, value in zip(prepared, values):
            job_return.status = JobStatus.FAILED if isinstance(value, Exception) else JobStatus.COMPLETED
            job_return.return_value = value
        return returns


def is_regexp_task(task: Any) -> bool:
    """Whether Hydra's task is regexp's training (regexp.cli.Job), whose jobs regexp's launchers run
    their own way; another app's run as Hydra's launchers run them."""
    return getattr(task, "regexp_task", False) is True


@contextmanager
def logging_into_each(hydra_cfgs: list[Any]) -> Iterator[None]:
    """While a group trains, its log lines go to every member's log file, not only to the
    last member's (where Hydra's job logging points after preparing them all)."""
    root = logging.getLogger()
    current = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    if current is None:
        yield
        return
    name = Path(current.baseFilename).name
    paths = {str(Path(h.runtime.output_dir, name).absolute()) for h in hydra_cfgs} - {current.baseFilename}
    added = [logging.FileHandler(path) for path in sorted(paths)]
    for handler in added:
        handler.setFormatter(current.formatter)
        handler.setLevel(current.level)
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
