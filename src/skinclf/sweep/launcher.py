"""The ``local`` launcher (conf/hydra/launcher/local.yaml): Hydra's joblib launcher, changed in
four ways that matter on one machine.

- Each job runs in a process of its own, at most ``n_jobs`` at once. Joblib shares a pool of
  processes between the jobs, and one of them killed outright (SIGKILL, the out-of-memory
  killer) breaks the pool: it ends every job beside it and aborts the sweep. Here it ends only
  its own job, which is recorded as failed with the exit code; a re-launch resumes it.
- ``kill`` (or ``kill -INT``) of the sweep stops its running jobs as ``kill`` stops a run (each
  records "stopped"), instead of waiting for them to finish, and starts no other. A job stopped
  by a signal of its own (an out-of-memory daemon's SIGTERM) stops alone.
- Each job's ``hydra.launcher.n_jobs`` is the number of jobs that run at once, min(n_jobs, jobs
  in the sweep): torch threads per job (skinclf.sweep.resources.threads_per_job) then divide
  the cores between the jobs that are really there, so that 2 jobs with n_jobs=-1 (one job per
  core) on 16 cores get 8 threads each, not 1.
- Each job's ``hydra.launcher.slot`` is its place among the jobs running at once (0 to n_jobs - 1,
  the lowest one free as it starts): with device=auto on several GPUs, it trains on GPU
  (slot mod GPUs) (skinclf.sweep.resources.spread_device). Jobs end out of order, so the job
  number would put a new job on a GPU still busy while another idles.

Of joblib's settings (hydra.launcher.*), only ``n_jobs`` is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib.externals.loky import ProcessPoolExecutor
from joblib.externals.loky.process_executor import BrokenProcessPool
from omegaconf import DictConfig

from skinclf.errors import SkinclfError, exit_with_error, first_line
from skinclf.sweep import resources
from skinclf.sweep.jobs import job_config, record_lost_job

log = logging.getLogger(__name__)

# How long a stopped sweep waits for its running jobs to record that they stopped, before it
# kills what is left of them.
STOP_TIMEOUT_S = 60
# How long a job's process waits idle for work before it ends on its own. Its one job is queued
# as it starts, and the launcher shuts it down when the job returns; but a launcher killed
# outright (SIGKILL) never does, and the process would otherwise wait forever, holding its
# memory (about 1 GB), deaf to SIGTERM (see _run_job).
WORKER_IDLE_TIMEOUT_S = 10


class LocalLauncher(JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        try:
            at_once = resources.concurrent_jobs(self.joblib, resources.available_cores())
        except SkinclfError as err:  # Hydra would print its traceback; before any job, as a run's
            exit_with_error("train", str(err))
        at_once = min(at_once, len(job_overrides))
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, {at_once} at a time, sweep output dir: {sweep_dir}")
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")

        jobs = _Jobs(self, job_overrides, initial_job_idx, at_once)
        try:
            jobs.run()
        except BaseException:
            # `kill`, `kill -INT` or an error here reach only this process: stop the jobs too (after
            # a Ctrl-C in the terminal, which reached them already, they ignore the second signal).
            jobs.stop()
            raise
        return [jobs.returns[idx] for idx in range(len(job_overrides))]


class _Jobs:
    """The jobs of one launch: each in a process of its own (a one-process loky executor), at
    most ``at_once`` at a time, and what each returned."""

    def __init__(
        self, launcher: LocalLauncher, job_overrides: Sequence[Sequence[str]], first_num: int, at_once: int
    ) -> None:
        self.launcher = launcher
        self.job_overrides = job_overrides
        self.first_num = first_num
        self.at_once = at_once
        self.returns: dict[int, JobReturn] = {}
        self.running: dict[Future, tuple[int, int, ProcessPoolExecutor]] = {}  # -> job, slot, executor
        self.free_slots = set(range(at_once))

    def run(self) -> None:
        queue = iter(range(len(self.job_overrides)))
        while True:
            for idx in queue:  # fill the free slots
                self._start(idx)
                if not self.free_slots:
                    break
            if not self.running:
                return
            finished, _ = wait(self.running, return_when=FIRST_COMPLETED)
            for future in finished:
                idx, slot, executor = self.running.pop(future)
                executor.shutdown(wait=True)
                self.free_slots.add(slot)
                error = future.exception()
                if isinstance(error, BrokenProcessPool):  # its process died
                    self._record_lost(idx, error)
                elif not isinstance(error, (SystemExit, KeyboardInterrupt)):
                    self.returns[idx] = future.result()  # any other error is Hydra's to report
                    continue
                # A job stopped by a signal of its own (an out-of-memory daemon's SIGTERM) recorded
                # "stopped", which the summary counts as failed; the sweep goes on. Its return is
                # COMPLETED: Hydra's sweeper raises a FAILED one's error, ending the sweep.
                overrides = list(self.job_overrides[idx])
                self.returns[idx] = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)

    def _start(self, idx: int) -> None:
        launcher = self.launcher
        slot = min(self.free_slots)
        self.free_slots.remove(slot)
        executor = ProcessPoolExecutor(max_workers=1, timeout=WORKER_IDLE_TIMEOUT_S)
        future = executor.submit(
            _run_job,
            self.first_num + idx,
            self.job_overrides[idx],
            launcher.hydra_context,
            launcher.config,
            launcher.task_function,
            Singleton.get_state(),
            self.at_once,
            slot,
            os.getcwd(),
        )
        self.running[future] = (idx, slot, executor)

    def _record_lost(self, idx: int, error: BrokenProcessPool) -> None:
        """Record job ``idx``, whose process died without a word (or failed in loky itself), as
        failed, with the exit code (SIGKILL: the out-of-memory killer?)."""
        codes = re.search(r"exit codes of the workers are \{(.*?)\}", str(error))
        if codes:
            message = f"its process was killed (exit code {codes.group(1)}; out of memory?)"
            message += "; a re-launch resumes it"
        else:
            message = f"its process failed: {first_line(error)}"
        record_lost_job(self.launcher, self.first_num + idx, list(self.job_overrides[idx]), message)

    def stop(self) -> None:
        """Stop the running jobs as `kill` stops a run: each records "stopped", and a re-launch
        resumes it. What has not stopped after STOP_TIMEOUT_S (or at a second signal) is killed."""
        try:
            for *_, executor in self.running.values():
                for process in list(getattr(executor, "_processes", {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)
            wait(self.running, timeout=STOP_TIMEOUT_S)
        finally:
            for future, (*_, executor) in self.running.items():
                # A job that recorded its stop is shut down cleanly (a killed worker leaves loky's
                # semaphores behind, which Python then warns about at exit); the rest are killed.
                executor.shutdown(wait=future.done(), kill_workers=not future.done())


def _run_job(*arguments: Any) -> JobReturn:
    """:func:`execute_job` in a job's own process, stopped by SIGTERM as the CLI stops a run
    (SystemExit) and by SIGINT as by Ctrl-C (KeyboardInterrupt): the job records "stopped" and
    leaves no temporary file. Only while the job runs: before, the process has nothing to record
    and may simply end; after, a signal would cut short the return of the result."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_once)
    try:
        return execute_job(*arguments)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _already_stopping)


def _stop_once(signum: int, frame: object) -> None:
    """The first SIGTERM or SIGINT in a job's process. Later ones are ignored: the launcher
    passes a stop on to its jobs, which a Ctrl-C in the terminal or a scheduler signalling the
    whole process group reached already, and a second signal would interrupt the recording of
    the first."""
    for ignored in (signal.SIGTERM, signal.SIGINT):
        signal.signal(ignored, _already_stopping)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _already_stopping(signum: int, frame: object) -> None:
    """A stop signal after the first: nothing to do. A handler rather than SIG_IGN, because the
    launcher's SIGTERM often arrives together with the terminal's SIGINT: Python would then find
    it pending under SIG_IGN and print "OSError: Signal 15 ignored due to race condition" with a
    traceback (CPython's bpo-43406 check) in the middle of the job's clean stop."""


def execute_job(
    num: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    at_once: int,
    slot: int,
    folder: str,
) -> JobReturn:
    """One job: hydra_joblib_launcher's ``execute_job``, with ``hydra.launcher.n_jobs`` set to the
    number of jobs running at once (``at_once``) and ``hydra.launcher.slot`` to the job's place
    among them, run from the launching process's ``folder`` (relative paths, and Hydra's record
    of them, hydra.runtime.cwd, count from there)."""
    os.chdir(folder)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = job_config(hydra_context, config, overrides, num, n_jobs=at_once, slot=slot)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
