"""hydra/launcher=joblib for regexp's jobs: Hydra's joblib launcher, except when a worker
process dies (SIGKILL, the kernel's out-of-memory killer): joblib then stops every worker and
raises, which ended the sweep with a traceback and left its runs marked running. Here the
sweep ends with its table instead: each job that had started and not finished is failed (its
run continues from its last checkpoint with resume=auto), a job that never started is `not
run`, and the exit code is 1."""

import re
from typing import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as HydraJoblibLauncher

from ._lost_jobs import lost_returns
from .fused_launcher import FusedLauncher, is_regexp_task


class JoblibLauncher(HydraJoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        try:
            return super().launch(job_overrides, initial_job_idx)
        except TerminatedWorkerError as e:
            if not is_regexp_task(self.task_function):
                raise
            codes = re.search(r"\{(.*)\}", str(e))  # joblib names the workers' exit codes: {SIGKILL(-9)}
            died = f"a joblib worker was killed ({codes[1]})" if codes else "a joblib worker died"
            what = f"{died} and joblib stopped the others before this job's run finished"
            print(f"joblib: {died} and joblib stopped the others: the jobs that had not finished are failed, those "
                  "not started did not run; the same command with resume=auto continues them", flush=True)
            return self.lost(job_overrides, initial_job_idx, what)

    def lost(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, what: str) -> list[JobReturn]:
        """Each job's return after the pool broke (a finished job's run keeps its own end)."""
        here = FusedLauncher.beside(self)
        configs = [here.sweep_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        return lost_returns(configs, what, unstarted_failed=False)
