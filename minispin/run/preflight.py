"""Preflight: what would otherwise fail hours into a run, checked in its first seconds.

train.py, generate.py and judge.py call one of `train_preflight`, `generate_preflight`,
`judge_preflight` once, after reading their settings and taking the run folder's lock, and
before any expensive stage (generation, judging, the reference pass, training, the
export). Each check refuses with one line naming the file, setting or fix (a UserError:
exit status 2):

* reporters: every reporter of `report_to` can start (TensorBoard: the package imports;
  W&B: the package imports and it is logged in — WANDB_API_KEY, or a netrc entry for its
  host — or WANDB_MODE is offline or disabled);
* folders: the run folder and the output can be created and written (a probe file in the
  nearest existing folder; a path under a regular file is named as such);
* room: θ_t's parameter count (from the safetensors headers, no weights loaded), the
  training dtype, the optimizer and `keep_checkpoints` give the checkpoints' size, the
  export dtype the export's; both are printed in one line and compared with the free space
  of each filesystem;
* the export target: not inside the run's working folders (iter<t>/, sft/, except their
  `model`), not θ_t, not a folder holding the run; and held by one run: a lock file beside
  it (`<out>.minispin.lock`, lock.RunLock) for the run's life, so a second run with the
  same --out is refused, naming the first; staging folders of dead exports beside it are
  removed;
* the judge: when a relabel/adaptive run will need an HTTP judge (its judged pairs are
  missing or out of date), one free authenticated request (GET <base URL>/models) must be
  answered, neither refused nor rejected;
* θ_t's weights are finite (checked while checkpoint.model_fingerprint hashes them, so a
  fingerprint is never recorded for NaN weights).

Under torchrun rank 0 checks and the other ranks stop with it.
"""
from __future__ import annotations

import contextlib
import netrc
import os
import shutil
import urllib.parse
from typing import Callable, Dict, List, Optional, Tuple

from . import distributed as D
from .errors import UserError

EXPORT_LOCK_SUFFIX = ".minispin.lock"
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_STATES = {"rmsprop": 1, "adamw": 2}  # tensors of the parameter's size per parameter


class PreflightError(UserError):
    """A run that would fail later, refused before its expensive stages."""


# ---------------------------------------------------------------------- reporters
def check_reporters(report_to: str):
    """Every reporter of report_to can start now (the package, and W&B's login)."""
    from .reporting import check_installed, parse_report_to
    check_installed(report_to)
    if "wandb" in parse_report_to(report_to):
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
            return
        host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        try:
            creds = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            creds = None
        if not (creds and creds[2]):
            raise PreflightError(f"report_to = wandb (--report-to wandb): W&B is not logged in (no WANDB_API_KEY, "
                                 f"no entry for {host} in {path}); run `wandb login`, set WANDB_API_KEY, or set "
                                 "WANDB_MODE=offline to log to disk only")


# ---------------------------------------------------------------------- folders
def _nearest_existing(path: str) -> str:
    """The deepest existing ancestor of path (path itself if it exists)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, what: str, fix: str):
    """path (a folder, or a file to create) can be created and written: each existing part
    of it is a folder, and a probe file can be made in the deepest one. Nothing is left."""
    base = _nearest_existing(path)
    target = os.path.abspath(path)
    if base != target and not os.path.isdir(base):
        raise PreflightError(f"{path}: {what} cannot be created there: {base} is a file, not a folder; {fix}")
    probe_dir = base if os.path.isdir(base) else os.path.dirname(base)
    probe = os.path.join(probe_dir, f".minispin-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"{path}: {what} is not writable ({probe_dir}: {e.strerror}); {fix}") from None


# ---------------------------------------------------------------------- room
def parameter_count(model_dir: str, lora_targets: Tuple[str, ...] = (), lora_rank: int = 0) -> Tuple[int, int]:
    """(all parameters, trainable ones) of a model folder, from its safetensors headers
    only. Under LoRA the trainable ones are rank x (in + out) per targeted weight."""
    from .checkpoint import read_safetensors_header, weight_files
    total, trainable = 0, 0
    for path in sorted(set(weight_files(model_dir).values())):
        for key, meta in read_safetensors_header(path).items():
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
            name = key.rsplit(".", 2)
            if lora_rank and len(meta["shape"]) == 2 and key.endswith(".weight") and name[-2] in lora_targets:
                trainable += lora_rank * (meta["shape"][0] + meta["shape"][1])
    return total, (trainable if lora_rank else total)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _used_by(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def check_room(needs: Dict[str, Tuple[int, str]]):
    """needs: folder -> (bytes, what for). Folders on one filesystem add up; each
    filesystem must have that much free."""
    by_fs: Dict[int, List[Tuple[str, int, str]]] = {}
    for folder, (n, what) in needs.items():
        base = _nearest_existing(folder)
        by_fs.setdefault(os.stat(base).st_dev, []).append((base, n, what))
    for entries in by_fs.values():
        base = entries[0][0]
        need = sum(n for _, n, _ in entries)
        free = shutil.disk_usage(base).free
        if need > free:
            parts = ", ".join(f"{what} {human(n)}" for _, n, what in entries)
            raise PreflightError(f"{base}: needs about {human(need)} ({parts}) but its filesystem has "
                                 f"{human(free)} free; free space there, lower keep_checkpoints, or use "
                                 "another --run-dir / --out")


# ---------------------------------------------------------------------- the export target
def check_export_place(out: str, run_dir: str, default_export: str, theta: Optional[str]):
    """The export folder is not one of the run's working folders, not θ_t, and does not
    hold the run folder: an export replaces its folder whole."""
    real = os.path.realpath(out)
    run = os.path.realpath(run_dir)

    def inside(a, b):  # a is b or lies in b
        return a == b or a.startswith(b.rstrip(os.sep) + os.sep)

    if inside(run, real):
        raise PreflightError(f"--out {out}: holds the run folder {run_dir}, which the export would replace; "
                             "choose an --out outside it")
    if theta and (inside(real, os.path.realpath(theta)) or inside(os.path.realpath(theta), real)):
        raise PreflightError(f"--out {out}: is θ_t ({theta}), which this run reads; choose another --out")
    if inside(real, run) and real != os.path.realpath(default_export):
        rel = os.path.relpath(real, run).split(os.sep)
        work = rel[0]
        if work.startswith("iter") or work == "sft":
            if not (len(rel) == 2 and rel[1] == "model"):
                raise PreflightError(f"--out {out}: lies inside the run's working folder {os.path.join(run_dir, work)} "
                                     "(checkpoints, pairs, logs); choose an --out outside "
                                     f"{os.path.join(run_dir, work)}, e.g. {os.path.join(run_dir, 'exports', work)}")


def clean_stale_staging(out: str, log: Callable):
    """Remove the staging folders that dead exports left beside out (save_model names them
    `<out>.tmp-<pid>` and marks them with checkpoint.STAGING_MARKER; nothing else is
    touched). Call it while holding the export lock."""
    from .checkpoint import STAGING_MARKER
    from .lock import ORPHAN, pid_running
    parent, name = os.path.split(os.path.abspath(out.rstrip("/")))
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        m = ORPHAN.match(n)
        path = os.path.join(parent, n)
        if (m and n == f"{name}.tmp-{m.group(1)}" and int(m.group(1)) != os.getpid()
                and not pid_running(int(m.group(1))) and os.path.isdir(path) and not os.path.islink(path)
                and os.path.isfile(os.path.join(path, STAGING_MARKER))):
            shutil.rmtree(path)
            log(f"note: removed {path}, a staging folder of an export whose process no longer runs")


@contextlib.contextmanager
def export_lock(out: str, run_dir: str, env, log: Callable):
    """Hold `<out>.minispin.lock` for the body (rank 0; the others wait for its verdict):
    a second run exporting to the same folder is refused, naming this run's folder."""
    from .lock import RunLock
    out = os.path.abspath(out.rstrip("/"))
    lock = RunLock(os.path.dirname(out), rank=env.rank, path=out + EXPORT_LOCK_SUFFIX, what=f"--out {out}",
                   owner={"run": os.path.abspath(run_dir)})
    err = None
    if env.is_main:
        try:
            lock.__enter__()
            clean_stale_staging(out, log)
        except UserError as e:
            err = str(e)
    err = D.broadcast_object(err)
    if err:
        raise PreflightError(err)
    try:
        yield
    finally:
        if env.is_main:
            lock.__exit__(None, None, None)


# ---------------------------------------------------------------------- θ_t
def check_theta(theta: str, run_dir: str, label: str):
    """θ_t's weights are finite: model_fingerprint checks every float tensor while it hashes
    the files (once per run; exports carry their fingerprint and were checked when saved)."""
    from .checkpoint import model_fingerprint
    from .layout import fingerprint_cache_path
    try:
        model_fingerprint(theta, fingerprint_cache_path(run_dir))
    except UserError as e:
        raise PreflightError(f"{label} = {theta}: {e}") from None


# ---------------------------------------------------------------------- the judge
def check_judge_endpoint(recipe, backend: str, log: Callable):
    """One free request to an HTTP judge (OpenAIJudge.check_endpoint): a refused
    connection or a rejected key now, as one line, instead of after generation."""
    if backend != "openai":
        return
    from ..study.judge import make_judge
    make_judge(recipe, "openai").check_endpoint()


# ---------------------------------------------------------------------- per tool
def _on_rank0(env, fn):
    err = None
    if env.is_main:
        try:
            fn()
        except UserError as e:
            err = str(e)
    err = D.broadcast_object(err)
    if err:
        raise PreflightError(err)


def checkpoint_bytes(recipe, trainable: int) -> int:
    """One training checkpoint: fp32 trainable weights and their optimizer state (sharded
    over the processes, so the total does not depend on their number)."""
    return trainable * 4 * (1 + OPTIMIZER_STATES.get(recipe.training.optimizer, 2))


@contextlib.contextmanager
def train_preflight(recipe, env, t: int, sft: bool = False, out: Optional[str] = None, force: bool = False,
                    dump_rows: Optional[str] = None, pairs_file: Optional[str] = None,
                    prev_pairs_file: Optional[str] = None, log: Callable = print, later=()):
    """train.py's checks (the module docstring), run with the run folder locked; the body
    runs holding the export lock. Nothing is checked for a run that will only say "already
    trained" or dump rows. later: [(t, recipe of iteration t)] of a chain's later iterations,
    checked now too: room for their exports, their judge endpoints."""
    from .layout import export_path, iter_dir, theta_path
    if sft:
        theta, work = recipe.model.path, os.path.join(recipe.run_dir, "sft")
        default_export = os.path.join(work, "model")
    else:
        theta, work = theta_path(recipe.run_dir, t, recipe.model.path), iter_dir(recipe.run_dir, t)
        default_export = export_path(recipe.run_dir, t)
    export = out or default_export
    if dump_rows:
        yield
        return
    _on_rank0(env, lambda: check_export_place(export, recipe.run_dir, default_export, theta))
    if os.path.isfile(os.path.join(export, "config.json")) and not force:
        yield
        return
    label = "θ_0" if sft else f"θ_{t}"
    tr = recipe.training

    def place():
        check_writable(recipe.run_dir, "the run folder", "make it writable or use another --run-dir")
        check_writable(export, "the export folder", "make it writable or choose another --out")

    def rest():
        if os.path.isfile(os.path.join(theta, "config.json")):
            check_theta(theta, recipe.run_dir, label)
            from ..core.lora import parse_targets
            targets = parse_targets(tr.lora_targets) if tr.lora_rank else ()
            params, trainable = parameter_count(theta, targets, tr.lora_rank)
            ckpt = checkpoint_bytes(recipe, trainable)
            ckpt_root = os.path.join(work, "ckpt")
            keep = tr.keep_checkpoints + 1  # the newest kept ones, and the one being written
            ckpts = max(0, keep * ckpt - (_used_by(ckpt_root) if os.path.isdir(ckpt_root) else 0))
            exp = params * BYTES.get(tr.export_dtype, 4)
            # a chain's later iterations each export one more model of this size, beside this one
            todo = [u for u, r in later if not os.path.isfile(os.path.join(export_path(r.run_dir, u), "config.json"))]
            log(f"preflight: {label} has {params:,} parameters ({trainable:,} trained); checkpoints about "
                f"{keep} x {human(ckpt)} (fp32 weights + {tr.optimizer} state, sharded over "
                f"{env.world_size} process{'es' if env.world_size > 1 else ''}), the export about "
                f"{human(exp)} ({tr.export_dtype})" + (f", x {1 + len(todo)} for iterations {t}"
                                                        f"{''.join(f', {u}' for u in todo)}" if todo else ""))
            check_room({work: (ckpts, "checkpoints"),
                        export: (exp * (1 + len(todo)), f"the export{'s' if todo else ''}")})
        if not sft:
            from .iteration import judging_needed
            asked = set()
            for u, r, pf, ppf in [(t, recipe, pairs_file, prev_pairs_file)] + [(u, r, None, None) for u, r in later]:
                endpoint = (r.fixes.judge_backend, r.fixes.judge_base_url, r.fixes.judge_model)
                if endpoint not in asked and judging_needed(r, u, pf, ppf):
                    asked.add(endpoint)
                    check_judge_endpoint(r, r.fixes.judge_backend, log)

    _on_rank0(env, place)
    with export_lock(export, recipe.run_dir, env, log):
        _on_rank0(env, rest)
        yield


def generate_preflight(recipe, env, theta: str, out: str, label: str):
    """generate.py's checks: the pairs file can be written, θ_t's weights are finite."""
    def checks():
        check_writable(out, "the pairs file", "make its folder writable or use another --out / --run-dir")
        if os.path.isfile(os.path.join(theta, "config.json")):
            check_theta(theta, recipe.run_dir, label)
    _on_rank0(env, checks)


def judge_preflight(recipe, backend: str, pairs_file: str, out: str, cache: str, log: Callable):
    """judge.py's checks (one process): its output and cache can be written, the cache is
    one, an HTTP judge answers."""
    from .iteration import check_cache_path
    check_writable(out, "the judged file", "make its folder writable or use another --out")
    check_writable(cache, "the score cache", "make its folder writable or use another --cache")
    check_cache_path(cache, pairs_file, out)
    check_judge_endpoint(recipe, backend, log)
