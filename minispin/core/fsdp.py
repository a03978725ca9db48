"""FSDP2 for the core: sharding a model, mixed precision, and the few collectives the
training step uses. torch.distributed only; a plain `python` run is a group of one, so
these are the same calls for 1 process or 64 (run/distributed.py makes the group and
keeps the checkpoints).

* Mixed precision is a `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the
  sharded parameters — the optimizer's master weights — stay fp32, and FSDP casts them to
  bf16 when it gathers them for compute. bf16 master weights would lose SPIN's lr = 5e-7
  updates (an update below half a bf16 ulp rounds away). On CPU/gloo the default is fp32.
* `shard_model`: one `fully_shard` unit per transformer Block, then the root.
* Activation checkpointing wraps each Block's forward in `torch.utils.checkpoint` (non-
  reentrant) without renaming modules, so state-dict keys stay the HF keys.
* `compile_blocks`: each Block is compiled in place (`Module.compile`, which keeps the
  module and its state-dict keys), after activation checkpointing and BEFORE
  `fully_shard`: the order FSDP2 supports (torchtitan's), where dynamo leaves FSDP2's
  all-gather/reduce-scatter hooks to run eagerly around each compiled block. Not
  fullgraph: a graph break falls back to eager for that piece instead of failing.
* `gather_full_state_dict`: the full fp32 weights on rank 0 (CPU), for the HF export.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .device import compute_dtype
from .lora import LoRASettings, apply_lora, store_base_in
from .model import Block, Transformer, build_model


# ---------------------------------------------------------------------- collectives
def barrier():
    dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> List[Any]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------- model sharding
def mixed_precision_policy(mode: str, device: torch.device):
    """'bf16' -> MixedPrecisionPolicy(bf16 compute, fp32 reduce); 'fp32' -> None;
    'auto' -> compute_dtype's rule (bf16 on CUDA, fp32 on CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if mode == "auto":
        mode = "bf16" if compute_dtype("auto", device) == torch.bfloat16 else "fp32"
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mode == "fp32":
        return None
    raise ValueError(f"mixed precision must be auto, bf16 or fp32, got {mode!r}")


def apply_activation_checkpointing(model: Transformer):
    """Recompute each Block's activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        block.forward = forward  # instance attribute: module names (state-dict keys) unchanged


def compile_blocks(model: Transformer, backend="inductor"):
    """torch.compile each Block in place (before fully_shard; see the module docstring).
    backend: "inductor" for training; the tests also pass "eager" (dynamo only)."""
    for block in model.model.layers:
        block.compile(backend=backend)
    return model


def shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True):
    """FSDP2: one `fully_shard` unit per transformer Block, then the root (embeddings,
    final norm, output head). LoRA adapters share their Block's unit: FSDP2 needs one dtype
    only among a unit's trainable parameters (the fp32 adapters); the frozen base, bf16 or
    not, is gathered with them and gets no gradient (lora.py's docstring)."""
    from torch.distributed.fsdp import fully_shard
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    return model


def device_mesh(env):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(env.device.type, (env.world_size,))


def build_sharded_model(args, env,  mesh, mp_policy=None, dtype=torch.float32,
                        activation_checkpointing: bool = False,
                        lora: Optional[LoRASettings] = None, compile: bool = False) -> Transformer:
    """The model of `args` (a ModelArgs), with LoRA adapters if asked, sharded over the mesh,
    its storage allocated on env.device and NOT initialised (load_sharded_model fills it;
    a bench fills it with random numbers). The base is in `dtype`, adapters in fp32.
    compile: torch.compile each Block (compile_train; a string names the backend)."""
    model = build_model(args, device="meta")
    if lora is not None:
        apply_lora(model, lora.rank, lora.alpha, lora.targets, lora.dropout)
        store_base_in(model, dtype)  # on the meta device: no memory moves
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model, "inductor" if compile is True else compile)
    shard_model(model, mesh, mp_policy)
    model.to_empty(device=env.device)
    if dtype != torch.float32 and lora is None:
        model.to(dtype)
    return model


def gather_full_state_dict(model: nn.Module) -> dict:
    """Full (unsharded) weights on rank 0's CPU; an empty dict on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------- finite weights
def _local_part(t: torch.Tensor):
    """(this rank's data, its offsets in the global tensor, the global shape)."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        (chunk,) = t.__create_chunk_list__()
        return t.to_local(), list(chunk.offsets), list(t.shape)
    return t, [0] * t.dim(), list(t.shape)


def _first_non_finite(tensors: dict) -> Optional[str]:
    for name, t in tensors.items():
        local = _local_part(t)[0]
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


def _any_rank(flag: bool) -> bool:
    """True on every rank when flag is true on some rank (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_finite(model: nn.Module, optimizer=None) -> bool:
    """True on every rank when every weight (and optimizer state tensor) on every rank is finite.
    A collective: call it on every rank, e.g. before save_checkpoint."""
    tensors = dict(model.named_parameters())
    if optimizer is not None:
        for i, state in enumerate(optimizer.state.values()):
            tensors.update({f"optim/{i}/{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return not _any_rank(_first_non_finite(tensors) is not None)
