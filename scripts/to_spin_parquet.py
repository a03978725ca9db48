"""Write a pairs file in uclaml/SPIN's Parquet layout, so SPIN's own trainer can train on it.

    python scripts/to_spin_parquet.py runs/tiny/iter0/pairs.jsonl          # -> runs/tiny/iter0/train_prefs-00000-of-00001.parquet
    python scripts/to_spin_parquet.py test_pairs.jsonl --split test --out data/synthetic/

Any pairs format minispin reads is accepted (ours, SPIN's, the study's, TRL's). The output
has SPIN's columns real and generated, each [user message, assistant message] — what
spin/run_spin.py's apply_chat_template reads — and an id column SPIN ignores. A folder of
train_prefs-*.parquet and test_prefs-*.parquet is what SPIN's recipes name as a dataset.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minispin.run.data import SPIN_PARQUET_NAME, DataError, read_pairs, write_spin_parquet  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a pairs file to uclaml/SPIN's Parquet layout (columns real, generated).")
    p.add_argument("pairs", help="input pairs file: our pairs.jsonl/judged.jsonl, or SPIN, study or "
                                 "TRL records (.jsonl, .json or .parquet)")
    p.add_argument("--out", default=None,
                   help="output .parquet file, or a folder to write SPIN's file name into "
                        "(default: the input's folder, with SPIN's file name for --split)")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which of SPIN's file names to use when --out is not a file: "
                        "train_prefs-00000-of-00001.parquet or test_prefs-00000-of-00001.parquet "
                        "(default: train)")
    p.add_argument("--ignore-swap", action="store_true",
                   help="write real and generated as they are; by default a pair marked "
                        "\"swap\": true by the judge is written with its answers exchanged, "
                        "since SPIN's real side is the one it trains towards")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.pairs))
    if os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, SPIN_PARQUET_NAME.format(split=args.split))
    try:
        pairs = read_pairs(args.pairs)
        rows = write_spin_parquet(pairs, out, apply_swap=not args.ignore_swap)
    except (DataError, FileNotFoundError) as e:
        print(f"to_spin_parquet.py: error: {e}", file=sys.stderr)
        return 2
    swapped = 0 if args.ignore_swap else sum(bool(p.get("swap")) for p in pairs)
    noised = sum(1 for p in pairs if p.get("noise"))
    print(f"wrote {rows} pairs to {out} ({swapped} swapped"
          + (f"; the per-pair noise of {noised} pairs has no place in SPIN's layout" if noised else "")
          + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
