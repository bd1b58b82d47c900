"""The ``local`` launcher (conf/hydra/launcher/local.yaml): Hydra's joblib launcher, changed in
two ways that matter on one machine.

- A job process killed outright (SIGKILL, the out-of-memory killer) stops only its own job.
  Joblib's process pool breaks when one of its workers dies: every job running beside it is
  ended too, and Hydra's joblib launcher then aborts the whole sweep. Here the jobs that were
  running when the pool broke are run again one at a time, each in a process of its own, so that
  a second death can only be that job's: it is left as it stands (its status "running", which
  the sweep summary counts as failed: killed), and the jobs beside it go on, resuming from their
  last completed epoch. The jobs not yet started run in parallel as before.
- Each job knows how many jobs run beside it, ``hydra.launcher.n_jobs`` in its config set to
  min(n_jobs, jobs left), so that a sweep of 2 jobs with n_jobs=-1 on 16 cores gives each job
  8 torch threads, not 1 (skinclf.sweep.resources.threads_per_job).

As with joblib, ``n_jobs`` of 1 runs the jobs one after another in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib.externals.loky import get_reusable_executor
from joblib.externals.loky.process_executor import BrokenProcessPool
from omegaconf import DictConfig, open_dict

from skinclf.errors import EXIT_USER_ERROR, SkinclfError
from skinclf.sweep import resources

log = logging.getLogger(__name__)

# How long `kill` waits for the running jobs to record that they stopped.
STOP_TIMEOUT_S = 60


class LocalLauncher(JoblibLauncher):
    """Of joblib's settings (hydra.launcher.*), reads only ``n_jobs``."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        try:
            at_once = resources.concurrent_jobs(self.joblib, resources.available_cores()) or 1
        except SkinclfError as err:  # Hydra would print its traceback; before any job, as a run's
            print(f"skinclf train: error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        at_once = min(at_once, len(job_overrides))
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, {at_once} at a time, sweep output dir: {sweep_dir}")
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")

        jobs = _Jobs(self, job_overrides, initial_job_idx)
        if at_once == 1:  # in this process, as joblib runs n_jobs=1
            return [jobs.execute(idx, 1) for idx in range(len(job_overrides))]
        waiting = list(range(len(job_overrides)))
        try:
            while waiting:
                interrupted = jobs.run_parallel(waiting, at_once)
                waiting = [idx for idx in waiting if idx not in jobs.returns and idx not in interrupted]
                for idx in interrupted:
                    jobs.run_alone(idx)
        except SystemExit:
            # `kill` (the CLI raises SIGTERM as SystemExit): the jobs must stop too, not run to
            # their end first. Ctrl-C reaches them already, from the terminal.
            jobs.stop()
            raise
        return [jobs.returns[idx] for idx in range(len(job_overrides))]


class _Jobs:
    """The jobs of one launch, and what each returned."""

    def __init__(
        self, launcher: LocalLauncher, job_overrides: Sequence[Sequence[str]], first_num: int
    ) -> None:
        self.launcher = launcher
        self.job_overrides = job_overrides
        self.first_num = first_num
        self.returns: dict[int, JobReturn] = {}
        self.singleton_state = Singleton.get_state()
        # The pool in use and its jobs (future -> job), for stop().
        self.executor: Any = None
        self.running: dict[Future, int] = {}

    def _arguments(self, idx: int, at_once: int) -> tuple[Any, ...]:
        launcher = self.launcher
        return (
            self.first_num + idx,
            self.job_overrides[idx],
            launcher.hydra_context,
            launcher.config,
            launcher.task_function,
            self.singleton_state,
            at_once,
            os.getcwd(),
        )

    def execute(self, idx: int, at_once: int) -> JobReturn:
        return execute_job(*self._arguments(idx, at_once))

    def submit(self, executor: Any, idx: int, at_once: int) -> Future:
        return executor.submit(_pool_job, *self._arguments(idx, at_once))

    def run_parallel(self, waiting: list[int], at_once: int) -> list[int]:
        """Run the ``waiting`` jobs, ``at_once`` at a time, until all are done or a job process
        dies; returns the jobs that were running then (the pool ends them all)."""
        at_once = min(at_once, len(waiting))
        self.executor = executor = get_reusable_executor(max_workers=at_once)
        queue = iter(waiting)
        self.running = running = {}
        while True:
            for idx in queue:  # fill the free places
                running[self.submit(executor, idx, at_once)] = idx
                if len(running) == at_once:
                    break
            if not running:
                return []
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            if any(_died(future) for future in finished):
                # Every job still in the pool ends with the same error in a moment: wait for them,
                # so that none that finished just before is run again.
                finished, _ = wait(running)
            died = []
            for future in finished:
                idx = running.pop(future)
                if _died(future):
                    died.append(idx)
                else:
                    self.returns[idx] = future.result()  # any other error is Hydra's to report
            if died:
                log.error(
                    f"a job process died ({_reason(finished)}); its pool ended the jobs beside it; "
                    f"running them again one at a time: {', '.join(f'#{self.first_num + i}' for i in died)}"
                )
                return died

    def run_alone(self, idx: int) -> None:
        """Run job ``idx`` in a process of its own: if that process dies, the job is the cause.
        Its status stays "running", which the sweep summary counts as failed (killed)."""
        self.executor = get_reusable_executor(max_workers=1)
        future = self.submit(self.executor, idx, 1)
        self.running = {future: idx}
        wait([future])
        if not _died(future):
            self.returns[idx] = future.result()
            return
        log.error(
            f"job #{self.first_num + idx} died on its own ({_reason([future])}; out of memory?): "
            "it counts as failed, and a re-launch resumes it"
        )
        self.returns[idx] = JobReturn(overrides=list(self.job_overrides[idx]), status=JobStatus.COMPLETED)

    def stop(self) -> None:
        """Stop the running jobs as `kill` stops a run (each records "stopped"; a re-launch resumes
        it), and wait until they have."""
        for process in list(getattr(self.executor, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        wait(self.running, timeout=STOP_TIMEOUT_S)


def _died(future: Future) -> bool:
    """Whether a finished job's process died (loky breaks the pool: BrokenProcessPool)."""
    return isinstance(future.exception(), BrokenProcessPool)


def _reason(futures: Any) -> str:
    """How the process died, from loky's message: "exit codes of the workers are {SIGKILL(-9)}"."""
    error = str(next(future.exception() for future in futures if _died(future)))
    codes = re.search(r"exit codes of the workers are \{(.*?)\}", error)
    return f"exit code {codes.group(1)}" if codes else error.strip().splitlines()[0]


def execute_job(
    num: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    at_once: int,
    folder: str,
) -> JobReturn:
    """One job in a pool process: hydra_joblib_launcher's ``execute_job``, with
    ``hydra.launcher.n_jobs`` set to the number of jobs running at once (``at_once``), run from
    the launching process's ``folder``. A pool process outlives its launch and keeps the folder
    it started in, but relative paths and Hydra's record of them (hydra.runtime.cwd) must count
    from where this sweep was launched."""
    os.chdir(folder)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
        sweep_config.hydra.job.num = num
        sweep_config.hydra.launcher.n_jobs = at_once
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _pool_job(*arguments: Any) -> JobReturn:
    """:func:`execute_job` in a pool process, which SIGTERM stops as the CLI stops a run."""
    signal.signal(signal.SIGTERM, _stop_once)
    return execute_job(*arguments)


def _stop_once(signum: int, frame: object) -> None:
    """A pool process's SIGTERM: stop the job as the CLI stops a run, raising SystemExit so that
    its status is recorded and no temporary file is left. Only once: the launcher forwards
    `kill` to its jobs, and a scheduler may signal the whole process group as well; a second
    signal would interrupt the recording of the first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)
