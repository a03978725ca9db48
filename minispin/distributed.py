"""Processes, sharding and sharded checkpoints: everything train.py needs from torch.distributed.

* `init_distributed`: under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) it joins
  the job's process group — nccl on GPUs, gloo on CPU. Started as plain `python train.py`
  it makes a one-process group, so the training code has a single path: the same FSDP
  wrapping, the same collectives, the same checkpoints, for 1 process or 64.
  Many nodes: torchrun's c10d rendezvous provides the environment; nothing here changes.
* `load_sharded_model`: rank 0 reads the HF checkpoint into CPU memory; every other rank
  builds the model on the meta device (no memory); all ranks shard it with FSDP2
  `fully_shard` (one unit per transformer Block, then the root), allocate only their
  shard and receive it from rank 0 by broadcast. Host memory therefore holds one full copy
  per node-rank-0 at most, never one per GPU.
* Mixed precision is a `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the
  sharded parameters — the optimizer's master weights — stay fp32, and FSDP casts them to
  bf16 when it gathers them for compute. bf16 master weights would lose SPIN's lr = 5e-7
  updates (an update below half a bf16 ulp rounds away). On CPU/gloo the default is fp32.
* Activation checkpointing wraps each Block's forward in `torch.utils.checkpoint` (non-
  reentrant) without renaming modules, so state-dict keys stay the HF keys.
* DCP checkpoints: `save_checkpoint` writes model + optimizer state sharded (each rank its
  own part, resharded on load if the world size changes) plus a small per-rank file with
  the trainer's state (step, scheduler, RNG). It writes into `<dir>.tmp` and rank 0 renames
  it to `<dir>` after every rank has finished, so a directory named step_<n> is always
  complete; `latest_checkpoint` picks the newest such directory. On many nodes the
  checkpoint folder must be on a filesystem every node sees.
* `gather_full_state_dict`: the full fp32 weights on rank 0 (CPU), for the HF export.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import load_model
from .config import read_config
from .model import Block, Transformer, build_model


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def init_distributed(device: Optional[str] = "auto") -> DistEnv:
    """Join (or create) the default process group; pick the device and backend.

    Under torchrun (RANK/WORLD_SIZE in the environment) this joins the job's group, nccl on
    GPUs and gloo on CPU; started as plain `python`, it makes a group of one, so every code
    path is the same for 1 process or 64. An existing group (train.py --generate calling
    the generation step) is used as it is and left for its owner to close.
    """
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # plain `python train.py`: a group of one, no ports needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                   dev, dist.get_backend(), owns)


def close_distributed(env: DistEnv):
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


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


def shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True):
    """FSDP2: one `fully_shard` unit per transformer Block, then the root (embeddings,
    final norm, output head)."""
    from torch.distributed.fsdp import fully_shard
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    return model


def device_mesh(env: DistEnv):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(env.device.type, (env.world_size,))


def load_sharded_model(path: str, env: DistEnv, mesh, mp_policy=None, dtype=torch.float32,
                       activation_checkpointing: bool = False, trainable: bool = True) -> Transformer:
    """θ from an HF folder, sharded over the mesh; rank 0 reads, the others receive."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    args = read_config(path)
    full = load_model(path, dtype=dtype, device="cpu").state_dict() if env.is_main else {}
    model = build_model(args, device="meta")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    shard_model(model, mesh, mp_policy)
    model.to_empty(device=env.device)
    if dtype != torch.float32:
        model.to(dtype)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    del full
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def gather_full_state_dict(model: nn.Module) -> dict:
    """Full (unsharded) weights on rank 0's CPU; an empty dict on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------- DCP checkpoints
STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint folder under root (step_<n>), or None."""
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root)
             if (m := STEP_DIR.match(name)) and os.path.isdir(os.path.join(root, name))]
    return os.path.join(root, max(steps)[1]) if steps else None


def save_checkpoint(path: str, model: nn.Module, optimizer, extra: dict, env: DistEnv,
                    keep: int = 2):
    """Sharded model + optimizer via DCP, per-rank `extra` (step, scheduler, RNG);
    written to path.tmp, renamed to path when complete; keeps the newest `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = path + ".tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(extra, os.path.join(tmp, f"trainer_rank{env.rank}.pt"))
    barrier()
    if env.is_main:
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        root = os.path.dirname(path)
        done = sorted(int(m.group(1)) for n in os.listdir(root) if (m := STEP_DIR.match(n)))
        for step in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, f"step_{step}"), ignore_errors=True)
    barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer, env: DistEnv) -> dict:
    """Restore model + optimizer shards (resharding if the world size changed) and
    return this rank's trainer state (rank 0's when this rank had none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    own = os.path.join(path, f"trainer_rank{env.rank}.pt")
    if not os.path.isfile(own):
        own = os.path.join(path, "trainer_rank0.pt")
    return torch.load(own, weights_only=True)
