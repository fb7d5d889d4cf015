"""Command outputs that cannot be written (a full disk, a path through a file, a read-only
folder): files written whole or not at all, and one line, not a traceback, from ``export``,
``report`` and ``predict`` saying what failed and that the output is incomplete."""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import pathlib
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

# Why a write failed, by the errno (or the words) of the error or one it was raised from: the
# errno; the OS's words (TensorStore and orbax raise their own types with them in the text, e.g.
# "[Errno 28] No space left on device"); what a message says in parentheses; what to do before
# running again; and whether it is the disk's (any write there fails: no file need be named)
# rather than one file's. Checkpoint saves (:mod:`vision_jax.checkpoint`) and the commands'
# outputs (:func:`failed_write`, predict's) read it through :func:`why_write_failed`
# (checkpoint's by :func:`why_and_advice` and :func:`why_and_what_to_do`).
WRITE_FAILURES = (
    (errno.ENOSPC, ("No space left", "ENOSPC", "RESOURCE_EXHAUSTED"),
     "the disk is full", "free space on the disk", True),
    (errno.EDQUOT, ("Disk quota exceeded", "EDQUOT"),
     "the disk quota is exceeded", "free space within the quota (or raise it)", True),
    (errno.EROFS, ("Read-only file system", "EROFS"),
     "the file system is read-only", "remount it writable", True),
    (errno.EACCES, ("Permission denied", "EACCES"),
     "permission denied", "give this user write permission there", False),
    (errno.EPERM, ("Operation not permitted", "EPERM"),
     "operation not permitted", "give this user write permission there", False),
    (errno.EFBIG, ("File too large", "EFBIG"),
     "a file is over the file size limit", "raise the file size limit (ulimit -f)", True),
)  # fmt: skip

# The errnos of a failed write whatever file it names (a full disk, not a file not found)
DISK_ERRORS = tuple(number for number, *_, disk in WRITE_FAILURES if disk)


def why_write_failed(error: BaseException, directory: str | None = None) -> tuple[str, str] | None:
    """``(why, what to do)`` when ``error`` (or an error it was raised from) says why a write in
    ``directory`` failed (a full disk, a quota, a read-only file system, no permission, the
    file size limit: :data:`WRITE_FAILURES`), else None. A full disk that has free bytes but
    no free inodes says so (``os.statvfs`` of ``directory``, where it is local)."""
    errors, seen = [], error
    while seen is not None and len(errors) < 8:
        errors.append(seen)
        seen = seen.__cause__ or seen.__context__
    for number, words, why, advice, _ in WRITE_FAILURES:
        if any(getattr(e, "errno", None) == number or any(w in str(e) for w in words)
               for e in errors):  # fmt: skip
            if number == errno.ENOSPC and directory and _no_free_inodes(directory):
                return "the disk has no free inodes", "delete files on the disk"
            return why, advice
    return None


def _no_free_inodes(directory: str) -> bool:
    """Whether the local file system of ``directory`` (or of its nearest existing parent) has
    free bytes but no free inodes."""
    if is_url(directory):
        return False
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_files > 0 and stats.f_favail == 0 and stats.f_bavail > 0


def _inside(filename: Any, folder: str) -> bool:
    """Whether ``filename`` (an OSError's, maybe None) is ``folder``, lies in it, or is a
    folder above it (one that could not be made)."""
    if not isinstance(filename, str | os.PathLike):
        return False
    path, folder = os.path.abspath(filename), os.path.abspath(folder)
    return path == folder or path.startswith(folder + os.sep) or folder.startswith(path + os.sep)


def why_and_advice(error: BaseException, directory: str) -> tuple[str, str]:
    """For a failed write in ``directory``: `` (why)`` and what to do, as
    :data:`WRITE_FAILURES` words it (not capitalised), where :func:`why_write_failed` knows
    them, else two empty strings."""
    failure = why_write_failed(error, directory)
    return ("", "") if failure is None else (f" ({failure[0]})", failure[1])


def why_and_what_to_do(
    error: BaseException, path: str | os.PathLike, then: str = "then run the same command again"
) -> tuple[str, str]:
    """For a failed write of ``path``: `` (why)`` and `` What to do, <then>.`` where
    :func:`why_write_failed` knows them, else two empty strings."""
    why, advice = why_and_advice(error, os.path.dirname(os.fsdecode(path)) or os.curdir)
    return why, advice and f" {advice[:1].upper()}{advice[1:]}, {then}."


def write_failure(
    what: str, output: str, filename: Any, reason: str, error: BaseException | None = None
) -> str:
    """The line for a failed write of ``what`` (e.g. "export") into the folder ``output``; with
    the ``error``, why and what to do where known (:func:`why_and_what_to_do`)."""
    path = filename or output
    why, advice = ("", "") if error is None else why_and_what_to_do(error, path)
    return f"cannot write {path}{why}: {reason}; the {what} in {output} is incomplete.{advice}"


def failed_write(error: OSError, what: str, output: str) -> str | None:
    """:func:`write_failure`'s line when ``error`` is a failed write of ``output`` (a file in
    it, or the disk); None for other errors (a file not found while reading)."""
    if not _inside(error.filename, output) and error.errno not in DISK_ERRORS:
        return None
    return write_failure(what, output, error.filename, error.strerror or str(error), error)


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/...``), not a local path."""
    return "://" in os.fspath(path)


def local_only(path: str | os.PathLike, what: str) -> str | None:
    """Why ``path``, a URL, cannot take ``what`` (written as local files), or None."""
    if is_url(path):
        return (f"{what} is written to a local folder, not a URL: write it locally and copy it "
                "(gcloud storage cp -r)")  # fmt: skip
    return None


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why no file can be written in ``folder``, made with those above it where missing when
    written: a file in its place or in the way, or no file can be created in the nearest
    existing folder (:func:`unwritable_folder`); or None. Nothing is made: the commands check
    their outputs so before their work, and a failed work leaves no empty folder behind. A URL
    (``gs://...``) is not checked here: its folders are made, and found missing, by its
    filesystem's library (:func:`is_url`)."""
    if is_url(folder):
        return None
    folder = existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    if problem := unwritable_folder(existing):
        return f"cannot write in {existing}: {problem}"
    return None


def file_problem(path: str | os.PathLike) -> str | None:
    """Why no file can be written at ``path``, checked before a command's work (the folder it
    goes in is made once it is written: a failed work leaves none behind): a folder there, or
    :func:`folder_problem` of the folder it goes in; or None. A URL is not checked here."""
    if is_url(path):  # checked by its filesystem's library when written
        return None
    if os.path.isdir(path):
        return "it is a folder; name a file"
    return folder_problem(os.path.dirname(os.path.abspath(path)))


def printable(path: str | os.PathLike) -> str:
    """``path`` as text, a byte that is not UTF-8 written ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def workdir_problem(workdir: str | os.PathLike) -> str | None:
    """Why ``workdir`` cannot hold a run, as the end of a line naming it ("Workdir X ..."),
    found before any setup: a file, a broken symbolic link, a name that is not UTF-8 (the event
    files' writer fails on it once the model is built); None for a folder, a URL, or a path not
    made yet."""
    path = os.fspath(workdir)
    if is_url(path):
        return None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "has a name that is not UTF-8 (TensorFlow's event files need one): choose another"
    if os.path.islink(path) and not os.path.exists(path):
        return (
            f"is a broken symbolic link (to {printable(os.readlink(path))}): remove it, or "
            "make the folder it names"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder: name a folder (it is made if missing)"
    return None


def unwritable_folder(folder: str) -> str | None:
    """Why no file can be created in the existing ``folder`` (a read-only file system, no
    permission, no space for one), or None: a file was created there and removed at once
    (permission bits alone would pass for root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def remove_left_behind(paths: Iterable[Any], what: str) -> None:
    """Removes ``paths`` (``pathlib`` or ``epath`` paths), files that a process stopped before
    it could remove them left behind, with an info line each naming ``what`` they are; one gone
    already is fine, one that cannot be removed stays (the write that needs it says why)."""
    for path in paths:
        with contextlib.suppress(Exception):
            path.unlink()
            logger.info("Removed %s, %s of a process that was stopped.", path, what)


def remove_partials(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Removes the temporary files of :func:`written_whole` for the files ``names`` in
    ``folder`` (``<name>.partial-<host>-<pid>``) that a process of this host left behind (killed
    while it wrote them: its pid no longer runs). Another's under way stays, as does one of
    another host (a shared folder: its pid cannot be checked from here) and any other file."""
    for name in names:
        pattern = f"{glob.escape(name)}.partial-{glob.escape(_HOST)}-*"
        mine = re.compile(rf"{re.escape(name)}\.partial-{re.escape(_HOST)}-(\d+)")
        for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)), pattern)):
            pid = mine.fullmatch(os.path.basename(path))  # (not host-2's: host-2-<pid>)
            if pid and not _running(int(pid[1])):
                remove_left_behind([pathlib.Path(path)], "the file being written")


# Part of a temporary file's name: its process's pid is checked on this host only.
_HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"


def _running(pid: int) -> bool:
    """Whether the process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside ``path`` to write the file to (``<path>.partial-<host>-<pid>``,
    see :func:`remove_partials`): it replaces ``path`` once written
    (a file already there stays whole until then) and is removed if the writing fails."""
    path = os.fspath(path)
    partial = f"{path}.partial-{_HOST}-{os.getpid()}"
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(partial)
        if isinstance(e, OSError) and e.filename == partial:
            e.filename = path  # the file meant, not its temporary name
        raise
