"""Processes, loading θ sharded, and sharded checkpoints: what a run needs from torch.distributed.

* `init_distributed`: under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) it joins
  the job's process group — nccl on GPUs, gloo on CPU. Started as plain `python train.py`
  it makes a one-process group, so the training code has a single path: the same FSDP
  wrapping, the same collectives, the same checkpoints, for 1 process or 64.
  Many nodes: torchrun's c10d rendezvous provides the environment; nothing here changes.
* `load_sharded_model`: rank 0 reads the HF checkpoint into CPU memory; every other rank
  builds the model on the meta device (no memory); all ranks shard it with FSDP2
  `fully_shard` (one unit per transformer Block, then the root), allocate only their
  shard and receive it from rank 0 by broadcast. Host memory therefore holds one full copy
  per node-rank-0 at most, never one per GPU. With LoRA (lora.py) the base is frozen and
  stored in the given dtype, fp32 adapters join each Block's unit, and rank 0's step-0
  adapters travel with the base.
* Sharding, mixed precision, activation checkpointing, compiled blocks and the
  collectives are core/fsdp.py's; this module re-exports them for its callers (D.*).
* Training checkpoints (for resume) never unpickle: run folders get copied and shared, and
  DCP's file format pickles its `.metadata`, and its planner torch.loads non-tensor state
  (param_groups) with weights_only=False, even with DCP's safetensors storage. Each rank
  streams its local shards (FSDP2 DTensor `to_local()`) of the model and optimizer state, and
  its tensors of the trainer's `extra` (RNG states, uint8), into `rank<r>.safetensors` (frozen
  weights, i.e. a LoRA base, are left out: θ_t holds them); their offsets
  in the global tensor travel in that file's header. Rank 0 then writes `checkpoint.json`:
  the files, where each chunk of each tensor lies, the optimizer's param_groups and every
  rank's `extra` as JSON (step, scheduler, resume key). Loading reads only that JSON and
  byte ranges of the safetensors files, so a checkpoint resumes on any world size: each rank
  copies the overlap of every saved chunk with its own shard. A folder in the old DCP layout
  (`.metadata`, `*.pt`) is refused unread. Writes go to `<dir>.tmp`, which rank 0 renames to
  `<dir>` once every rank is done, so a directory named step_<n> is always complete;
  `latest_checkpoint` picks the newest. checkpoint.json records the sha256 of every rank file
  and a checksum of itself: `verify_checkpoint` (the trainer runs it before resuming, and
  falls back to the newest intact checkpoint) catches a flipped bit in a rank file or an
  edited step in the index, which the header checks alone would let through. A non-finite
  model or optimizer state is refused before anything is written, keeping the last finite
  checkpoint (`all_finite` is the same check for
  callers). A rank that fails to write or read tells the others, so none waits forever.
  On many nodes the checkpoint folder must be on a filesystem every node sees.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.device import compute_dtype, pick_device  # noqa: F401  (re-exported: D.pick_device)
from ..core.fsdp import (  # noqa: F401  (re-exported: D.barrier, D.all_finite, ...)
    _any_rank, _first_non_finite, _local_part, all_finite, all_gather_objects, all_reduce_sum,
    apply_activation_checkpointing, barrier, broadcast_object, build_sharded_model, compile_blocks,
    device_mesh, gather_full_state_dict, mixed_precision_policy, shard_model)
from ..core.lora import LoRASettings, initial_adapters
from ..core.model import Transformer
from .checkpoint import _ST_DTYPES, check_config_sizes, file_sha256, load_model
from .config import read_config
from .errors import UserError, json_loads, stage, writing


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


def init_distributed(device: Optional[str] = "auto", timeout_s: Optional[float] = None) -> DistEnv:
    """Join (or create) the default process group; pick the device and backend. timeout_s
    (recipe key dist_timeout) bounds each collective's wait for the other ranks.

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
            wait = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None, **wait)
        else:  # plain `python train.py`: a group of one, no ports needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                   dev, dist.get_backend(), owns)


def close_distributed(env: DistEnv):
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- model sharding
def check_compile_support(device: torch.device):
    """compile_train's one outside need, checked before a model loads: on the CPU, inductor
    builds C++ and needs a compiler (on CUDA it writes Triton kernels, which ship with torch)."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # inductor's own error is long; its gist goes in the one line
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"compile_train (--compile-train) on the CPU needs a C++ compiler for "
                        f"torch.compile's inductor ({why}): install g++ or clang++, or train "
                        f"without --compile-train") from None


def load_sharded_model(path: str, env: DistEnv, mesh, mp_policy=None, dtype=torch.float32,
                       activation_checkpointing: bool = False, trainable: bool = True,
                       lora: Optional[LoRASettings] = None, lora_seed: int = 0,
                       compile: bool = False) -> Transformer:
    """θ from an HF folder, sharded over the mesh; rank 0 reads, the others receive.
    compile: torch.compile each Block (build_sharded_model).

    lora: adapters on a frozen base (lora.py). The base is stored in `dtype`, the adapters
    in fp32; rank 0 draws their step-0 values (seeded by lora_seed) and they travel with
    the base, so every world size starts alike. Only the adapters require grad."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = load_model(path, dtype=dtype, device="cpu").state_dict() if env.is_main else {}
    args = read_config(path)
    check_config_sizes(args, path)  # every rank: none builds what config.json merely claims
    if compile in (True, "inductor"):
        check_compile_support(env.device)
    model = build_sharded_model(args, env, mesh, mp_policy, dtype,
                                activation_checkpointing, lora, compile)
    if lora is not None and env.is_main:
        full.update(initial_adapters(model, lora_seed))
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    del full
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


# ---------------------------------------------------------------------- training checkpoints
CKPT_INDEX = "checkpoint.json"
CKPT_FORMAT = "minispin-train-checkpoint"
CKPT_VERSION = 2  # 2: sha256 of each rank file and a checksum of the index itself
STEP_DIR = re.compile(r"^step_(\d+)$")
_DTYPE_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


class TrainCheckpointError(UserError):
    """A training checkpoint that must not be written or cannot be resumed. The message names
    the folder (and the file or key) and says what to do."""


def _start_fresh(path: str) -> str:
    return (f"Delete {os.path.dirname(os.path.abspath(path))} to start this training from the "
            f"beginning, or use another --run-dir")


def checkpoints_newest_first(root: str) -> List[str]:
    """The complete checkpoint folders under root (step_<n>), newest first."""
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(root)
             if (m := STEP_DIR.match(name)) and os.path.isdir(os.path.join(root, name))]
    return [os.path.join(root, name) for _, name in sorted(steps, reverse=True)]


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint folder under root (step_<n>), or None."""
    found = checkpoints_newest_first(root)
    return found[0] if found else None


def _index_checksum(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_checkpoint(path: str) -> dict:
    """The checkpoint's index, after checking it against its own checksum and every rank
    file against its sha256 (TrainCheckpointError naming the file that differs)."""
    index = _read_index(path)
    for name in index["files"]:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise TrainCheckpointError(f"{f}: missing; the checkpoint is damaged. {_start_fresh(path)}")
        if file_sha256(f) != index["sha256"][name]:
            raise TrainCheckpointError(f"{f}: its sha256 is not the one {CKPT_INDEX} recorded (the file "
                                       f"changed or was damaged after it was written). {_start_fresh(path)}")
    return index


def _train_state(model: nn.Module, optimizer):
    """get_state_dict's (model_sd, optim_sd), and their tensors under flat names:
    'model/<fqn>' and 'optim/<fqn>/<state>' (FSDP2 gives DTensors; step counters are plain).
    Frozen weights (a LoRA base) are left out: they never change and are reloaded from θ_t."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(ignore_frozen_params=True))
    flat = {f"model/{k}": v for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                raise TrainCheckpointError(f"optimizer state {fqn}/{name} is a {type(value).__name__}; "
                                           f"only tensor state can be checkpointed")
            flat[f"optim/{fqn}/{name}"] = value
    return model_sd, optim_sd, flat


def _to_json(value, tensors: dict, key: str):
    """`extra` as JSON; each tensor moves to `tensors` under its path, leaving a placeholder."""
    if torch.is_tensor(value):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) and "/" not in k for k in value):
            raise TrainCheckpointError(f"checkpoint state {key}: keys must be strings without '/'")
        return {k: _to_json(v, tensors, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TrainCheckpointError(f"checkpoint state {key} is a {type(value).__name__}: only JSON "
                               f"values and tensors are saved (nothing is pickled)")


def _from_json(value, read_tensor):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return read_tensor(value["__tensor__"])
        return {k: _from_json(v, read_tensor) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, read_tensor) for v in value]
    return value


def _write_safetensors(path: str, tensors: dict, metadata: dict):
    """A .safetensors file written one tensor at a time, so host memory holds one tensor of a
    GPU shard at a time (safetensors' save_file wants them all on the CPU at once)."""
    header, end = {"__metadata__": metadata}, 0
    for key, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TrainCheckpointError(f"checkpoint state {key} has dtype {t.dtype}, which "
                                       f"safetensors lacks")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [end, end + size]}
        end += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    with writing(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            data = t.detach().to("cpu").contiguous().reshape(-1)
            f.write(memoryview(data.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _read_header(path: str, why: str):
    """Check a rank file's header against the file: {key: (dtype, shape, start)}, __metadata__."""
    def bad(what):
        return TrainCheckpointError(f"{path}: {what}; {why}")
    if not os.path.isfile(path):
        raise bad("missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8 or 8 + struct.unpack("<Q", raw)[0] > size:
            raise bad(f"truncated ({size} bytes, shorter than its header)")
        n = struct.unpack("<Q", raw)[0]
        try:
            header = json_loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise bad("corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", {})
    entries = {}
    for key, e in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
            ok = _is_sizes(shape, len(shape)) and type(begin) is int and type(end) is int
            ok = ok and 0 <= begin and 8 + n + end <= size
            ok = ok and end - begin == math.prod(shape) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {key!r}: dtype, shape and data_offsets do not agree with each other "
                      f"or with the file size")
        entries[key] = (dtype, shape, 8 + n + begin)
    return entries, metadata


def _read_rows(path: str, entry, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi (dim 0) of a stored tensor: one contiguous byte range; a 0-d tensor whole."""
    dtype, shape, start = entry
    row = math.prod(shape[1:]) * dtype.itemsize
    buf = torch.empty((hi - lo) * row, dtype=torch.uint8)
    view, got = memoryview(buf.numpy()), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start + lo * row)
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise TrainCheckpointError(f"{path}: unexpected end of file")
            got += n
    return buf.view(dtype).reshape(shape if not shape else [hi - lo] + shape[1:])


def _fill(local: torch.Tensor, offsets: list, chunks: list, read) -> int:
    """Copy into this rank's part (at `offsets` in the global tensor) whatever the saved chunks
    hold of it: resharding when the world size changed. Returns the number of elements copied."""
    copied = 0
    for c in chunks:
        lo = [max(o, co) for o, co in zip(offsets, c["offsets"])]
        hi = [min(o + n, co + cn)
              for o, n, co, cn in zip(offsets, local.shape, c["offsets"], c["sizes"])]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        if local.dim() == 0:
            local.copy_(read(c, 0, 1))
            copied += 1
            continue
        rows = read(c, lo[0] - c["offsets"][0], hi[0] - c["offsets"][0])
        inner = zip(lo[1:], hi[1:], c["offsets"][1:])
        src = rows[(slice(None),) + tuple(slice(a - co, b - co) for a, b, co in inner)]
        local[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))].copy_(src)
        copied += src.numel()
    return copied


def save_checkpoint(path: str, model: nn.Module, optimizer, extra: dict, env: DistEnv,
                    keep: int = 2):
    """Model + optimizer shards and `extra` (JSON values and tensors only; step, scheduler,
    RNG) of every rank, written to path.tmp and renamed to path when complete; keeps the newest
    `keep`. Refuses (on every rank, before writing) a non-finite model or optimizer state."""
    from torch.distributed.tensor import DTensor
    step = extra.get("step", "?")
    _, optim_sd, flat = _train_state(model, optimizer)
    bad = _first_non_finite(flat)
    if _any_rank(bad is not None):
        raise TrainCheckpointError(
            f"not saving {path}: the model/optimizer state after step {step} is not finite "
            f"({bad or 'on another rank'}); the last finite checkpoint is kept. Lower --lr")
    tensors, chunks = {}, {}
    for key, t in flat.items():
        local, offsets, shape = _local_part(t)
        # a plain tensor (a step counter) is the same on every rank: rank 0 writes it
        if (isinstance(t, DTensor) or env.is_main) and local.numel() > 0:
            tensors[key] = local
            chunks[key] = {"offsets": offsets, "shape": shape}
    extra_json = _to_json(extra, tensors, "extra")
    meta = {"minispin": json.dumps({"rank": env.rank, "chunks": chunks, "extra": extra_json})}
    groups_tensors = {}
    param_groups = _to_json(optim_sd["param_groups"], groups_tensors, "param_groups")
    if groups_tensors:
        raise TrainCheckpointError(f"optimizer setting {next(iter(groups_tensors))} is a tensor; "
                                   f"give the optimizer plain numbers")
    tmp = path + ".tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    failed = None
    try:
        _write_safetensors(os.path.join(tmp, f"rank{env.rank}.safetensors"), tensors, meta)
    except OSError as e:
        failed = e
    if _any_rank(failed is not None):  # also the barrier: every rank has written its file
        raise TrainCheckpointError(f"could not write {tmp}: {failed or 'another rank failed'}; "
                                   f"the last complete checkpoint is kept")
    if env.is_main:
        with stage(f"training (saving checkpoint step {step})"):
            _write_index(tmp, env.world_size, param_groups)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        root = os.path.dirname(path)
        done = sorted(int(m.group(1)) for n in os.listdir(root) if (m := STEP_DIR.match(n)))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, f"step_{old}"), ignore_errors=True)
        fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
        os.fsync(fd)
        os.close(fd)
    barrier()


def _write_index(folder: str, world_size: int, param_groups: list):
    """checkpoint.json: where every chunk of every tensor lies, from the ranks' file headers."""
    files = [f"rank{r}.safetensors" for r in range(world_size)]
    tensors, extras = {}, []
    for name in files:
        entries, meta = _read_header(os.path.join(folder, name), "written just now")
        info = json_loads(meta["minispin"])
        extras.append(info["extra"])
        for key, c in info["chunks"].items():
            dtype, sizes, _ = entries[key]
            t = tensors.setdefault(key, {"dtype": _DTYPE_NAMES[dtype], "shape": c["shape"],
                                         "chunks": []})
            if not any(x["offsets"] == c["offsets"] for x in t["chunks"]):  # replicas: keep one
                t["chunks"].append({"file": name, "offsets": c["offsets"], "sizes": sizes})
    index = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "world_size": world_size,
             "files": files, "extra": extras, "param_groups": param_groups, "tensors": tensors,
             "sha256": {name: file_sha256(os.path.join(folder, name)) for name in files}}
    index["checksum"] = _index_checksum(index)
    with writing(os.path.join(folder, CKPT_INDEX)), open(os.path.join(folder, CKPT_INDEX), "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())


def _is_sizes(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(type(x) is int and x >= 0 for x in v)


def _read_index(path: str) -> dict:
    """checkpoint.json, checked; a folder in another (pickle) format is refused, never read."""
    index_path = os.path.join(path, CKPT_INDEX)
    if not os.path.isfile(index_path):
        names = sorted(os.listdir(path)) if os.path.isdir(path) else []
        legacy = [n for n in names if n == ".metadata" or n.endswith((".pt", ".pth", ".distcp", ".bin"))]
        if legacy:
            raise TrainCheckpointError(
                f"{path}: checkpoint in the old pickle-based format ({', '.join(legacy[:3])}); it is "
                f"not read, as unpickling a file can run code. {_start_fresh(path)}")
        raise TrainCheckpointError(f"{path}: no {CKPT_INDEX}, so not a minispin checkpoint. "
                                   f"{_start_fresh(path)}")

    def need(ok, what):
        if not ok:
            raise TrainCheckpointError(f"{index_path}: {what}. {_start_fresh(path)}")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json_loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainCheckpointError(f"{index_path}: not valid JSON ({e}). {_start_fresh(path)}") from None
    need(isinstance(index, dict) and index.get("format") == CKPT_FORMAT,
         "not a minispin checkpoint index")
    need(index.get("version") == CKPT_VERSION,
         f"format version {index.get('version')!r}; this minispin reads version {CKPT_VERSION}")
    need(index.get("checksum") == _index_checksum(index),
         "its checksum does not match its content (the file was edited or damaged after it was written)")
    world = index.get("world_size")
    need(type(world) is int and world >= 1, "'world_size' must be a positive integer")
    files = [f"rank{r}.safetensors" for r in range(world)]
    need(index.get("files") == files, f"'files' must be rank0 ... rank{world - 1}.safetensors")
    need(isinstance(index.get("extra"), list) and len(index["extra"]) == world
         and all(isinstance(e, dict) for e in index["extra"]), "'extra' must hold an object per rank")
    groups = index.get("param_groups")
    need(isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                          for g in groups), "'param_groups' malformed")
    need(isinstance(index.get("tensors"), dict), "'tensors' must be an object")
    need(isinstance(index.get("sha256"), dict) and all(isinstance(index["sha256"].get(n), str) for n in files),
         "'sha256' must give every rank file's checksum")
    for key, t in index["tensors"].items():
        need(isinstance(t, dict) and t.get("dtype") in _ST_DTYPES and isinstance(t.get("chunks"), list)
             and _is_sizes(t.get("shape"), len(t.get("shape") or [])), f"tensors[{key!r}] malformed")
        for c in t["chunks"]:
            dims = len(t["shape"])
            need(isinstance(c, dict) and c.get("file") in files and _is_sizes(c.get("offsets"), dims)
                 and _is_sizes(c.get("sizes"), dims), f"a chunk of tensors[{key!r}] is malformed")
    return index


def checkpoint_extra(path: str) -> dict:
    """Rank 0's `extra` as JSON (step, resume key, ...), read from the index alone — so a
    run can check that a checkpoint is its own before loading any tensor."""
    return _read_index(path)["extra"][0]


def load_checkpoint(path: str, model: nn.Module, optimizer, env: DistEnv, verified: bool = False) -> dict:
    """Restore model + optimizer from a checkpoint of any world size (resharding) and return
    this rank's `extra` (rank 0's when the saving job had fewer ranks). Reads only JSON and
    safetensors: nothing is unpickled. The checksums are checked first unless the caller
    has (verified=True; the trainer verifies on rank 0 while choosing the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    index = _read_index(path) if verified else verify_checkpoint(path)
    why = f"the checkpoint is damaged. {_start_fresh(path)}"
    # every rank checks every file's header, so a damaged file stops all ranks alike
    headers = {name: _read_header(os.path.join(path, name), why)[0] for name in index["files"]}
    model_sd, optim_sd, flat = _train_state(model, optimizer)
    saved = index["tensors"]
    missing, unexpected = sorted(set(flat) - set(saved)), sorted(set(saved) - set(flat))
    if missing or unexpected:
        raise TrainCheckpointError(
            f"{path}: does not fit this model and optimizer (missing: {', '.join(missing[:4]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:4]) or '-'}): it was written with another model or "
            f"--optimizer. {_start_fresh(path)}")
    for key, t in flat.items():
        entry = saved[key]
        if entry["shape"] != list(t.shape) or _ST_DTYPES[entry["dtype"]] != t.dtype:
            raise TrainCheckpointError(f"{path}: {key} is {entry['dtype']} {entry['shape']} there, "
                                       f"{t.dtype} {list(t.shape)} here. {_start_fresh(path)}")
        for c in entry["chunks"]:
            got = headers[c["file"]].get(key)
            if got is None or got[1] != c["sizes"] or got[0] != t.dtype:
                raise TrainCheckpointError(f"{os.path.join(path, c['file'])}: {key} missing or not as "
                                           f"{CKPT_INDEX} describes it; {why}")

    failed = None
    with torch.no_grad():
        for key, t in flat.items():
            local, offsets, _ = _local_part(t)
            try:
                copied = _fill(local, offsets, saved[key]["chunks"], lambda c, lo, hi: _read_rows(
                    os.path.join(path, c["file"]), headers[c["file"]][key], lo, hi))
            except (OSError, TrainCheckpointError) as e:
                failed = str(e)
                break
            if copied != local.numel():
                failed = (f"{path}: {key}: the chunks cover {copied} of this rank's "
                          f"{local.numel()} elements; {why}")
                break
    if _any_rank(failed is not None):  # no rank goes on to train with half a checkpoint
        raise TrainCheckpointError(failed or f"{path}: another rank could not restore its part; {why}")
    if len(index["param_groups"]) != len(optim_sd["param_groups"]):
        raise TrainCheckpointError(f"{path}: {len(index['param_groups'])} optimizer parameter groups "
                                   f"there, {len(optim_sd['param_groups'])} here. {_start_fresh(path)}")
    for now, was in zip(optim_sd["param_groups"], index["param_groups"]):
        for k, v in was.items():  # lr, betas, ...; JSON made tuples lists: restore the type
            if k != "params":
                now[k] = tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v
    frozen = any(not p.requires_grad for p in model.parameters())  # LoRA: only the adapters
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(ignore_frozen_params=True, strict=not frozen))
    rank = env.rank if env.rank < index["world_size"] else 0
    name = index["files"][rank]

    def read_extra(key):
        entry = headers[name].get(key) if isinstance(key, str) else None
        if entry is None:
            raise TrainCheckpointError(f"{os.path.join(path, name)}: {key!r} missing; {why}")
        return _read_rows(os.path.join(path, name), entry, 0, entry[1][0] if entry[1] else 1)
    return _from_json(index["extra"][rank], read_extra)
