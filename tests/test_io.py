"""Atomic writes: all or nothing, and files as readable as any other the user creates."""

import os
import zipfile

import pytest
import torch

from skinclf.io import atomic_torch_save, atomic_write, atomic_write_json


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_written_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_torch_files_skip_zip_checksums_and_load_exactly(tmp_path):
    state = {"weights": torch.randn(1000), "step": torch.tensor(7)}
    atomic_torch_save(state, tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["step"].item() == 7
    # The save time without the CRC32 pass is the point; torch's own setting is left as it was.
    assert {info.CRC for info in zipfile.ZipFile(tmp_path / "last.pt").infolist()} == {0}
    assert torch.serialization.get_crc32_options() is True
