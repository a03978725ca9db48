"""THE device and dtype rules, on their own so that code that only runs a model (judge.py,
evaluation.py, pairs.py) need not import the training machinery (distributed.py, which
re-exports both names for its callers)."""
from __future__ import annotations

import os
from typing import Optional

import torch


def pick_device(setting: Optional[str] = "auto") -> torch.device:
    """THE device rule: "auto" -> this process's GPU (cuda:LOCAL_RANK) if there is one, else
    the CPU; "cuda" -> cuda:LOCAL_RANK; "cuda:N" and "cpu" as given."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if setting in (None, "", "auto"):
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(setting)


def compute_dtype(setting: Optional[str], device: torch.device) -> torch.dtype:
    """THE dtype rule: "auto" computes in bfloat16 on a GPU and float32 on the CPU (where
    bf16 matmuls are slow and tiny models gain nothing); anything else as named."""
    from .config import parse_dtype
    if setting in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(setting)
