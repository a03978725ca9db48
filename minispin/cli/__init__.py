"""The command-line tools, one module each, every one with a `main(argv=None) -> int`.

    minispin-train     train.py       one SPIN iteration (or SFT)      cli/train.py
    minispin-generate  generate.py    y' ~ p_θt, the pairs file        cli/generate.py
    minispin-judge     judge.py       judge scores and relabeling      cli/judge.py
    minispin-eval      evaluate.py    the study's lm-eval suite        cli/evaluate.py
    minispin-plot      plot.py        training and held-out charts     cli/plot.py

An installed minispin runs them as console scripts (setup.py's entry_points); a checkout
also runs them as `python train.py ...` (or under torchrun), through the three-line
scripts at its root. The code lives here, in the package, so both are the same program.
Each tool only reads its command line and calls into minispin; its messages name it as
the user started it (`prog`), and each applies the recipe's process settings the same way
(`apply_threads`).
"""
from __future__ import annotations

import os
import sys


def prog(installed_name: str) -> str:
    """The tool's name as typed: "train.py" from a checkout (also under torchrun), the
    console script's name when installed; `installed_name` when neither can be told."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.endswith(".py") or name.startswith("minispin-") else installed_name


def apply_threads(recipe) -> None:
    """The recipe's cpu_threads (0 = torch's default) as torch's intra-op thread count, in
    every tool: generate.py with torch's default ran 5-7x slower on a shared 2-core machine
    and could sample another token than train.py --generate on a CDF boundary."""
    if recipe.model.cpu_threads:
        import torch
        torch.set_num_threads(recipe.model.cpu_threads)
