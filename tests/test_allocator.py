"""trainer.keep_freed_memory: training steps reuse freed memory instead of page-faulting it in."""

import platform
import subprocess
import sys

import pytest
import torch

# In a fresh interpreter (the allocator setting is process-wide and lasting): bytes page-faulted
# in by four training steps of the baseline model at batch 16, after two warm-up steps.
# Transparent huge pages are turned off for the child, so that a fault is one base page.
_STEADY_STEP_FAULT_BYTES = """
import ctypes, os, resource, sys, torch, torch.nn.functional as F
from skinclf.models.simple_cnn import SimpleCNN
from skinclf.training.allocator import keep_freed_memory
PR_SET_THP_DISABLE = 41
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
model = SimpleCNN()
optimizer = torch.optim.Adam(model.parameters())
x, y = torch.rand(16, 3, 128, 128), torch.ones(16)
for step in range(6):
    if step == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss = F.binary_cross_entropy_with_logits(model(x).flatten(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults * os.sysconf("SC_PAGESIZE"))
"""


def _steady_step_fault_bytes(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _STEADY_STEP_FAULT_BYTES, mode], capture_output=True, text=True, check=True
    )
    applied, faulted = out.stdout.split()
    return applied, int(faulted)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_kept_memory_spares_training_steps_most_page_faults():
    applied, kept = _steady_step_fault_bytes("keep")
    assert applied == "True"
    # glibc's default returns the activations' memory on free, so each step faults about
    # 250 MB of activations, gradients and temporaries in again; kept, the steps reuse it (an
    # occasional heap growth aside).
    applied, default = _steady_step_fault_bytes("default")
    assert applied == "False"
    assert default > 4 * 50 * 2**20
    assert kept < default / 5


def test_freed_memory_is_kept_for_cpu_runs_only(monkeypatch):
    # On a GPU the CPU runs no training step: keeping freed memory would only hold host buffers
    # (vgg16's 1.3 GB checkpoint copies) for the whole run, in every job.
    from hydra.core.hydra_config import HydraConfig

    from skinclf import train
    from skinclf.config import compose_config

    hydra_config = HydraConfig.instance()
    monkeypatch.setattr(hydra_config, "cfg", hydra_config.cfg)  # put back after the test
    hydra_config.set_config(compose_config(return_hydra_config=True))
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(train, "task", lambda cfg, out_dir: {})
    cfg = compose_config()
    for device, kept in (("cpu", True), ("cuda", False)):
        monkeypatch.setattr(train, "resolve_device", lambda name, device=device: torch.device(device))
        calls.clear()
        train.run_in_hydra(cfg, None)
        assert calls == ([True] if kept else [])
    cfg.trainer.keep_freed_memory = False
    monkeypatch.setattr(train, "resolve_device", lambda name: torch.device("cpu"))
    train.run_in_hydra(cfg, None)
    assert calls == []


def test_a_job_on_a_numbered_gpu_makes_it_the_current_one_while_it_runs(monkeypatch):
    # Parallel sweep jobs spread over the GPUs (cuda:1, cuda:2, ...): what torch does on the
    # current GPU must happen on the job's, not on cuda:0, the default; and only during the job,
    # as the next job of a sequential sweep may be on plain "cuda". Faked: no GPU needed.
    from hydra.core.hydra_config import HydraConfig

    from skinclf import train
    from skinclf.config import compose_config

    hydra_config = HydraConfig.instance()
    monkeypatch.setattr(hydra_config, "cfg", hydra_config.cfg)  # put back after the test
    hydra_config.set_config(compose_config(return_hydra_config=True))
    events = []

    class CurrentGpu:  # torch.cuda.device, which needs a GPU
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("current", self.device))

        def __exit__(self, *exc):
            events.append(("restored", self.device))

    monkeypatch.setattr(torch.cuda, "device", CurrentGpu)
    monkeypatch.setattr(train, "task", lambda cfg, out_dir: events.append(("task", cfg.device)))
    cfg = compose_config()
    for device, made_current in (
        (torch.device("cuda", 1), True),
        (torch.device("cuda"), False),  # whichever GPU is current
        (torch.device("cpu"), False),
    ):
        monkeypatch.setattr(train, "resolve_device", lambda name, device=device: device)
        events.clear()
        train.run_in_hydra(cfg, None)
        task = [("task", cfg.device)]
        assert events == ([("current", device), *task, ("restored", device)] if made_current else task)

    # The case it is for: a sweep job with device=auto, spread to its GPU by its slot (the real
    # resolve_device, on a faked machine with two GPUs); put back also when the job fails.
    monkeypatch.undo()
    monkeypatch.setattr(hydra_config, "cfg", hydra_config.cfg)
    sweep = compose_config(["hydra.mode=MULTIRUN", "hydra.job.num=3"], return_hydra_config=True)
    hydra_config.set_config(sweep)
    monkeypatch.setattr(torch.cuda, "device", CurrentGpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def failing_task(cfg, out_dir):
        events.append(("task", cfg.device))
        raise RuntimeError("the job failed")

    monkeypatch.setattr(train, "task", failing_task)
    events.clear()
    with pytest.raises(RuntimeError, match="the job failed"):
        train.run_in_hydra(compose_config(["device=auto"]), None)
    gpu = torch.device("cuda", 1)  # job 3 of 2 GPUs
    assert events == [("current", gpu), ("task", "cuda:1"), ("restored", gpu)]
