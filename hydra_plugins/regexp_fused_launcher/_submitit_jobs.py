"""regexp's submitit launchers: `hydra/launcher=submitit_slurm` and `submitit_local` run each
job as one job of the cluster (or of this machine), as Hydra's submitit plugin does;
`fused_slurm` and `fused_local` first partition the jobs as `hydra/launcher=fused` does
(regexp.fusion), then run each fused group as one job that trains its members side by side.

What they add to Hydra's plugin, for regexp's jobs (another app's run as the plugin runs them):
- A job whose run resume=auto finds finished is not submitted: it is skipped here, at once.
- The launching host gathers each job's result as it ends. A job that ends without one
  (scancel, its time limit, a lost node, a killed process) is a failed row of the sweep (or an
  interrupted one, when its run saved its checkpoint as it stopped), and the sweep goes on.
- In a job, SLURM's time-limit warning (submitit's SIGUSR2, `signal_delay_s` before the limit) makes
  the training save a checkpoint and end `interrupted`, which resume=auto continues; no job is
  requeued (hydra.launcher.max_num_timeout stays 0: the pre-flight says so).
- A signal to the launching host (Ctrl-C, SIGTERM) cancels the jobs still queued or running:
  each running one saves its checkpoint as it stops, and the sweep's report says so.

Hydra imports this module at every start (its plugin scan): Hydra's and submitit's launcher
modules only, regexp (and torch) when a sweep launches.
"""

import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf

from ._lost_jobs import lost_returns
from .fused_launcher import FusedLauncher, is_regexp_task

Member = tuple[list[str], int, Optional[DictConfig]]  # a job as a cluster job runs it: overrides, number, config if loaded
POLL_S = 1.0  # how often the launching host looks whether a job ended
CANCEL_WAIT_S = 60  # how long a signal's cancellation waits for the running jobs to save and end


class SubmititJobs(BaseSubmititLauncher):
    """Each job of the sweep as one submitit job (see the module's doc)."""

    max_models = 1  # members a submitted job trains at most: one, unless fused

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not is_regexp_task(self.task_function):
            return super().launch(job_overrides, initial_job_idx)
        from hydra.core.utils import configure_log

        from regexp.compose import composing_many

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        here = FusedLauncher.beside(self, self.max_models)
        loaded: dict[int, DictConfig] = {}  # the jobs' configs loaded here so far, by index

        def config(i: int) -> DictConfig:
            if i not in loaded:
                loaded[i] = here.sweep_config(job_overrides[i], initial_job_idx + i)
            return loaded[i]

        with composing_many():  # a fused partition, or resume=auto, loads every job's config here
            groups, finished = self.partition(len(job_overrides), config)
        returns = {i: here.run(config(i)) for i in finished}  # resume=auto skips them: nothing to submit
        if groups:  # a config loaded here goes along: the job need not compose it again
            submitted = self.submit([[(list(job_overrides[i]), initial_job_idx + i, loaded.get(i)) for i in g]
                                     for g in groups])
            returns.update(self.gather(submitted, groups, config))
        return [returns[i] for i in range(len(job_overrides))]

    def partition(self, count: int, config: Callable[[int], DictConfig]) -> tuple[list[list[int]], list[int]]:
        """(the groups to submit, as job indices; the jobs resume=auto finds finished, whose
        configs only resume=auto needs to load here). Here: each job alone."""
        from regexp import fusion

        if self.config.get("resume") != "auto":
            return [[i] for i in range(count)], []
        finished = [i for i in range(count) if fusion.candidate(config(i)).step is None]
        return [[i] for i in range(count) if i not in finished], finished

    # ---------------------------------------------------------------- on the launching host
    def submit(self, groups: list[list[Member]]) -> list[Any]:
        """One submitit job per group (an array, as Hydra's plugin submits a sweep)."""
        executor = self.executor()
        jobs = executor.map_array(self.run_members, groups, [Singleton.get_state()] * len(groups))
        ids = [job.job_id for job in jobs]
        members = sum(len(g) for g in groups)
        print(f"submitit {self._EXECUTOR}: {len(jobs)} job{'s' * (len(jobs) != 1)} submitted"
              f"{f' for {members} sweep jobs' if members != len(jobs) else ''} "
              f"({ids[0] if len(ids) == 1 else f'{ids[0]} to {ids[-1]}'}); each one's log: "
              f"{str(self.params['submitit_folder']).replace('%j', '<job id>')}", flush=True)
        return jobs

    def executor(self) -> Any:
        """submitit's executor with this launcher's parameters, as Hydra's plugin builds it."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]}
                                         if "max_num_timeout" in self.params else {})
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"{self._EXECUTOR}_{key}": value
                                      for key, value in self.params.items() if key not in init_keys})
        return executor

    def gather(self, submitted: list[Any], groups: list[list[int]],
               config: Callable[[int], DictConfig]) -> dict[int, JobReturn]:
        """Each group's returns as its job ends (a job's console line comes from regexp.sweep's
        JobEnds, which watches the run dirs); a signal here cancels the jobs not ended yet."""
        pending = dict(zip(submitted, groups))
        returns: dict[int, JobReturn] = {}
        try:
            while pending:
                for job in self.ended(list(pending)):
                    group = pending.pop(job)
                    returns.update(zip(group, self.collect(job, group, config)))
                if pending:
                    time.sleep(POLL_S)
        except BaseException:
            self.cancel(list(pending))
            raise
        return returns

    def ended(self, jobs: list[Any]) -> list[Any]:
        """The jobs that ended: their result came back, or (SLURM) squeue no longer lists them.
        submitit asks sacct, which a cluster without accounting lacks: there it would wait for
        a cancelled job for ever (and warn at each poll)."""
        if self._EXECUTOR != "slurm":
            return [job for job in jobs if job.done()]
        queued = slurm_queue()
        return [job for job in jobs if job.paths.result_pickle.exists() or (queued is not None and job.job_id not in queued)]

    def collect(self, job: Any, group: list[int], config: Callable[[int], DictConfig]) -> list[JobReturn]:
        """A group's returns from its job's result; a job that gave none back fails each member
        whose run did not record its own end (regexp.sweep.record_lost_job): only then are the
        members' configs needed here."""
        from submitit.core.utils import FailedJobError

        try:
            if job.paths.result_pickle.exists():
                return job.results()[0]
            lost = f"{self._EXECUTOR} job {job.job_id} ended without a result ({why_lost(job)})"
        except FailedJobError as e:  # the job itself raised, outside any run's own records
            lost = f"{self._EXECUTOR} job {job.job_id} failed: {str(e).strip().splitlines()[-1]}"
        if Path(job.paths.stderr).is_file():
            lost += f"; its log: {job.paths.stderr}"
        return lost_returns([config(i) for i in group], lost)

    def cancel(self, jobs: list[Any]) -> None:
        """Cancel the jobs not ended yet, then wait (CANCEL_WAIT_S at most) while the running ones
        save their checkpoints and end, so the sweep's report reads what they left."""
        if not jobs:
            return
        print(f"submitit {self._EXECUTOR}: cancelling {len(jobs)} job{'s' * (len(jobs) != 1)} not ended yet "
              "(a running one saves its checkpoint as it stops)", flush=True)
        for job in jobs:
            job.cancel(check=False)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while jobs and time.monotonic() < deadline:
            time.sleep(POLL_S)
            jobs = [job for job in jobs if job not in self.ended(jobs)]

    # ---------------------------------------------------------------- in the cluster job
    def run_members(self, members: list[Member], singleton_state: dict[type, Singleton]) -> list[JobReturn]:
        """A submitted job: its members, alone or side by side, in Hydra's job context each."""
        import submitit

        from regexp.rundir import Interrupted
        from regexp.train import cluster_warnings

        Singleton.set_state(singleton_state)
        setup_globals()
        here = FusedLauncher.beside(self, self.max_models)
        job_id = submitit.JobEnvironment().job_id
        configs = [here.sweep_config(overrides, number, job_id) if cfg is None else here.with_id(cfg, job_id)
                   for overrides, number, cfg in members]
        for signum in cluster_warnings():  # until training takes them over (regexp.train.StopSignal)
            signal.signal(signum, time_is_up)
        try:
            return [here.run(configs[0])] if len(configs) == 1 else here.run_fused(configs)
        except Interrupted as e:  # a run that trained recorded its stop; one that had not started says so
            return lost_returns(configs, f"stopped by signal {e.signum} before its run started")


def time_is_up(signum: int, frame: Any) -> None:
    """The cluster's time-limit or preemption warning while no run of this job trains."""
    from regexp.rundir import Interrupted

    raise Interrupted(signum)


def slurm_queue() -> Optional[set[str]]:
    """The ids squeue lists (array tasks one by one: 25_3); None when it does not answer."""
    import subprocess

    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(listed.stdout.split()) if listed.returncode == 0 else None


def why_lost(job: Any) -> str:
    """Why a job gave no result, from its log (not submitit's state: sacct, which a cluster may
    lack): SLURM's own line (`*** JOB 25 ON node CANCELLED AT ... DUE TO TIME LIMIT ***`), else
    the log's last line, else that it wrote none."""
    try:
        lines = [line.strip() for line in Path(job.paths.stderr).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "it wrote no log: cancelled before it started, or it failed before Python did (hydra.launcher.setup?)"
    said = [line.split("***")[1].strip() for line in lines if line.count("***") >= 2]
    if said:
        return said[-1]
    return f"its log ends: {lines[-1]}" if lines else "its log is empty: it failed before Python started " \
                                                       "(hydra.launcher.setup?), or was killed"


class FusedJobs(SubmititJobs):
    """Each fused group (regexp.fusion's partition, as hydra/launcher=fused makes it) as one
    submitit job; a job that cannot fuse as one job of its own."""

    def __init__(self, max_models: int = 64, **params: Any) -> None:
        super().__init__(**params)
        self.max_models = max_models

    def partition(self, count: int, config: Callable[[int], DictConfig]) -> tuple[list[list[int]], list[int]]:
        from regexp import fusion

        jobs = [fusion.candidate(config(i)) for i in range(count)]
        plan = fusion.partition(jobs, self.max_models, fusion.cluster_budget(jobs, self.params.get("mem_gb")))
        for line in plan.lines(jobs):
            print(line, flush=True)
        finished = [g[0] for g in plan.groups if len(g) == 1 and jobs[g[0]].step is None]
        return [g for g in plan.groups if g[0] not in finished], finished


class SlurmLauncher(SubmititJobs):
    _EXECUTOR = "slurm"


class LocalLauncher(SubmititJobs):
    _EXECUTOR = "local"


class FusedSlurmLauncher(FusedJobs):
    _EXECUTOR = "slurm"


class FusedLocalLauncher(FusedJobs):
    _EXECUTOR = "local"
