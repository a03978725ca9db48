"""Errors a user can fix, and how every command-line tool reports them.

Every error class of minispin that means "this input or setting cannot be used" derives
from `UserError`; its message already names the file (and line or key) and says what to
do. The CLIs run their `main` through `run_cli`, which turns a UserError into one line on
stderr and exit status 2 (1 for a training run that stopped, 130 for Ctrl-C). Anything else
is a bug and keeps its traceback; `--debug` shows the traceback of a UserError too.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, List, Optional


class UserError(ValueError):
    """Bad input or settings; the message is complete and fits on one line."""

    exit_code = 2


class StoppedError(UserError):
    """A run that started and had to stop (e.g. a non-finite loss): exit status 1."""

    exit_code = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line: `prog: error: what (see --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[Optional[List[str]]], int], prog: str, argv: Optional[List[str]] = None) -> int:
    """main(argv) -> exit status, with our errors turned into `prog: error: message`."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or the run layout needs) does not exist."""
