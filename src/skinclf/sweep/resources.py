"""Hardware per job: torch threads divided between parallel jobs, parallel jobs spread over GPUs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from skinclf.errors import SkinclfError


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / Slurm cgroups, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_parallel_jobs(cores: int, gpus: int) -> int:
    """How many jobs to run at once on one machine: one per GPU; on CPU, one per 4 cores.

    Convolutions scale well up to a few threads, so 4 threads per job keeps each job efficient
    while still running several at once on a large machine.
    """
    if gpus > 0:
        return gpus
    return max(1, cores // 4)


def _parallel_jobs_resolver() -> int:
    import torch  # here: `skinclf train --help` and config errors must not wait for torch's import

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return default_parallel_jobs(available_cores(), gpus)


# Used by conf/hydra/launcher/local.yaml as `n_jobs: ${skinclf.parallel_jobs:}`.
if not OmegaConf.has_resolver("skinclf.parallel_jobs"):
    OmegaConf.register_new_resolver("skinclf.parallel_jobs", _parallel_jobs_resolver)


N_JOBS_ZERO = (
    "hydra.launcher.n_jobs=0: expected a positive number of jobs, or a negative one counted back "
    "from the cores (-1: all of them; -2: all but one), as joblib takes it"
)


def concurrent_jobs(launcher: Mapping[str, Any] | None, cores: int) -> int | None:
    """Jobs sharing this machine's cores under ``launcher`` (hydra.launcher); None if not known.

    joblib runs ``n_jobs`` at once (negative: cores + 1 + n_jobs, joblib's own convention).
    Hydra's basic launcher runs jobs one after another: each has the machine to itself.
    """
    if launcher is None:
        return None
    if "n_jobs" in launcher:
        n_jobs = int(launcher["n_jobs"])
        if n_jobs == 0:
            raise SkinclfError(N_JOBS_ZERO)
        return max(1, cores + 1 + n_jobs) if n_jobs < 0 else n_jobs
    return 1


def threads_per_job(setting: int | None, launcher: Mapping[str, Any] | None, cores: int) -> int | None:
    """Torch intra-op threads for one job; None = leave torch's default.

    ``setting`` is trainer.num_threads (checked by train.check_settings): an explicit number wins.
    Otherwise the cores are divided between the jobs running at once, so two jobs on two cores do
    not each start two threads. Submitit jobs get ``cpus_per_task`` cores each (Slurm enforces it;
    submitit_local does not).
    """
    if setting is not None:
        return int(setting)
    if launcher is not None and launcher.get("cpus_per_task"):
        return int(launcher["cpus_per_task"])
    jobs = concurrent_jobs(launcher, cores)
    if jobs is None or jobs == 1:
        return None
    return max(1, cores // jobs)


def spread_device(device: str, slot: int | None, gpu_count: int) -> str:
    """The device of the sweep job in ``slot``: with device=auto on several GPUs, slot i gets GPU
    i mod n. The local launcher numbers slots so that no two running jobs share one
    (hydra.launcher.slot); under other launchers a job's slot is its job number.

    Without this, every parallel job lands on cuda:0. Explicit devices (cpu, cuda:1) are kept;
    under Slurm each job sees only its own GPUs, so gpu_count is 1 there and nothing changes.
    """
    if device != "auto" or slot is None or gpu_count < 2:
        return device
    return f"cuda:{slot % gpu_count}"
