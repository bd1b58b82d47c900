"""The benchmark scripts refuse bad arguments with argparse's usage error, before any work starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("benchmark_decode.py", ["--repeats", "0"], "argument --repeats: 0: expected an integer >= 1"),
        ("benchmark.py", ["--repeats", "0"], "argument --repeats: 0: expected an integer >= 1"),
        ("benchmark.py", ["--models", "resnt"], "argument --models: invalid choice: 'resnt'"),
        ("benchmark.py", ["--images", "63"], "argument --images: 63: expected an integer >= 64"),
        ("benchmark_decode.py", ["--images", "0"], "argument --images: 0: expected an integer >= 1"),
        (
            "benchmark.py",
            ["--json", "no/such/folder/b.json"],
            "argument --json: no/such/folder/b.json: cannot write there (No such file or directory)",
        ),
        (
            "benchmark_sweep.py",
            ["--models", "baseline", "resnt"],
            "argument --models: invalid choice: 'resnt'",
        ),
    ],
)
def test_bad_arguments_are_a_usage_error(script, args, message):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("usage: ")
    assert f"{script}: error: {message}" in done.stderr


def test_refused_arguments_leave_earlier_results_as_they_were(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"baseline": {}}\n')
    args = ["--json", str(results), "--images", "63"]  # --json is checked first, then --images fails
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "benchmark.py"), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "argument --images: 63" in done.stderr
    assert results.read_text() == '{"baseline": {}}\n'


@pytest.mark.slow
def test_the_steps_only_table_has_a_header_for_each_column(tmp_path):
    # --steps-only rows have no epoch columns; the header had them, so peak MB sat under "epoch ref".
    args = ["--steps-only", "--models", "resnet", "--repeats", "1", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "benchmark.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    row = next(line for line in lines if line.startswith("resnet "))
    assert "epoch ref" not in header and header.split()[-2:] == ["peak", "MB"]
    assert len(row.split()) == len(header.split()) - 4  # "step fp32", "step fast", "not kept", "peak MB"


def test_benchmark_results_name_the_commit_they_were_measured_at(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import _provenance

    if shutil.which("git") is None:
        pytest.skip("no git here")

    def measuring(checkout: Path) -> None:
        """As if the skinclf measured were ``checkout``'s own (an editable install)."""
        monkeypatch.setattr(_provenance, "CHECKOUT", checkout)
        monkeypatch.setattr(_provenance.skinclf, "__file__", str(checkout / "src/skinclf/__init__.py"))

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    repo = tmp_path / "repo"
    (repo / "src" / "skinclf").mkdir(parents=True)
    subprocess.run([*git, "-C", str(repo), "init", "-q"], check=True)
    (repo / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "-C", str(repo), "add", "f.py"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run(
        [*git, "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    measuring(repo)
    (repo / ".venv").mkdir()  # untracked files (CI's venv) are no change to the code
    (repo / ".venv" / "x").write_text("")
    record = _provenance.provenance(torch.device("cpu"))
    assert record["commit"] == head
    assert (
        f"skinclf {record['skinclf']} at {head} (source {record['source']}), torch {torch.__version__}"
        in _provenance.describe(record)
    )
    (repo / "f.py").write_text("a = 2\n")  # a tracked file changed: the figures are not that commit's
    assert _provenance.checkout_commit() == f"{head}+changes"
    # An installed copy measures the code as it was installed, whichever commit the checkout is at.
    monkeypatch.setattr(_provenance.skinclf, "__file__", str(tmp_path / "site-packages/skinclf/__init__.py"))
    assert _provenance.checkout_commit() is None
    assert " at " not in _provenance.describe(_provenance.provenance(torch.device("cpu")))
    # A copy of the project inside another repository, or outside any: no commit of its own.
    measuring(repo / "src")
    assert _provenance.checkout_commit() is None
    (tmp_path / "plain").mkdir()
    measuring(tmp_path / "plain")
    assert _provenance.checkout_commit() is None
