"""THE device and dtype rules: which device a process uses, which dtype it computes in,
and the names a dtype may be given by. Code that only runs a model (the judge, lm-eval,
generation) reads them here without the training machinery."""
from __future__ import annotations

import os
from typing import Any, Optional

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
    if setting in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(setting)


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: Any) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[key]
