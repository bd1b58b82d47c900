"""trainer.keep_freed_memory: training steps reuse freed memory instead of page-faulting it in."""

import subprocess
import sys

import pytest

# In a fresh interpreter (the allocator setting is process-wide and lasting): minor page faults
# of four training steps of the baseline model at batch 16, after two warm-up steps.
_STEADY_STEP_FAULTS = """
import resource, sys, torch, torch.nn.functional as F
from skinclf.models.simple_cnn import SimpleCNN
from skinclf.training.allocator import keep_freed_memory
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
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _steady_step_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _STEADY_STEP_FAULTS, mode], capture_output=True, text=True, check=True
    )
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_spares_training_steps_most_page_faults():
    applied, kept = _steady_step_faults("keep")
    assert applied == "True"
    # glibc's default returns the activations' memory on free, so every step faults its ~250 MB
    # in again (about 70,000 pages of 4 KB); kept, the steps reuse it (an occasional heap growth
    # of a few thousand pages aside).
    applied, default = _steady_step_faults("default")
    assert applied == "False"
    assert default > 4 * 20_000
    assert kept < default / 5
