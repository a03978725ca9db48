"""SPIN's self-play step: y' ~ p_θt(·|x) for every SFT prompt x, written as a pairs file.

`sample_pairs(model, tok, examples, recipe)` is the step itself: render each prompt with
the chat template training uses, cut it by training's truncation rule, sample y' with the
KV-cache sampler, decode. It touches no file and no process group.

`generate_pairs_file(recipe, t, env)` is the resumable, sharded job around it (what
generate.py and `train.py --generate` run):
* rank r of W takes every W-th prompt not yet done and appends one flushed line per prompt
  to `<out>.part-<r>`; at the end rank 0 merges everything into the pairs file, in the
  order of the SFT file, and removes the parts. A re-run (after a crash, or with more
  prompts) keeps every line already written, in the pairs file or in a part, and samples
  only the rest.
* Seeds are per prompt, from (seed, prompt id): a prompt gets the same y' whatever the
  number of ranks or the batch it lands in (greedy output is identical; a sampled token
  could only differ if a last-bit float difference of another batch shape moved it across
  a step of the inverse CDF).

The prompt y' is sampled from is the one training will condition on: training's rule
(rows.truncate_pair) applied to (prompt, real answer, an answer of max_new_tokens + eos);
whatever still does not fit the model's context next to max_new_tokens is cut further,
keeping the end. Truncated prompts are counted and flagged ("truncated" in "gen").
"""
from __future__ import annotations

import glob
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import torch

from . import distributed as D
from .checkpoint import load_model
from .data import JsonlAppender, ReadStats, SFTExample, data_files, read_jsonl, read_sft, write_jsonl_atomic
from .errors import UserError
from .layout import fingerprint_cache_path, pairs_path, theta_path
from .recipe import Recipe
from .rows import truncate_pair
from ..core.sampling import generate, row_seed
from .tokenizer import load_tokenizer

# what makes two lines of a pairs file comparable (the per-line fields are left out)
SETTING_KEYS = ("model", "model_sha", "iter", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
                "template", "empty_system", "max_length", "max_prompt_length", "bos", "decode")


class GenerateError(UserError):
    pass


def keep_end(ids: List[int], budget: int, bos_id: Optional[int]) -> List[int]:
    """SPIN's rule, keep the END: <s> (if the prompt starts with it) + the last tokens."""
    if len(ids) <= budget:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [ids[0]] + ids[len(ids) - (budget - 1):]
    return ids[len(ids) - budget:]


def generation_prompt(ids: List[int], real_ids: List[int], max_new_tokens: int, max_length: int,
                      max_prompt_length: int, context: int, bos_id: Optional[int]):
    """The prompt y' is sampled from, and whether it was cut (see the module docstring)."""
    ids, _, _, (cut, _, _) = truncate_pair(ids, real_ids, [0] * (max_new_tokens + 1), max_length,
                                           max_prompt_length, bos_id)
    cap = context - max_new_tokens
    if len(ids) > cap:
        ids, cut = keep_end(ids, cap, bos_id), True
    return ids, cut


def decode_answer(tok, ids: List[int], rule: str = "minispin") -> str:
    """y' as text. "minispin": decoded without special tokens. "spin": uclaml/SPIN's
    spin/generate.py — decoded with them, every "</s>" removed, leading whitespace stripped
    (convert_data.py strips it once more, which changes nothing)."""
    if rule == "spin":
        return tok.decode(ids, skip_special_tokens=False).replace(tok.id_to_piece(tok.eos_id), "").lstrip()
    return tok.decode(ids)


def sample_pairs(model, tok, examples: List[SFTExample], recipe: Recipe,
                 progress=None) -> Iterator[Tuple[SFTExample, str, dict]]:
    """SPIN's self-play step: yields (example, y', per-line info) for each example, a batch
    of similar-length prompts at a time, longest first. `tok` renders the generation prompt
    (its template is the recipe's gen_template, or training's)."""
    g, d = recipe.generation, recipe.data
    context = model.config.max_position_embeddings
    if context - g.max_new_tokens < 2:
        raise GenerateError(f"max_new_tokens {g.max_new_tokens} leaves no room for a prompt in "
                            f"the model's context of {context} tokens")
    # y' is sampled from the prompt training will condition on — unless generation renders
    # another template than training (uclaml/SPIN's setup), where that cannot hold: then
    # only the context limit cuts the prompt
    same_prompt = g.gen_template in ("", recipe.model.template)
    encoded = []
    for ex in examples:
        ids, _ = tok.encode_chat(ex.prompt, add_generation_prompt=True, empty_system=recipe.model.empty_system,
                                 bos=g.gen_bos)
        if same_prompt:
            real_ids = tok.encode(ex.real, continuation=True) + [tok.eos_id]
            ids, cut = generation_prompt(ids, real_ids, g.max_new_tokens, d.max_length,
                                         d.max_prompt_length, context, tok.bos_id)
        else:
            cut = len(ids) > context - g.max_new_tokens
            ids = keep_end(ids, context - g.max_new_tokens, tok.bos_id)
        encoded.append((ex, ids, cut))
    encoded.sort(key=lambda e: -len(e[1]))
    for start in range(0, len(encoded), g.gen_batch_size):
        chunk = encoded[start:start + g.gen_batch_size]
        outs = generate(model, [ids for _, ids, _ in chunk], g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, eos_id=tok.eos_ids,
                        seeds=[row_seed(recipe.seed, ex.id) for ex, _, _ in chunk],
                        batch_size=len(chunk), compile=g.compile)
        for (ex, ids, cut), out in zip(chunk, outs):
            yield ex, decode_answer(tok, out, g.decode), {"prompt_tokens": len(ids), "truncated": cut,
                                        "new_tokens": len(out), "finished": len(out) < g.max_new_tokens}
        if progress is not None:
            progress(len(chunk), sum(len(o) for o in outs))


def select_records(n_records: int, seed: int, n: Optional[int]) -> List[int]:
    """Which records `Dataset.shuffle(seed=seed).select(range(n))` of HF datasets takes:
    its permutation is numpy's default_rng(seed).permutation over ALL n_records rows
    (datasets' arrow_dataset.py, Dataset.shuffle); n=None takes them all."""
    import numpy as np
    return [int(i) for i in np.random.default_rng(seed).permutation(n_records)[:n]]


def read_sft_prompts(recipe: Recipe, strict: bool = False):
    """The SFT records generation uses: the recipe's data, shuffled first when it names a
    shuffle_seed, then the first num_prompts. The shuffle is datasets' shuffle(seed) as
    uclaml/SPIN's and the study's generate.py ran it (select_records); shuffle_rows says
    over what: "usable" permutes the records our reader keeps, "all" every record of the
    file, as datasets does, so a record we cannot use moves no other prompt; of the
    selection, the records without a user turn or an answer are left out (counted in
    stats.skipped), blank ones are kept as the original code kept them."""
    d = recipe.data
    n, seed = d.num_prompts or None, d.shuffle_seed
    if seed >= 0 and d.shuffle_rows == "all":
        every, whole = read_sft(d.path, strict=strict, every_record=True)
        chosen = [every[i] for i in select_records(len(every), seed, n)]
        examples = [ex for ex in chosen if ex is not None]
        stats = ReadStats(records=whole.records, kept=len(examples))
        skipped = len(chosen) - len(examples)
        if skipped:
            stats.skipped["selected, but without a user turn or an answer"] = skipped
        return examples, stats
    examples, stats = read_sft(d.path, strict=strict, limit=None if seed >= 0 else n)
    if seed >= 0:
        examples = [examples[i] for i in select_records(len(examples), seed, n)]
    return examples, stats


def part_path(out: str, rank: int) -> str:
    return f"{out}.part-{rank}"


def part_files(out: str) -> List[str]:
    return sorted(glob.glob(glob.escape(out) + ".part-*"))


def _log(env, msg: str):
    if env.is_main:
        print(f"generate: {msg}", file=sys.stderr, flush=True)


def generate_pairs_file(recipe: Recipe, t: int, env, model_dir: Optional[str] = None,
                        out: Optional[str] = None, overwrite: bool = False, strict: bool = False,
                        progress: bool = True) -> dict:
    """Sample y' for every SFT prompt of the recipe with θ_t (or model_dir) into the pairs
    file of iteration t (or out), resuming what is there. Every rank calls it; returns a
    summary (the counts are summed over ranks)."""
    model_dir = model_dir or theta_path(recipe.run_dir, t, recipe.model.path)
    out = out or pairs_path(recipe.run_dir, t)
    if not os.path.isdir(model_dir):
        hint = (f" (θ_{t} is the export of iteration {t - 1}: run train.py --iter {t - 1} first, "
                "or pass --model)") if t > 0 and model_dir == theta_path(recipe.run_dir, t, "") else ""
        raise GenerateError(f"model folder '{model_dir}' does not exist{hint}")
    if not recipe.data.path:
        raise GenerateError("no SFT data: give --data or a recipe with 'data'")
    if not data_files(recipe.data.path):
        from .hub import missing
        raise GenerateError(missing("data", recipe.data.path, recipe.where.get("data", recipe.source)))
    device = env.device
    dtype = D.compute_dtype(recipe.model.dtype, device)
    tok = load_tokenizer(model_dir, template=recipe.generation.gen_template or recipe.model.template)
    examples, stats = read_sft_prompts(recipe, strict)
    if stats.skipped:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
        _log(env, f"{recipe.data.path}: skipped {sum(stats.skipped.values())} of {stats.records} records ({why})")
    from .checkpoint import model_fingerprint
    # by content: a retrained θ_t at the same path differs (rank 0 hashes, cached in the run folder)
    theta_sha = D.broadcast_object(model_fingerprint(model_dir, fingerprint_cache_path(recipe.run_dir))
                                   if env.is_main else None)
    settings = {"model": model_dir, "model_sha": theta_sha, "iter": t, "max_new_tokens": recipe.generation.max_new_tokens,
                "temperature": recipe.generation.temperature, "top_p": recipe.generation.top_p,
                "top_k": recipe.generation.top_k, "seed": recipe.seed, "template": tok.template,
                "bos": recipe.generation.gen_bos, "decode": recipe.generation.decode,
                "empty_system": recipe.model.empty_system, "max_length": recipe.data.max_length,
                "max_prompt_length": recipe.data.max_prompt_length,
                "dtype": str(dtype).replace("torch.", "")}

    # ---- what is already done (every rank reads the same files before anyone writes)
    if overwrite and env.is_main:
        for path in [out] + part_files(out):
            if os.path.exists(path):
                os.remove(path)
    D.barrier()
    done_lines = read_jsonl(out)
    for path in part_files(out):
        done_lines += read_jsonl(path)
    stale = sum(1 for rec in done_lines if isinstance(rec.get("gen"), dict)
                and rec["gen"].get("model_sha") not in (None, theta_sha))
    if stale:
        raise GenerateError(f"{out}: {stale} lines were sampled from another {model_dir} than the one "
                            "there now (its weights changed since); pass --overwrite to sample them all "
                            "again with the current model")
    done = {rec.get("id") for rec in done_lines}
    core = lambda gen: tuple(gen.get(k) for k in SETTING_KEYS) if isinstance(gen, dict) else None  # noqa: E731
    other = sum(1 for rec in done_lines if core(rec.get("gen")) != core(settings))
    todo = [ex for ex in examples if ex.id not in done]
    shard = todo[env.rank::env.world_size]
    n_done = len(examples) - len(todo)
    _log(env, f"{len(examples)} prompts, {n_done} already in {out}, {len(todo)} to generate "
              f"on {env.world_size} process(es) with {model_dir}")
    g = recipe.generation
    _log(env, f"sampling: temperature {g.temperature}, top_p {g.top_p}, top_k {g.top_k}, "
              f"max_new_tokens {g.max_new_tokens}"
              + (f" (unset keys from {recipe.sampling_from})" if recipe.sampling_from else ""))
    if other:
        _log(env, f"warning: {other} existing lines were generated with other settings; they are "
                  "kept (use --overwrite to regenerate everything)")
    D.barrier()

    # ---- this rank's shard
    n_tokens, n_trunc, t0 = 0, 0, time.time()
    if shard:
        model = load_model(model_dir, dtype=dtype, device=device)
        bar = None
        if progress and env.is_main:
            from .plan import stage_bar   # train.py's stage and whole-iteration ETA, if it runs us
            bar = stage_bar("generate", len(shard), share=1, unit="prompt", desc=f"iter{t} rank 0/{env.world_size}",
                            dynamic_ncols=True, file=sys.stderr)

        def tick(n_prompts, n_new):
            if bar is not None:
                bar.update(n_prompts)
                bar.set_postfix_str(f"{(n_tokens + n_new) / max(time.time() - t0, 1e-9):.1f} tok/s")

        with JsonlAppender(part_path(out, env.rank)) as w:
            for ex, text, info in sample_pairs(model, tok, shard, recipe, progress=tick):
                w.write({"id": ex.id, "prompt": ex.prompt, "real": ex.real, "generated": text,
                         "gen": dict(settings, **info)})
                n_tokens += info["new_tokens"]
                n_trunc += info["truncated"]
        if bar is not None:
            bar.close()
        del model  # a caller (train.py --generate) goes on to train: give the memory back
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.time() - t0
    counts = D.all_reduce_sum(torch.tensor([len(shard), n_trunc, n_tokens], dtype=torch.long,
                                           device=device))

    # ---- rank 0 merges everything into the pairs file, in SFT order
    if env.is_main:
        lines = read_jsonl(out)
        for path in part_files(out):
            lines += read_jsonl(path)
        by_id = {}
        for rec in lines:
            by_id.setdefault(rec.get("id"), rec)
        order = [ex.id for ex in examples if ex.id in by_id]
        known = set(order)
        extra = [i for i in by_id if i not in known]  # kept: lines of records no longer read
        write_jsonl_atomic(out, [by_id[i] for i in order + extra])
        for path in part_files(out):
            os.remove(path)
        if extra:
            _log(env, f"note: kept {len(extra)} earlier lines whose ids are not among these prompts")
    D.barrier()
    generated, truncated, tokens = (int(x) for x in counts.cpu())
    _log(env, f"wrote {out}: {generated} generated now ({tokens} tokens, "
              f"{tokens / max(elapsed, 1e-9):.1f} tok/s on rank 0's clock), {n_done} kept, "
              f"{truncated} prompts truncated (keep-the-end rule)")
    return {"out": out, "prompts": len(examples), "already_done": n_done, "generated": generated,
            "truncated": truncated, "skipped": dict(stats.skipped), "new_tokens": tokens,
            "seconds": round(elapsed, 2), "world_size": env.world_size}
