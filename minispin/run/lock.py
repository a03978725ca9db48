"""One writer per run folder, and the litter that killed writers leave behind.

* `RunLock(folder)` is a context manager around `<folder>/.minispin.lock`, a file created with
  O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+) that holds the writer's pid and
  hostname as JSON. A second writer is refused with a one-line error naming the holder's pid,
  host and the lock file. A lock whose pid is no longer running on this host was left by a
  killed process: it is taken over, with a note on stderr. A lock from another host cannot be
  checked from here, so it is refused and the message says to delete it if that process is gone.
  Under torchrun only rank 0 takes the lock (the ranks of one job are one writer); the caller
  should make the other ranks wait for rank 0 (a barrier) before they write.
  The writer also holds an flock(2) on the file while it lives, so a lock file that is empty or
  unreadable (a crash, or a full disk, between creating it and writing the JSON) can still be
  judged: when no process holds its flock it is taken over, with a note; when one does, the
  folder is in use. If the JSON cannot be written (a full disk), the empty file is removed at
  once and the error says why.
  The lock is re-entrant within a process, so a driver may hold it around stages that take it
  themselves. Exit removes the file only if it still holds our pid and start time.
* `clean_orphans(folder)` removes what a kill leaves behind: `<name>.tmp-<pid>` files and folders
  (the atomic writers' staging copies, e.g. `model.tmp-<pid>/` from an export) whose pid is not
  running on this host, and `step_<n>.tmp` checkpoint folders. Call it while holding the lock,
  when no other writer can be mid-write. `<name>.old-<pid>` folders are left alone: a kill
  between save_model's two renames leaves the only copy of the previous model there.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import List, Optional

from .errors import UserError, json_loads

LOCK_NAME = ".minispin.lock"
ORPHAN = re.compile(r"^.+\.tmp-(\d+)$")
STEP_TMP = re.compile(r"^step_\d+\.tmp$")
_HELD: dict = {}  # absolute lock path -> [nesting depth, the JSON we wrote, fd holding the flock]


class RunLockError(UserError):
    """The run folder is locked by another writer, or the lock cannot be taken."""


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json_loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(holder, dict) and type(holder.get("pid")) is int and isinstance(holder.get("host"), str)
    return holder if ok else None


class RunLock:
    """`path` (default <folder>/.minispin.lock) is the lock file; `what` names the locked
    thing in messages (default the folder); `owner` is extra JSON the holder records (e.g.
    its run folder), named to whoever is refused."""

    def __init__(self, folder: str, rank: Optional[int] = None, *, path: Optional[str] = None,
                 what: Optional[str] = None, owner: Optional[dict] = None):
        self.folder = folder
        self.path = path or os.path.join(folder, LOCK_NAME)
        self.what = what or folder
        self.owner = dict(owner or {})
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank

    def __enter__(self) -> "RunLock":
        if self.rank != 0:
            return self
        key = os.path.abspath(self.path)
        if key in _HELD:
            _HELD[key][0] += 1
            return self
        me = {**self.owner, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(5):  # each lost race against another process costs one round
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise RunLockError(f"{self.path}: cannot create the lock file ({e.strerror}); make "
                                   f"{self.folder} writable or use another --run-dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until exit: "a live writer"
                os.write(fd, json.dumps(me).encode())
                os.fsync(fd)
            except OSError as e:  # e.g. ENOSPC: never leave an empty lock behind
                os.close(fd)
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
                raise RunLockError(f"{self.path}: cannot write the lock file ({e.strerror}); free "
                                   f"space on that disk or use another --run-dir") from None
            _HELD[key] = [1, me, fd]
            return self
        raise RunLockError(f"{self.path}: other processes keep taking this lock; is another job "
                           f"starting on {self.folder}?")

    def _take_over_if_stale(self):
        """Refuse a live (or uncheckable) holder; remove a lock whose pid died on this host."""
        holder = None
        for _ in range(10):  # a lock file just created may not hold its JSON yet
            holder = _read_holder(self.path)
            if holder is not None or not os.path.exists(self.path):
                break
            time.sleep(0.05)
        if holder is None:
            if not os.path.exists(self.path):
                return  # released meanwhile: try again
            self._take_over_unreadable()
            return
        host = socket.gethostname()
        pid = holder["pid"]
        # our own pid here means an earlier process with the same pid (a restarted container):
        # this process does not hold the lock (that is _HELD's case)
        if holder["host"] != host or (pid != os.getpid() and pid_running(pid)):
            run = f"the run in {holder['run']}, " if isinstance(holder.get("run"), str) else ""
            raise RunLockError(f"{self.what} is in use by {run}pid {pid} on {holder['host']} (lock file "
                               f"{self.path}); wait for it to finish, or delete the lock file if that "
                               f"process is gone")
        # move it aside, then check that what we moved is the stale lock we read and not one
        # that another process took over in between
        grave = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if _read_holder(grave) != holder:
            try:
                os.link(grave, self.path)  # put it back, unless a third process has locked since
            except FileExistsError:
                pass
            os.unlink(grave)
            return
        os.unlink(grave)
        print(f"note: took over {self.path}, left by pid {pid} on {host}, which is no longer running",
              file=sys.stderr, flush=True)

    def _take_over_unreadable(self):
        """An empty or garbled lock file: a live writer holds its flock; nobody holding it
        means the writer died before writing its pid (a crash, a full disk). Take it over."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as e:
            raise RunLockError(f"{self.path}: unreadable lock file ({e.strerror}); if no other process "
                               f"writes to {self.folder}, delete it") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockError(f"{self.folder} is in use by a process that is starting (lock "
                                       f"file {self.path} not yet written); wait for it to finish") from None
                raise RunLockError(f"{self.path}: unreadable lock file ({e.strerror}); if no other "
                                   f"process writes to {self.folder}, delete it") from None
            grave = f"{self.path}.stale-{os.getpid()}"
            try:
                os.rename(self.path, grave)
            except FileNotFoundError:
                return
            if os.stat(grave).st_ino != os.fstat(fd).st_ino:  # another process's lock: put it back
                try:
                    os.link(grave, self.path)
                except FileExistsError:
                    pass
            os.unlink(grave)
        finally:
            os.close(fd)
        print(f"note: took over {self.path}, an empty or unreadable lock that no running process "
              "holds (left by a crash)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> bool:
        if self.rank != 0:
            return False
        key = os.path.abspath(self.path)
        _HELD[key][0] -= 1
        if _HELD[key][0] == 0:
            _, mine, fd = _HELD.pop(key)
            if _read_holder(self.path) == mine:  # never remove a lock someone else has taken
                os.unlink(self.path)
            os.close(fd)
        return False


def clean_orphans(folder: str) -> List[str]:
    """Remove `*.tmp-<pid>` (pid not running on this host) and `step_<n>.tmp` under folder;
    returns the removed paths. Call it while holding the RunLock."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in list(dirs) + files:
            m = ORPHAN.match(name)
            dead_writer = m is not None and int(m.group(1)) != os.getpid() and not pid_running(int(m.group(1)))
            if not (dead_writer or (name in dirs and STEP_TMP.match(name))):
                continue
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                dirs.remove(name)
            else:
                os.remove(path)
            removed.append(path)
    return removed
