"""What every command-line tool shares: argparse with one-line errors and a did-you-mean,
the argument types, and `run_cli`, which turns a UserError (minispin/run/errors.py) into
`prog: error: message` on stderr and its exit status (2; 1 for a training run that stopped;
130 for Ctrl-C). Anything else is a bug and keeps its traceback; `--debug` shows the
traceback of a UserError too."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, List, Optional

from minispin.run.errors import DISK_FIXES, DiskError, UserError, disk_error, redact
from minispin.run.recipe import FOREIGN_NAMES


class _ShowDefaults:
    """--help shows each flag's default where it means something: a flag whose help does
    not already say "default", whose default is not None (= "not given", e.g. a recipe key's
    flag: add_flags writes the recipe's rule into its help) and that is not an on/off switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or any(action.default is v for v in (None, False, True))
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class HelpFormatter(_ShowDefaults, argparse.HelpFormatter):
    pass


class RawDescriptionHelpFormatter(_ShowDefaults, argparse.RawDescriptionHelpFormatter):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line: `prog: error: what (see --help)`, exit 2; a
    mistyped flag gets the closest flag this command has (or the one a transformers / TRL
    / uclaml/SPIN user means: --learning-rate -> --lr, recipe.FOREIGN_NAMES); --help shows
    the defaults (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        # a prefix is no flag: argparse would run `--epoch 3` as --epochs and `--warmup 0.1`
        # as --warmup-ratio, silently; here a prefix gets the did-you-mean line like any typo
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {redact(message)} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return namespace

    def unrecognized(self, extras: List[str]) -> str:
        """'unrecognized argument --learning-rate (did you mean --lr?)' for the first flag-like extra."""
        flag = next((e for e in extras if e.startswith("-") and len(e) > 1), None)
        if flag is None:
            return f"unrecognized arguments: {' '.join(extras)}"
        name = flag.split("=", 1)[0]
        close = self.closest_flag(name)
        return f"unrecognized argument {name}" + (f" (did you mean {close}?)" if close else "")

    def closest_flag(self, name: str) -> Optional[str]:
        import difflib
        key = FOREIGN_NAMES.get(name.lstrip("-").replace("-", "_"))
        if key:   # a recipe key under another library's name: this command's flag for it
            for action in self._actions:
                if action.dest == key and action.option_strings:
                    return action.option_strings[0]
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        return close[0] if close else None


def path_arg(value: str) -> str:
    """argparse type of every file/folder flag: an empty string is refused, never read as
    "use the default" (`--config ''` must not quietly run the tiny recipe)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder, or leave the flag out")
    return value


def iteration_arg(value: str) -> int:
    """argparse type of --iter: a whole number >= 0."""
    try:
        t = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}") from None
    if t < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (iterations count from 0), got {t}")
    return t


def iteration_range(value: str) -> List[int]:
    """argparse type of train.py's --iter: "T" or "A-B" (A <= B), iterations from 0."""
    first, sep, last = value.partition("-")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an iteration T or a range A-B such as 0-3, got {value!r}") from None
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"must be >= 0, and a range A-B needs A <= B, got {value!r}")
    return list(range(a, b + 1))


def metric_arg(value: str) -> str:
    """argparse type of --stop-when-worse: a metric the stop rule knows (run/chain.py METRICS)."""
    from minispin.run.chain import METRICS
    if value not in METRICS:
        raise argparse.ArgumentTypeError(f"unknown metric {value!r}; one of {', '.join(METRICS)}")
    return value


def run_cli(main: Callable[[Optional[List[str]]], int], prog: str, argv: Optional[List[str]] = None) -> int:
    """main(argv) -> exit status, with our errors turned into `prog: error: message`."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {redact(str(e))}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except OSError as e:  # a disk fault outside every stage(): still one line
        if e.errno not in DISK_FIXES:
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {redact(str(disk_error(e)))}", file=sys.stderr, flush=True)
        return DiskError.exit_code
