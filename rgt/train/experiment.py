"""The experiment folder's life cycle: one run at a time, earlier runs archived, leftovers of killed writes removed.

    lock = ExperimentLock.acquire(root)            # rank 0, before anything reads or writes the folder
    remove_leftovers(root)
    archived = lock.archive()                      # when not resuming: <root>_archived_<YYYYmmdd_HHMMSS>
    ...
    lock.release()

- Lock: `<root>/train.lock`, a POSIX record lock (`fcntl.lockf`) held for the whole run, the file holding the pid.
  The kernel drops it when the process ends, `kill -9` included, so a killed run never blocks the next one. Unlike
  `flock`, the lock belongs to the process and is not inherited by forked data-loader workers, which outlive a
  killed trainer by up to 5 s (their parent check interval) and would hold an inherited lock that long. Being
  per process, it does not exclude two runs inside one Python process.
- Archive: a run that does not resume moves a used folder aside, as BasicSR does, so that no checkpoint of an
  earlier run is overwritten, nor resumed later by mistake.
- Leftovers: `atomic_write` writes `.<name>.<random>.tmp` and renames it; a kill between the two leaves it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import time
from pathlib import Path

from rgt.checkpoint import TEMP_SUFFIX

log = logging.getLogger("rgt.train")

LOCK_NAME = "train.lock"
# atomic_write's temporary names, and (second form) those of earlier versions, mkstemp's `.<name>.<8 chars>`
_TEMP = re.compile(rf"\..+\.(?:[0-9a-f]+{re.escape(TEMP_SUFFIX)}|(?:pth|state|yml)\.[a-z0-9_]{{8}})")
_WRITTEN_FOLDERS = (".", "models", "training_states")  # where the trainer writes through atomic_write


class ExperimentBusy(RuntimeError):
    """Another process holds the experiment folder's lock."""


class ExperimentLock:
    """The lock on one experiment folder (see the module docstring); `release()` or process exit drops it."""

    def __init__(self, root: Path, fd: int):
        self.root, self.fd = root, fd

    @classmethod
    def acquire(cls, root: str | os.PathLike) -> ExperimentLock:
        """Create the folder if needed and lock it; ExperimentBusy names the folder and the holder's pid."""
        root = Path(root)
        while True:
            root.mkdir(parents=True, exist_ok=True)
            path = root / LOCK_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: a file system without locks
                    log.warning("cannot lock %s (%s): nothing stops a second run from using this folder", path,
                                exc.strerror)
                    return cls(root, fd)
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ExperimentBusy(f"experiment folder {root} is in use by another rgt.train run (pid {holder}); "
                                     "wait for it to end, or choose another name (--set name=...)") from None
            # The folder may have been archived (renamed) between open and lock: then lock the new one.
            if path.exists() and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(root, fd)

    def _empty(self) -> bool:
        return all(p.name == LOCK_NAME for p in self.root.iterdir())

    def release(self) -> None:
        """Drop the lock; a folder holding nothing but the lock file (a run that stopped at its checks) is
        removed. A run that opened the lock file meanwhile finds it unlinked and locks a new one (acquire)."""
        if self.fd < 0:
            return
        if self._empty():
            (self.root / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):  # something appeared meanwhile: keep the folder
                self.root.rmdir()
        os.close(self.fd)  # closing any descriptor of the file drops a POSIX lock
        self.fd = -1

    def archive(self) -> Path | None:
        """Move a used folder (anything but the lock file) to `<root>_archived_<YYYYmmdd_HHMMSS>` and lock a
        fresh one in its place; returns the archive, or None when there was nothing to keep."""
        if self._empty():
            return None
        stamp = time.strftime("%Y%m%d_%H%M%S")
        target, n = self.root.with_name(f"{self.root.name}_archived_{stamp}"), 1
        while target.exists():  # two archives within one second
            target, n = self.root.with_name(f"{self.root.name}_archived_{stamp}_{n}"), n + 1
        os.replace(self.root, target)
        (target / LOCK_NAME).unlink()
        fresh = ExperimentLock.acquire(self.root)
        os.close(self.fd)  # the archived folder's lock
        self.fd = fresh.fd
        return target


def remove_leftovers(root: Path) -> list[Path]:
    """Delete the temporary files of writes a kill interrupted (the folder must be locked); returns them."""
    removed = []
    for sub in _WRITTEN_FOLDERS:
        folder = root / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if _TEMP.fullmatch(p.name) and p.is_file():
                    p.unlink()
                    removed.append(p)
    return removed
