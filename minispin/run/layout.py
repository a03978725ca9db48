"""Where a SPIN run keeps its files — the one place generate.py, judge.py, train.py and
evaluate.py agree on (run_dir defaults to runs/<recipe name>):

    runs/<name>/
      judge_cache.jsonl    every judge score, appended as it arrives (judge.py)
      fingerprints.json    content fingerprints of model folders hashed for this run (θ_0)
      iter<t>/
        pairs.jsonl        y' ~ p_θt for every SFT prompt (generate.py --iter t)
        judged.jsonl       pairs with judge scores, margins and swap flags (judge.py --iter t)
        ref_logps.jsonl    log p_θt of both answers, computed once (train.py)
        ckpt/step_<n>/     sharded checkpoints while training, for resume
        metrics.jsonl      one line per optimizer step
        train_info.json    data sources, truncation counts, settings, world size
        model/             the HF-format export θ_{t+1}
        summary.json       rewards and the held-out check, written after the export
        eval/              evaluate.py results
      sft/                 train.py --sft: the same files for an SFT run

Iterations chain: θ_0 is the recipe's SFT model; θ_t for t >= 1 is iter<t-1>/model.
"""
from __future__ import annotations

import os


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


def summary_path(run_dir: str, t: int) -> str:
    return os.path.join(iter_dir(run_dir, t), "summary.json")


def judge_cache_path(run_dir: str) -> str:
    return os.path.join(run_dir, "judge_cache.jsonl")


def fingerprint_cache_path(run_dir: str) -> str:
    return os.path.join(run_dir, "fingerprints.json")
