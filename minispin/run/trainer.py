"""The training loop: batches -> reference -> spin_step -> optimizer -> metrics and checkpoints.

This is the only file where the maths (loss.py, model.py, noise.py) meets the distributed
machinery (distributed.py). One SPIN iteration, or an SFT run, is one `Trainer.run()`:

1. Load θ_t sharded over all ranks (FSDP2, fp32 master weights, bf16 compute on GPU).
2. The reference θ_t. `ref_mode = "precompute"` (default): before the first step the
   policy IS θ_t, so it computes log p_θt(y|x) and log p_θt(y'|x) of every pair once
   (teacher-forced, eval mode, no gradients) and stores them in iter<t>/ref_logps.jsonl,
   keyed by "<source>/<pair id>" with a fingerprint of the tokens and the noise (a changed
   pair is recomputed, never silently reused). `ref_mode = "online"` keeps a frozen sharded
   copy of θ_t and recomputes the reference every step, as the original SPIN code did.
3. The data order is a function of (seed, epoch) only: each epoch is a seeded permutation
   of all pairs, cut into global batches of `batch_size` pairs (an incomplete last batch is
   dropped; `last_batch = "fill"` keeps it, completed with the epoch's first pairs, as HF
   Trainer under accelerate did for uclaml/SPIN and the study: steps per epoch = ceil). A global batch is dealt to ranks and accumulation steps in micro-batches of
   `micro_batch_size` pairs; each micro-batch's loss is Σ losses / batch_size (× world
   size, because FSDP averages gradients over ranks), so the gradient is that of the mean
   over the global batch whatever the number of processes. That is why 1, 2 or 16
   processes trace the same losses, and why resuming needs only the step number.
4. Per micro-batch: loss.spin_step — ONE forward of the [real; generated] rows, log-probs
   in fp32, the SPIN loss with the batch's swap flags — or loss.sft_step for --sft.
5. Optimizer step with gradient clipping; RMSprop (SPIN's choice) or AdamW; a linear (or
   cosine / constant) schedule with warmup. The step's metrics are a named dict, summed
   over the global batch with one all-reduce, appended to metrics.jsonl by rank 0
   (and to TensorBoard / W&B as report_to asks: MetricsLog, minispin/run/reporting.py).
6. A non-finite loss or gradient norm stops the run BEFORE the optimizer step, with a
   message naming the step, the batch and the last good checkpoint, which stays intact.
7. Checkpoints every `checkpoint_every` steps (model, optimizer, scheduler, step, RNG and a
   fingerprint of the data and settings); re-running the same command resumes from the
   newest intact one (a damaged newest checkpoint is skipped, saying so), and refuses one
   written from other data or settings. At the end the full state
   dict is gathered and written as an HF folder (atomically): θ_{t+1}.

LoRA (`lora_rank > 0`, lora.py): θ_t is loaded frozen (in the compute dtype unless
`lora_base_dtype` says otherwise) with fp32 adapters that alone train and have optimizer
state; the reference is the same model with its adapters off (no second copy online);
checkpoints hold the adapters and their optimizer state; the export writes the adapter in
peft's format (work_dir/adapter) and then the merged θ_{t+1}.

The study's noise (fixes.py decides, noise.py draws): each pair's "noise" σ goes on the
reference logits of its answers on the recipe's noise side, drawn once per answer
("frozen") or anew at every step ("fresh"); NEFTune is a hook on the policy's embeddings.

Settings: the loop reads only `TrainSettings` (below), a typed dataclass that iteration.py
builds from a recipe; it never sees the recipe. The resume key is derived from it: every
field is in the key unless declared `resume=False` (bookkeeping that cannot change a loss),
so a setting added later is checked on resume without anyone remembering to list it. θ_t
enters the key, and the reference log-probs' fingerprints, by the content fingerprint of its
files (checkpoint.model_fingerprint), not its path: a model retrained at the same path is
noticed, and a copied run folder resumes.

Hooks for tests: `add_hook("loss", fn(step, loss) -> loss)` and `add_hook("step_end",
fn(trainer, step))` run inside every Trainer of the process; a test installs them (e.g. a
NaN at step 5, a SIGKILL after step 5) and removes them with `clear_hooks()`. Nothing in
the loop reads the environment.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch

from . import distributed as D
from ..core import lora
from . import reporting
from .checkpoint import check_export_target, model_fingerprint, save_model, save_peft_adapter
from .config import parse_dtype, read_config
from .data import JsonlAppender, read_jsonl, write_jsonl_atomic
from .errors import StoppedError, UserError, redact_all
from .layout import fingerprint_cache_path
from .rows import TokenizedPair, collate_pairs, collate_sft
from ..core.loss import answer_logps, sft_step, spin_step
from ..core.noise import add_neftune, noised_answer_logps, reference_noise
from ..core.optim import CompiledRMSprop

if TYPE_CHECKING:  # the type only: the trainer never reads a recipe
    from .recipe import NoiseSettings

_HOOKS: Dict[str, List[Callable]] = {"loss": [], "step_end": []}


def add_hook(kind: str, fn: Callable):
    """Install a test hook in every Trainer of this process (see the module docstring)."""
    _HOOKS[kind].append(fn)


def clear_hooks():
    for fns in _HOOKS.values():
        fns.clear()


class TrainingError(StoppedError):
    """The run cannot go on (a non-finite loss); the message says why and what is left."""


class ResumeError(UserError):
    """A checkpoint that belongs to another run."""


class MetricsLog:
    """Where each optimizer step's metrics go, on rank 0: a line of metrics.jsonl and the
    same numbers to each reporter of report_to (TensorBoard, W&B: minispin/run/reporting.py).
    Every step is flushed, so a crash loses nothing a checkpoint would not replay (JSONL
    lines past a resumed step are trimmed by the trainer before)."""

    def __init__(self, work_dir: str, report_to: str = "none", resume_step: int = 0, enabled: bool = True,
                 recipe: Optional[dict] = None):
        """recipe: the run's resolved recipe as a dict (as_dict), which names and configures
        a W&B run; the trainer itself never reads it."""
        self.jsonl = open(os.path.join(work_dir, "metrics.jsonl"), "a") if enabled else None
        label = dict(name=f"{recipe['name']}-{os.path.basename(work_dir)}", group=recipe["name"],
                     config=recipe) if recipe else {}
        self.reporters = reporting.open_reporters(report_to, work_dir, resume_step, **label) if enabled else []

    def write(self, rec: dict):
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        reporting.report(self.reporters, rec)

    def close(self):
        for f in [self.jsonl] + self.reporters:
            if f:
                f.close()


def _bookkeeping():
    """A TrainSettings field that cannot change any loss or weight: left out of the resume key."""
    return field(metadata={"resume": False})


@dataclass(frozen=True)
class TrainSettings:
    """Everything the training loop reads. Each field is a recipe key of the same name
    (iteration.train_settings copies them), plus the run's seed and its parsed noise.
    A field is in the resume key unless it is declared with _bookkeeping()."""
    beta: float
    loss_type: str
    label_smoothing: float
    ref_mode: str
    optimizer: str
    lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    optim_eps: float
    rmsprop_alpha: float
    lr_scheduler: str
    warmup_ratio: float
    epochs: int
    batch_size: int
    last_batch: str  # drop | fill: how many steps an epoch has, and which pairs the last one sees
    max_grad_norm: float
    mixed_precision: str  # in the key as the precision it resolves to on this device
    fp32_logits: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    lora_base_dtype: str
    seed: int
    noise: "NoiseSettings"  # what the fixes do to each pair (swap, σ) is in the data fingerprint
    # bookkeeping: any process count, any micro-batching, any logging trains alike
    max_steps: int = _bookkeeping()  # what it changes, the number of steps, is in the key itself
    micro_batch_size: int = _bookkeeping()
    ref_batch_size: int = _bookkeeping()
    activation_checkpointing: bool = _bookkeeping()
    compile_train: bool = _bookkeeping()  # the same maths compiled: checkpoints move between both
    report_to: str = _bookkeeping()
    checkpoint_every: int = _bookkeeping()
    keep_checkpoints: int = _bookkeeping()
    keep_checkpoints_after_export: bool = _bookkeeping()
    export_dtype: str = _bookkeeping()

    def resume_settings(self, device) -> dict:
        """{field: value} of every field a checkpoint must agree on."""
        out = {}
        for f in fields(self):
            if f.metadata.get("resume", True):
                v = getattr(self, f.name)
                out[f.name] = asdict(v) if hasattr(v, "__dataclass_fields__") else v
        mp = D.mixed_precision_policy(self.mixed_precision, torch.device(device))
        out["mixed_precision"] = "fp32" if mp is None else "bf16"
        return out


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    per_round = micro_batch_size * world_size
    if batch_size % per_round:
        raise UserError(
            f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size} x "
            f"{world_size} processes = {per_round}; pick --batch-size or --micro-batch-size so "
            "that it is (the global batch is fixed so that any process count trains alike)")
    return batch_size // per_round


def lr_lambda(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr before optimizer step `s` (0-based), as transformers'
    get_{linear,cosine,constant}_schedule_with_warmup define it."""
    def f(s: int) -> float:
        if s < warmup_steps:
            return s / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def epoch_steps(n: int, batch_size: int, last_batch: str) -> int:
    """Optimizer steps per epoch over n pairs: floor (last_batch "drop": the incomplete last
    batch is dropped) or ceil ("fill": it is completed, as HF Trainer keeps it)."""
    return -(-n // batch_size) if last_batch == "fill" else n // batch_size


def global_batch(n: int, step: int, batch_size: int, steps_per_epoch: int, seed: int) -> List[int]:
    """Indices (into the n pairs) of optimizer step `step` (0-based): epoch e is a fresh
    permutation seeded by seed + e, cut into global batches in order."""
    epoch, b = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    idx = perm[b * batch_size:(b + 1) * batch_size].tolist()
    if len(idx) < batch_size:   # last_batch = "fill": accelerate's even_batches wraps to the start
        idx += perm[:batch_size - len(idx)].tolist()
    return idx


def items_fingerprint(items: List[TokenizedPair]) -> str:
    """A hash of the rows a run trains on: pair keys, token ids, swap and noise."""
    h = hashlib.sha256()
    for p in items:
        h.update(json.dumps([p.key, p.prompt, p.real, p.generated, p.swap, p.noise,
                             p.attention]).encode())
    return h.hexdigest()[:16]


class Trainer:
    """One SPIN iteration. (SFTTrainer below changes the step and its metrics, nothing else.)"""

    mode = "spin"

    def __init__(self, settings: TrainSettings, env: D.DistEnv, items: List[TokenizedPair], init_model: str,
                 work_dir: str, export_dir: str, pad_id: int, info: Optional[dict] = None,
                 progress: bool = True):
        self.cfg, self.env, self.items = settings, env, items
        self.init_model, self.work_dir, self.export_dir = init_model, work_dir, export_dir
        self.pad_id = pad_id
        self.info = info or {}
        self.progress = progress
        self.noise = settings.noise
        check_export_target(export_dir)  # refused now, not after hours of training
        # θ_t by content (module docstring): rank 0 hashes (cached in the run folder), all use it
        run_dir = os.path.dirname(os.path.abspath(work_dir))  # work_dir is iter<t>/ or sft/
        fp = model_fingerprint(init_model, fingerprint_cache_path(run_dir)) if env.is_main else None
        self.theta_fp = D.broadcast_object(fp) if D.dist.is_initialized() else fp
        self.ckpt_root = os.path.join(work_dir, "ckpt")
        self.metrics_path = os.path.join(work_dir, "metrics.jsonl")
        self.ref_path = os.path.join(work_dir, "ref_logps.jsonl")
        cfg = self.cfg
        self.accum = accumulation_steps(cfg.batch_size, cfg.micro_batch_size, env.world_size)
        # an epoch's steps: floor (drop the incomplete last batch) or ceil (fill it)
        self.steps_per_epoch = epoch_steps(len(items), cfg.batch_size, cfg.last_batch)
        if len(items) < cfg.batch_size:
            raise UserError(f"{len(items)} training examples are fewer than one global batch "
                            f"(batch_size {cfg.batch_size}); lower --batch-size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.ref_cache: Dict[str, tuple] = {}
        self.ref_model = None
        self.policy = None  # set by run(); step_end hooks may look at it
        # LoRA (lora.py): adapters on a frozen base; None = every weight trains
        self.lora = (lora.LoRASettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                       lora.parse_targets(cfg.lora_targets))
                     if cfg.lora_rank > 0 else None)
        self.adapter_dir = os.path.join(work_dir, "adapter")
        if self.lora:
            check_export_target(self.adapter_dir)
        self.noise_gen: Optional[torch.Generator] = None
        self.step = 0  # the optimizer step being computed (0-based)

    def log(self, *msg):
        if self.env.is_main:
            print(*msg, flush=True)

    # ------------------------------------------------------------------ data order
    def global_batch(self, step: int) -> List[int]:
        """Indices (into self.items) of the pairs of optimizer step `step` (0-based)."""
        return global_batch(len(self.items), step, self.cfg.batch_size, self.steps_per_epoch, self.cfg.seed)

    def my_micro_batches(self, step: int) -> List[List[int]]:
        """This rank's micro-batches: micro j = a * world + rank for a in accumulation."""
        idx, m, W = self.global_batch(step), self.cfg.micro_batch_size, self.env.world_size
        return [idx[(a * W + self.env.rank) * m:(a * W + self.env.rank + 1) * m]
                for a in range(self.accum)]

    # ------------------------------------------------------------------ reference
    def _fingerprint(self, p: TokenizedPair) -> str:
        noise = [p.noise, self.noise.side, self.noise.seed] if p.noise else []
        # the numerics too: a bf16 or bf16-logit log-prob is not the fp32 one
        numerics = [self.cfg.mixed_precision, self.cfg.fp32_logits, torch.device(self.env.device).type]
        blob = json.dumps([self.theta_fp, p.prompt, p.real, p.generated, noise, numerics]
                          + ([p.attention] if p.attention is not None else []))
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def _ref_forward(self, model, batch: dict) -> torch.Tensor:
        """(2B,) log p_θt of a [real; generated] batch, with the pairs' reference noise."""
        dev = self.env.device
        ids, mask = batch["input_ids"].to(dev), batch["loss_mask"].to(dev)
        draw = self.step if self.noise.mode == "fresh" else None
        noise = reference_noise(batch["keys"], batch["noise"], self.noise.side, self.noise.seed, draw)
        seen = {"attention_mask": batch["attention_mask"].to(dev)} if "attention_mask" in batch else {}
        with torch.no_grad(), lora.adapters_disabled(model):  # under LoRA, θ_t is the base
            if noise is None:
                return answer_logps(model, ids, mask, self.cfg.fp32_logits, **seen)
            return noised_answer_logps(model, ids, mask, noise[0], noise[1], self.cfg.fp32_logits, **seen)

    def precompute_reference(self, model):
        """log p_θt of both answers of every pair, once; cached in ref_logps.jsonl."""
        env, cfg = self.env, self.cfg
        fps = {p.key: self._fingerprint(p) for p in self.items}
        have = {}
        for rec in read_jsonl(self.ref_path):
            if fps.get(rec.get("key")) == rec.get("fp"):
                have[rec["key"]] = (float(rec["real"]), float(rec["generated"]))
        D.barrier()  # everyone has read the file before rank 0 appends to it
        todo = [p for p in self.items if p.key not in have]
        # longest first, so each batch holds similar lengths and little padding
        todo.sort(key=lambda p: len(p.prompt) + max(len(p.real), len(p.generated)), reverse=True)
        if todo:
            self.log(f"reference pass: log p_θt for {len(todo)} pairs ({len(have)} cached) -> {self.ref_path}")
            per = cfg.ref_batch_size or 2 * cfg.micro_batch_size
            chunk = per * env.world_size
            model.eval()
            writer = JsonlAppender(self.ref_path, fsync=False) if env.is_main else None
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="reference", unit="pair", disable=not (env.is_main and self.progress))
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                mine = part[env.rank * per:(env.rank + 1) * per]
                # every rank must run the forward (FSDP gathers collectively): a rank with
                # nothing left computes a throwaway pair
                work = mine or part[:1]
                logps = self._ref_forward(model, collate_pairs(work, self.pad_id)).cpu().tolist()
                n = len(work)
                out = [(p.key, logps[i], logps[n + i]) for i, p in enumerate(work)] if mine else []
                for results in D.all_gather_objects(out):
                    for key, real, gen in results:
                        have[key] = (real, gen)
                        if writer:
                            writer.write({"key": key, "real": real, "generated": gen, "fp": fps[key]})
                bar.update(len(part))
            bar.close()
            if writer:
                writer.close()
        D.barrier()
        self.ref_cache = have

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) log p_θt of the batch's [real; generated] rows."""
        if self.ref_model is not None:
            return self._ref_forward(self.ref_model, batch)
        keys = batch["keys"]
        vals = [self.ref_cache[k][0] for k in keys] + [self.ref_cache[k][1] for k in keys]
        return torch.tensor(vals, dtype=torch.float32, device=self.env.device)

    # ------------------------------------------------------------------ one micro-batch
    def _micro_step(self, policy, items: List[TokenizedPair], sums: Dict[str, float]):
        """Forward + backward of one micro-batch of pairs; adds its metric sums to `sums`."""
        cfg, W, dev = self.cfg, self.env.world_size, self.env.device
        batch = collate_pairs(items, self.pad_id)
        ref = self.reference_logps(batch)
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        losses, stats = spin_step(policy, batch, ref, beta=cfg.beta, loss_type=cfg.loss_type,
                                  label_smoothing=cfg.label_smoothing, fp32_logits=cfg.fp32_logits)
        loss = losses.sum() * (W / cfg.batch_size)  # FSDP averages over ranks: × W
        for fn in _HOOKS["loss"]:
            loss = fn(self.step, loss)
        loss.backward()
        stats = {k: float(v.sum()) for k, v in stats.items()}
        stats["loss"] = float(loss.detach()) * cfg.batch_size / W   # Σ pair losses, as backward saw it
        stats["tokens/processed"] = sum(2 * len(p.prompt) + len(p.real) + len(p.generated) for p in items)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v

    def _step_metrics(self, sums: Dict[str, float]) -> dict:
        """The step's loss and logged means from the global sums."""
        B = self.cfg.batch_size
        rec = {k: v / B for k, v in sums.items() if k.startswith(("rewards/", "logps/"))}
        rec["loss"] = sums["loss"] / B
        return rec

    def _prepare(self, policy, mesh, compute):
        """The reference θ_t: stored log-probs of every pair, or a frozen online copy (under
        LoRA no copy: the policy with its adapters off is θ_t)."""
        if self.cfg.ref_mode == "precompute":
            self.precompute_reference(policy)   # the policy is still θ_t here
        elif self.lora:
            self.ref_model = policy
        else:
            self.ref_model = D.load_sharded_model(self.init_model, self.env, mesh, None, dtype=compute,
                                                  trainable=False, compile=self.cfg.compile_train)

    # ------------------------------------------------------------------ setup
    def _build_optimizer(self, policy):
        cfg = self.cfg
        params = [p for p in policy.parameters() if p.requires_grad]
        if cfg.optimizer == "rmsprop":
            # foreach: a few multi-tensor kernels per step, not several per parameter (what torch
            # picks on CUDA anyway; torch has no fused RMSprop); on the CPU the same numbers as
            # its per-tensor loop. compile_train: the same update through torch.compile (optim.py)
            kind = CompiledRMSprop if cfg.compile_train else torch.optim.RMSprop
            opt = kind(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.optim_eps,
                       weight_decay=cfg.weight_decay, foreach=True)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.optim_eps, weight_decay=cfg.weight_decay)
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler, self.total_steps, warmup))
        return opt, sched

    def _resume_key(self) -> dict:
        """What a checkpoint must agree on to be resumed by this run: every setting of
        TrainSettings.resume_settings, the data (a content fingerprint per source) and θ_t
        (by content). File paths are not in it: a copied run folder resumes."""
        key = self.cfg.resume_settings(self.env.device)
        key.update(total_steps=self.total_steps, mode=self.mode, theta=self.theta_fp,
                   data={tag: v["sha"] for tag, v in self.info.get("fingerprints", {}).items()})
        return key

    def _check_resume_key(self, path: str, was: dict):
        now = self._resume_key()
        files = {tag: v["file"] for tag, v in self.info.get("fingerprints", {}).items()}
        diff = []
        for k in sorted(set(now) | set(was)):
            if k == "data":
                for tag in sorted(set(now[k]) | set(was.get(k) or {})):
                    a, b = (was.get(k) or {}).get(tag), now[k].get(tag)
                    if a != b:
                        what = "changed" if a and b else ("added" if b else "removed")
                        diff.append(f"the pairs of {tag} ({files.get(tag, tag)}) {what}")
            elif k == "theta" and was.get(k) != now.get(k):
                diff.append(f"θ_t ({self.init_model}) changed: its weights are not those the "
                            "checkpoint was trained from")
            elif was.get(k) != now.get(k):
                diff.append(f"{k}: {was.get(k)!r} -> {now.get(k)!r}")
        if diff:
            raise ResumeError(f"{path} was written by a run with other data or settings "
                              f"({'; '.join(diff)}); resuming would mix two runs. Restore them, or "
                              f"start fresh: delete {self.ckpt_root} (or use another --run-dir)")

    def _rng_state(self) -> dict:
        st = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.env.device)
        if self.noise_gen is not None:
            st["noise"] = self.noise_gen.get_state()
        return st

    def _set_rng_state(self, st: dict):
        torch.set_rng_state(st["cpu"])
        if "cuda" in st and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda"], self.env.device)
        if "noise" in st and self.noise_gen is not None:
            self.noise_gen.set_state(st["noise"])

    def _trim_metrics(self, step: int):
        """Keep metric lines of steps <= step (a resumed run rewrites the rest)."""
        if self.env.is_main and os.path.isfile(self.metrics_path):
            recs = [r for r in read_jsonl(self.metrics_path, repair=True) if r.get("step", 0) <= step]
            write_jsonl_atomic(self.metrics_path, recs)

    def _load_models(self):
        cfg, env = self.cfg, self.env
        mesh = D.device_mesh(env)
        mp = D.mixed_precision_policy(cfg.mixed_precision, env.device)
        t0 = time.time()
        base = torch.float32  # full fine-tuning: fp32 master weights
        if self.lora:
            # a LoRA base is never updated: "auto" stores it in the compute dtype, all the
            # forward ever sees of it; and a bf16 base computes in bf16 (recipe.check refuses
            # it with an explicit fp32), so "auto" on the CPU gets the bf16 policy then
            base = parse_dtype(cfg.lora_base_dtype) if cfg.lora_base_dtype != "auto" else \
                (torch.bfloat16 if mp is not None else torch.float32)
            if base == torch.bfloat16 and mp is None:
                mp = D.mixed_precision_policy("bf16", env.device)
        compute = torch.bfloat16 if mp is not None else torch.float32
        policy = D.load_sharded_model(self.init_model, env, mesh, mp, dtype=base,
                                      activation_checkpointing=cfg.activation_checkpointing,
                                      lora=self.lora, lora_seed=self.cfg.seed,
                                      compile=cfg.compile_train)
        if self.noise.neftune_alpha > 0:
            # training mode + autograd only: never in the precompute pass (eval, no_grad),
            # the online reference (another model, or under LoRA a no_grad forward) or generation
            add_neftune(policy, self.noise.neftune_alpha, generator=self.noise_gen)
        if self.lora:
            trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
            total = sum(p.numel() for p in policy.parameters())
            self.log(f"LoRA rank {self.lora.rank}, alpha {self.lora.alpha:g} on "
                     f"{','.join(self.lora.targets)}: {trainable:,} trainable parameters "
                     f"({100 * trainable / total:.2f}%), base frozen in {str(base)[6:]}")
        self.log(f"loaded {self.init_model} ({read_config(self.init_model).n_layers} layers) on "
                 f"{env.world_size} process(es), {env.device.type}, compute {str(compute)[6:]}, "
                 f"{time.time() - t0:.1f}s")
        self._prepare(policy, mesh, compute)
        return policy

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        os.makedirs(self.work_dir, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        self.noise_gen = torch.Generator(device=env.device).manual_seed(self.cfg.seed + 1 + env.rank)
        policy = self.policy = self._load_models()
        opt, sched = self._build_optimizer(policy)
        start, last_ckpt = 0, self._intact_checkpoint()
        if last_ckpt:
            self._check_resume_key(last_ckpt, D.checkpoint_extra(last_ckpt).get("resume_key", {}))
            extra = D.load_checkpoint(last_ckpt, policy, opt, env, verified=True)
            start = extra["step"]
            sched.load_state_dict(extra["scheduler"])
            self._set_rng_state(extra["rng"])
            self.log(f"resumed from {last_ckpt} (step {start} of {self.total_steps})")
        self._trim_metrics(start)
        if env.is_main:
            info = dict(self.info, mode=self.mode, world_size=env.world_size, accumulation=self.accum,
                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                        examples=len(self.items), init_model=self.init_model, theta_fingerprint=self.theta_fp)
            with open(os.path.join(self.work_dir, "train_info.json"), "w") as f:
                json.dump(redact_all(json.loads(json.dumps(info, default=str))), f, indent=2)

        from tqdm import tqdm
        metrics_log = MetricsLog(self.work_dir, cfg.report_to, start, enabled=env.is_main,
                                 recipe=self.info.get("recipe"))
        bar = tqdm(total=self.total_steps, initial=start, desc=f"train {self.mode}", unit="step",
                   disable=not (env.is_main and self.progress), file=sys.stdout)
        last = {}
        try:
            for step in range(start, self.total_steps):
                self.step = step
                rec = self._train_step(policy, opt, step, last_ckpt)
                sched.step()
                last = rec
                metrics_log.write(rec)
                bar.set_postfix({k: f"{rec[k]:.4f}" for k in ("loss", "rewards/accuracies") if k in rec})
                bar.update(1)
                done = step + 1
                if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == self.total_steps:
                    if not D.all_finite(policy, opt):  # a finite loss can still step into inf
                        raise TrainingError(
                            f"the weights or optimizer state are not finite after step {done}; "
                            f"not saved. Last good checkpoint: {last_ckpt or 'none yet'} (left intact; "
                            f"re-running the same command resumes from it). Lower --lr.")
                    last_ckpt = os.path.join(self.ckpt_root, f"step_{done}")
                    D.save_checkpoint(last_ckpt, policy, opt,
                                      {"step": done, "resume_key": self._resume_key(),
                                       "scheduler": sched.state_dict(), "rng": self._rng_state()},
                                      env, keep=cfg.keep_checkpoints)
                for fn in _HOOKS["step_end"]:
                    fn(self, done)
        finally:
            bar.close()
            metrics_log.close()
        self.export(policy)
        if env.is_main and not cfg.keep_checkpoints_after_export:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
        D.barrier()
        return last

    def _intact_checkpoint(self) -> Optional[str]:
        """The newest checkpoint whose files match their checksums (rank 0 checks, the
        others follow); each damaged newer one is named on stderr and skipped (a later save
        of its step replaces it). When none is intact the newest one's error stops the run:
        a run never starts over silently on top of checkpoints it cannot read."""
        chosen, errors = None, []
        if self.env.is_main:
            for path in D.checkpoints_newest_first(self.ckpt_root):
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

    def _train_step(self, policy, opt, step: int, last_ckpt: Optional[str]) -> dict:
        """Forward/backward of this rank's micro-batches, the checks, the optimizer step;
        returns the step's metrics (means over the global batch)."""
        cfg, env = self.cfg, self.env
        t_step = time.perf_counter()
        policy.train()
        sums: Dict[str, float] = {}
        for idx in self.my_micro_batches(step):
            self._micro_step(policy, [self.items[i] for i in idx], sums)
        names = sorted(sums)
        total = D.all_reduce_sum(torch.tensor([sums[k] for k in names], dtype=torch.float64, device=env.device))
        sums = dict(zip(names, total.tolist()))
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"), foreach=True)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        metrics = self._step_metrics(sums)
        loss = metrics["loss"]
        if not (math.isfinite(loss) and math.isfinite(gn)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            keys = [self.items[i].key for i in self.global_batch(step)]
            raise TrainingError(
                f"non-finite {what} ({loss if what == 'loss' else gn}) at step {step + 1} "
                f"(epoch {step // self.steps_per_epoch + 1}); stopped before the optimizer step. "
                f"Last good checkpoint: {last_ckpt or 'none yet'} (left intact; re-running the "
                f"same command resumes from it). Batch: {', '.join(keys[:4])}"
                f"{' ...' if len(keys) > 4 else ''}. Lower --lr or check these pairs.")
        lr = opt.param_groups[0]["lr"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_step
        rec = {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4), **metrics}
        rec.update({"tokens/s": sums["tokens/processed"] / dt, "lr": lr, "grad_norm": gn,
                    "time": round(dt, 4)})
        return rec

    def export(self, policy):
        """Gather the full weights and write θ_{t+1} as an HF folder (atomic rename). Under
        LoRA, first the adapters alone in peft's format (work_dir/adapter), then the merged
        W + (alpha/r)·B·A as θ_{t+1}: the model folder, which marks the iteration done,
        comes last."""
        t0 = time.time()
        full = D.gather_full_state_dict(policy)
        if self.env.is_main:
            if self.lora:
                save_peft_adapter(self.adapter_dir, full, self.lora, os.path.abspath(self.init_model))
                self.log(f"adapter (peft format): {self.adapter_dir}")
                stats: Dict[str, float] = {}
                full = lora.merged_state_dict(full, self.lora, parse_dtype(self.cfg.export_dtype), stats)
                if stats.get("update"):
                    self.log(f"note: a bf16 copy of θ_{{t+1}} (what the next LoRA iteration stores) differs "
                             f"from it by {math.sqrt(stats['bf16_error'] / stats['update']):.2f} x the norm "
                             f"of this iteration's update (rounding; >= 1 means it is mostly lost)")
            save_model(None, self.export_dir, tokenizer_from=self.init_model, state_dict=full,
                       config=read_config(self.init_model), dtype=parse_dtype(self.cfg.export_dtype))
            self.log(f"exported {self.export_dir} ({time.time() - t0:.1f}s)")
        D.barrier()


class SFTTrainer(Trainer):
    """Supervised fine-tuning on the real answers (train.py --sft): the same loop, with the
    cross-entropy of loss.sft_step per answer token and no reference."""

    mode = "sft"

    def _micro_step(self, policy, items: List[TokenizedPair], sums: Dict[str, float]):
        W, dev = self.env.world_size, self.env.device
        # the mean over the global batch's answer tokens, whatever the processes
        global_tokens = sum(len(self.items[i].real) for i in self.global_batch(self.step))
        batch = collate_sft(items, self.pad_id)
        nll, stats = sft_step(policy, {k: v.to(dev) for k, v in batch.items() if k != "keys"},
                              fp32_logits=self.cfg.fp32_logits)
        loss = nll * (W / global_tokens)
        for fn in _HOOKS["loss"]:
            loss = fn(self.step, loss)
        loss.backward()
        stats["tokens/processed"] = sum(len(p.prompt) + len(p.real) for p in items)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)

    def _step_metrics(self, sums: Dict[str, float]) -> dict:
        return {"loss": sums["nll"] / max(1.0, sums["tokens"]), "tokens": int(sums["tokens"])}

    def _prepare(self, policy, mesh, compute):
        pass
