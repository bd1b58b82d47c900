"""Atomic writes (all or nothing, and files as readable as any other the user creates), and listing
the files under a folder."""

import os
import zipfile

import pytest
import torch

from skinclf.errors import SkinclfError
from skinclf.io import atomic_link, atomic_torch_save, atomic_write, atomic_write_json, files_under


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


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_second_name_replaces_the_old_file_and_outlives_the_next_write(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without them (FAT, some network shares): a copy instead

        def refuse(source, target):
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", refuse)
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    last.write_text("epoch 1")
    best.write_text("epoch 2")
    atomic_link(best, last)
    assert last.read_text() == "epoch 2" and best.samefile(last) == hard_links
    atomic_write_json({"epoch": 3}, last)  # the next write replaces the name, not the file
    assert best.read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_files_under_follows_symlinked_folders_once_and_keeps_dangling_links(tmp_path):
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (images / "sub").mkdir(parents=True)
    (elsewhere / "deeper").mkdir(parents=True)
    for path in (
        images / "a.jpg",
        images / "sub" / "b.jpg",
        elsewhere / "c.jpg",
        elsewhere / "deeper" / "d.jpg",
    ):
        path.write_bytes(b"x")
    (images / ".hidden.jpg").write_bytes(b"x")
    (images / ".cache").mkdir()
    (images / ".cache" / "e.jpg").write_bytes(b"x")
    (images / "Thumbs.db").write_bytes(b"x")  # what Windows, and a Synology NAS, leave in folders
    (images / "sub" / "DESKTOP.INI").write_bytes(b"x")
    (images / "@eaDir" / "a.jpg").mkdir(parents=True)
    (images / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_S.jpg").write_bytes(b"x")
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "deeper" / "back_up").symlink_to(elsewhere, target_is_directory=True)  # a loop
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")

    found = [p.relative_to(images).as_posix() for p in files_under(images)]
    assert found == ["a.jpg", "gone.jpg", "linked/c.jpg", "linked/deeper/d.jpg", "sub/b.jpg"]


def test_files_under_takes_the_first_route_by_name_to_a_folder_reached_twice(tmp_path):
    (tmp_path / "m_real").mkdir()
    (tmp_path / "m_real" / "img.jpg").write_bytes(b"x")
    for name in ("z_link", "a_link"):  # created in this order; listed by name
        (tmp_path / name).symlink_to(tmp_path / "m_real", target_is_directory=True)
    assert [p.relative_to(tmp_path).as_posix() for p in files_under(tmp_path)] == ["a_link/img.jpg"]


def test_an_unreadable_subfolder_is_an_error_naming_it(tmp_path, monkeypatch):
    locked = tmp_path / "images" / "locked"
    locked.mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(locked):  # as chmod 000 would, also for root
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SkinclfError, match=f"{locked}: cannot read the folder \\(Permission denied\\)"):
        files_under(tmp_path / "images")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a file descriptor through /proc")
def test_records_reach_the_disk_before_they_count_and_checkpoints_skip_it(tmp_path, monkeypatch):
    # A power loss after the rename must find the new record or the old, never an empty file: the
    # file is synced before the rename, the folder after. Checkpoints skip it (seconds for 1.3 GB).
    real_fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_json({"status": "running"}, tmp_path / "job_status.json")
    folder = os.path.realpath(tmp_path)
    assert len(synced) == 2 and synced[0].startswith(os.path.join(folder, ".job_status.json."))
    assert synced[1] == folder
    synced.clear()
    atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "last.pt")
    assert synced == []
