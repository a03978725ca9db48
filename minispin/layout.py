"""Recipes and the on-disk layout of a SPIN run — the one place generate.py, judge.py,
train.py and evaluate.py agree on where things live.

A recipe is a TOML file in configs/ (comments allowed, no extra dependency: tomllib is in
the standard library). Keys not given take the defaults in DEFAULTS; command-line flags
override both. With no --config the tiny CPU recipe (configs/tiny.toml) is used.

Layout of a run (run_dir defaults to runs/<recipe name>):

    runs/<name>/
      iter<t>/
        pairs.jsonl        y' ~ p_θt for every SFT prompt (generate.py --iter t)
        judged.jsonl       pairs with judge scores and swap flags (judge.py --iter t)
        ref_logps.jsonl    log p_θt of both answers, computed once (train.py)
        ckpt/step_<n>/     sharded DCP checkpoints while training, for resume
        metrics.jsonl      one line per optimizer step
        model/             the HF-format export θ_{t+1}
        eval/              evaluate.py results

θ_0 is the recipe's SFT model; θ_t for t >= 1 is runs/<name>/iter<t-1>/model.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPE = os.path.join(REPO_ROOT, "configs", "tiny.toml")


def load_recipe(path: Optional[str] = None) -> dict:
    """The recipe as a flat dict; relative paths inside it resolve against the repo root."""
    path = path or DEFAULT_RECIPE
    if not os.path.isfile(path):
        alt = os.path.join(REPO_ROOT, "configs", f"{path}.toml")
        if os.path.isfile(alt):
            path = alt
        else:
            raise FileNotFoundError(f"recipe {path} not found (see configs/ for the shipped ones)")
    with open(path, "rb") as f:
        try:
            recipe = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    recipe.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    recipe["recipe_path"] = path
    for key in ("model", "data", "eval_data"):  # run_dir stays relative to the cwd
        val = recipe.get(key)
        if isinstance(val, str) and not os.path.isabs(val) and not os.path.exists(val):
            recipe[key] = os.path.join(REPO_ROOT, val)
    recipe.setdefault("run_dir", os.path.join("runs", recipe["name"]))
    return recipe


def write_recipe_variant(out_path: str, overrides: dict, base: str = DEFAULT_RECIPE) -> str:
    """Copy a recipe with some top-level keys given new values (comments kept), e.g. the
    tiny recipe with more prompts for an experiment or fewer for a test."""
    with open(base) as f:
        text = f.read()
    for key, value in overrides.items():
        text, n = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        if n != 1:
            raise ValueError(f"{base} has no top-level key '{key}' to override")
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


def iter_dir(run_dir: str, t: int) -> str:
    return os.path.join(run_dir, f"iter{t}")


def pairs_path(run_dir: str, t: int) -> str:
    return os.path.join(iter_dir(run_dir, t), "pairs.jsonl")


def judged_path(run_dir: str, t: int) -> str:
    return os.path.join(iter_dir(run_dir, t), "judged.jsonl")


def export_path(run_dir: str, t: int) -> str:
    """Where iteration t writes θ_{t+1}."""
    return os.path.join(iter_dir(run_dir, t), "model")


def theta_path(run_dir: str, t: int, sft_model: str) -> str:
    """θ_t: the SFT model for t = 0, else the export of iteration t-1."""
    if t < 0:
        raise ValueError(f"--iter must be >= 0, got {t}")
    return sft_model if t == 0 else export_path(run_dir, t - 1)
