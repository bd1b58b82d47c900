"""Preparing the next batch on an idle-priority helper thread: results in order, on the helper
where Linux allows it, errors where they are due, and the caller taking over when the helper
gets no CPU time."""

import logging
import os
import threading
import time

import pytest
import torch

from skinclf.training import prefetch
from skinclf.training.prefetch import prefetched

needs_idle_policy = pytest.mark.skipif(
    not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's; elsewhere batches are prepared in turn"
)


def job(k: int, delay_on_helper: float = 0.0):
    def run():
        if delay_on_helper and threading.current_thread().name == "skinclf-batch-helper":
            time.sleep(delay_on_helper)
        return k, threading.get_native_id()

    return run


@needs_idle_policy
def test_jobs_after_the_first_run_on_an_idle_priority_helper_and_come_back_in_order(two_torch_threads):
    results = list(prefetched((job(k) for k in range(6)), enabled=True))
    assert [k for k, _ in results] == list(range(6))
    caller = threading.get_native_id()
    threads = {tid for _, tid in results[1:]}
    assert results[0][1] == caller and threads.isdisjoint({caller}) and len(threads) == 1
    assert os.sched_getscheduler(threads.pop()) == os.SCHED_IDLE


def test_disabled_or_with_one_torch_thread_every_job_runs_on_the_caller(two_torch_threads):
    caller = threading.get_native_id()
    assert [tid for _, tid in prefetched((job(k) for k in range(4)), enabled=False)] == [caller] * 4
    torch.set_num_threads(1)
    assert [tid for _, tid in prefetched((job(k) for k in range(4)), enabled=True)] == [caller] * 4


def test_no_jobs_no_results():
    assert list(prefetched(iter([]), enabled=True)) == []


def test_a_failing_job_raises_when_its_result_is_due(two_torch_threads):
    def failing():
        raise ValueError("batch 2 is broken")

    results = prefetched(iter([job(0), job(1), failing, job(3)]), enabled=True)
    assert [next(results)[0], next(results)[0]] == [0, 1]
    with pytest.raises(ValueError, match="batch 2 is broken"):
        next(results)


@needs_idle_policy
def test_a_starved_helper_hands_the_rest_of_the_epoch_to_the_caller(two_torch_threads, monkeypatch, caplog):
    monkeypatch.setattr(prefetch, "STARVED_AFTER_S", 0.02)
    jobs = [job(k, delay_on_helper=0.5) for k in range(4)]
    with caplog.at_level(logging.INFO, logger="skinclf.training.prefetch"):
        results = list(prefetched(iter(jobs), enabled=True))
    assert [k for k, _ in results] == [0, 1, 2, 3]
    assert {tid for _, tid in results} == {threading.get_native_id()}  # the caller made every batch
    assert "got no CPU time for 20 ms" in caplog.text
    prefetch.idle_helper().submit(lambda: None).result()  # the abandoned job done: an idle helper
