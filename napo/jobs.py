"""One job per output folder: an exclusive lock that every job writing a folder takes (pairs, train, compare, lab).

    with output_lock("out/pairs"):      # creates the folder if needed; raises OutputFolderBusy if a job holds it
        ...                             # write outputs; `<file>.tmp-<pid>` files are removed if this block fails

The lock is `<folder>/.napo-lock`, held with `flock` (POSIX) for as long as the job runs and holding the job's pid,
host, command and start time as JSON. The operating system drops an flock when its process dies, however it dies
(`kill -9` included), so a lock file left by a dead job is *stale*: the next job takes it over and says so; there is
no pid-liveness guess and no race between two jobs that find the same stale file. A second job on a held folder is
refused at once with a message naming the holder's pid and command.

On any exit of the block the lock file is removed; on an exception, the block's temporary files (names ending in
`.tmp-<this pid>`, the convention of every atomic write in napo: write `<name>.tmp-<pid>`, then `os.replace`) are
removed too, and a folder that the lock itself created and that is empty again is removed, so a job that fails
before writing anything leaves nothing behind.

Re-entrant within one process: a library function that locks its folder can be called by another one that already
holds it (the lab runs pairs and training jobs inside its own folder's cache).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

Job = TypeVar("Job", bound=Callable[..., Any])

LOCK_NAME = ".napo-lock"
logger = logging.getLogger(__name__)
# Folders locked by this process -> how many nested `output_lock` blocks hold them.
_held: dict[str, int] = {}


class OutputFolderBusy(RuntimeError):
    """Another running job holds the output folder's lock. `holder` is its lock record (pid, host, command, ...)."""

    def __init__(self, folder: str | Path, holder: dict):
        self.folder, self.holder = str(folder), holder
        pid = holder.get("pid", "?")
        what = f"pid {pid}" + (f" on {holder['host']}" if holder.get("host") else "")
        command = f" ({holder['command']})" if holder.get("command") else ""
        since = f", since {holder['started']}" if holder.get("started") else ""
        super().__init__(
            f"{folder} is in use by another napo job: {what}{command}{since}. Wait for it to finish, stop it "
            f"(kill {pid}), or choose another output folder; two jobs writing one folder would mix their outputs."
        )


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold `folder`'s exclusive job lock for the block (see the module docstring); yields the folder as a Path.

    Args:
        folder: the job's output folder; created (with parents) if missing.
        command: what the lock file records as the holder's command (default: this process's command line).

    Raises:
        OutputFolderBusy: another live process holds the lock.
        OSError: the folder cannot be created or written (read-only, full disk, ...).
    """
    path = Path(folder)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    if key in _held:  # this process already holds it: nested job inside a job
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    handle = _acquire(path, command)
    _held[key] = 1
    failed = False
    try:
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path / LOCK_NAME)  # unlink before closing: a job that opens it afterwards creates a new file
        handle.close()
        if failed:
            remove_temporary_files(path)
            with contextlib.suppress(OSError):  # only if empty: a failed first run leaves no folder behind
                if created:
                    path.rmdir()


def locks_output(folder_of: Callable[[dict[str, Any]], str | Path]) -> Callable[[Job], Job]:
    """Decorate a job function so that every call holds `output_lock` on its output folder.

    `folder_of` gets the call's arguments by parameter name (defaults applied) and returns the folder, e.g.
    `@locks_output(lambda a: a["config"].output_dir)`.
    """

    def decorate(job: Job) -> Job:
        signature = inspect.signature(job)

        @functools.wraps(job)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with output_lock(folder_of(bound.arguments)):
                return job(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate


def lock_holder(folder: str | Path) -> dict | None:
    """The lock record of the live job holding `folder`, or None when no job holds it (no file, or a stale one)."""
    lock_file = Path(folder) / LOCK_NAME
    try:
        handle = open(lock_file, "r+")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def remove_temporary_files(folder: str | Path, pid: int | None = None) -> list[Path]:
    """Delete the files and folders under `folder` whose names end in `.tmp-<pid>` (default: this process's).

    Returns the removed paths. Checkpoints and finished outputs never have such names.
    """
    suffix = f".tmp-{os.getpid() if pid is None else pid}"
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if name.endswith(suffix):
                target = Path(root, name)
                with contextlib.suppress(OSError):
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
                    removed.append(target)
        dirs[:] = [d for d in dirs if not d.endswith(suffix)]
    return removed


def _acquire(path: Path, command: str | None):
    """Open and flock `path/.napo-lock`, retrying if another job unlinked the file between our open and flock."""
    lock_file = path / LOCK_NAME
    for _ in range(100):
        handle = open(lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(handle)
            handle.close()
            raise OutputFolderBusy(path, holder) from None
        except OSError as error:
            handle.close()
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without locks: say so, do not hang
                raise OSError(error.errno, f"{path}: this file system does not support file locks") from error
            raise
        try:
            same_file = os.fstat(handle.fileno()).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous holder removed the file after we opened it: lock the new one instead
            handle.close()
            continue
        stale = _read_record(handle)
        if stale:
            logger.warning(
                "%s: taking over the lock left by pid %s (%s), which is no longer running",
                path,
                stale.get("pid", "?"),
                stale.get("command", "unknown command"),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        return handle
    raise OSError(errno.EAGAIN, f"{path}: could not take the job lock (its file keeps being replaced)")


def _read_record(handle) -> dict:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}
