"""How much of a SPIN step is padding: padding_fraction for a recipe's own pairs, or for the
study's UltraChat rows under a stated length assumption. No model runs.

    python scripts/padding.py --config tiny --pairs runs/tiny/iter0/pairs.jsonl
    python scripts/padding.py --config smollm2-135m --pairs runs/smollm2-135m/iter0/pairs.jsonl
    python scripts/padding.py --config smollm2-135m       # no pairs: real answers, generated at the cap
    python scripts/padding.py --ultrachat                 # the study's iteration-0 batches, assumed lengths

With --pairs: the pairs are tokenized as train.py does (the recipe's rows, template and
truncation; the fixes are not applied, they change no length), dealt into the run's global
batches (seed, epochs, last_batch) and micro-batches, and measured as the trainer measures
its own (Trainer.padding_info, which train.py writes to train_info.json): padded positions
/ all positions over the policy's micro-batches, each padded to its longest row; and the same
with the rows packed (packing.py's bins).

--ultrachat: no UltraChat answers are in this repository, and the dataset card of
HuggingFaceH4/ultrachat_200k gives no answer lengths (only 207,865 train_sft dialogues in
1,397,058,554 bytes, all turns together). So the lengths are an ASSUMPTION, printed with the
result: prompt and first real answer lengths lognormal (medians --prompt-median and
--answer-median tokens, log-σ 0.8 and 0.7), the generated answer at the 256-token cap that
the study's greedy generation (max_new_tokens 256) reaches on long answers, and the study's
rows ("study": each answer row repeats the prompt, template tokens ~10), truncated with
uclaml/SPIN's rule at max_length 1024 / max_prompt_length 512, micro-batches of 7 pairs
(the study's iteration 0: 56 = 7 x 8 processes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minispin.core.packing import layout_padding  # noqa: E402
from minispin.run.rows import TokenizedPair, row_lengths, truncate_pair_spin  # noqa: E402
from minispin.core.train import epoch_steps, global_batch  # noqa: E402


def run_batches(items, batch_size: int, micro_batch_size: int, epochs: int, last_batch: str, seed: int,
                max_steps: int = 0):
    """The row lengths of every policy micro-batch of a run over `items`, in the trainer's order."""
    per_epoch = epoch_steps(len(items), batch_size, last_batch)
    steps = per_epoch * epochs if not max_steps else min(per_epoch * epochs, max_steps)
    for step in range(steps):
        idx = global_batch(len(items), step, batch_size, per_epoch, seed)
        for j in range(0, len(idx), micro_batch_size):
            yield row_lengths([items[i] for i in idx[j:j + micro_batch_size]])


def recipe_items(config: str, pairs: str = None):
    """The recipe's rows from a pairs file; without one, from its SFT data's first
    num_prompts records, each generated answer put at the max_new_tokens cap (+ eos), cut
    to the room the prompt leaves (stated as such where printed)."""
    from minispin.run.data import read_pairs, read_sft
    from minispin.run.recipe import resolve
    from minispin.run.rows import tokenize_pairs
    from minispin.run.tokenizer import load_tokenizer
    recipe = resolve(config)
    tok = load_tokenizer(recipe.model.path, template=recipe.model.template)
    if pairs:
        records = read_pairs(pairs)
    else:
        examples, _ = read_sft(recipe.data.path, limit=recipe.data.num_prompts or None)
        records = [{"id": e.id, "prompt": e.prompt, "real": e.real, "generated": ""} for e in examples]
    items, _ = tokenize_pairs(tok, records, "iter0", recipe.data.max_length,
                              recipe.data.max_prompt_length, empty_system=recipe.model.empty_system,
                              rows=recipe.data.rows)
    if not pairs:
        cap = recipe.generation.max_new_tokens + 1
        for p in items:
            p.generated = [tok.eos_id] * min(cap, recipe.data.max_length - len(p.prompt))
    t = recipe.training
    return items, dict(batch_size=t.batch_size, micro_batch_size=t.micro_batch_size, epochs=t.epochs,
                       last_batch=t.last_batch, seed=recipe.seed, max_steps=t.max_steps)


def ultrachat_items(n: int, prompt_median: float, answer_median: float, gen_tokens: int, seed: int = 0):
    """Assumed study rows (see the module docstring): TokenizedPairs of dummy tokens."""
    rng = random.Random(seed)
    template = 10   # the zephyr turn markers around the repeated user turn and the answer
    items = []
    for i in range(n):
        p = max(4, round(rng.lognormvariate(0, 0.8) * prompt_median))
        a = max(1, round(rng.lognormvariate(0, 0.7) * answer_median))
        ones = lambda k: ([0] * k, [1] * k)  # noqa: E731
        prompt, real, gen, _ = truncate_pair_spin(ones(p), ones(p + template + a + 1),
                                                  ones(p + template + gen_tokens + 1), 1024, 512)
        items.append(TokenizedPair(f"u/{i}", prompt[0], real[0], gen[0]))
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="the recipe whose tokenizer, rows and batches count")
    ap.add_argument("--pairs", help="a pairs.jsonl of that recipe (generate.py's output)")
    ap.add_argument("--ultrachat", action="store_true", help="the study's UltraChat rows, assumed lengths")
    ap.add_argument("--prompt-median", type=float, default=60.0, help="--ultrachat: median prompt tokens")
    ap.add_argument("--answer-median", type=float, default=250.0, help="--ultrachat: median real answer tokens")
    ap.add_argument("--pairs-count", type=int, default=20000, help="--ultrachat: pairs (the study's 20,000)")
    ap.add_argument("--dump-lengths", metavar="FILE",
                    help="also write the pairs' [prompt, real, generated] token lengths as JSON "
                         "(bench/bench_train.py --lengths reads them)")
    args = ap.parse_args(argv)
    if args.ultrachat:
        items = ultrachat_items(args.pairs_count, args.prompt_median, args.answer_median, 256)
        batches = dict(batch_size=56, micro_batch_size=7, epochs=1, last_batch="fill", seed=42)
        what = (f"study rows on UltraChat, ASSUMED lengths: prompt median {args.prompt_median:g}, real "
                f"answer median {args.answer_median:g} tokens (lognormal), generated 256; "
                f"{len(items)} pairs, micro-batch 7, one epoch")
    elif args.pairs:
        items, batches = recipe_items(args.config, args.pairs)
        what = f"recipe {args.config}, {len(items)} pairs from {args.pairs}"
    else:
        items, batches = recipe_items(args.config)
        what = (f"recipe {args.config}, {len(items)} real answers of its data, every generated "
                f"answer ASSUMED at the max_new_tokens cap")
    # packed as the trainer packs: sequences of at most the run's longest row
    info = layout_padding(run_batches(items, **batches), max(row_lengths(items)))
    print(what)
    print(json.dumps(info))
    if args.dump_lengths:
        with open(args.dump_lengths, "w") as f:
            json.dump({"source": what, "lengths": [[len(p.prompt), len(p.real), len(p.generated)] for p in items]}, f)
            f.write("\n")
    return info


if __name__ == "__main__":
    main()
