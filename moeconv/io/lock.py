"""OUT.lock: one run at a time per output, held with flock for the whole run; the file names the holder."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from moeconv.errors import MoeconvError
from moeconv.io.files import write_error

log = logging.getLogger(__name__)


class OutputLock:
    """An exclusive lock on OUT and OUT.partial.

    The kernel drops a flock when its holder dies, however it dies, so a lock whose flock can be taken on
    this host is stale by construction and is taken over (and said so). A lock file naming another host
    cannot be checked from here: it is reported with the command that clears it.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.with_name(out.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise write_error(self.path.parent, err) from None
            holder = _read_holder(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
                raise MoeconvError(f"another moeconv run ({who}) is writing {self.out}; "
                                   "wait for it to finish or choose another OUT") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was removed by its last holder between our open and our flock: start over
        if holder and holder.get("host") != socket.gethostname():
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise MoeconvError(f"{self.path} names a run on host {holder.get('host')} (pid {holder.get('pid')}) that cannot be "
                               f"checked from here; if it has stopped, remove the lock (rm {self.path}) and rerun")
        if holder:
            log.warning("taking over %s: its run (pid %s) is no longer running", self.path, holder.get("pid"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter that opened this file sees it gone and retries
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False
