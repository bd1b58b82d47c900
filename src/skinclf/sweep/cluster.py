"""The ``slurm`` and ``slurm_local`` launchers (conf/hydra/launcher/): Hydra's submitit launchers,
changed in one way. A job that ends without a result (killed by the out-of-memory killer or
``scancel``, its node lost) made Hydra's launcher raise submitit's error as the whole launch's:
a traceback, no sweep summary, and the jobs still running no longer waited for. Here it is
recorded as failed, as the ``local`` launcher records a killed job (a re-launch resumes it), and
the launch waits for the other jobs and ends with the summary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import submitit
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as SubmititLocal
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurm
from submitit.core.utils import UncompletedJobError

from skinclf.run_folder import read_status
from skinclf.sweep.jobs import job_dir, record_lost_job


class _RecordsLostJobs:
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with _lost_jobs_recorded(self, job_overrides, initial_job_idx):
            return super().launch(job_overrides, initial_job_idx)


class SlurmLauncher(_RecordsLostJobs, SubmititSlurm):
    """Hydra's submitit_slurm launcher; a job lost on the cluster fails alone."""


class SlurmLocalLauncher(_RecordsLostJobs, SubmititLocal):
    """Hydra's submitit_local launcher (the slurm setup as local processes); a killed job fails alone."""


@contextlib.contextmanager
def _lost_jobs_recorded(
    launcher: Any, job_overrides: Sequence[Sequence[str]], first_num: int
) -> Iterator[None]:
    # Hydra's launch() builds its executor and reads the jobs' results in one method: submitting
    # is the one step between them that can hand it jobs whose results() record a loss instead of
    # raising. Patched for this launch only.
    executor_class = submitit.AutoExecutor
    own = vars(executor_class).get("map_array")  # None: inherited from submitit's Executor
    submit = executor_class.map_array

    def map_array(executor: submitit.AutoExecutor, fn: Any, *iterables: Any) -> list[_Recorded]:
        jobs = submit(executor, fn, *iterables)
        return [
            _Recorded(job, launcher, first_num + idx, list(job_overrides[idx]))
            for idx, job in enumerate(jobs)
        ]

    executor_class.map_array = map_array
    try:
        yield
    finally:
        if own is None:
            del executor_class.map_array
        else:
            executor_class.map_array = own


class _Recorded:
    """A submitted job whose ``results()`` records it as failed when it ended without a result."""

    def __init__(self, job: submitit.Job, launcher: Any, num: int, overrides: list[str]) -> None:
        self.job, self.launcher, self.num, self.overrides = job, launcher, num, overrides

    def results(self) -> list[JobReturn]:
        # COMPLETED where handled: Hydra's sweeper raises a FAILED job's error, ending the sweep.
        handled = [JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED)]
        try:
            return self.job.results()
        except UncompletedJobError:
            # No result at all. A skinclf job records its failures and returns; it leaves no
            # result when stopped (Ctrl-C, a requeue's exit: recorded as stopped) or killed
            # outright (scancel too: submitit ignores SIGTERM, and Slurm's SIGKILL follows).
            # An error raised by the job itself (skinclf not importable on the node) is Hydra's.
            if read_status(job_dir(self.launcher, self.num, self.overrides)).get("status") != "stopped":
                message = (
                    f"its job {self.job.job_id} ended without a result (out of memory, scancel, a "
                    f"lost node? {self.job.paths.stderr} may say); a re-launch resumes it"
                )
                record_lost_job(self.launcher, self.num, self.overrides, message)
            return handled
