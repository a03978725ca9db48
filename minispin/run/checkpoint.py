"""Hugging Face safetensors checkpoints in and out, without transformers.

Loading
* The files are named by the folder, never guessed: `model.safetensors.index.json`
  (sharded; its weight_map says which file holds each tensor) or `model.safetensors`.
  We never glob *.safetensors (Mistral repos also ship `consolidated.safetensors`) and
  never unpickle (.bin/.pt files are refused with a message saying so).
* The model is built on the meta device, so it has no storage until loading fills it.
  A tensor kept as stored (same dtype, on the CPU) is a view of the file's private
  (copy-on-write) memory map; one that is cast or moved is read into a buffer with plain
  `readinto` calls and cast, so mapped pages never pile up beside converted copies. Peak
  memory stays close to the size of the weights (bench/bench_load.py measures it).
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
Files get the process umask's modes (0644 under umask 022; safetensors itself writes 0600
temporaries, so replace_folder sets every file's mode): nothing copies a source's mode.

Exports never delete what minispin did not write: a folder is replaced only if it is empty
or holds minispin's export marker, `minispin_export.json`, which every export writes. The
marker also records the sha256 of every file and one content fingerprint of the model
(config.json + weights): `model_fingerprint` reads it back instead of hashing again, and
hashes any other folder (θ_0) itself. Derived files (pairs, reference log-probs,
checkpoints) record that fingerprint, so a model retrained at the same path is noticed and
a copied run folder, whose content is unchanged, still matches.

A model folder read from disk is treated as untrusted: the index may only name weight files
that resolve inside the folder (no `../`, no symlink out of it; a Hugging Face cache
snapshot's links into its own `blobs/` are the one exception), and config.json's sizes are
checked against the tensors' shapes in the headers before the model is built.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .errors import UserError, json_loads, load_json_file, writing
from ..core.lora import LoRASettings, is_adapter_key
from ..core.model import ModelArgs
from .config import hf_config, parse_dtype, read_config
from ..core.model import Transformer, build_model

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


class ExportError(UserError):
    """An export target that minispin did not write (it is never deleted)."""


EXPORT_MARKER = "minispin_export.json"
EXPORT_FORMAT = "minispin-export"


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
            header = json_loads(f.read(n))
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
                weight_map = json_loads(f.read().decode("utf-8"))["weight_map"]
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map values must be file names")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return {k: _inside(model_dir, v, index) for k, v in weight_map.items()}
    if os.path.isfile(single):
        return {k: _inside(model_dir, SINGLE, single) for k in read_safetensors_header(_inside(model_dir, SINGLE, single))}
    pickles = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" (found {', '.join(sorted(pickles))}: pickle checkpoints are never loaded because "
            "unpickling runs code; convert them to safetensors first)") if pickles else ""
    raise CheckpointError(f"{model_dir}: neither {SINGLE} nor {INDEX} found{hint}")


def _inside(model_dir: str, name: str, named_by: str) -> str:
    """model_dir/name, refused unless it resolves inside model_dir: a weight file never
    comes from elsewhere (`../`, an absolute path, a symlink out). The one link allowed is a
    Hugging Face cache snapshot's (snapshots/<rev>/x -> ../../blobs/<sha>)."""
    path = os.path.join(model_dir, name)
    real, root = os.path.realpath(path), os.path.realpath(model_dir)
    roots = [root]
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) == "snapshots":  # an HF hub cache: models--org--name/snapshots/<rev>
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    if os.path.isabs(name) or not any(real == r or real.startswith(r + os.sep) for r in roots):
        raise CheckpointError(f"{named_by}: weight file {name!r} resolves to {real}, outside the model "
                              f"folder {model_dir}; a model folder's files must lie inside it")
    return path


def check_config_sizes(args: ModelArgs, model_dir: str):
    """config.json's sizes against the real tensor shapes of the headers, BEFORE the model is
    built: a config that claims 10^7 layers or a huge vocabulary is refused in milliseconds
    instead of allocating (or building meta modules) for hours."""
    files = weight_files(model_dir)
    config = os.path.join(model_dir, "config.json")
    layers = {int(m.group(1)) for k in files if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    n = max(layers) + 1 if layers else 0
    if args.n_layers != n:
        raise CheckpointError(f"{config}: num_hidden_layers is {args.n_layers}, but the weight files "
                              f"hold {n} layers; fix config.json or re-download the model")
    key = "model.embed_tokens.weight"
    if key in files:
        path = files[key]
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in {INDEX} but missing")
        meta = read_safetensors_header(path).get(key)
        want = [args.vocab_size, args.dim]
        if meta is not None and meta["shape"] != want:
            raise CheckpointError(f"{config}: vocab_size x hidden_size is {want[0]} x {want[1]}, but "
                                  f"{os.path.basename(path)} holds {key} as {meta['shape'][0] if meta['shape'] else '?'} "
                                  f"x {meta['shape'][1] if len(meta['shape']) > 1 else '?'}; fix config.json "
                                  "or re-download the model")


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


MADV_POPULATE_READ = 22   # Linux >= 5.14; Python's mmap module names it from 3.13 on


def _populate(mm: mmap.mmap):
    """Map every page of the file at once (read faults only: copy-on-write stays unbroken),
    instead of one page fault per 4 KiB page at first touch; a kernel without it skips."""
    try:
        mm.madvise(getattr(mmap, "MADV_POPULATE_READ", MADV_POPULATE_READ))
    except (OSError, ValueError, AttributeError):
        pass


def _mapped(mm: mmap.mmap, path: str, key: str, meta: dict) -> Optional[torch.Tensor]:
    """One tensor as a view of the file's private (copy-on-write: a weight changed in place
    never reaches the file) memory map, or None when its bytes are not aligned for a view."""
    file_dtype = _ST_DTYPES[meta["dtype"]]
    begin, end = meta["data_offsets"]
    if end == begin or meta["start"] % file_dtype.itemsize:
        return None
    try:
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=meta["start"])
    except ValueError:
        raise CheckpointError(f"{path}: tensor '{key}': unexpected end of file (truncated "
                              "while loading? re-download or re-save it)") from None
    return raw.view(file_dtype).reshape(meta["shape"])


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
    # A tensor that stays as stored (same dtype, CPU) becomes a view of the file's memory
    # map: no copy, and no zero-filled page per page of a fresh buffer (reading 397 MiB into
    # buffers took 0.41 s against transformers' mapped 0.09 s; bench/bench_load.py). A
    # tensor that is cast or moved is read into a buffer that dies after the cast, so the
    # mapped pages of a converted checkpoint never pile up beside their copies.
    mapped = torch.device(device).type == "cpu"
    for path, keys in by_file.items():
        with open(path, "rb", buffering=0) as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if mapped else None  # views keep it
            if mm is not None:
                _populate(mm)
            for k in sorted(keys, key=lambda k: headers[path][k]["start"]):  # sequential reads
                meta = headers[path][k]
                view = _mapped(mm, path, k, meta) if mapped and _ST_DTYPES[meta["dtype"]] == dtype else None
                _set_tensor(model, k, view if view is not None else _read_into(f, k, meta, dtype, device))
    return model


def load_model(path: str, dtype=torch.float32, device="cpu") -> Transformer:
    """Load an HF Llama/Mistral/Qwen2 folder (config.json + safetensors) as a minispin model."""
    args = read_config(path)
    check_config_sizes(args, path)
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
               config: Optional[ModelArgs] = None, training: Optional[dict] = None) -> str:
    """Write an HF-format folder that transformers, vLLM, lm-eval and load_model read.

    state_dict/config let a distributed trainer pass gathered full weights without a
    local model. dtype casts the saved tensors (default: as they are). training: how the
    trainer made it (resume.py), kept in the export marker.
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
    with staging_folder(out_dir) as tmp:
        shards = list(_shards(tensors, parse_size(max_shard_size)))
        if len(shards) == 1:
            save_safetensors(shards[0], os.path.join(tmp, SINGLE))
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, os.path.join(tmp, name))
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with writing(os.path.join(tmp, INDEX)), open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with writing(os.path.join(tmp, "config.json")), open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(config, saved_dtype), f, indent=2)
        if tokenizer_from:
            src = tokenizer_from if os.path.isdir(tokenizer_from) else os.path.dirname(tokenizer_from)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    # copyfile, not copy: the process umask sets the mode, not the source's
                    with writing(os.path.join(tmp, name)):
                        shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        return replace_folder(tmp, out_dir, training)


STAGING_MARKER = ".minispin-staging"


@contextlib.contextmanager
def staging_folder(out_dir: str):
    """A fresh `<out_dir>.tmp-<pid>` folder to build an export in, marked with STAGING_MARKER
    so that a later run may recognise it as minispin's and remove it once its process is
    dead (preflight.clean_stale_staging); removed at once if the body fails (a full disk
    never leaves half an export behind)."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        os.makedirs(tmp)
        with open(os.path.join(tmp, STAGING_MARKER), "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# an io::Error inside safetensors' message: Rust's Debug form (`Os { code: 28, ...`) or its
# Display form (`... (os error 28)`)
_OS_ERROR = re.compile(r"\bOs \{ code: (\d+)|\(os error (\d+)\)")


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str):
    """safetensors' save_file, then its header read back: the library's writer can report a
    failed write (a full disk) as its own error, or not at all, so a file shorter than its
    header promises is an OSError naming it, never part of a finished export."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except Exception as e:  # safetensors_rust.SafetensorError: the OSError's code in its text
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m.group(1) or m.group(2))
        raise OSError(code, os.strerror(code), path) from None
    try:
        read_safetensors_header(path)
    except CheckpointError:
        raise OSError(errno.EIO, "written short (is the disk full?)", path) from None


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 16 MiB chunks (exports, θ_t fingerprints, checkpoint rank files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint_of(hashes: Dict[str, str]) -> str:
    """One fingerprint of a model from its files' hashes: config.json and the weights
    (tokenizer files travel beside them but do not change log-probs of token ids)."""
    keep = {n: h for n, h in hashes.items() if n == "config.json" or n.endswith(".safetensors")
            or n == INDEX}
    return hashlib.sha256(json.dumps(sorted(keep.items())).encode()).hexdigest()[:32]


def check_export_target(out_dir: str):
    """Refuse (one line, exit 2) to replace anything minispin did not export: out_dir may be
    missing, an empty folder, or a folder carrying EXPORT_MARKER. Call it before the work
    that leads to the export, so a long run is not lost at its end."""
    if not os.path.lexists(out_dir):
        return
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a folder; minispin writes its export as a "
                          "folder there and never deletes what it did not write: choose another --out")
    names = os.listdir(out_dir)
    if names and EXPORT_MARKER not in names:
        raise ExportError(f"{out_dir}: not empty and not written by minispin (no {EXPORT_MARKER}); "
                          "minispin never deletes what it did not write: choose another --out, or "
                          "empty that folder yourself")


def replace_folder(tmp: str, out_dir: str, training: Optional[dict] = None) -> str:
    """Put the finished folder tmp in out_dir's place by renames, so out_dir is at every
    moment either the old complete folder or the new one, never half written. tmp gets the
    export marker (with every file's sha256) first; out_dir is checked by
    check_export_target, so a folder minispin did not write is never deleted."""
    check_export_target(out_dir)
    umask = os.umask(0)  # read it (the only way), and put it back at once
    os.umask(umask)
    for n in os.listdir(tmp):  # safetensors writes 0600 temporaries: give every file the umask's mode
        if os.path.isfile(os.path.join(tmp, n)):
            os.chmod(os.path.join(tmp, n), 0o666 & ~umask)
    if os.path.exists(os.path.join(tmp, STAGING_MARKER)):
        os.remove(os.path.join(tmp, STAGING_MARKER))
    hashes = {n: file_sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))
              if os.path.isfile(os.path.join(tmp, n)) and n != EXPORT_MARKER}
    marker = {"format": EXPORT_FORMAT, "version": 1, "fingerprint": _fingerprint_of(hashes),
              "files": {n: {"size": os.path.getsize(os.path.join(tmp, n)),
                            "mtime_ns": os.stat(os.path.join(tmp, n)).st_mtime_ns, "sha256": h}
                        for n, h in hashes.items()}}
    if training is not None:
        marker["training"] = training
    with writing(os.path.join(tmp, EXPORT_MARKER)), open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
        json.dump(marker, f, indent=1)
    os.chmod(tmp, 0o777 & ~umask)
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def sha256_finite(path: str) -> str:
    """sha256 of a .safetensors file (the same as file_sha256), reading every float tensor
    on the way to check that it is finite: a NaN or infinite weight is a CheckpointError
    naming the file and the tensor. One sequential pass, 16 MiB at a time."""
    header = read_safetensors_header(path)
    spans = sorted((m["start"], m["start"] + m["data_offsets"][1] - m["data_offsets"][0], k, m["dtype"])
                   for k, m in header.items() if m["dtype"] in _FLOAT_DTYPES)
    h, pos, chunk = hashlib.sha256(), 0, 1 << 24

    def check(buf: bytearray, key: str, dtype: str):
        if buf and not bool(torch.isfinite(torch.frombuffer(buf, dtype=_ST_DTYPES[dtype])).all()):
            raise CheckpointError(f"{path}: tensor '{key}' holds NaN or infinite values; these weights "
                                  "cannot be trained or sampled from: re-download or re-export the model")

    with open(path, "rb") as f:
        def advance(to):  # hash [pos, to) without looking at it
            nonlocal pos
            while pos < to:
                piece = f.read(min(chunk, to - pos))
                if not piece:
                    return
                h.update(piece)
                pos += len(piece)

        for start, end, key, dtype in spans:
            size = _ST_DTYPES[dtype].itemsize
            if start < pos:  # overlaps one already read (an odd header): check it on its own
                f.seek(start)
                check(bytearray(f.read(end - start)), key, dtype)
                f.seek(pos)
                continue
            advance(start)
            while pos < end:
                buf = bytearray(min(chunk // size * size, end - pos))
                got = f.readinto(buf)
                h.update(memoryview(buf)[:got])
                pos += got
                check(buf[:got - got % size], key, dtype)
                if got < len(buf):
                    break
        advance(os.path.getsize(path))
    return h.hexdigest()


_FP_CACHE: Dict[tuple, str] = {}


def _unchanged(path: str, recorded: dict) -> bool:
    """The file still has the size and modification time the marker recorded: other bytes of
    the same size copied over it (a new mtime) make the marker's hashes untrusted."""
    st = os.stat(path)
    return st.st_size == recorded["size"] and st.st_mtime_ns == recorded["mtime_ns"]


def model_fingerprint(model_dir: str, cache_path: Optional[str] = None) -> str:
    """A content fingerprint of a model folder (config.json + weight files): read from its
    export marker when the listed files are all there with their recorded sizes and
    modification times (a marker without them is not trusted), else the
    files are hashed — once per process, and once per run when cache_path (a JSON file in
    the run folder) remembers it for the files' (path, size, mtime): a copied folder gets
    new mtimes and is hashed again, so the cache never vouches for other content."""
    marker = os.path.join(model_dir, EXPORT_MARKER)
    if os.path.isfile(marker):
        try:
            m = load_json_file(marker)
            files = m["files"]
            if (m.get("format") == EXPORT_FORMAT and isinstance(m.get("fingerprint"), str)
                    and all(_unchanged(os.path.join(model_dir, n), f) for n, f in files.items())):
                return m["fingerprint"]
        except (UserError, OSError, KeyError, TypeError, AttributeError):
            pass  # unreadable or stale marker: hash the files
    names = ["config.json"] + sorted({os.path.relpath(p, model_dir) for p in weight_files(model_dir).values()})
    if os.path.isfile(os.path.join(model_dir, INDEX)):
        names.append(INDEX)
    stats = tuple((n, os.stat(os.path.join(model_dir, n)).st_size, os.stat(os.path.join(model_dir, n)).st_mtime_ns)
                  for n in names if os.path.isfile(os.path.join(model_dir, n)))
    key = (os.path.realpath(model_dir), stats)
    if key in _FP_CACHE:
        return _FP_CACHE[key]
    saved = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            saved = load_json_file(cache_path)
        except UserError:
            saved = {}
    # "finite": entries recorded while the weights were checked (sha256_finite) as they were hashed
    entry = json.dumps([key[0], [list(x) for x in stats], "finite"])
    fp = saved.get(entry) if isinstance(saved, dict) else None
    if not isinstance(fp, str):
        fp = _fingerprint_of({n: (sha256_finite if n.endswith(".safetensors") else file_sha256)(
            os.path.join(model_dir, n)) for n, _, _ in stats})
        if cache_path:
            saved = dict(saved) if isinstance(saved, dict) else {}
            saved[entry] = fp
            tmp = f"{cache_path}.tmp-{os.getpid()}"
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            try:
                with writing(cache_path), open(tmp, "w") as f:
                    json.dump(saved, f)
                os.replace(tmp, cache_path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    _FP_CACHE[key] = fp
    return fp


# ------------------------------------------------------------------ LoRA adapters in peft's format
PEFT_PREFIX = "base_model.model."          # peft's key prefix for a causal LM
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapters under peft's names: base_model.model.<our key>."""
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()
            if is_adapter_key(k)}


def peft_config(settings: LoRASettings, base_model: str) -> dict:
    """adapter_config.json as peft's LoraConfig writes it, for the fields that matter."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": sorted(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None}


def save_peft_adapter(out_dir: str, state: Dict[str, torch.Tensor], settings: LoRASettings,
                      base_model: str) -> str:
    """Write the adapters of a full state dict as a peft adapter folder (temporary folder,
    then rename, so a crash never leaves half an adapter)."""
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    with staging_folder(out_dir) as tmp:
        save_safetensors(peft_state_dict(state), os.path.join(tmp, ADAPTER_WEIGHTS))
        with writing(os.path.join(tmp, ADAPTER_CONFIG)), open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_config(settings, base_model), f, indent=2)
        return replace_folder(tmp, out_dir)
