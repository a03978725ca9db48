"""Loglikelihood requests/s: minispin's lm-eval backend vs lm-eval's own "hf" backend.

    python bench/bench_eval.py                                  # stories260K, CPU, fp32
    python bench/bench_eval.py --random-llama 512,8,2048        # a bigger random Llama
    python bench/bench_eval.py --model PATH --device cuda --dtype bfloat16 --limit 200

Both backends get the SAME lm-eval Instances (built once from the offline "_local"
tasks: multiple-choice tasks of the SPIN suite with their shot counts) in one process,
and we time only `lm.loglikelihood(requests)` — tokenization included, as lm-eval
calls it; task and data loading excluded. Each backend runs `--repeats` times,
alternating, and its best time counts (the machine may be shared). The answers are
compared as well (max |Δ log p|), so a fast wrong backend cannot pass unnoticed.

Both backends take the log-softmax in fp32: ours always does, and lm-eval's "hf" backend
is asked to (softmax_dtype="float32", where its version has the option); otherwise a bf16
run would compare our fp32 log-probs with its bf16 ones, and time a cheaper computation.

--random-llama DIM,LAYERS,MAXPOS saves a random transformers Llama (tok512 tokenizer,
vocab 512) with that width, depth and context length to a temporary folder: with a
context of 2048 the 25-shot prompts are not truncated and the multiple-choice packing
of the minispin backend has full effect; stories260K truncates them at 512 tokens.
"""
from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_TASKS = "arc_challenge,arc_easy,truthfulqa_mc2,winogrande,hellaswag,mmlu"


def random_llama(spec: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dim, layers, maxpos = (int(x) for x in spec.split(","))
    path = tempfile.mkdtemp(prefix="bench-eval-llama-")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, dim // 64),
                      num_key_value_heads=max(1, dim // 128), max_position_embeddings=maxpos,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).float().eval().save_pretrained(path)
    shutil.copy(os.path.join(REPO, "assets", "tokenizers", "tok512.model"), os.path.join(path, "tokenizer.model"))
    shutil.copy(os.path.join(REPO, "assets", "models", "stories260K", "tokenizer_config.json"), path)
    return path


def build_requests(names, limit):
    """The loglikelihood Instances lm-eval would send for these tasks (rank 0 of 1)."""
    from minispin.study import evaluation as E

    tasks = E.resolve_tasks(names)
    tm = E.task_manager(offline=True)
    loaded = tm.load([E.local_name(t.name) for t in tasks])
    shots = {}
    for t in tasks:
        group = loaded["groups"].get(E.local_name(t.name))
        for leaf in (group.get_all_tasks() if group else [loaded["tasks"][E.local_name(t.name)]]):
            shots[leaf.task_name] = t.num_fewshot
    requests = []
    for name, task in loaded["tasks"].items():
        task.set_config(key="num_fewshot", value=shots[name])
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return requests


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "assets", "models", "stories260K"))
    ap.add_argument("--random-llama", default=None, metavar="DIM,LAYERS,MAXPOS")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--limit", type=int, default=20, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from lm_eval.models.huggingface import HFLM
    from minispin.study.evaluation import MinispinLM

    path = random_llama(a.random_llama) if a.random_llama else a.model
    requests = build_requests([t.strip() for t in a.tasks.split(",") if t.strip()], a.limit)
    hf_kw = {}
    if "softmax_dtype" in inspect.signature(HFLM.__init__).parameters:
        hf_kw["softmax_dtype"] = "float32"
    else:
        print(f"note: this lm-eval's HFLM has no softmax_dtype: its log-softmax runs in {a.dtype}")
    backends = {
        "minispin": MinispinLM(pretrained=path, dtype=a.dtype, device=a.device, batch_size=a.batch_size),
        "hf": HFLM(pretrained=path, dtype=a.dtype, device=a.device, batch_size=a.batch_size, **hf_kw),
    }
    for lm in backends.values():  # warm-up: first-call allocations, kernels
        lm.loglikelihood(requests[:4], disable_tqdm=True)
    best = {k: float("inf") for k in backends}
    answers = {}
    for _ in range(a.repeats):
        for name, lm in backends.items():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            answers[name] = lm.loglikelihood(requests, disable_tqdm=True)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    diff = max(abs(x[0] - y[0]) for x, y in zip(answers["minispin"], answers["hf"]))
    greedy_same = sum(x[1] == y[1] for x, y in zip(answers["minispin"], answers["hf"]))
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {path} | {device} | {a.dtype} | batch {a.batch_size} | tasks {a.tasks} | "
          f"limit {a.limit} | {len(requests)} loglikelihood requests")
    print(f"{'backend':<10} {'seconds':>9} {'requests/s':>11}")
    for name in backends:
        print(f"{name:<10} {best[name]:>9.2f} {len(requests) / best[name]:>11.1f}")
    print(f"speed-up minispin / hf: {best['hf'] / best['minispin']:.2f}x   "
          f"(max |Δ log p| {diff:.1e}, is_greedy equal {greedy_same}/{len(requests)})")
    if a.random_llama:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
