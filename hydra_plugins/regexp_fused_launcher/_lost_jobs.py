"""The returns of jobs whose process or cluster job ended without giving one back (regexp's
submitit and joblib launchers): each job's failure recorded where its run did not record its
own end (regexp.sweep.record_lost_job), and what Hydra's sweeper expects of it."""

import math
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig


def lost_returns(configs: Sequence[DictConfig], what: str, unstarted_failed: bool = True) -> list[JobReturn]:
    """`configs`: the lost jobs' configs as the launcher loaded them; `what`: why they are lost.
    A job that never started is failed too (a cluster job cancelled in the queue), or, without
    `unstarted_failed`, left without a record: its row says `not run`."""
    from regexp.compose import expands_its_jobs
    from regexp.sweep import job_record_path, record_lost_job

    returns = []
    for cfg in configs:
        if unstarted_failed or job_record_path(cfg.hydra).is_file():
            record_lost_job(cfg.hydra, what)
        searching = not expands_its_jobs(cfg.hydra)  # a search sweeper takes the error, the basic one NaN
        returns.append(JobReturn(overrides=list(cfg.hydra.overrides.task), cfg=cfg, hydra_cfg=cfg.hydra,
                                 status=JobStatus.FAILED if searching else JobStatus.COMPLETED,
                                 _return_value=RuntimeError(what) if searching else math.nan))
    return returns
