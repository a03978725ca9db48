"""Generation speed: minispin.generate vs transformers' generate, same weights, one run.

    python bench/bench_generate.py                 # CPU: stories260K and a ~50M random Llama,
                                                   #      batch 1 and 32, greedy
    python bench/bench_generate.py --gpu           # GPU: Mistral-7B shape, random bf16 weights:
                                                   #      batch 1 greedy 128+256, batch 64 sampling
                                                   #      256+256; eager, then compiled (ours:
                                                   #      compile=True; transformers: static cache,
                                                   #      which its generate compiles on a GPU)
    python bench/bench_generate.py --quick         # fewer tokens, one repetition (smoke test)

Both sides produce exactly max_new_tokens per row (eos switched off on both), from the
same prompts with the same left padding; tokens/s = rows x new tokens / wall time (prefill
included), best of --reps runs after one warm-up run each, the two sides interleaved so
that load from other processes hits both alike. For greedy rows the outputs are compared
too ("same" = rows identical to transformers'). Ratio = ours / transformers.

Compiled cases: the warm-up run has the timed runs' exact shape, so compilation stays out
of the rates, and "compiles" counts the graphs dynamo compiled DURING the timed runs (both
sides; 0 expected). A per-call cost that survives warm-up (a recompile, a CUDA-graph
re-record, a new cache) still sits in the end-to-end rate, so ours also gets a decode-only
rate: rows x (new - short) / (t(new) - t(short)), from a shorter run in the same cache-length
bucket, which cancels everything paid once per call.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minispin import load_model  # noqa: E402
from minispin.core.model import build_model  # noqa: E402
from minispin.core.sampling import generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(REPO, "assets", "models", "stories260K")

LLAMA_50M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False)
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                  sliding_window=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_prompts(batch, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lens]


def hf_inputs(prompts, device):
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def short_run_length(prompt_len: int, new: int) -> int:
    """New tokens of a shorter run whose static cache has the same length as the full run's
    (the compiled path rounds prompt + new up to a multiple of 256): same compiled graph."""
    bucket = -(-(prompt_len + new) // 256) * 256
    return max(1, bucket - 255 - prompt_len, new // 4)


def run_case(name, ours, hf, prompts, new, sample, reps, compile=False, hf_compile=False):
    device = ours.output_weight.device
    ids, mask = hf_inputs(prompts, device)
    T = ids.shape[1]
    kw = dict(do_sample=sample, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    if sample:
        kw.update(temperature=1.0, top_p=1.0, top_k=0)
    if hf_compile:  # transformers compiles its forward itself when the cache is static
        kw.update(cache_implementation="static")

    def run_ours(n=new):
        return generate(ours, prompts, n, temperature=1.0 if sample else 0.0, eos_id=-1,
                        seed=0, batch_size=len(prompts), compile=compile)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, **kw)[:, T:].tolist()

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t0

    short = short_run_length(T, new) if compile else None
    best = {"ours": float("inf"), "hf": float("inf"), "short": float("inf")}
    outs = {}
    compiles = 0
    for rep in range(reps + 1):  # rep 0 = warm-up, of the same shapes as the timed runs
        if rep == 0 and short is not None and short < new:
            timed(lambda: run_ours(short))
        g0 = graphs_compiled()
        for side, fn in (("ours", run_ours), ("hf", run_hf)):
            outs[side], dt = timed(fn)
            if rep > 0 or reps == 0:
                best[side] = min(best[side], dt)
        if short is not None and short < new:
            _, dt = timed(lambda: run_ours(short))
            if rep > 0 or reps == 0:
                best["short"] = min(best["short"], dt)
        if rep > 0:
            compiles += graphs_compiled() - g0
    n_tok = len(prompts) * new
    got = sum(len(o) for o in outs["ours"])
    assert got == n_tok, f"ours produced {got} tokens, expected {n_tok}"
    same = "-" if sample else f"{sum(a == b for a, b in zip(outs['ours'], outs['hf']))}/{len(prompts)}"
    tps_o, tps_h = n_tok / best["ours"], n_tok / best["hf"]
    decode = "-"
    if best["short"] < best["ours"]:
        decode = f"{len(prompts) * (new - short) / (best['ours'] - best['short']):.1f}"
    print(f"{name:<46} {len(prompts):>5} {tps_o:>12.1f} {tps_h:>12.1f} {tps_o / tps_h:>7.2f}  {same:>5} "
          f"{compiles:>8} {decode:>12}", flush=True)
    return tps_o / tps_h


def header(device):
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"{'case':<46} {'batch':>5} {'ours tok/s':>12} {'hf tok/s':>12} {'ratio':>7}  {'same':>5} "
          f"{'compiles':>8} {'ours decode':>12}")


def cpu_bench(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    header("cpu")
    new = 16 if args.quick else args.new_tokens
    reps = 0 if args.quick else args.reps
    ratios = []
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ours = load_model(STORIES)
    for batch in (1, 32):
        prompts = make_prompts(batch, 8, 48, 512, seed=batch)
        ratios.append(run_case(f"stories260K greedy {new} new", ours, hf, prompts, new, False, reps,
                               args.compile))
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        hfl = LlamaForCausalLM(LlamaConfig(**LLAMA_50M)).eval()
        hfl.generation_config.eos_token_id = None
        hfl.save_pretrained(d)
        ours = load_model(d)
    n = ours.num_params() / 1e6
    for batch in (1, 32):
        prompts = make_prompts(batch, 16, 64, 32000, seed=batch)
        ratios.append(run_case(f"llama {n:.0f}M random greedy {new} new", ours, hfl, prompts, new,
                               False, reps, args.compile))
    print(f"min ratio {min(ratios):.2f}")


def gpu_bench(args, device="cuda", shape=MISTRAL_7B, dtype=torch.bfloat16):
    from transformers import MistralConfig, MistralForCausalLM
    from minispin.run.config import model_args_from_hf
    device = torch.device(device)
    header(torch.cuda.get_device_name() if device.type == "cuda" else str(device))
    cfg = MistralConfig(**shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the random weights in bf16 straight away
    try:
        with torch.device(device):
            hf = MistralForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    hf.generation_config.eos_token_id = None
    ours = build_model(model_args_from_hf(cfg.to_dict()), device="meta")
    ours.load_state_dict(hf.state_dict(), assign=True, strict=True)  # the same tensors, no copy
    ours.eval()
    n = ours.num_params() / 1e9
    new = 32 if args.quick else 256
    reps = 0 if args.quick else max(1, args.reps // 2)
    for compiled in (False, True):  # eager (the reference), then both sides compiled
        tag = " compiled (hf: static cache)" if compiled else ""
        run_case(f"mistral {n:.2f}B greedy 128+{new}{tag}", ours, hf,
                 make_prompts(1, 128, 128, shape["vocab_size"]), new, False, reps, compiled, compiled)
        run_case(f"mistral {n:.2f}B sampling 256+{new}{tag}", ours, hf,
                 make_prompts(64, 256, 256, shape["vocab_size"]), new, True, reps, compiled, compiled)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run the GPU cases (needs CUDA)")
    p.add_argument("--quick", action="store_true", help="few tokens, no repetitions")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per row on CPU (default 64)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per side, best is kept (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="CPU cases: use minispin's compiled decode step (GPU runs eager and compiled)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("bench_generate.py: --gpu needs a CUDA device")
        gpu_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
