"""The frozen reference θ_t: log p_θt(y|x) and log p_θt(y'|x) of every pair.

`ref_mode = "precompute"` (default): before the first step the policy IS θ_t, so
`Reference.precompute(policy)` runs it once over every pair (teacher-forced, eval mode, no
gradients) and stores the log-probs in iter<t>/ref_logps.jsonl, keyed by "<source>/<pair
id>" with a fingerprint of θ_t, the tokens, the noise and the numerics (a changed pair is
recomputed, never silently reused). `ref_mode = "online"`: a frozen sharded copy of θ_t
(under LoRA, the policy with its adapters off) recomputes them every step, as the original
SPIN code did.

The study's reference noise (fixes.py decides, core/noise.py draws): each pair's σ goes on
the reference logits of its answers on the recipe's noise side, drawn once per answer
("frozen") or anew at every step ("fresh", which needs the online reference).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Callable, Dict, List, Optional

import torch

from . import distributed as D
from ..core import lora
from ..core.loss import answer_logps, batch_inputs
from ..core.noise import noised_answer_logps, reference_noise
from ..core.settings import TrainSettings
from .data import JsonlAppender, read_jsonl
from .errors import UserError
from .resume import HOOKS
from .rows import TokenizedPair, collate_pairs


class Reference:
    """log p_θt of the [real; generated] rows of a run's pairs, stored or recomputed."""

    def __init__(self, cfg: TrainSettings, env, items: List[TokenizedPair], theta_fp: str, pad_id: int,
                 path: str, progress: bool = True, log: Callable = print, theta_path: str = "θ_t",
                 collate: Optional[Callable] = None):
        """collate: pairs -> batch (default collate_pairs; the trainer's packs with `packing`)."""
        self.cfg, self.env, self.items, self.theta_fp = cfg, env, items, theta_fp
        self.collate = collate or (lambda pairs: collate_pairs(pairs, pad_id))
        self.theta_path = theta_path   # named when θ_t cannot score a pair
        self.pad_id, self.path, self.progress, self.log = pad_id, path, progress, log
        self.noise = cfg.noise
        self.cache: Dict[str, tuple] = {}
        self.model = None   # the online reference; None when the log-probs are stored

    def fingerprint(self, p: TokenizedPair) -> str:
        noise = [p.noise, self.noise.side, self.noise.seed] if p.noise else []
        # the numerics too: a bf16 or bf16-logit log-prob is not the fp32 one
        numerics = [self.cfg.mixed_precision, self.cfg.fp32_logits, torch.device(self.env.device).type]
        blob = json.dumps([self.theta_fp, p.prompt, p.real, p.generated, noise, numerics]
                          + ([p.attention] if p.attention is not None else []))
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def forward(self, model, batch: dict, step: int) -> torch.Tensor:
        """(2B,) log p_θt of a [real; generated] batch, with the pairs' reference noise
        (a fresh draw per optimizer step in mode "fresh")."""
        dev = self.env.device
        ids, mask = batch["input_ids"].to(dev), batch["loss_mask"].to(dev)
        draw = step if self.noise.mode == "fresh" else None
        noise = reference_noise(batch["keys"], batch["noise"], self.noise.side, self.noise.seed, draw)
        seen, rows = (({k: v.to(dev) if torch.is_tensor(v) else v for k, v in d.items()})
                      for d in batch_inputs(batch))
        with torch.no_grad(), lora.adapters_disabled(model):  # under LoRA, θ_t is the base
            if noise is None:
                return answer_logps(model, ids, mask, self.cfg.fp32_logits, **rows, **seen)
            return noised_answer_logps(model, ids, mask, noise[0], noise[1], self.cfg.fp32_logits,
                                       **rows, **seen)

    def precompute(self, model, step: int = 0):
        """log p_θt of both answers of every pair, once; cached in ref_logps.jsonl.

        The forward batches are fixed slices of ALL pairs (longest first, so each holds
        similar lengths and little padding), whatever the cache holds: a batch with a pair
        missing is computed whole, a complete one skipped. So a run killed after any number
        of records computes each pair in the same batch, with the same padding and rounding,
        as an uninterrupted one. A non-finite log-prob stops the pass (nothing is written)."""
        env, cfg = self.env, self.cfg
        fps = {p.key: self.fingerprint(p) for p in self.items}
        have = {}
        for rec in read_jsonl(self.path):
            if fps.get(rec.get("key")) == rec.get("fp"):
                have[rec["key"]] = (float(rec["real"]), float(rec["generated"]))
        D.barrier()  # everyone has read the file before rank 0 appends to it
        per = cfg.ref_batch_size or 2 * cfg.micro_batch_size
        ordered = sorted(self.items, key=lambda p: len(p.prompt) + max(len(p.real), len(p.generated)),
                         reverse=True)
        batches = [ordered[i:i + per] for i in range(0, len(ordered), per)]
        todo = [b for b in batches if any(p.key not in have for p in b)]
        if todo:
            n_todo = sum(map(len, todo))
            self.log(f"reference pass: log p_θt for {n_todo} pairs ({len(self.items) - n_todo} cached) "
                     f"-> {self.path}")
            model.eval()
            writer = JsonlAppender(self.path, fsync=False) if env.is_main else None
            written = 0
            from .plan import stage_bar   # the stage and the whole iteration's ETA (plan.py)
            bar = stage_bar("reference", n_todo, desc="reference", unit="pair",
                            disable=not (env.is_main and self.progress))
            for start in range(0, len(todo), env.world_size):
                part = todo[start:start + env.world_size]   # one batch per rank
                mine = part[env.rank] if env.rank < len(part) else []
                # every rank must run the forward (FSDP gathers collectively): a rank with
                # nothing left computes a throwaway batch
                work = mine or part[0]
                logps = self.forward(model, self.collate(work), step).cpu().tolist()
                n = len(work)
                out = [(p.key, logps[i], logps[n + i]) for i, p in enumerate(work)] if mine else []
                gathered = [r for results in D.all_gather_objects(out) for r in results]
                self.refuse_non_finite(gathered)   # on every rank: all stop together
                for key, real, gen in gathered:
                    have[key] = (real, gen)
                    if writer:
                        writer.write({"key": key, "real": real, "generated": gen, "fp": fps[key]})
                        written += 1
                        for fn in HOOKS["ref_record"]:
                            fn(self, written)
                bar.update(sum(map(len, part)))
            bar.close()
            if writer:
                writer.close()
        D.barrier()
        self.cache = have

    def refuse_non_finite(self, results):
        """Stop at the first pair whose reference log-prob is NaN or infinite: θ_t cannot
        score it, and every loss on it would be non-finite too."""
        for key, real, gen in results:
            if not (math.isfinite(real) and math.isfinite(gen)):
                raise UserError(
                    f"reference pass: θ_t = {self.theta_path} gives pair {key} a non-finite log-prob "
                    f"(real {real}, generated {gen}); nothing was written for it. Check θ_t's weights "
                    "(NaN or inf, or values so large the logits overflow) and this pair")

    def logps(self, batch: dict, step: int) -> torch.Tensor:
        """(2B,) log p_θt of the batch's [real; generated] rows."""
        if self.model is not None:
            return self.forward(self.model, batch, step)
        keys = batch["keys"]
        vals = [self.cache[k][0] for k in keys] + [self.cache[k][1] for k in keys]
        return torch.tensor(vals, dtype=torch.float32, device=self.env.device)
