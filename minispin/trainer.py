"""The training loop: batches -> policy and reference log-probs -> SPIN loss -> optimizer step.

This is the only file where the maths (loss.py, model.py) meets the distributed machinery
(distributed.py). One iteration of SPIN, or an SFT run, is one `Trainer.run()`:

1. Load θ_t sharded over all ranks (FSDP2, fp32 master weights, optional bf16 compute).
2. Reference θ_t. `ref_mode="precompute"` (default): before the first step the policy IS
   θ_t, so it computes log p_θt(y|x) and log p_θt(y'|x) for every pair once, teacher-
   forced and without gradients (eval mode), and stores them in iter<t>/ref_logps.jsonl
   keyed by "<source>/<pair id>" with a fingerprint of the tokens (a changed pair or
   truncation setting is recomputed, never silently reused). Every later step and epoch
   reads them: a third less compute per step and no second model in memory.
   `ref_mode="online"` keeps a frozen, sharded copy of θ_t (eval mode, no grads, stored in
   the compute dtype) and recomputes the reference each step, as the original SPIN code did.
3. The data order is a function of (seed, epoch) only: each epoch is a seeded permutation of
   all pairs, cut into global batches of `batch_size` pairs (an incomplete last batch is
   dropped). A global batch is split into `micro_batch_size`-pair micro-batches dealt to
   ranks and accumulation steps; the loss of a micro-batch is Σ losses / batch_size (×
   world size, because FSDP averages gradients over ranks), so the gradient is that of the
   mean over the global batch whatever the number of processes. That is why 1, 2 or 16
   processes trace the same losses, and why resuming needs only the step number.
4. Per micro-batch ONE forward of the concatenated [real; generated] rows; log-probs in
   fp32 (loss.sequence_logps); loss.spin_loss with the batch's swap flags.
5. Optimizer step with gradient clipping; RMSprop (SPIN's choice) or AdamW; linear (or
   cosine / constant) schedule with warmup. Metrics are summed over the global batch with
   one all-reduce and appended to metrics.jsonl by rank 0, one line per optimizer step.
6. A non-finite loss or gradient norm stops the run BEFORE the optimizer step, with a
   message naming the step, the batch and the last good checkpoint, which stays intact.
7. DCP checkpoints every `checkpoint_every` steps (model, optimizer, scheduler, step, RNG);
   a re-run of the same command resumes from the newest complete one and appends to the
   metrics from there. At the end: the full state dict is gathered and written as an HF
   folder (atomically, by save_model): θ_{t+1}.

Hook points for the relabeling / noise features:
* pair-level fields: TokenizedPair.swap and .noise (from the pairs file's "swap" and
  "noise"); `collate_pairs` turns them into batch["swap"] (B,) and batch["noise"] (B,).
* `Trainer.reference_noise(batch)` returns (per-row σ (2B,), per-row generators) for the
  reference pass, or None. Default: each pair's "noise" σ on side `ref_noise_side`, drawn
  from noise.row_generators seeded by (seed, pair key, side) — a "frozen" draw that does
  not depend on batching, so it can be precomputed and online gives the same numbers; None
  when every pair has σ = 0, so plain SPIN draws no random number. Override it, or set
  `Trainer.reference_noise_fn(trainer, batch)`, for other schedules — e.g. fresh draws per
  epoch (`trainer.epoch` is the current epoch), which need ref_mode="online"; set
  `Trainer.noise_tag` to a string describing the schedule so that precomputed reference
  log-probs made under another schedule are recomputed, not reused.
* `Trainer.policy_hooks`: callables(policy) run once the policy is loaded and sharded, e.g.
  `lambda m: noise.add_neftune(m, alpha)`. The precompute reference pass runs the same
  policy in eval mode under no_grad, so a hook must stay inactive there (add_neftune is).

Fault injection for the tests: the environment variable MINISPIN_FAULT="nan@N" makes the
loss of step N NaN; "kill@N" SIGKILLs rank 0 right after step N (and its checkpoint, if one
is due) — a real crash at a known point.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import distributed as D
from .checkpoint import save_model
from .config import parse_dtype, read_config
from .data import (JsonlAppender, TokenizedPair, collate_pairs, collate_sft, read_jsonl,
                   write_jsonl_atomic)
from .loss import (LOSS_TYPES, NOISE_SIDES, reference_noise_std, sequence_logps, sft_loss,
                   spin_loss)

SPIN_METRICS = ("loss", "rewards/real", "rewards/generated", "rewards/accuracies",
                "rewards/margins", "logps/real", "logps/generated")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad configuration); the message says why."""


@dataclass
class TrainConfig:
    """Every knob of a run. Recipe keys (configs/*.toml) and train.py flags set these."""
    # what to train
    name: str = "tiny"
    run_dir: str = "runs/tiny"
    model: str = ""                    # θ_0: the SFT model
    data: str = ""                     # SFT records (for --sft, and generate.py)
    template: str = "zephyr"
    empty_system: bool = True
    iteration: int = 0
    sft: bool = False
    sft_limit: Optional[int] = None    # --sft: use only the first N records
    # data
    max_length: int = 1024
    max_prompt_length: int = 512
    mix_previous: bool = True          # iteration t >= 1 also trains on iteration t-1's pairs
    # loss
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ref_mode: str = "precompute"
    ref_noise_side: str = "real"
    # optimization
    optimizer: str = "rmsprop"
    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    optim_eps: float = 1e-8
    rmsprop_alpha: float = 0.99
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.1
    epochs: int = 2
    batch_size: int = 64               # pairs per optimizer step, over all processes
    micro_batch_size: int = 8          # pairs per process per forward
    ref_batch_size: int = 0            # pairs per process in the precompute pass (0: 2x micro)
    max_grad_norm: float = 1.0
    max_steps: int = 0                 # stop after this many steps (0: all epochs)
    seed: int = 42
    # systems
    device: str = "auto"
    mixed_precision: str = "auto"
    activation_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    keep_checkpoints_after_export: bool = False
    export_dtype: str = "float32"
    progress: bool = True

    def check(self):
        if self.loss_type not in LOSS_TYPES:
            raise TrainingError(f"loss_type must be one of {LOSS_TYPES}, got '{self.loss_type}'")
        if self.ref_mode not in ("precompute", "online"):
            raise TrainingError(f"ref_mode must be precompute or online, got '{self.ref_mode}'")
        if self.ref_noise_side not in NOISE_SIDES:
            raise TrainingError(f"ref_noise_side must be one of {NOISE_SIDES}")
        if self.optimizer not in ("rmsprop", "adamw"):
            raise TrainingError(f"optimizer must be rmsprop or adamw, got '{self.optimizer}'")
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise TrainingError(f"lr_scheduler must be linear, cosine or constant, got '{self.lr_scheduler}'")
        if self.max_prompt_length >= self.max_length:
            raise TrainingError(f"max_prompt_length ({self.max_prompt_length}) must be smaller "
                                f"than max_length ({self.max_length})")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise TrainingError("the robust loss needs 0 <= label_smoothing < 0.5")
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise TrainingError("epochs, batch_size and micro_batch_size must be >= 1")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.max_steps < 0:
            raise TrainingError("checkpoint_every and max_steps must be >= 0 (0: only at the end / "
                                "all epochs), keep_checkpoints >= 1")
        if self.lr < 0 or not 0 <= self.warmup_ratio <= 1 or self.beta <= 0:
            raise TrainingError("lr must be >= 0, warmup_ratio in [0, 1] and beta > 0")


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    per_round = micro_batch_size * world_size
    if batch_size % per_round:
        raise TrainingError(
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


def _log(env, *msg):
    if env.is_main:
        print(*msg, flush=True)


def _fault(kind: str) -> Optional[int]:
    spec = os.environ.get("MINISPIN_FAULT", "")
    for part in spec.split(","):
        if part.startswith(kind + "@"):
            return int(part.split("@", 1)[1])
    return None


class Trainer:
    """One SPIN iteration (mode "spin") or one SFT run (mode "sft")."""


    def __init__(self, cfg: TrainConfig, env: D.DistEnv, items: List[TokenizedPair],
                 init_model: str, work_dir: str, export_dir: str, pad_id: int,
                 mode: str = "spin", info: Optional[dict] = None):
        cfg.check()
        self.cfg, self.env, self.items = cfg, env, items
        self.init_model, self.work_dir, self.export_dir = init_model, work_dir, export_dir
        self.pad_id, self.mode = pad_id, mode
        self.info = info or {}
        self.ckpt_root = os.path.join(work_dir, "ckpt")
        self.metrics_path = os.path.join(work_dir, "metrics.jsonl")
        self.ref_path = os.path.join(work_dir, "ref_logps.jsonl")
        self.accum = accumulation_steps(cfg.batch_size, cfg.micro_batch_size, env.world_size)
        self.steps_per_epoch = len(items) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise TrainingError(f"{len(items)} training examples are fewer than one global batch "
                                f"(batch_size {cfg.batch_size}); lower --batch-size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.ref_cache: Dict[str, tuple] = {}
        self.ref_model = None
        self.noise_gen: Optional[torch.Generator] = None
        self.policy_hooks: List[Callable] = []
        self.reference_noise_fn: Optional[Callable] = None
        self.noise_tag = ""        # set with reference_noise_fn: part of the reference cache key
        self.step = self.epoch = 0  # the step being computed (0-based) and its epoch

    # ------------------------------------------------------------------ data order
    def global_batch(self, step: int) -> List[int]:
        """Indices (into self.items) of the pairs of optimizer step `step` (0-based)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(len(self.items), generator=g)
        B = self.cfg.batch_size
        return perm[b * B:(b + 1) * B].tolist()

    def my_micro_batches(self, step: int) -> List[List[int]]:
        """This rank's micro-batches: micro j = a * world + rank for a in accumulation."""
        idx, m, W = self.global_batch(step), self.cfg.micro_batch_size, self.env.world_size
        return [idx[(a * W + self.env.rank) * m:(a * W + self.env.rank + 1) * m]
                for a in range(self.accum)]

    # ------------------------------------------------------------------ reference
    def _fingerprint(self, p: TokenizedPair) -> str:
        noise = [p.noise, self.cfg.ref_noise_side, self.cfg.seed] if p.noise else []
        if self.noise_tag:
            noise.append(self.noise_tag)
        blob = json.dumps([os.path.abspath(self.init_model), p.prompt, p.real, p.generated, noise])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def reference_noise(self, batch: dict):
        """(per-row σ (2B,), per-row generators) for the reference logits of a
        [real; generated] batch, or None for no noise (see the module docstring)."""
        if self.reference_noise_fn is not None:
            return self.reference_noise_fn(self, batch)
        if not bool((batch["noise"] > 0).any()):
            return None
        from .noise import row_generators
        keys = batch["keys"]
        sides = ["real"] * len(keys) + ["generated"] * len(keys)
        gens = row_generators(keys + keys, sides, seed=self.cfg.seed)
        return reference_noise_std(batch["noise"], self.cfg.ref_noise_side), gens

    def _ref_forward(self, model, batch: dict) -> torch.Tensor:
        dev = self.env.device
        ids, mask = batch["input_ids"].to(dev), batch["loss_mask"].to(dev)
        with torch.no_grad():
            logits = model(ids)
            noise = self.reference_noise(batch)
            if noise is None:
                return sequence_logps(logits, ids, mask)
            return sequence_logps(logits, ids, mask, noise_std=noise[0], generator=noise[1])

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
            _log(env, f"reference pass: log p_θt for {len(todo)} pairs "
                      f"({len(have)} cached) -> {self.ref_path}")
            per = cfg.ref_batch_size or 2 * cfg.micro_batch_size
            chunk = per * env.world_size
            model.eval()
            writer = JsonlAppender(self.ref_path, fsync=False) if env.is_main else None
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="reference", unit="pair",
                       disable=not (env.is_main and cfg.progress))
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

    # ------------------------------------------------------------------ one step
    def _micro_step(self, policy, items: List[TokenizedPair], step: int, sums: torch.Tensor,
                    global_tokens: int):
        cfg, env, dev = self.cfg, self.env, self.env.device
        W = env.world_size
        if self.mode == "sft":
            batch = collate_sft(items, self.pad_id)
            ids, mask = batch["input_ids"].to(dev), batch["loss_mask"].to(dev)
            nll, ntok = sft_loss(policy(ids), ids, mask)
            loss = nll * (W / global_tokens)
            if _fault("nan") == step + 1:
                loss = loss * float("nan")
            loss.backward()
            sums += torch.tensor([float(nll.detach()), ntok, float(sum(len(p.prompt) + len(p.real) for p in items))],
                                 dtype=sums.dtype, device=sums.device)
            return
        batch = collate_pairs(items, self.pad_id)
        ids, mask = batch["input_ids"].to(dev), batch["loss_mask"].to(dev)
        B = len(items)
        ref = self.reference_logps(batch)
        logps = sequence_logps(policy(ids), ids, mask)  # one forward of [real; generated]
        losses, stats = spin_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=cfg.beta,
                                  loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                  swap=batch["swap"].to(dev))
        loss = losses.sum() * (W / cfg.batch_size)
        if _fault("nan") == step + 1:
            loss = loss * float("nan")
        loss.backward()
        row = [float(loss.detach()) * cfg.batch_size / W] + [float(stats[k].sum()) for k in SPIN_METRICS[1:]]
        row.append(float(sum(2 * len(p.prompt) + len(p.real) + len(p.generated) for p in items)))
        sums += torch.tensor(row, dtype=sums.dtype, device=sums.device)

    # ------------------------------------------------------------------ run
    def _build_optimizer(self, policy):
        cfg = self.cfg
        params = [p for p in policy.parameters() if p.requires_grad]
        if cfg.optimizer == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.optim_eps,
                                      weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.optim_eps, weight_decay=cfg.weight_decay)
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler, self.total_steps, warmup))
        return opt, sched

    RESUME_KEYS = ("beta", "loss_type", "label_smoothing", "optimizer", "lr", "weight_decay",
                   "lr_scheduler", "warmup_ratio", "epochs", "batch_size", "max_length",
                   "max_prompt_length", "max_grad_norm", "seed")

    def _resume_key(self) -> dict:
        """What a checkpoint must agree on to be resumed by this run."""
        key = {k: getattr(self.cfg, k) for k in self.RESUME_KEYS}
        key.update(total_steps=self.total_steps, examples=len(self.items), mode=self.mode,
                   init_model=os.path.abspath(self.init_model))
        return key

    def _rng_state(self) -> dict:
        st = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.env.device.type == "cuda":
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

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        os.makedirs(self.work_dir, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(device=env.device).manual_seed(cfg.seed + 1 + env.rank)
        mesh = D.device_mesh(env)
        mp = D.mixed_precision_policy(cfg.mixed_precision, env.device)
        compute_dtype = torch.bfloat16 if mp is not None else torch.float32
        t0 = time.time()
        policy = D.load_sharded_model(self.init_model, env, mesh, mp,
                                      activation_checkpointing=cfg.activation_checkpointing)
        model_args = read_config(self.init_model)
        for hook in self.policy_hooks:
            hook(policy)
        _log(env, f"loaded {self.init_model} ({model_args.n_layers} layers) on {env.world_size} "
                  f"process(es), {env.device.type}, compute {str(compute_dtype)[6:]}, "
                  f"{time.time() - t0:.1f}s")
        if self.mode == "spin":
            if cfg.ref_mode == "precompute":
                self.precompute_reference(policy)   # the policy is still θ_t here
            else:
                self.ref_model = D.load_sharded_model(self.init_model, env, mesh, None,
                                                      dtype=compute_dtype, trainable=False)
        opt, sched = self._build_optimizer(policy)
        start = 0
        last_ckpt = D.latest_checkpoint(self.ckpt_root)
        if last_ckpt:
            extra = D.load_checkpoint(last_ckpt, policy, opt, env)
            now = self._resume_key()
            was = extra.get("resume_key", {})
            diff = [f"{k}: {was.get(k)!r} -> {now[k]!r}" for k in now if was.get(k) != now[k]]
            if diff:
                raise TrainingError(
                    f"{last_ckpt} was written by a run with other settings ({'; '.join(diff)}); "
                    f"resuming would mix two runs. Restore the settings, or delete "
                    f"{self.ckpt_root} to start over")
            start = extra["step"]
            sched.load_state_dict(extra["scheduler"])
            self._set_rng_state(extra["rng"])
            _log(env, f"resumed from {last_ckpt} (step {start} of {self.total_steps})")
        self._trim_metrics(start)
        if env.is_main:
            info = dict(self.info, mode=self.mode, world_size=env.world_size, accumulation=self.accum,
                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                        examples=len(self.items), config=asdict(cfg), init_model=self.init_model)
            with open(os.path.join(self.work_dir, "train_info.json"), "w") as f:
                json.dump(info, f, indent=2)

        from tqdm import tqdm
        bar = tqdm(total=self.total_steps, initial=start, desc=f"train {self.mode}", unit="step",
                   disable=not (env.is_main and cfg.progress), file=sys.stdout)
        metrics_file = open(self.metrics_path, "a") if env.is_main else None
        ncols = 3 if self.mode == "sft" else len(SPIN_METRICS) + 1
        last = {}
        for step in range(start, self.total_steps):
            t_step = time.perf_counter()
            self.step, self.epoch = step, step // self.steps_per_epoch
            policy.train()
            micro = self.my_micro_batches(step)
            global_tokens = 0
            if self.mode == "sft":
                global_tokens = sum(len(self.items[i].real) for i in self.global_batch(step))
            sums = torch.zeros(ncols, dtype=torch.float64, device=env.device)
            for idx in micro:
                self._micro_step(policy, [self.items[i] for i in idx], step, sums, global_tokens)
            D.all_reduce_sum(sums)
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            else:
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), float("inf"))
            gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            if self.mode == "sft":
                loss = float(sums[0] / max(1.0, float(sums[1])))
            else:
                loss = float(sums[0] / cfg.batch_size)
            if not (math.isfinite(loss) and math.isfinite(gn)):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                keys = [self.items[i].key for i in self.global_batch(step)]
                bar.close()
                raise TrainingError(
                    f"non-finite {what} ({loss if what == 'loss' else gn}) at step {step + 1} "
                    f"(epoch {step // self.steps_per_epoch + 1}); stopped before the optimizer step. "
                    f"Last good checkpoint: {last_ckpt or 'none yet'} (left intact; re-running the "
                    f"same command resumes from it). Batch: {', '.join(keys[:4])}"
                    f"{' ...' if len(keys) > 4 else ''}. Lower --lr or check these pairs.")
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t_step
            rec = {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4)}
            if self.mode == "sft":
                rec.update({"loss": loss, "tokens": int(sums[1]), "tokens/s": float(sums[2]) / dt})
            else:
                for i, k in enumerate(SPIN_METRICS):
                    rec[k] = float(sums[i] / cfg.batch_size)
                rec["loss"] = loss
                rec["tokens/s"] = float(sums[-1]) / dt
            rec.update({"lr": lr, "grad_norm": gn, "time": round(dt, 4)})
            last = rec
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            post = {"loss": f"{loss:.4f}"}
            if self.mode == "spin":
                post["acc"] = f"{rec['rewards/accuracies']:.2f}"
            bar.set_postfix(post)
            bar.update(1)
            done = step + 1
            if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == self.total_steps:
                last_ckpt = os.path.join(self.ckpt_root, f"step_{done}")
                D.save_checkpoint(last_ckpt, policy, opt,
                                  {"step": done, "resume_key": self._resume_key(),
                                   "scheduler": sched.state_dict(), "rng": self._rng_state()},
                                  env, keep=cfg.keep_checkpoints)
            if _fault("kill") == done and env.is_main:
                if metrics_file:
                    metrics_file.close()
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        if metrics_file:
            metrics_file.close()
        self.export(policy, model_args)
        if env.is_main and not cfg.keep_checkpoints_after_export:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
        D.barrier()
        return last

    def export(self, policy, model_args):
        """Gather the full weights and write θ_{t+1} as an HF folder (atomic rename)."""
        t0 = time.time()
        full = D.gather_full_state_dict(policy)
        if self.env.is_main:
            save_model(None, self.export_dir, tokenizer_from=self.init_model, state_dict=full,
                       config=model_args, dtype=parse_dtype(self.cfg.export_dtype))
            _log(self.env, f"exported {self.export_dir} ({time.time() - t0:.1f}s)")
        D.barrier()
