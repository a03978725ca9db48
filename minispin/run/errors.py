"""Errors a user can fix, and how every command-line tool reports them.

Every error class of minispin that means "this input or setting cannot be used" derives
from `UserError`; its message already names the file (and line or key) and says what to
do. The CLIs (minispin/cli/args.py's `run_cli`) turn a UserError into one line on stderr
and its `exit_code`: 2, or 1 for a training run that stopped (128 + the signal number for
one a scheduler stopped: preempt.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import re
from typing import Optional

from ..core.errors import StoppedError, UserError  # noqa: F401  (the base of every error here)


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or the run layout needs) does not exist."""


# ---------------------------------------------------------------------- disk faults
# A full, read-only or failing disk can strike any write of any stage. Each write site
# wraps itself in `writing(path)`, which names the file on the OSError (a failed write()
# or close() carries no file name); each stage runs inside `stage(name)`, which turns such
# an error into one line naming the file and the stage. What was being written is never
# taken as complete: files are written to a temporary sibling and renamed, or appended one
# line at a time (a torn last line is dropped when read).
DISK_FIXES = {errno.ENOSPC: "free space on that disk (or use another --run-dir / --out), then re-run the same "
                            "command: it resumes",
              errno.EDQUOT: "raise the quota or free space there, then re-run the same command: it resumes",
              errno.EROFS: "that filesystem is read-only: use another --run-dir / --out",
              errno.EIO: "the disk reported an I/O error: check it (dmesg), then re-run the same command"}


class DiskError(UserError):
    """A write that the disk refused (full, read-only, failing): names the file and stage."""


@contextlib.contextmanager
def writing(path: str):
    """Name `path` on a disk fault raised by the body (OSError.filename, if it has none)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FIXES and not e.filename:
            e.filename = path
        raise


@contextlib.contextmanager
def stage(name: str):
    """A disk fault inside the body becomes a DiskError: `<file>: <what> during <name>; <fix>`."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FIXES:
            raise
        raise disk_error(e, name) from None


def disk_error(e: OSError, stage_name: Optional[str] = None) -> DiskError:
    """The one-line DiskError of a disk fault (errno in DISK_FIXES)."""
    where = f" during {stage_name}" if stage_name else ""
    return DiskError(f"{e.filename or 'a file'}: {e.strerror}{where}; {DISK_FIXES[e.errno]}")


# ---------------------------------------------------------------------- JSON from files
def json_loads(raw):
    """json.loads, with input nested too deep for Python's parser (a RecursionError, which
    no caller expects) turned into the JSONDecodeError every file reader already reports as
    one line naming its file."""
    try:
        return json.loads(raw)
    except RecursionError:
        doc = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
        raise json.JSONDecodeError("nested too deeply (arrays/objects inside each other beyond "
                                   "Python's limit)", doc[:100], 0) from None


def load_json_file(path: str):
    """A whole JSON file; any problem is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            return json_loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None


# ---------------------------------------------------------------------- secrets
# THE redaction rule, for everything minispin prints or writes: the user:password part of
# any URL, and the value of any query parameter that looks like a credential.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#@]*@")
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:api[-_]?key|key|token|access[-_]?token|auth|"
                           r"password|passwd|pwd|secret|sig|signature|code)=)[^&#\s\"']*")


def redact(text: str) -> str:
    """text with every URL's credentials replaced by '***' ('http://u:KEY@host/v1?key=K' ->
    'http://***@host/v1?key=***'); anything else unchanged."""
    if not isinstance(text, str):
        return text
    return _SECRET_PARAM.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", text))


def redact_all(obj):
    """redact() applied to every string inside a JSON-like value (before it is written)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_all(v) for v in obj]
    return obj
