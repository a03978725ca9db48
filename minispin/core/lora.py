"""LoRA: SPIN on one GPU by training low-rank adapters on a frozen base.

Each target projection (q/k/v/o and gate/up/down by default) becomes

    y = W x + b + (alpha / r) · B A dropout(x)        A: r × in,  B: out × r

with W (and b) frozen. A starts Kaiming-uniform (a = √5, i.e. U(±1/√in)) and B at zero,
as peft initialises them, so at step 0 the policy IS the base θ_t: SPIN's loss starts at
exactly ln 2, and the precomputed reference stays valid.

Design choices, and why:
* Wrapped from outside. `apply_lora` swaps each target `nn.Linear` for a `LoRALinear` that
  takes over the very same weight (and bias) Parameter and adds `lora_A` / `lora_B` as
  children. The base keeps its Hugging Face state-dict keys (`...q_proj.weight`), so the
  checkpoint loader fills it unchanged; the adapters add `...q_proj.lora_A.weight` and
  `...q_proj.lora_B.weight`, which are peft's names minus its `base_model.model.` prefix.
  model.py knows nothing about LoRA.
* The reference is the base with the adapters off (`adapters_disabled(model)`), so the
  online reference costs a forward, not a second copy of 7B weights.
* Dtypes. The frozen base may be stored in bf16 (it is never updated, and bf16 compute
  would round it to bf16 anyway), while the adapters, their gradients and their optimizer
  state stay fp32: their updates are small. The adapter path computes in the adapters'
  dtype and casts its sum back to the base's output dtype, as peft does.
  Under FSDP2 (distributed.shard_model) the adapters live in their block's unit with the
  base weights: FSDP2 only asks a unit's *trainable* parameters (whose gradients are
  reduce-scattered together) to share a dtype, which the fp32 adapters do; the bf16
  MixedPrecisionPolicy, which the trainer always uses with a bf16 base, all-gathers the
  unit's mixed bf16/fp32 storage as bf16 (without a policy FSDP2 would gather mixed dtypes
  as raw bytes). Frozen weights get no gradient and no reduce-scatter.
* Initial adapters are drawn on rank 0 from a seeded CPU generator, in module order
  (`initial_adapters`), and broadcast with the base, so 1, 2 or 64 processes start from
  the same A.
* Export (`merged_state_dict`; run/checkpoint.py's `save_peft_adapter`): θ_{t+1} = W + (alpha/r)·B·A in fp32,
  in HF format (the next iteration's θ_t), and the adapter alone in peft's format
  (adapter_config.json + adapter_model.safetensors), which `peft.PeftModel.from_pretrained`
  loads onto the base. minispin never imports peft.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: Tuple[str, ...] = TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def parse_targets(spec: str) -> Tuple[str, ...]:
    """'q_proj,v_proj' -> ('q_proj', 'v_proj'); ValueError names what is wrong."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not names:
        raise ValueError(f"no target modules given; choose from {','.join(TARGETS)}")
    bad = [n for n in names if n not in TARGETS]
    if bad:
        raise ValueError(f"unknown target module {bad[0]!r}; choose from {','.join(TARGETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"target modules listed twice in {spec!r}")
    return names


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus (alpha/r)·B·A·dropout(x). Same `weight`/`bias` names as the
    Linear it replaces; `adapters_on` switches the low-rank path off for the reference."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.adapters_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapters_on:
            return y
        a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return (y + self.lora_B(a) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.lora_A.out_features}, scaling={self.scaling:g}")


def lora_modules(model: nn.Module) -> Iterator[Tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = TARGETS,
               dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Put adapters on every decoder projection named in `targets` and freeze everything
    else. On a meta-device model the adapters stay empty (the loader fills them from
    `initial_adapters`); on a real one they are initialised here. Returns the model."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)}")
    model.requires_grad_(False)
    swaps = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and name.rpartition(".")[2] in targets and ".layers." in f".{name}"]
    if not swaps:
        raise ValueError(f"no decoder projection named {', '.join(targets)} found")
    for name, linear in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(linear, rank, alpha, dropout))
    if next(model.parameters()).device.type != "meta":
        with torch.no_grad():
            for key, value in initial_adapters(model, seed).items():
                model.get_parameter(key).copy_(value)
    return model


def store_base_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the frozen base to `dtype` and keep the adapters fp32."""
    model.to(dtype)
    for _, m in lora_modules(model):
        m.lora_A.float()
        m.lora_B.float()
    return model


def initial_adapters(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """{state-dict key: fp32 CPU tensor} of every adapter at step 0: A Kaiming-uniform with
    a = √5 as peft draws it (bound 1/√in), B zeros. One seeded generator, module order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_modules(model):
        a = torch.empty(m.lora_A.out_features, m.lora_A.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[f"{name}.lora_A.weight"] = a
        out[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.out_features, m.lora_B.in_features)
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base alone, for the reference θ_t: every adapter off inside the block."""
    mods = [m for _, m in lora_modules(model)]
    states = [m.adapters_on for m in mods]
    for m in mods:
        m.adapters_on = False
    try:
        yield model
    finally:
        for m, on in zip(mods, states):
            m.adapters_on = on


# ---------------------------------------------------------------------- export
def merged_state_dict(state: Dict[str, torch.Tensor], settings: LoRASettings,
                      dtype: Optional[torch.dtype] = None,
                      stats: Optional[Dict[str, float]] = None) -> Dict[str, torch.Tensor]:
    """HF keys only: each adapted weight becomes W + scaling·B·A, computed in fp32, then
    cast to `dtype` (default: fp32 for the merged weights, the rest as it is). Consumes
    `state` key by key, so host memory holds about one weight more than the result.

    stats, if given, receives the squared norms of the updates ΔW ("update") and of what
    rounding W + ΔW to bf16 would change ("bf16_error"), for a bf16 base: the next LoRA
    iteration stores θ_{t+1} in bf16, and an update under half a bf16 step of W is lost."""
    out = {}
    for key in list(state):
        if is_adapter_key(key):
            continue
        w = state.pop(key)
        stem = key[:-len(".weight")] if key.endswith(".weight") else None
        if stem and f"{stem}.lora_A.weight" in state:
            a, b = state[f"{stem}.lora_A.weight"].float(), state[f"{stem}.lora_B.weight"].float()
            delta = settings.scaling * (b @ a)
            merged = w.float() + delta
            if stats is not None and w.dtype == torch.bfloat16:
                stats["update"] = stats.get("update", 0.0) + float(delta.double().square().sum())
                err = merged.to(torch.bfloat16).float() - merged
                stats["bf16_error"] = stats.get("bf16_error", 0.0) + float(err.double().square().sum())
            w = merged
        out[key] = w.to(dtype) if dtype is not None and w.is_floating_point() else w
    return out
