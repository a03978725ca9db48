"""Hugging Face safetensors checkpoints in and out, without transformers.

Loading
* The files are named by the folder, never guessed: `model.safetensors.index.json`
  (sharded; its weight_map says which file holds each tensor) or `model.safetensors`.
  We never glob *.safetensors (Mistral repos also ship `consolidated.safetensors`) and
  never unpickle (.bin/.pt files are refused with a message saying so).
* The model is built on the meta device, so it has no storage until loading fills it.
  Each tensor is then read straight from the file into its final buffer with plain
  `readinto` calls: no mmap (mapped pages count towards RSS) and no whole-file copy, so
  peak memory stays close to the size of the weights (bench/bench_load.py measures it).
* Every key and shape is checked from the headers before any data is read, and all
  problems are reported in one error: missing, unexpected and mis-shaped tensors.
  Rotary `inv_freq` buffers that some exporters include are ignored.
* Each header entry is checked before use: a known dtype, a shape, and data_offsets
  whose span is exactly what dtype x shape needs and which lie inside the file. A
  truncated or corrupt file is named with the tensor that does not fit, and what its
  header promised and what is there.
* Biases (Qwen2's q/k/v, Llama's attention_bias / mlp_bias) are ordinary tensors under
  HF's names (`...q_proj.bias`): the model has them exactly when its config says so, so
  the same strict key check covers them on load and save.

Saving writes config.json, safetensors shards (+ index when there is more than one) and
copies the tokenizer files, first into a temporary sibling folder that is renamed into
place at the end, so a crash never leaves a half-written model where a loader looks.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .errors import UserError
from .config import ModelArgs, parse_dtype, read_config
from .model import Transformer, build_model

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.json", "generation_config.json")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(UserError):
    """Weights that do not fit the model. The message names the file and the tensors."""


def _is_ignored(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file, every entry checked against its dtype, its
    shape and the file's real size, so that no read can run past a lie."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header claims {n} bytes, "
                                  f"file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for key, meta in header.items():
        _check_entry(path, key, meta)
        meta["start"] = 8 + n + meta["data_offsets"][0]
    beyond = [(m["data_offsets"][1], k) for k, m in header.items() if 8 + n + m["data_offsets"][1] > size]
    if beyond:
        end, key = min(beyond)
        raise CheckpointError(f"{path}: truncated safetensors file: tensor '{key}' needs bytes up to "
                              f"{8 + n + end}, file has {size} (re-download or re-save it)")
    return header


def _check_entry(path: str, key: str, meta) -> None:
    """One header entry: a known dtype, a shape of sizes >= 0, and data_offsets [begin,
    end) whose length is exactly the bytes that dtype and shape need."""
    def bad(what):
        return CheckpointError(f"{path}: tensor '{key}': {what} (corrupt header; re-download or re-save it)")

    def is_count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(meta, dict):
        raise bad("header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in _ST_DTYPES:
        raise bad(f"unsupported dtype {dtype!r} (supported: {', '.join(_ST_DTYPES)})")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if offsets is None:
        raise bad("no data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with begin <= end")
    need = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != need:
        raise bad(f"data_offsets span {offsets[1] - offsets[0]} bytes but {dtype} {tuple(shape)} "
                  f"needs {need}")


def weight_files(model_dir: str) -> Dict[str, str]:
    """key -> file path, from the index if there is one, else from model.safetensors."""
    index = os.path.join(model_dir, INDEX)
    single = os.path.join(model_dir, SINGLE)
    if os.path.isfile(index):
        try:
            with open(index, "rb") as f:
                weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map values must be file names")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        return {k: single for k in read_safetensors_header(single)}
    pickles = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" (found {', '.join(sorted(pickles))}: pickle checkpoints are never loaded because "
            "unpickling runs code; convert them to safetensors first)") if pickles else ""
    raise CheckpointError(f"{model_dir}: neither {SINGLE} nor {INDEX} found{hint}")


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor):
    mod_path, _, leaf = key.rpartition(".")
    module = model.get_submodule(mod_path)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)


def _read_into(f, key: str, meta: dict, dtype: torch.dtype, device) -> torch.Tensor:
    """Read one tensor from an open file into a fresh buffer, then cast/move it."""
    file_dtype = _ST_DTYPES[meta["dtype"]]
    begin, end = meta["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(meta["start"])
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{f.name}: tensor '{key}': unexpected end of file (truncated "
                                  "while loading? re-download or re-save it)")
        got += n
    t = buf.view(file_dtype).reshape(meta["shape"])
    return t.to(device=device, dtype=dtype)


def load_state_into(model: Transformer, model_dir: str, dtype=torch.float32, device="cpu"):
    """Fill a (meta or real) model with the checkpoint in model_dir, strictly."""
    dtype = parse_dtype(dtype)
    files = weight_files(model_dir)
    headers = {}
    for path in sorted(set(files.values())):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in {INDEX} but missing")
        headers[path] = read_safetensors_header(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: p for k, p in files.items() if not _is_ignored(k)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = []
    for k in sorted(set(expected) & set(found)):
        meta = headers[found[k]].get(k)
        if meta is None:
            missing.append(f"{k} (index names {os.path.basename(found[k])}, which lacks it)")
        elif tuple(meta["shape"]) != expected[k]:
            wrong.append(f"{k}: file {tuple(meta['shape'])} vs model {expected[k]}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {'; '.join(wrong[:8])}")
        raise CheckpointError(f"{model_dir}: checkpoint does not match config.json: " + " | ".join(parts))
    by_file: Dict[str, list] = {}
    for k, p in found.items():
        by_file.setdefault(p, []).append(k)
    for path, keys in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for k in sorted(keys, key=lambda k: headers[path][k]["start"]):  # sequential reads
                _set_tensor(model, k, _read_into(f, k, headers[path][k], dtype, device))
    return model


def load_model(path: str, dtype=torch.float32, device="cpu") -> Transformer:
    """Load an HF Llama/Mistral/Qwen2 folder (config.json + safetensors) as a minispin model."""
    args = read_config(path)
    model = build_model(args, device="meta")
    load_state_into(model, path, dtype=dtype, device=device)
    model.eval()
    return model


def parse_size(size) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; write e.g. 5GB, 500MB or a byte count")
    unit = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2) or ""]
    return int(float(m.group(1)) * unit)


def _shards(state: Dict[str, torch.Tensor], max_bytes: int) -> Iterable[Dict[str, torch.Tensor]]:
    shard, size = {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shard and size + n > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[k] = t
        size += n
    if shard:
        yield shard


def save_model(model: Optional[Transformer], out_dir: str, tokenizer_from: Optional[str] = None,
               max_shard_size="5GB", dtype=None, state_dict: Optional[dict] = None,
               config: Optional[ModelArgs] = None) -> str:
    """Write an HF-format folder that transformers, vLLM, lm-eval and load_model read.

    state_dict/config let a distributed trainer pass gathered full weights without a
    local model. dtype casts the saved tensors (default: as they are).
    """
    config = config or model.config
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v for k, v in state.items() if not _is_ignored(k)}
    if dtype is not None:
        dtype = parse_dtype(dtype)
    tensors = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.to("cpu").contiguous()
    saved_dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())

    out_dir = os.path.abspath(out_dir.rstrip("/"))
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = list(_shards(tensors, parse_size(max_shard_size)))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config.to_hf(saved_dtype), f, indent=2)
    if tokenizer_from:
        src = tokenizer_from if os.path.isdir(tokenizer_from) else os.path.dirname(tokenizer_from)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    return replace_folder(tmp, out_dir)


def replace_folder(tmp: str, out_dir: str) -> str:
    """Put the finished folder tmp in out_dir's place by renames, so out_dir is at every
    moment either the old complete folder or the new one, never half written."""
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir

