"""What lets a training run stop anywhere and go on as if it had not: the resume key, the
RNG state, the newest intact checkpoint, and the metric lines past it.

* The resume key (`resume_key`) is what a checkpoint must agree on to be resumed: every
  TrainSettings field not declared bookkeeping (core/train.resume_settings), the number of
  steps, the mode, the data (a content fingerprint per source) and θ_t by the content
  fingerprint of its files (checkpoint.model_fingerprint), not its path: a model retrained
  at the same path is noticed, and a copied run folder resumes. `check_resume_key` names
  every difference.
* `intact_checkpoint`: the newest checkpoint whose files match their checksums (rank 0
  checks, the others follow); each damaged newer one is named on stderr and skipped.
* The same key is written into the export marker (minispin_export.json, under "training")
  when θ_{t+1} is exported (`trained_record`), so a re-run of a finished iteration compares
  it too (`check_trained`): with other settings it refuses, naming them (`--force` trains
  again), instead of saying "already trained" about a model other settings made.
  `key_differences` is the one place that spells a difference, for both.
* Hooks for tests: `add_hook("loss", fn(step, loss) -> loss)`, `add_hook("step_end",
  fn(trainer, step))` and `add_hook("ref_record", fn(reference, n))` (rank 0, after the n-th
  reference record is written) run inside every Trainer of the process; a test installs them
  (e.g. a NaN at step 5, a SIGKILL after step 5 or after 3 reference records) and removes
  them with `clear_hooks()`. Nothing in the loop reads the environment.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from . import distributed as D
from ..core.train import resume_settings
from .data import read_jsonl, write_jsonl_atomic
from .checkpoint import EXPORT_MARKER
from .errors import UserError, load_json_file

HOOKS: Dict[str, List[Callable]] = {"loss": [], "step_end": [], "ref_record": []}


def add_hook(kind: str, fn: Callable):
    """Install a test hook in every Trainer of this process (see the module docstring)."""
    HOOKS[kind].append(fn)


def clear_hooks():
    for fns in HOOKS.values():
        fns.clear()


class ResumeError(UserError):
    """A checkpoint that belongs to another run."""


def resume_key(cfg, device, total_steps: int, mode: str, theta_fp: str, info: dict) -> dict:
    """What a checkpoint must agree on to be resumed by this run (module docstring)."""
    key = resume_settings(cfg, device)
    key.update(total_steps=total_steps, mode=mode, theta=theta_fp,
               data={tag: v["sha"] for tag, v in info.get("fingerprints", {}).items()})
    return key


def key_differences(was: dict, now: dict, files: Dict[str, str], theta: str, trained_from: str,
                    keys: Optional[set] = None) -> List[str]:
    """What differs between two resume keys, one phrase each; `keys` limits the comparison
    (None: every key of either). trained_from names what `was` describes."""
    diff = []
    for k in sorted(keys if keys is not None else set(now) | set(was)):
        if k == "data":
            for tag in sorted(set(now.get(k) or {}) | set(was.get(k) or {})):
                a, b = (was.get(k) or {}).get(tag), (now.get(k) or {}).get(tag)
                if a != b:
                    what = "changed" if a and b else ("added" if b else "removed")
                    rows = "examples" if tag == "sft" else "pairs"
                    diff.append(f"the {rows} of {tag} ({files.get(tag, tag)}) {what}")
        elif k == "theta" and was.get(k) != now.get(k):
            diff.append(f"θ_t ({theta}) changed: its weights are not those {trained_from} was "
                        "trained from" if now.get(k) else f"θ_t ({theta}) is not a model folder")
        elif was.get(k) != now.get(k):
            diff.append(f"{k}: {was.get(k)!r} -> {now.get(k)!r}")
    return diff


def check_resume_key(path: str, was: dict, now: dict, info: dict, init_model: str, ckpt_root: str):
    """Refuse a checkpoint written with other data or settings, naming each difference."""
    files = {tag: v["file"] for tag, v in info.get("fingerprints", {}).items()}
    diff = key_differences(was, now, files, init_model, "the checkpoint")
    if diff:
        raise ResumeError(f"{path} was written by a run with other data or settings "
                          f"({'; '.join(diff)}); resuming would mix two runs. Restore them, or "
                          f"start fresh: delete {ckpt_root} (or use another --run-dir)")


class TrainedWithOtherSettings(UserError):
    """A finished iteration re-run with settings other than those it was trained with."""


def trained_record(export_dir: str) -> Optional[dict]:
    """The training record of an export ({"key", "theta", "files"}), or None when it has none
    (exported by an older minispin, or not by the trainer)."""
    try:
        rec = load_json_file(os.path.join(export_dir, EXPORT_MARKER)).get("training")
    except (UserError, OSError, AttributeError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), dict) else None


def check_trained(record: dict, now: dict, export_dir: str, theta: str, files: Dict[str, str],
                  keys: Optional[set] = None):
    """Refuse (exit 2) a re-run whose settings differ from those export_dir was trained with."""
    diff = key_differences(record["key"], now, files, theta, export_dir, keys)
    if diff and now.get("theta") != record["key"].get("theta") and record.get("theta") != theta:
        diff.append(f"it was trained from θ_t = {record.get('theta')}")
    if diff:
        raise TrainedWithOtherSettings(
            f"{export_dir} was trained with other settings than this command's ({'; '.join(diff)}); "
            "pass --force to train it again with these, or use another --run-dir or --out to keep both")


def rng_state(device: torch.device, noise_gen: Optional[torch.Generator]) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    if noise_gen is not None:
        st["noise"] = noise_gen.get_state()
    return st


def set_rng_state(st: dict, device: torch.device, noise_gen: Optional[torch.Generator]):
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)
    if "noise" in st and noise_gen is not None:
        noise_gen.set_state(st["noise"])


def trim_metrics(metrics_path: str, step: int, is_main: bool):
    """Keep metric lines of steps <= step (a resumed run rewrites the rest)."""
    if is_main and os.path.isfile(metrics_path):
        recs = [r for r in read_jsonl(metrics_path, repair=True) if r.get("step", 0) <= step]
        write_jsonl_atomic(metrics_path, recs)


def intact_checkpoint(ckpt_root: str, is_main: bool) -> Optional[str]:
    """The newest checkpoint whose files match their checksums (rank 0 checks, the others
    follow); each damaged newer one is named on stderr and skipped (a later save of its step
    replaces it). When none is intact the newest one's error stops the run: a run never
    starts over silently on top of checkpoints it cannot read."""
    chosen, errors = None, []
    if is_main:
        for path in D.checkpoints_newest_first(ckpt_root):
            try:
                D.verify_checkpoint(path)
            except D.TrainCheckpointError as e:
                errors.append(str(e))
                continue
            chosen = path
            break
        if chosen and errors:
            for e in errors:
                print(f"warning: skipping a damaged checkpoint: {e}", file=sys.stderr, flush=True)
            print(f"note: resuming from {chosen}, the newest intact checkpoint", file=sys.stderr, flush=True)
    first_error = errors[0] if errors else None
    chosen, first_error = D.broadcast_object((chosen, first_error))
    if chosen is None and first_error:
        raise D.TrainCheckpointError(first_error)
    return chosen
