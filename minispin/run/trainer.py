"""One SPIN iteration (or SFT run) end to end: θ_t, its reference log-probs, the loop, θ_{t+1}.

`Trainer.run()` is the algorithm on one screen:

1. Load θ_t sharded over all ranks (FSDP2, fp32 master weights, bf16 compute on GPU,
   run/distributed.py). The policy starts as θ_t.
2. The reference θ_t (run/reference.py): its log-probs of every pair, computed once while
   the policy still IS θ_t and stored in iter<t>/ref_logps.jsonl (or a frozen online copy).
3. The loop: every optimizer step runs core/train.train_step over this rank's
   micro-batches, each a loss.spin_step against the reference and a backward. The data
   order, the scaling of each micro-batch, the schedule and the optimizer are core/train.py's.
   Metrics go to metrics.jsonl (and TensorBoard / W&B: reporting.MetricsLog).
4. Checkpoints every `checkpoint_every` steps (model, optimizer, scheduler, step, RNG and
   the resume key: run/resume.py); re-running the same command resumes from the newest
   intact one and refuses one written from other data or settings. A non-finite loss or
   gradient norm stops the run BEFORE the optimizer step, naming the step, the batch and
   the last good checkpoint, which stays intact. SIGTERM / SIGUSR1 (run/preempt.py) finish
   the step in flight, save a checkpoint on every rank and stop.
5. Export: the full state dict gathered and written as an HF folder (atomically): θ_{t+1}.

LoRA (`lora_rank > 0`, core/lora.py): θ_t is loaded frozen (in the compute dtype unless
`lora_base_dtype` says otherwise) with fp32 adapters that alone train and have optimizer
state; the reference is the same model with its adapters off (no second copy online);
checkpoints hold the adapters and their optimizer state; the export writes the adapter in
peft's format (work_dir/adapter) and then the merged θ_{t+1}. NEFTune (core/noise.py) is a
hook on the policy's embeddings.

Settings: the trainer reads only `TrainSettings` (core/settings.py), which iteration.py
builds from a recipe; it never sees the recipe.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch

from . import distributed as D
from . import preempt
from ..core import lora
from ..core.device import parse_dtype
from ..core.noise import add_neftune
from ..core.settings import TrainSettings
from ..core.train import (NonFiniteStep, accumulation_steps, build_optimizer, epoch_steps, global_batch,
                          my_micro_batches, sft_metrics, sft_micro_step, spin_metrics, spin_micro_step,
                          train_step)
from .checkpoint import check_export_target, model_fingerprint, save_model, save_peft_adapter
from .config import read_config
from .data import write_json_atomic
from .errors import StoppedError, UserError, stage
from .layout import fingerprint_cache_path
from .reference import Reference
from .reporting import MetricsLog
from .resume import HOOKS, check_resume_key, intact_checkpoint, resume_key, rng_state, set_rng_state, trim_metrics
from .rows import TokenizedPair, collate_pairs, collate_sft, row_lengths
from ..core.packing import layout_padding, pack_batch


class TrainingError(StoppedError):
    """The run cannot go on (a non-finite loss); the message says why and what is left."""


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
        # θ_t by content (run/resume.py): rank 0 hashes (cached in the run folder), all use it
        run_dir = os.path.dirname(os.path.abspath(work_dir))  # work_dir is iter<t>/ or sft/
        fp = model_fingerprint(init_model, fingerprint_cache_path(run_dir)) if env.is_main else None
        self.theta_fp = D.broadcast_object(fp) if D.dist.is_initialized() else fp
        self.ckpt_root = os.path.join(work_dir, "ckpt")
        self.metrics_path = os.path.join(work_dir, "metrics.jsonl")
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
        self.window = read_config(init_model).sliding_window if cfg.packing else None
        self.pack_capacity = max(self.row_lengths(items), default=1)  # a packed sequence's most tokens
        self.reference = Reference(cfg, env, items, self.theta_fp, pad_id,
                                   os.path.join(work_dir, "ref_logps.jsonl"), progress, self.log, init_model,
                                   self.collate)
        self.policy = None  # set by run(); step_end hooks may look at it
        # LoRA (core/lora.py): adapters on a frozen base; None = every weight trains
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

    # ------------------------------------------------------------------ the iteration
    def run(self) -> dict:
        """θ_t -> θ_{t+1}: the module docstring's five steps, in order."""
        cfg, env = self.cfg, self.env
        os.makedirs(self.work_dir, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(device=env.device).manual_seed(cfg.seed + 1 + env.rank)
        policy = self.policy = self.load_theta()     # 1. θ_t; the policy starts as θ_t
        with stage("the reference pass"):
            self.prepare_reference(policy)           # 2. log p_θt of every pair (policy == θ_t)
        opt, sched = build_optimizer(policy, cfg, self.total_steps)
        start, last_ckpt = self.resume(policy, opt, sched)
        self.write_info()
        metrics_log = MetricsLog(self.work_dir, cfg.report_to, start, enabled=env.is_main,
                                 recipe=self.info.get("recipe"))
        from .plan import stage_bar   # the stage and the whole iteration's ETA (plan.py)
        bar = stage_bar("train", self.total_steps, initial=start, desc=f"train {self.mode}", unit="step",
                        disable=not (env.is_main and self.progress), file=sys.stdout)
        last = {}
        preempt.hold()  # SIGTERM / SIGUSR1 now wait for the optimizer step in flight (run/preempt.py)
        try:
            for step in range(start, self.total_steps):  # 3. the loop
                self.step = step
                last = self.train_step(policy, opt, step, last_ckpt)
                sched.step()
                metrics_log.write(last)
                bar.set_postfix({k: f"{last[k]:.4f}" for k in ("loss", "rewards/accuracies") if k in last})
                bar.update(1)
                done = step + 1
                if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == self.total_steps:
                    last_ckpt = self.save_checkpoint(policy, opt, sched, done, last_ckpt)  # 4.
                for fn in HOOKS["step_end"]:
                    fn(self, done)
                self.stop_if_signalled(policy, opt, sched, done, last_ckpt)
        finally:
            bar.close()
            metrics_log.close()
        preempt.release()
        with stage("the export"):
            self.export(policy)                      # 5. θ_{t+1}
        if env.is_main and not cfg.keep_checkpoints_after_export:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
        D.barrier()
        return last

    def train_step(self, policy, opt, step: int, last_ckpt: Optional[str]) -> dict:
        """One optimizer step over this rank's micro-batches of the global batch."""
        cfg, env = self.cfg, self.env
        micro = [functools.partial(self.micro_step, policy, [self.items[i] for i in idx])
                 for idx in my_micro_batches(self.global_batch(step), cfg.micro_batch_size, self.accum,
                                             env.rank, env.world_size)]
        try:
            rec = train_step(policy, opt, micro, self.step_metrics, cfg.max_grad_norm, env.device)
        except NonFiniteStep as e:
            keys = [self.items[i].key for i in self.global_batch(step)]
            raise TrainingError(
                f"non-finite {e.what} ({e.value}) at step {step + 1} "
                f"(epoch {step // self.steps_per_epoch + 1}); stopped before the optimizer step. "
                f"Last good checkpoint: {last_ckpt or 'none yet'} (left intact; re-running the "
                f"same command resumes from it). Batch: {', '.join(keys[:4])}"
                f"{' ...' if len(keys) > 4 else ''}. Lower --lr or check these pairs.") from None
        return {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4), **rec}

    def micro_step(self, policy, items: List[TokenizedPair]) -> Dict[str, float]:
        """Forward + backward of one micro-batch of pairs; returns its metric sums."""
        batch = self.collate(items)
        ref = self.reference.logps(batch, self.step)
        batch = {k: (v.to(self.env.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        sums = spin_micro_step(policy, batch, ref, self.cfg, self.env.world_size, self.loss_hook)
        sums["tokens/processed"] = sum(2 * len(p.prompt) + len(p.real) + len(p.generated) for p in items)
        return sums

    def step_metrics(self, sums: Dict[str, float]) -> dict:
        return spin_metrics(sums, self.cfg.batch_size)

    def collate(self, items: List[TokenizedPair]) -> dict:
        """collate_pairs' padded batch, or with `packing` the same rows packed (core/packing.py)
        in sequences of at most the run's longest row, built on the device: flex_attention's
        block mask on CUDA, a dense mask elsewhere."""
        batch = collate_pairs(items, self.pad_id)
        if not self.cfg.packing:
            return batch
        dev = torch.device(self.env.device)
        return pack_batch(batch, window=self.window, capacity=self.pack_capacity,
                          block_mask=dev.type == "cuda", device=dev)

    def row_lengths(self, items: List[TokenizedPair]) -> List[int]:
        return row_lengths(items)

    def padding_info(self) -> dict:
        """Padded positions / all positions over every policy micro-batch of the run (each
        micro-batch's rows as collate_pairs pads them, and as packing lays them out); the
        processes do not change it (their micro-batches are the same chunks of each global
        batch), and the reference pass is not counted."""
        m = self.cfg.micro_batch_size
        batches = (self.row_lengths([self.items[i] for i in idx[j:j + m]])
                   for idx in map(self.global_batch, range(self.total_steps)) for j in range(0, len(idx), m))
        return layout_padding(batches, self.pack_capacity)

    def loss_hook(self, loss: torch.Tensor) -> torch.Tensor:
        for fn in HOOKS["loss"]:
            loss = fn(self.step, loss)
        return loss

    def global_batch(self, step: int) -> List[int]:
        """Indices (into self.items) of the pairs of optimizer step `step` (0-based)."""
        return global_batch(len(self.items), step, self.cfg.batch_size, self.steps_per_epoch, self.cfg.seed)

    # ------------------------------------------------------------------ θ_t and its reference
    def load_theta(self):
        """θ_t sharded over the ranks: fp32 master weights, or a frozen LoRA base with adapters."""
        cfg, env = self.cfg, self.env
        self.mesh = D.device_mesh(env)
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
        self.compute = torch.bfloat16 if mp is not None else torch.float32
        policy = D.load_sharded_model(self.init_model, env, self.mesh, mp, dtype=base,
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
                 f"{env.world_size} process(es), {env.device.type}, compute {str(self.compute)[6:]}, "
                 f"{time.time() - t0:.1f}s")
        return policy

    def prepare_reference(self, policy):
        """Stored log-probs of every pair, or a frozen online copy of θ_t (under LoRA no
        copy: the policy with its adapters off is θ_t)."""
        if self.cfg.ref_mode == "precompute":
            self.reference.precompute(policy)   # the policy is still θ_t here
        elif self.lora:
            self.reference.model = policy
        else:
            self.reference.model = D.load_sharded_model(self.init_model, self.env, self.mesh, None,
                                                        dtype=self.compute, trainable=False,
                                                        compile=self.cfg.compile_train)

    # ------------------------------------------------------------------ checkpoints, info, export
    def resume_key(self) -> dict:
        return resume_key(self.cfg, self.env.device, self.total_steps, self.mode, self.theta_fp, self.info)

    def training_record(self) -> dict:
        """What the export records of how it was made (run/resume.py compares it on a re-run)."""
        return {"key": self.resume_key(), "theta": self.init_model,
                "files": {tag: v["file"] for tag, v in self.info.get("fingerprints", {}).items()}}

    def resume(self, policy, opt, sched):
        """(first step, newest intact checkpoint): 0 and None on a fresh start."""
        start, last_ckpt = 0, intact_checkpoint(self.ckpt_root, self.env.is_main)
        if last_ckpt:
            check_resume_key(last_ckpt, D.checkpoint_extra(last_ckpt).get("resume_key", {}),
                             self.resume_key(), self.info, self.init_model, self.ckpt_root)
            extra = D.load_checkpoint(last_ckpt, policy, opt, self.env, verified=True)
            start = extra["step"]
            sched.load_state_dict(extra["scheduler"])
            set_rng_state(extra["rng"], self.env.device, self.noise_gen)
            self.log(f"resumed from {last_ckpt} (step {start} of {self.total_steps})")
        trim_metrics(self.metrics_path, start, self.env.is_main)
        return start, last_ckpt

    def save_checkpoint(self, policy, opt, sched, done: int, last_ckpt: Optional[str]) -> str:
        if not D.all_finite(policy, opt):  # a finite loss can still step into inf
            raise TrainingError(
                f"the weights or optimizer state are not finite after step {done}; "
                f"not saved. Last good checkpoint: {last_ckpt or 'none yet'} (left intact; "
                f"re-running the same command resumes from it). Lower --lr.")
        path = os.path.join(self.ckpt_root, f"step_{done}")
        D.save_checkpoint(path, policy, opt, {"step": done, "resume_key": self.resume_key(),
                                              "scheduler": sched.state_dict(),
                                              "rng": rng_state(self.env.device, self.noise_gen)},
                          self.env, keep=self.cfg.keep_checkpoints)
        return path

    def stop_if_signalled(self, policy, opt, sched, done: int, last_ckpt: Optional[str]):
        """SIGTERM / SIGUSR1 reached any rank (run/preempt.py): every rank saves the state
        after step `done` (unless just saved) and the run stops, saying how to resume."""
        stop = preempt.requested(self.env)   # collective: all ranks stop after the same step
        if stop:
            if os.path.basename(last_ckpt or "") != f"step_{done}":
                last_ckpt = self.save_checkpoint(policy, opt, sched, done, last_ckpt)
            raise preempt.stopped_training(stop, done, self.total_steps, last_ckpt)

    def write_info(self):
        if self.env.is_main:
            info = dict(self.info, mode=self.mode, world_size=self.env.world_size, accumulation=self.accum,
                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                        examples=len(self.items), init_model=self.init_model, theta_fingerprint=self.theta_fp,
                        **self.padding_info())
            with stage("training"):
                write_json_atomic(os.path.join(self.work_dir, "train_info.json"),
                                  json.loads(json.dumps(info, default=str)), indent=2)

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
                       config=read_config(self.init_model), dtype=parse_dtype(self.cfg.export_dtype),
                       training=self.training_record())
            self.log(f"exported {self.export_dir} ({time.time() - t0:.1f}s)")
        D.barrier()


class SFTTrainer(Trainer):
    """Supervised fine-tuning on the real answers (train.py --sft): the same loop, with the
    cross-entropy of loss.sft_step per answer token and no reference."""

    mode = "sft"

    def micro_step(self, policy, items: List[TokenizedPair]) -> Dict[str, float]:
        # the mean over the global batch's answer tokens, whatever the processes
        global_tokens = sum(len(self.items[i].real) for i in self.global_batch(self.step))
        batch = collate_sft(items, self.pad_id)
        batch = {k: v.to(self.env.device) for k, v in batch.items() if k != "keys"}
        sums = sft_micro_step(policy, batch, global_tokens, self.cfg, self.env.world_size, self.loss_hook)
        sums["tokens/processed"] = sum(len(p.prompt) + len(p.real) for p in items)
        return sums

    def step_metrics(self, sums: Dict[str, float]) -> dict:
        return sft_metrics(sums, self.cfg.batch_size)

    def row_lengths(self, items: List[TokenizedPair]) -> List[int]:
        return [len(p.prompt) + len(p.real) for p in items]   # collate_sft's rows (SFT does not pack)

    def prepare_reference(self, policy):
        pass
