"""Errors a user can fix, and how every command-line tool reports them.

Every error class of minispin that means "this input or setting cannot be used" derives
from `UserError`; its message already names the file (and line or key) and says what to
do. The CLIs (minispin/cli/args.py's `run_cli`) turn a UserError into one line on stderr
and its `exit_code`: 2, or 1 for a training run that stopped (128 + the signal number for
one a scheduler stopped: preempt.py).
"""
from __future__ import annotations

import json
import re

from ..core.errors import StoppedError, UserError  # noqa: F401  (the base of every error here)


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or the run layout needs) does not exist."""


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
