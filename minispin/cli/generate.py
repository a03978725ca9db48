"""minispin-generate (python generate.py in a checkout) — SPIN's synthetic answers
y' ~ p_θt for the SFT prompts, written as a pairs file.

    python generate.py                               # tiny recipe, iteration 0, CPU
    python generate.py --config zephyr-7b-sft-full --iter 1
    torchrun --nproc_per_node 8 generate.py --iter 1 # each rank a shard, rank 0 merges

For every SFT record: the first user turn x and the first assistant answer y (SPIN's rule),
the prompt rendered with the chat template training uses, y' sampled from θ_t, one line
appended to runs/<name>/iter<t>/pairs.jsonl. Re-running resumes; seeds are per prompt, so
the output does not depend on the number of processes. The logic is minispin/run/pairs.py;
docs/generate.md has the file format, the truncation rule and resume.
"""
from __future__ import annotations

import argparse

from minispin.run import distributed as D
from minispin.run import recipe as R
from minispin.cli import apply_threads, prog
from minispin.cli.args import ArgumentParser, run_cli, path_arg, iteration_arg
from minispin.run.errors import stage
from minispin.run.iteration import locked
from minispin.run.layout import pairs_path, theta_path
from minispin.run.pairs import generate_pairs_file
from minispin.run.preempt import stoppable
from minispin.run.preflight import generate_preflight

KEYS = ("data", "num_prompts", "shuffle_seed", "shuffle_rows", "max_new_tokens", "temperature", "top_p", "top_k",
        "seed", "gen_batch_size", "max_length", "max_prompt_length", "template", "empty_system",
        "gen_template", "gen_bos", "decode", "dtype", "device", "compile", "cpu_threads",
        "dist_timeout")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog("minispin-generate"), description="Sample SPIN's synthetic answers y' ~ p_θt for the SFT "
        "prompts and write the pairs file {id, prompt, real, generated, gen} of iteration t.",
        epilog="Settings come from the recipe (--config), then these flags. Output: "
               "runs/<name>/iter<t>/pairs.jsonl; re-running resumes. Under torchrun every rank "
               "generates its shard and rank 0 merges. See docs/generate.md.")
    p.add_argument("--config", type=path_arg, metavar="RECIPE", default=None,
                   help="recipe TOML, or the name of one in configs/ (default: configs/tiny.toml)")
    p.add_argument("--iter", type=iteration_arg, default=0, metavar="T",
                   help="SPIN iteration t: samples with θ_t (θ_0 = the recipe's SFT model, θ_t = "
                        "runs/<name>/iter<t-1>/model) and writes runs/<name>/iter<t>/pairs.jsonl (default 0)")
    p.add_argument("--model", type=path_arg, default=None, metavar="DIR",
                   help="HF model folder to sample with, instead of θ_t from the run layout; or a "
                        "Hugging Face Hub id ORG/NAME[@REVISION], fetched into huggingface_hub's cache")
    p.add_argument("--out", type=path_arg, default=None, metavar="FILE",
                   help="pairs file to write (default: <run-dir>/iter<t>/pairs.jsonl)")
    p.add_argument("--run-dir", type=path_arg, default=None, metavar="DIR",
                   help="run folder (default: the recipe's run_dir, runs/<recipe name>)")
    p.add_argument("--strict", action="store_true",
                   help="a record without a user turn or an assistant answer is an error (default: "
                        "skipped and counted)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the existing pairs file and part files first instead of resuming")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of a setup error")
    R.add_flags(p, KEYS, "sampling settings (each also a recipe key)", rename={"gen_batch_size": "--batch-size"})
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # fetch what this command reads: the data, and θ_0 unless --model names the sampler
    fetch = ("data",) if args.model else ("model", "data")
    recipe = R.resolve(args.config, R.given_flags(args, KEYS), iteration=args.iter, fetch=fetch)
    if args.model:
        from minispin.run.hub import resolve
        args.model = resolve(args.model, "model", "--model")
    apply_threads(recipe)
    env = D.init_distributed(recipe.model.device, recipe.model.dist_timeout)
    changed = R.format_overrides(recipe)   # e.g. the checkpoint's generation_config.json
    if changed and env.is_main:
        print(changed, flush=True)
    try:
        with stoppable(env, recipe.model.dist_timeout), locked(recipe.run_dir, env), stage("generation"):
            generate_preflight(recipe, env, args.model or theta_path(recipe.run_dir, args.iter, recipe.model.path),
                               args.out or pairs_path(recipe.run_dir, args.iter), f"θ_{args.iter}")
            generate_pairs_file(recipe, args.iter, env, model_dir=args.model, out=args.out,
                                overwrite=args.overwrite, strict=args.strict, progress=args.progress)
        return 0
    finally:
        D.close_distributed(env)


def main(argv=None) -> int:
    """minispin-generate / python generate.py: run, with minispin's errors as one line (errors.run_cli)."""
    return run_cli(run, prog("minispin-generate"), argv)


if __name__ == "__main__":   # python -m minispin.cli.generate, or torchrun -m minispin.cli.generate
    raise SystemExit(main())
