"""Atomic file writes: a crash never leaves a half-written checkpoint, cache or result file;
output folders checked before the work that fills them; and the files under an input folder."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skinclf.errors import SkinclfError, first_line

log = logging.getLogger("skinclf")

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# A file name may hold bytes that are no UTF-8 (Linux allows any), which Python keeps in a str as
# surrogate escapes and a UTF-8 text file refuses. A CSV file writes them back as they were
# (errors=FILE_NAME_ERRORS), so that the name it holds still finds the file; a title shows them escaped.
FILE_NAME_ERRORS = "surrogateescape"


def python_strings():
    """A context in which pandas keeps text as Python strings, for tables that hold file names.
    pandas 3 stores text in pyarrow where it is installed, and pyarrow refuses the surrogate
    escapes in which Python keeps a name's bytes that are no UTF-8 (UnicodeEncodeError)."""
    import pandas as pd  # here: --help and argument errors answer without importing pandas

    settings: list[object] = ["mode.string_storage", "python"]
    future = getattr(pd.options, "future", None)  # none in pandas 2.0
    if int(pd.__version__.split(".")[0]) < 3 and hasattr(future, "infer_string"):
        # pandas 2.1/2.2 with the opt-in future.infer_string infer pyarrow strings whatever the
        # storage; pandas 3 always infers its str dtype and deprecates the option.
        settings += ["future.infer_string", False]
    return pd.option_context(*settings)


def readable(text: str) -> str:
    """``text`` with a file name's bytes that are no UTF-8 shown as ``\\xff``: for titles and
    headers, which matplotlib, Markdown and LaTeX cannot take as bytes."""
    return text.encode("utf-8", FILE_NAME_ERRORS).decode("utf-8", "backslashreplace")


def _default_file_mode() -> int:
    """rw for everyone the umask allows, as ``open()`` would create the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    ``durable``: the bytes and the rename are on the disk before this returns (fsync), so that a
    power loss leaves the old file or the new one, never an empty one: for the small records that
    decide what a re-launch does (run_config.json, job_status.json, cv_result.json). Not for
    checkpoints, where it would cost seconds a write (vgg16's 1.3 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates files readable by their owner only; results are meant to be shared.
        os.chmod(tmp, _default_file_mode())
        if durable:
            _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
        if durable and os.name == "posix":  # the rename, kept in the folder's own entry
            _fsync(path.parent, os.O_RDONLY)
    finally:
        tmp.unlink(missing_ok=True)


# What atomic_write's temporary adds after ``.<name>``: mkstemp's 8 random characters, .tmp.
_TEMPORARY_TAIL = r"\.[a-z0-9_]{8}\.tmp"


def temporaries_of(names: Iterable[str]) -> re.Pattern[str]:
    """The names of the temporary files that :func:`atomic_write` makes for the files ``names``:
    ``.<name>.<mkstemp's 8 characters>.tmp``."""
    return re.compile("|".join(rf"\.{re.escape(name)}{_TEMPORARY_TAIL}" for name in names))


def remove_temporaries(folder: Path, pattern: re.Pattern[str], older_than_s: float = 0.0) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` whose names ``pattern``
    matches (and, with ``older_than_s``, that are older than that); return those removed. A process
    killed outright (SIGKILL, the out-of-memory killer) while writing leaves its file behind, as
    large as what it was writing (a vgg16 checkpoint: up to 1.3 GB)."""
    now, removed = time.time(), []
    for tmp in sorted(folder.glob(".*.tmp")):
        with contextlib.suppress(OSError):  # removed by another process meanwhile; a folder
            if pattern.fullmatch(tmp.name) and now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def _fsync(path: Path, mode: int) -> None:
    """Sync ``path`` where the system can: a file system or platform that cannot (some network or
    FUSE mounts; a folder that is not readable) keeps the write as it was before, unsynced."""
    try:
        fd = os.open(path, mode)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}:
            raise
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename into place.

    Without the zip format's CRC32 checksums: ``torch.load`` never checks them (a flipped bit
    in a tensor loads silently either way), and computing them took up to half of the save time
    (vgg16's 1.3 GB last.pt, by default written every epoch). Files load as before; only an external
    ``unzip -t`` would flag the missing checksums.
    """
    atomic_write(path, lambda tmp: _save_without_crc32(obj, tmp))


# A temporary file this old is no write in progress (the largest, a big dataset's decoded images
# or vgg16's features, take minutes): a process killed outright left it.
STALE_TEMPORARY_S = 24 * 3600
# A cache file's temporary, .<name>.pt.<8 characters>.tmp; a run's checkpoints' excepted.
_CACHE_TEMPORARY = re.compile(rf"\.(?!(?:best|last)\.pt\.)[^.][^/]*\.pt{_TEMPORARY_TAIL}")


def remove_stale_cache_temporaries(cache_file: Path) -> None:
    """Remove, from the folder of ``cache_file``, the temporaries of cache saves (the decode cache,
    the synthetic data, vgg16's features) that are over :data:`STALE_TEMPORARY_S` old. A process
    killed outright while it saved (the out-of-memory killer during feature extraction) leaves one
    as large as the file; several runs may write a cache folder at once, so none owns it to clean
    up sooner. Called on every look at the cache, hit or miss."""
    folder = Path(cache_file).parent
    stale = remove_temporaries(folder, _CACHE_TEMPORARY, older_than_s=STALE_TEMPORARY_S)
    if stale:
        names = ", ".join(tmp.name for tmp in stale)
        log.info(f"{folder}: removed what killed processes left half-written over a day ago: {names}")


def _save_without_crc32(obj: Any, path: Path) -> None:
    # Imported here: the command line (skinclf.train_command) writes its records with this module
    # and must not wait for torch. A process-wide setting: switched off for this save only.
    import torch

    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        # torch.save reports a short write (a full disk, a file size limit) as "[enforce fail at
        # inline_container.cc] unexpected pos ...": an OSError, as any other failed write is.
        # Its other errors (an object it cannot save) stay what they are.
        if "inline_container" not in str(err) and "PytorchStreamWriter" not in str(err):
            raise
        raise OSError(f"torch.save stopped short: {first_line(err)}") from err
    finally:
        torch.serialization.set_crc32_options(previous)


def save_cache(obj: Any, path: Path, what: str, next_run: str) -> bool:
    """:func:`atomic_torch_save` of a cache file (the decode cache, the synthetic data, vgg16's
    features); one that cannot be written (a full disk, a read-only shared folder) is a warning:
    the run has what it computed, only its reuse is lost (``next_run``: what the next one does).
    Returns whether it was written."""
    try:
        atomic_torch_save(obj, path)
    except OSError as err:
        log.warning(f"{what} {write_failure(path, err)}; {next_run}")
        return False
    return True


def write_failure(path: Path, err: OSError) -> str:
    """``path: could not be written (why); N GB free on its file system``, for a failed write."""
    try:
        space = f"; {shutil.disk_usage(Path(path).parent).free / 1e9:.1f} GB free on its file system"
    except OSError:
        space = ""
    return f"{path}: could not be written ({first_line(err)}){space}"


# What os.link raises where a file system has no hard links (FAT, some network shares) or no more
# of them for a file.
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def atomic_link(source: Path, path: Path) -> None:
    """Make ``path`` a second name of the file ``source`` (a hard link: no bytes written), or a
    copy of it where the file system has no hard links; atomically, as every write here."""

    def link(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError as err:
            if err.errno not in NO_HARD_LINKS:  # a full disk or missing folder: no copy would do better
                raise
            shutil.copyfile(source, tmp)

    # atomic_write's chmod of the new name sets the mode of the shared file: the same one.
    atomic_write(path, link)


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` as PNG atomically (never a half-written image)."""
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def atomic_write_text(text: str, path: Path, errors: str = "strict") -> None:
    """``text`` as UTF-8 whatever the locale, durably (records and results are small);
    ``errors=FILE_NAME_ERRORS`` for text holding file names."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors=errors), durable=True)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


@contextlib.contextmanager
def output_folder(folder: Path) -> Iterator[Path]:
    """Make ``folder`` (and missing parents) and check that files can be created in it, so that an
    unwritable --out fails at once with one message, not after the work; the folders made here are
    removed again when the work inside fails before writing into them."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SkinclfError(f"{folder}: is a file; expected a folder for the output")
    created = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:  # read-only, not ours, or under a regular file
        remove_empty_folders(created)
        raise SkinclfError(
            f"{folder}: cannot write the output there ({err.strerror or first_line(err)}); "
            "expected a folder you can write to"
        ) from err
    try:
        yield folder
    except BaseException:
        remove_empty_folders(created)
        raise


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those above it that do not exist yet, deepest first: what making it will
    create, and what :func:`remove_empty_folders` may take away again when the work fails."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or never made
            return


# What operating systems and file servers put into a user's folders besides hidden (dot) files:
# Windows' thumbnail cache and folder settings, a Synology NAS's thumbnail folders. Never images.
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "@eadir"})


def is_system_file(name: str) -> bool:
    """Whether ``name`` is a hidden file or folder, or one of :data:`SYSTEM_NAMES` (any case)."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` but hidden and system files (:func:`is_system_file`; their
    folders skipped too), sorted.

    Symlinked subfolders are followed, as a user who linked images in expects (Python 3.11's
    ``rglob`` silently skips them), each real folder once, so a link back up ends the walk.
    Dangling symlinks are kept: they stand for files that should be there, and the reader then
    names them as missing instead of the list quietly losing them. Subfolders are walked in name
    order, so a folder reached by two routes is listed under the same one on every machine. A
    folder that cannot be read is an error, not an empty folder.
    """

    def unreadable(err: OSError) -> None:
        raise SkinclfError(
            f"{err.filename}: cannot read the folder ({err.strerror}); expected a readable folder"
        )

    files: list[Path] = []
    seen: set[str] = set()
    for parent, subfolders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not is_system_file(name))
        for name in names:
            path = Path(parent) / name
            if not is_system_file(name) and (path.is_file() or (path.is_symlink() and not path.exists())):
                files.append(path)
    return sorted(files)
