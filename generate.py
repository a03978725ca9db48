"""generate.py: SPIN's synthetic answers y' ~ p_θt for the SFT prompts, written as a pairs file.

    python generate.py                               # tiny recipe, iteration 0, CPU
    python generate.py --config zephyr-7b-sft-full --iter 1
    torchrun --nproc_per_node 8 generate.py --iter 1 # each rank a shard, rank 0 merges

For every SFT record: the first user turn x and the first assistant answer y (SPIN's rule),
the prompt rendered with the SAME chat template training uses (tokenizer.encode_chat,
zephyr with SPIN's empty system turn by default), y' sampled from θ_t with minispin's KV-cache
sampler, one line appended to the pairs file (format: minispin/data.py).

Where things live (minispin/layout.py): θ_0 is the recipe's SFT model, θ_t (t >= 1) is
runs/<name>/iter<t-1>/model; the output is runs/<name>/iter<t>/pairs.jsonl. While running,
rank r appends to pairs.jsonl.part-<r> (one flushed line per prompt); at the end rank 0
merges everything into pairs.jsonl in the order of the SFT file and removes the parts.
A re-run (after a crash, or with more prompts) keeps every line already written, in
pairs.jsonl or in any part file, and generates only the rest.

Sampling seeds are per prompt, derived from (--seed, prompt id), so a prompt gets the same
y' whatever the number of ranks or the batch it lands in (greedy output is identical; a
sampled token could differ only if a last-bit float difference of a differently shaped
batch moved it across a boundary of the inverse CDF).

Truncation follows training (minispin.data.truncate_pair, SPIN's rule): when the prompt plus
the longer of its real answer and an answer of --max-new-tokens would exceed --max-length,
the prompt keeps its END, <s> and its last --max-prompt-length - 1 tokens, so y' is sampled
from the prompt train.py will condition on. A prompt that still does not fit the model's
context next to --max-new-tokens is cut further the same way. Truncated prompts are counted
and flagged ("truncated" in "gen").

This file is also a function: train.py --generate calls main(argv) inside its own torchrun
process group, which is used as it is (never re-initialized or destroyed here).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import List, Optional

import torch

from minispin.checkpoint import CheckpointError, load_model
from minispin.config import ConfigError
from minispin.data import DataError, JsonlAppender, read_jsonl, read_sft, truncate_pair, write_jsonl_atomic
from minispin.layout import load_recipe, pairs_path, theta_path
from minispin.sampling import generate, row_seed
from minispin.tokenizer import TEMPLATES, TokenizerError, load_tokenizer

# SPIN's generation settings (uclaml/SPIN: HF generate / vLLM, temperature 1.0, top_p 1.0,
# 256 new tokens; max_prompt_length 512 in training). The recipe overrides these and the
# command line overrides the recipe.
DEFAULTS = dict(max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, seed=42,
                gen_batch_size=32, max_length=1024, max_prompt_length=512, num_prompts=0,
                template="zephyr", empty_system=True)
PROG = "generate.py"


class GenerateError(Exception):
    """A problem the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample SPIN's synthetic answers y' ~ p_θt for the SFT prompts and write "
                    "the pairs file {id, prompt, real, generated, gen} of iteration t.",
        epilog="Settings come from the recipe (--config), then these flags. Output: "
               "runs/<name>/iter<t>/pairs.jsonl; re-running resumes. Under torchrun every "
               "rank generates its shard and rank 0 merges. See docs/generate.md.")
    a = p.add_argument
    a("--config", metavar="RECIPE", default=None,
      help="recipe TOML, or the name of one in configs/ (default: configs/tiny.toml)")
    a("--iter", type=int, default=0, metavar="T",
      help="SPIN iteration t: samples with θ_t (θ_0 = the recipe's SFT model, θ_t = "
           "runs/<name>/iter<t-1>/model) and writes runs/<name>/iter<t>/pairs.jsonl (default 0)")
    a("--model", default=None, metavar="DIR",
      help="HF model folder to sample with, instead of θ_t from the run layout")
    a("--data", default=None, metavar="FILE",
      help="SFT records: .jsonl, .json or .parquet with {messages}, {prompt, completion} or "
           "{question, answer} records (default: the recipe's data)")
    a("--out", default=None, metavar="FILE",
      help="pairs file to write (default: <run-dir>/iter<t>/pairs.jsonl)")
    a("--run-dir", default=None, metavar="DIR",
      help="run folder (default: the recipe's run_dir, runs/<recipe name>)")
    a("--num-prompts", type=int, default=None, metavar="N",
      help="use the first N usable records only; 0 = all (recipe: num_prompts)")
    a("--max-new-tokens", type=int, default=None, metavar="N",
      help="most tokens sampled per answer (SPIN: 256; recipe: max_new_tokens)")
    a("--temperature", type=float, default=None, metavar="T",
      help="sampling temperature; 0 = greedy (SPIN: 1.0)")
    a("--top-p", type=float, default=None, metavar="P",
      help="nucleus sampling: keep the most likely tokens up to probability P (SPIN: 1.0 = off)")
    a("--top-k", type=int, default=None, metavar="K",
      help="keep only the K most likely tokens; 0 = off (default 0)")
    a("--seed", type=int, default=None,
      help="base seed; each prompt samples from a generator seeded by (seed, prompt id) (default 42)")
    a("--batch-size", type=int, default=None, metavar="B",
      help="prompts per batch, per rank (recipe: gen_batch_size; default 32)")
    a("--max-length", type=int, default=None, metavar="N",
      help="training's max_length (SPIN: 1024; recipe: max_length): a prompt whose tokens plus "
           "the longer of its real answer and --max-new-tokens exceed N is truncated to "
           "--max-prompt-length, as train.py will truncate it")
    a("--max-prompt-length", type=int, default=None, metavar="N",
      help="what a truncated prompt keeps: <s> and its last N-1 tokens (SPIN: 512; recipe: "
           "max_prompt_length). Prompts are also cut to the model's context minus "
           "--max-new-tokens. Truncated prompts are counted and flagged")
    a("--template", choices=TEMPLATES, default=None,
      help="chat template for the prompt, the one training uses (default zephyr; 'instruction' "
           "reproduces the original SPIN generation prompt)")
    a("--empty-system", action=argparse.BooleanOptionalAction, default=None,
      help="put SPIN's empty system turn in front of each prompt (default: on)")
    a("--strict", action="store_true",
      help="a record without a user turn or an assistant answer is an error (default: skipped "
           "and counted)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
      help="weights and activations (default: bfloat16 on GPU, float32 on CPU)")
    a("--device", default=None,
      help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if a GPU is visible, else cpu)")
    a("--compile", action="store_true",
      help="torch.compile the decode step (CUDA graphs on GPU); the eager path is the reference")
    a("--overwrite", action="store_true",
      help="delete the existing pairs file and part files first instead of resuming")
    a("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


# ---------------------------------------------------------------- distributed helpers
class _Dist:
    """The process group: an existing one is used as is; torchrun without one gets one
    here (gloo on CPU, nccl on GPU) that is destroyed at the end."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.owned = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1

    def barrier(self):
        if self.world > 1:
            self.dist.barrier()

    def close(self):
        if self.owned:
            self.dist.destroy_process_group()


def part_path(out: str, rank: int) -> str:
    return f"{out}.part-{rank}"


def part_files(out: str) -> List[str]:
    return sorted(glob.glob(glob.escape(out) + ".part-*"))


def keep_end(ids: List[int], budget: int, bos_id: Optional[int]) -> List[int]:
    """SPIN's rule, keep the END: <s> (if the prompt starts with it) + the last tokens."""
    if len(ids) <= budget:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [ids[0]] + ids[len(ids) - (budget - 1):]
    return ids[len(ids) - budget:]


def generation_prompt(ids: List[int], real_ids: List[int], max_new_tokens: int, max_length: int,
                      max_prompt_length: int, context: int, bos_id: Optional[int]):
    """The prompt y' is sampled from, and whether it was cut.

    1. The prompt training will see if y' comes out as long as it may be: training's rule
       (data.truncate_pair) applied to (prompt, real answer, an answer of max_new_tokens + eos).
    2. Then whatever still does not fit the model's context next to max_new_tokens is cut,
       keeping the end again.
    """
    ids, _, _, (cut, _, _) = truncate_pair(ids, real_ids, [0] * (max_new_tokens + 1), max_length,
                                           max_prompt_length, bos_id)
    cap = context - max_new_tokens
    if len(ids) > cap:
        ids, cut = keep_end(ids, cap, bos_id), True
    return ids, cut


def _resolve(args) -> dict:
    recipe = load_recipe(args.config)
    cfg = dict(DEFAULTS)
    cfg.update({k: recipe[k] for k in DEFAULTS if k in recipe})
    flags = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                 gen_batch_size=args.batch_size, max_length=args.max_length,
                 max_prompt_length=args.max_prompt_length,
                 num_prompts=args.num_prompts, template=args.template,
                 empty_system=args.empty_system)
    cfg.update({k: v for k, v in flags.items() if v is not None})
    run_dir = args.run_dir or recipe["run_dir"]
    cfg["run_dir"] = run_dir
    cfg["model"] = args.model or theta_path(run_dir, args.iter, recipe.get("model"))
    cfg["data"] = args.data or recipe.get("data")
    cfg["out"] = args.out or pairs_path(run_dir, args.iter)
    for key, lo in (("max_new_tokens", 1), ("gen_batch_size", 1), ("max_prompt_length", 2),
                    ("max_length", 3),
                    ("top_k", 0), ("num_prompts", 0)):
        if int(cfg[key]) < lo:
            raise GenerateError(f"{key.replace('_', '-')} must be >= {lo}, got {cfg[key]}")
    if not 0.0 < float(cfg["top_p"]) <= 1.0:
        raise GenerateError(f"top-p must be in (0, 1], got {cfg['top_p']}")
    if float(cfg["temperature"]) < 0:
        raise GenerateError(f"temperature must be >= 0, got {cfg['temperature']}")
    if not cfg["model"]:
        raise GenerateError("no model: give --model or a recipe with 'model'")
    if not cfg["data"]:
        raise GenerateError("no data: give --data or a recipe with 'data'")
    return cfg


def main(argv: Optional[List[str]] = None) -> dict:
    """Run generation; returns a summary dict. Errors exit with one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (GenerateError, DataError, CheckpointError, ConfigError, TokenizerError,
            FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None


def _run(args) -> dict:
    cfg = _resolve(args)
    model_dir, out = cfg["model"], cfg["out"]
    if not os.path.isdir(model_dir):
        hint = (f" (θ_{args.iter} is the export of iteration {args.iter - 1}: run train.py "
                f"--iter {args.iter - 1} first, or pass --model)") if args.iter > 0 and not args.model else ""
        raise GenerateError(f"model folder '{model_dir}' does not exist{hint}")
    d = _Dist()
    try:
        return _generate_all(args, cfg, d)
    finally:
        d.close()


def _log(d: _Dist, msg: str):
    if d.rank == 0:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _generate_all(args, cfg: dict, d: _Dist) -> dict:
    out, t = cfg["out"], args.iter
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per rank
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    tok = load_tokenizer(cfg["model"], template=cfg["template"])
    examples, stats = read_sft(cfg["data"], strict=args.strict, limit=int(cfg["num_prompts"]) or None)
    if stats.skipped:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
        _log(d, f"{cfg['data']}: skipped {sum(stats.skipped.values())} of {stats.records} records ({why})")
    model = load_model(cfg["model"], dtype=dtype, device=device)
    context = model.config.max_position_embeddings
    if context - int(cfg["max_new_tokens"]) < 2:
        raise GenerateError(f"max-new-tokens {cfg['max_new_tokens']} leaves no room for a prompt in "
                            f"the model's context of {context} tokens")
    if int(cfg["max_prompt_length"]) >= int(cfg["max_length"]):
        raise GenerateError(f"max-prompt-length ({cfg['max_prompt_length']}) must be smaller than "
                            f"max-length ({cfg['max_length']})")
    settings = {"model": cfg["model"], "iter": t, "max_new_tokens": int(cfg["max_new_tokens"]),
                "temperature": float(cfg["temperature"]), "top_p": float(cfg["top_p"]),
                "top_k": int(cfg["top_k"]), "seed": int(cfg["seed"]), "template": cfg["template"],
                "empty_system": bool(cfg["empty_system"]), "max_length": int(cfg["max_length"]),
                "max_prompt_length": int(cfg["max_prompt_length"]),
                "dtype": dtype_name}

    # ---- what is already done (every rank reads the same files before anyone writes)
    if args.overwrite and d.rank == 0:
        for path in [out] + part_files(out):
            if os.path.exists(path):
                os.remove(path)
    d.barrier()
    done_lines = read_jsonl(out)
    for path in part_files(out):
        done_lines += read_jsonl(path)
    done = {rec.get("id") for rec in done_lines}
    other = sum(1 for rec in done_lines if _core(rec.get("gen")) != _core(settings))
    todo = [ex for ex in examples if ex.id not in done]
    shard = todo[d.rank::d.world]
    n_done = sum(1 for ex in examples if ex.id in done)
    _log(d, f"{len(examples)} prompts, {n_done} already in {out}, {len(todo)} to generate "
            f"on {d.world} process(es) with {cfg['model']}")
    if other:
        _log(d, f"warning: {other} existing lines were generated with other settings; they are "
                "kept (use --overwrite to regenerate everything)")
    d.barrier()

    # ---- generate this rank's shard, longest prompts first (similar lengths share a batch)
    encoded = []
    n_trunc = 0
    for ex in shard:
        ids, _ = tok.encode_chat(ex.prompt, add_generation_prompt=True,
                                 empty_system=bool(cfg["empty_system"]))
        real_ids = tok.encode(ex.real, continuation=True) + [tok.eos_id]
        ids, cut = generation_prompt(ids, real_ids, int(cfg["max_new_tokens"]), int(cfg["max_length"]),
                                     int(cfg["max_prompt_length"]), context, tok.bos_id)
        n_trunc += cut
        encoded.append((ex, ids, cut))
    encoded.sort(key=lambda e: -len(e[1]))
    bs, new = int(cfg["gen_batch_size"]), int(cfg["max_new_tokens"])
    n_tokens, t0 = 0, time.time()
    bar = None
    if not args.no_progress and d.rank == 0 and encoded:
        from tqdm import tqdm
        bar = tqdm(total=len(encoded), unit="prompt", desc=f"iter{t} rank 0/{d.world}",
                   dynamic_ncols=True, file=sys.stderr)
    if encoded:
        with JsonlAppender(part_path(out, d.rank)) as w:
            for start in range(0, len(encoded), bs):
                chunk = encoded[start:start + bs]
                outs = generate(model, [ids for _, ids, _ in chunk], new,
                                temperature=settings["temperature"], top_p=settings["top_p"],
                                top_k=settings["top_k"], eos_id=tok.eos_id,
                                seeds=[row_seed(settings["seed"], ex.id) for ex, _, _ in chunk],
                                batch_size=len(chunk), compile=args.compile)
                for (ex, ids, cut), o in zip(chunk, outs):
                    w.write({"id": ex.id, "prompt": ex.prompt, "real": ex.real,
                             "generated": tok.decode(o),
                             "gen": dict(settings, prompt_tokens=len(ids), truncated=cut,
                                         new_tokens=len(o), finished=len(o) < new)})
                    n_tokens += len(o)
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{n_tokens / max(time.time() - t0, 1e-9):.1f} tok/s")
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    del model  # a caller (train.py --generate) goes on to train: give the memory back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    counts = torch.tensor([len(encoded), n_trunc, n_tokens], dtype=torch.long)
    if d.world > 1:
        if d.dist.get_backend() == "nccl":  # nccl reduces GPU tensors only
            counts = counts.to(device)
        d.dist.all_reduce(counts)
    d.barrier()

    # ---- rank 0 merges everything into the pairs file, in SFT order
    if d.rank == 0:
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
            _log(d, f"note: kept {len(extra)} earlier lines whose ids are not among these prompts")
    d.barrier()
    generated, truncated, tokens = (int(x) for x in counts)
    summary = {"out": out, "prompts": len(examples), "already_done": n_done, "generated": generated,
               "truncated": truncated, "skipped": dict(stats.skipped), "new_tokens": tokens,
               "seconds": round(elapsed, 2), "world_size": d.world}
    _log(d, f"wrote {out}: {generated} generated now ({tokens} tokens, "
            f"{tokens / max(elapsed, 1e-9):.1f} tok/s on rank 0's clock), {n_done} kept, "
            f"{truncated} prompts truncated (keep-the-end rule)")
    return summary


def _core(gen) -> Optional[tuple]:
    """The settings that make two lines comparable (not the per-line fields)."""
    if not isinstance(gen, dict):
        return None
    keys = ("model", "iter", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
            "template", "empty_system", "max_length", "max_prompt_length")
    return tuple(gen.get(k) for k in keys)


if __name__ == "__main__":
    main()
