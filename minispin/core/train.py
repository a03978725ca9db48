"""SPIN's training step and its schedule: the loop body a run repeats for every optimizer step.

One SPIN iteration trains θ_{t+1} from θ_t (run/trainer.py drives it):

1. The data order is a function of (seed, epoch) only: each epoch is a seeded permutation
   of all pairs (`global_batch`), cut into global batches of `batch_size` pairs (an
   incomplete last batch is dropped; `last_batch = "fill"` completes it with the epoch's
   first pairs, as HF Trainer under accelerate did for uclaml/SPIN and the study: steps
   per epoch = ceil). A global batch is dealt to ranks and accumulation steps in
   micro-batches of `micro_batch_size` pairs (`my_micro_batches`).
2. Each micro-batch's loss is Σ losses / batch_size (× world size, because FSDP averages
   gradients over ranks), so the gradient is that of the mean over the global batch
   whatever the number of processes: 1, 2 or 16 processes trace the same losses, and
   resuming needs only the step number.
3. Per micro-batch (`spin_micro_step`): loss.spin_step — ONE forward of the [real;
   generated] rows, log-probs in fp32, the SPIN loss against θ_t's log-probs of the same
   rows — then backward. (`sft_micro_step`: the cross-entropy of train.py --sft.)
4. `train_step`: the step's metric sums over all ranks (one all-reduce), gradient clipping,
   then the optimizer. A non-finite loss or gradient norm raises `NonFiniteStep` BEFORE
   the optimizer step, so the weights stay those of the last good step.
5. The optimizer (`build_optimizer`): RMSprop (SPIN's choice) or AdamW, with a linear (or
   cosine / constant) schedule with warmup, as transformers defines it (`lr_lambda`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, fields
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .errors import UserError
from .fsdp import all_reduce_sum, mixed_precision_policy
from .loss import sft_step, spin_step
from .optim import CompiledRMSprop
from .settings import TrainSettings


class NonFiniteStep(ArithmeticError):
    """A step whose loss or gradient norm is not finite; nothing was applied."""

    def __init__(self, what: str, value: float):
        super().__init__(f"non-finite {what} ({value})")
        self.what, self.value = what, value


# ---------------------------------------------------------------------- the schedule
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


def my_micro_batches(idx: List[int], micro_batch_size: int, accumulation: int, rank: int,
                     world_size: int) -> List[List[int]]:
    """This rank's micro-batches of a global batch: micro j = a * world + rank for a in
    accumulation."""
    m, W = micro_batch_size, world_size
    return [idx[(a * W + rank) * m:(a * W + rank + 1) * m] for a in range(accumulation)]


def resume_settings(cfg: TrainSettings, device) -> dict:
    """{field: value} of every setting a checkpoint must agree on: every TrainSettings field
    not declared bookkeeping, and mixed precision as the precision it resolves to here."""
    out = {}
    for f in fields(cfg):
        if f.metadata.get("resume", True):
            v = getattr(cfg, f.name)
            out[f.name] = asdict(v) if hasattr(v, "__dataclass_fields__") else v
    mp = mixed_precision_policy(cfg.mixed_precision, torch.device(device))
    out["mixed_precision"] = "fp32" if mp is None else "bf16"
    return out


def build_optimizer(policy: torch.nn.Module, cfg: TrainSettings, total_steps: int):
    """The optimizer over the trainable parameters, and its lr schedule."""
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
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler, total_steps, warmup))
    return opt, sched


# ---------------------------------------------------------------------- one step
LossHook = Optional[Callable[[torch.Tensor], torch.Tensor]]


def spin_micro_step(policy, batch: dict, reference: torch.Tensor, cfg: TrainSettings, world_size: int,
                    hook: LossHook = None) -> Dict[str, float]:
    """Forward and backward of one micro-batch of pairs (batch: [real; generated] rows on the
    device; reference: log p_θt of the same rows). Returns its metric sums."""
    losses, stats = spin_step(policy, batch, reference, beta=cfg.beta, loss_type=cfg.loss_type,
                              label_smoothing=cfg.label_smoothing, fp32_logits=cfg.fp32_logits)
    loss = losses.sum() * (world_size / cfg.batch_size)  # FSDP averages over ranks: × W
    if hook is not None:
        loss = hook(loss)
    loss.backward()
    sums = {k: float(v.sum()) for k, v in stats.items()}
    sums["loss"] = float(loss.detach()) * cfg.batch_size / world_size   # Σ pair losses, as backward saw it
    return sums


def spin_metrics(sums: Dict[str, float], batch_size: int) -> dict:
    """The step's loss and logged means from the global sums."""
    rec = {k: v / batch_size for k, v in sums.items() if k.startswith(("rewards/", "logps/"))}
    rec["loss"] = sums["loss"] / batch_size
    return rec


def sft_micro_step(policy, batch: dict, global_tokens: int, cfg: TrainSettings, world_size: int,
                   hook: LossHook = None) -> Dict[str, float]:
    """Supervised fine-tuning: the mean NLL over the global batch's answer tokens."""
    nll, stats = sft_step(policy, batch, fp32_logits=cfg.fp32_logits)
    loss = nll * (world_size / global_tokens)
    if hook is not None:
        loss = hook(loss)
    loss.backward()
    return {k: float(v) for k, v in stats.items()}


def sft_metrics(sums: Dict[str, float], batch_size: int) -> dict:
    return {"loss": sums["nll"] / max(1.0, sums["tokens"]), "tokens": int(sums["tokens"])}


def train_step(policy, optimizer, micro_steps: Iterable[Callable[[], Dict[str, float]]],
               metrics: Callable[[Dict[str, float]], dict], max_grad_norm: float, device) -> dict:
    """One optimizer step: this rank's micro-steps (each a forward + backward returning its
    metric sums; a "tokens/processed" sum gives tokens/s), the sums over all ranks, gradient clipping, the finite check, then the
    optimizer. Returns the step's metrics with lr, grad_norm, tokens/s and time."""
    t_step = time.perf_counter()
    policy.train()
    sums: Dict[str, float] = {}
    for micro_step in micro_steps:
        for k, v in micro_step().items():
            sums[k] = sums.get(k, 0.0) + v
    names = sorted(sums)
    total = all_reduce_sum(torch.tensor([sums[k] for k in names], dtype=torch.float64, device=device))
    sums = dict(zip(names, total.tolist()))
    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm or float("inf"), foreach=True)
    gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
    rec = metrics(sums)
    if not math.isfinite(rec["loss"]):
        raise NonFiniteStep("loss", rec["loss"])
    if not math.isfinite(gn):
        raise NonFiniteStep("gradient norm", gn)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t_step
    rec.update({"tokens/s": sums.get("tokens/processed", 0.0) / dt, "lr": lr, "grad_norm": gn,
                "time": round(dt, 4)})
    return rec
