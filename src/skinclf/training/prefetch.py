"""The next training batch, prepared on CPU time that the current step leaves idle (Linux).

A CPU training step keeps its torch threads busy only part of the time: between the parallel
parts (dropout's random draws, small ops, Python's dispatch) the other threads wait. During a
res_aug step on 2 cores, 1.64 cores were busy on average (CPU time / wall time with OpenMP's
threads sleeping instead of spinning while they wait). Preparing a batch (gather, augmentation,
normalisation: 5-10 ms of CPU time at batch 64) fits into those gaps, but only if it never delays
the step: a helper thread at normal priority competes with the step's own threads and made epochs
slower. So the helper runs under Linux's SCHED_IDLE policy, which gives it a core only when no
other thread wants one. Elsewhere (macOS, Windows), and with one torch thread (no gaps to fill),
batches are prepared in turn as before.

The batches are the same either way: :func:`prefetched` takes jobs that are pure functions (the
loop makes every random draw itself, in its own order, before handing a job over), so it does
not matter which thread runs one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long the loop waits, once the step is done, for a batch the helper has not finished. An
# idle-priority thread gets no CPU while other processes keep every core busy: past this, the
# loop prepares the batch itself, and the rest of the epoch's batches too.
STARVED_AFTER_S = 0.05


class IdleHelper:
    """A daemon thread at SCHED_IDLE priority that runs the functions handed to it, in order.
    ``idle_priority`` is False (and the thread gone) where the policy could not be set."""

    def __init__(self) -> None:
        # The torch threads it was started under: its own parallel ops keep that many.
        self.threads = torch.get_num_threads()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started = threading.Event()
        self.idle_priority = False
        # A daemon, so that a job starved of CPU time never holds up the interpreter's exit.
        threading.Thread(target=self._run, name="skinclf-batch-helper", daemon=True).start()
        self._started.wait()

    def _run(self) -> None:
        try:
            # pid 0: this thread only. torch's worker threads that this thread starts for its
            # own parallel ops inherit the policy.
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            self.idle_priority = True
        except OSError:
            pass
        self._started.set()
        while self.idle_priority and (item := self._jobs.get()) is not None:
            future, job = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as err:  # handed to whoever waits for the result
                    future.set_exception(err)

    def submit(self, job: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, job))
        return future

    def close(self) -> None:
        """The thread ends after the jobs already handed over."""
        self._jobs.put(None)


_helper: IdleHelper | None = None
_no_idle_policy = not (hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"))


def idle_helper() -> IdleHelper | None:
    """The process's helper; None where SCHED_IDLE is not available (a helper at normal priority
    would slow the step down). One for the whole process: starting a thread each epoch cost more
    than the helper saved (its first parallel op resets torch's per-thread state)."""
    global _helper, _no_idle_policy
    if _no_idle_policy:
        return None
    if _helper is not None and _helper.threads != torch.get_num_threads():
        _helper.close()  # started under another thread count (trainer.num_threads)
        _helper = None
    if _helper is None:
        _helper = IdleHelper()
        if not _helper.idle_priority:
            _helper, _no_idle_policy = None, True
    return _helper


def _forget_helper() -> None:
    global _helper
    _helper = None


if hasattr(os, "register_at_fork"):
    # A forked child has none of the parent's threads.
    os.register_at_fork(after_in_child=_forget_helper)


def prefetched(jobs: Iterable[Callable[[], T]], enabled: bool) -> Iterator[T]:
    """Each job's result, in order. With ``enabled`` on a CPU with several torch threads, job
    k + 1 runs on an :class:`IdleHelper` while the caller works with result k (the first job runs
    here: there is nothing to overlap it with). A job's exception reaches the caller when its
    result is due, as if it had run here."""
    helper = idle_helper() if enabled and torch.get_num_threads() > 1 else None
    jobs = iter(jobs)
    upcoming = next(jobs, None)
    if upcoming is None:
        return
    result = upcoming()
    for upcoming in jobs:
        pending = helper.submit(upcoming) if helper is not None else None
        yield result
        if pending is not None:
            try:
                result = pending.result(timeout=STARVED_AFTER_S)
                continue
            except concurrent.futures.TimeoutError:
                log.info(
                    f"the batch helper thread got no CPU time for {STARVED_AFTER_S * 1000:.0f} ms "
                    "(other processes busy?): batches are prepared in turn for the rest of this epoch"
                )
                helper = None
        result = upcoming()
    yield result
