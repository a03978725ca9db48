"""SPIN training step, minispin vs transformers, on the same weights, in one run.

    python bench/bench_train.py                         # CPU: a ~20M-parameter Llama, fp32
    python bench/bench_train.py --shape 1b --device cuda --dtype bf16 --ac --pairs 4 --seq 1024
    python bench/bench_train.py --shape 7b --device cuda --dtype bf16 --ac --pairs 2 --seq 1024

One step = what train.py does per optimizer step with one micro-batch: ONE forward of the
concatenated [real; generated] rows (2 x pairs rows of --seq tokens, the second half of each
row is the answer), fp32 sequence log-probs of the answers (ours: loss.answer_logps, the
trainer's forward, lm_head on the answer positions in fp32; transformers: full logits,
then loss.sequence_logps), the SPIN
sigmoid loss against fixed reference log-probs (the precomputed reference), backward,
gradient clipping and an RMSprop step (the trainer's optimizer).

ours runs as trainer.py does: a one-process group, the model loaded by
distributed.load_sharded_model (FSDP2 per block + root), fp32 master weights, and with
--dtype bf16 a MixedPrecisionPolicy that computes in bf16 and reduces in fp32.
transformers runs the way its own Trainer does mixed precision: fp32 weights and
torch.autocast(bf16) around the forward. Both sides thus keep fp32 masters and take the
same optimizer step; --dtype fp32 runs both in fp32.

The same random weights (made by transformers, saved once as safetensors) are loaded by
both implementations; each runs in its own child process so that peak memory is its own.
Reported per implementation: step time, tokens/s (policy tokens: 2 x pairs x seq per step),
MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6N + 12·layers·heads·head_dim·seq
(N = non-embedding parameters; model.flops_per_token), and peak memory (GPU: max allocated;
CPU: the child's peak RSS, and its growth over what loading the model reached). Then the ratios ours / transformers.

Real lengths (--lengths smollm2 | ultrachat | FILE.json): instead of rows of one fixed
length, each step takes --pairs pairs drawn (seeded, the same for every child) from a
length distribution of [prompt, real answer, generated answer] tokens: "smollm2" is
bench/results/lengths-smollm2.json, written by `python scripts/padding.py --config
smollm2-135m --dump-lengths FILE` (the recipe's real answers, generated answers at the
cap; with `--pairs` it writes a pairs file's own lengths), "ultrachat"
the study's UltraChat rows under scripts/padding.py's stated length assumption. Four
children run: ours and transformers, each padded (collate_pairs) and packed (packing.py:
ours with its block-diagonal mask; transformers with restarting position_ids and no
attention mask, which its sdpa path turns into the same block-causal mask). tokens/s then
counts REAL tokens only (padding excluded), summed over the timed steps, so padded and
packed compare on the work that matters; the ratios are packed / padded per implementation
and ours / transformers per layout.

Peak FLOP/s: --peak-tflops if given; on a GPU the datasheet's dense bf16 figure for the card
told apart by name (H100 SXM 989, PCIe 756, NVL 835, H200 989: bench/cards.py), and MFU
against a measured 8192^3 bf16 matmul as well; a card not in the table uses the measured
rate. On CPU: the measured rate of a large fp32 matmul (an "achievable peak", so CPU MFU is
relative to what this machine's BLAS reaches, not a datasheet number).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, BENCH]

import cards  # noqa: E402

SHAPES = {
    # ~20M parameters: big enough that matmuls, not Python, dominate on a CPU
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=32000),
    # ~1.1B Llama shape (the anchors' "1B" row)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # Mistral-7B / zephyr-7b-sft-full shape
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
}


def make_weights(path: str, shape: str, device: torch.device, seed: int = 0):
    """Random weights, made on the device the bench runs on (a 7B model is not built on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_flops(device: torch.device, override: float) -> tuple:
    """(peak FLOP/s for MFU, its description, measured bf16 matmul FLOP/s or None)."""
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (given)", None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        measured = cards.measure_matmul_tflops(device) * 1e12
        sheet = cards.datasheet_bf16_tflops(name)
        if sheet:
            return sheet * 1e12, f"{sheet:g} TFLOP/s ({name}, datasheet dense bf16)", measured
        return measured, f"{measured / 1e12:.0f} TFLOP/s ({name}: not in bench/cards.py, measured)", measured
    n, reps, best = 1024, 10, 0.0
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    for _ in range(5):  # best of 5: a shared machine only ever makes a trial slower
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best, f"{best / 1e9:.1f} GFLOP/s (best measured fp32 1024^3 matmul, {torch.get_num_threads()} threads)", None


def run_child(args) -> dict:
    """Time one implementation; print one JSON line."""
    from minispin.core.loss import answer_logps, sequence_logps, spin_loss
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16"
    env = None
    autocast = contextlib.nullcontext
    if args.impl == "ours":  # as trainer.py: one-process group, FSDP2, fp32 master weights
        from minispin.run import distributed as D
        env = D.init_distributed(device.type)
        device = env.device
        mp = D.mixed_precision_policy("bf16" if bf16 else "fp32", device)
        model = D.load_sharded_model(args.weights, env, D.device_mesh(env), mp,
                                     activation_checkpointing=args.ac)
        # the trainer's forward: lm_head on the answer positions only, fp32 logits
        logps_of = lambda ids, mask: answer_logps(model, ids, mask)  # noqa: E731
        flops_tok = model.flops_per_token(args.seq)
    else:  # as transformers' Trainer: fp32 weights, autocast for bf16
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.weights, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device)
        if args.ac:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if bf16:
            autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)

        def logps_of(ids, mask):
            with autocast():
                logits = model(input_ids=ids, use_cache=False).logits
            return sequence_logps(logits, ids, mask)
        flops_tok = None
    if args.lengths:
        return run_child_lengths(args, model, env, device, autocast, flops_tok)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=5e-7, alpha=0.99, eps=1e-8)  # the trainer's defaults
    B, T = args.pairs, args.seq
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (2 * B, T), generator=g).to(device)
    mask = torch.zeros(2 * B, T, dtype=torch.long, device=device)
    mask[:, T // 2:] = 1
    ref = (-T / 2 * 10.0 + torch.randn(2 * B, generator=g)).to(device)

    def step():
        logps = logps_of(ids, mask)
        losses, _ = spin_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(losses.detach().mean())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after loading
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    for _ in range(args.warmup):
        step()
    sync()
    times, loss = [], None
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        mem = {"peak_bytes": peak, "peak_over_loaded_bytes": peak - base_mem, "kind": "cuda max allocated"}
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem = {"peak_bytes": rss, "peak_over_loaded_bytes": max(0, rss - rss_before), "kind": "peak RSS"}
    times.sort()
    med = times[len(times) // 2]
    out = {"impl": args.impl, "step_s": med, "tokens_per_s": 2 * B * T / med, "loss": loss,
           "params": sum(p.numel() for p in model.parameters()), "flops_per_token": flops_tok, **mem}
    print("RESULT " + json.dumps(out), flush=True)
    if env is not None:
        D.close_distributed(env)
    return out


def length_table(name: str) -> list:
    """[[prompt, real, generated], ...] token lengths of the named distribution."""
    if name == "ultrachat":
        sys.path.insert(0, os.path.join(REPO, "scripts"))
        import padding
        return [[len(p.prompt), len(p.real), len(p.generated)] for p in padding.ultrachat_items(2000, 60.0, 250.0, 256)]
    path = name if name.endswith(".json") else os.path.join(BENCH, "results", f"lengths-{name}.json")
    with open(path) as f:
        return json.load(f)["lengths"]


def real_length_batches(args) -> list:
    """args.steps + args.warmup padded [real; generated] batches of args.pairs pairs each,
    lengths drawn from the table (seeded: every child gets the same batches), random tokens."""
    import random
    from minispin.run.rows import TokenizedPair, collate_pairs
    table = length_table(args.lengths)
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 32000, (n,), generator=g).tolist()  # noqa: E731
    batches = []
    for b in range(args.steps + args.warmup):
        items = [TokenizedPair(f"b/{b}/{i}", ids(p), ids(r), ids(q))
                 for i, (p, r, q) in enumerate(rng.choices(table, k=args.pairs))]
        batches.append(collate_pairs(items, 0))
    return batches


def run_child_lengths(args, model, env, device, autocast, flops_tok) -> dict:
    """The --lengths step: padded or packed batches of real lengths; tokens/s of real tokens."""
    from minispin.core.loss import answer_logps, batch_inputs, sequence_logps, spin_loss
    from minispin.core.packing import pack_batch
    batches = real_length_batches(args)
    capacity = max(int(b["lengths"].max()) for b in batches)   # the run's longest row, as the trainer packs
    real = [int(b["lengths"].sum()) for b in batches]
    if args.layout == "packed":
        batches = [pack_batch(b, capacity=capacity) for b in batches]
    batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]

    def logps_of(b):
        model_kw, rows = batch_inputs(b)
        if args.impl == "ours":
            return answer_logps(model, b["input_ids"], b["loss_mask"], **rows, **model_kw)
        with autocast():   # transformers: full logits; packed rows through position_ids alone
            extra = {"position_ids": b["positions"]} if "positions" in b else {}
            logits = model(input_ids=b["input_ids"], use_cache=False, **extra).logits
        return sequence_logps(logits, b["input_ids"], b["loss_mask"], **rows)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=5e-7, alpha=0.99, eps=1e-8)
    B = args.pairs

    def step(b):
        logps = logps_of(b)
        ref = logps.detach() - 1.0   # a fixed offset: the loss is the same function of θ for every layout
        losses, _ = spin_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(logps.detach().sum())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for b in batches[:args.warmup]:
        step(b)
    sync()
    total_t, logp_sum = 0.0, 0.0
    for b in batches[args.warmup:]:
        t = time.perf_counter()
        logp_sum += step(b)
        sync()
        total_t += time.perf_counter() - t
    tokens = sum(real[args.warmup:])
    positions = sum(b["input_ids"].numel() for b in batches[args.warmup:])
    out = {"impl": args.impl, "layout": args.layout, "step_s": total_t / args.steps,
           "tokens_per_s": tokens / total_t, "real_tokens": tokens, "positions": positions,
           "loss": logp_sum, "params": sum(p.numel() for p in model.parameters()), "flops_per_token": flops_tok}
    print("RESULT " + json.dumps(out), flush=True)
    if env is not None:
        from minispin.run import distributed as D
        D.close_distributed(env)
    return out


def main_lengths(args):
    """--lengths: ours and transformers, padded and packed, in one run (alternating rounds)."""
    device = torch.device(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(tmp, args.shape, device)
        for _ in range(args.rounds):
            for impl in ("ours", "hf"):
                for layout in ("padded", "packed"):
                    cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--weights", tmp,
                           "--device", args.device, "--dtype", args.dtype, "--pairs", str(args.pairs),
                           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
                           str(args.threads), "--lengths", args.lengths, "--layout", layout]
                    if args.ac:
                        cmd.append("--ac")
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
                    if r.returncode or not lines:
                        raise SystemExit(f"{impl} {layout} failed:\n{r.stderr[-4000:]}")
                    r = json.loads(lines[-1][7:])
                    key = f"{impl}/{layout}"
                    if key not in results or r["tokens_per_s"] > results[key]["tokens_per_s"]:
                        results[key] = r
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({args.threads or torch.get_num_threads()} threads)"
    some = results["ours/padded"]
    print(f"SPIN training step on real lengths ({args.lengths}) — shape {args.shape} "
          f"({some['params'] / 1e6:.1f}M params), {args.pairs} pairs per step, {args.steps} timed steps, "
          f"{args.dtype}, activation checkpointing {'on' if args.ac else 'off'}, {dev}")
    print(f"real tokens per run {some['real_tokens']}; positions computed: padded "
          f"{results['ours/padded']['positions']}, packed {results['ours/packed']['positions']}")
    print(f"{'':24}{'step (s)':>10}{'real tokens/s':>15}{'sum log p':>14}")
    for key, r in results.items():
        name = key.replace("ours", "minispin").replace("hf", "transformers")
        print(f"{name:24}{r['step_s']:>10.4f}{r['tokens_per_s']:>15.0f}{r['loss']:>14.2f}")
    rate = {k: r["tokens_per_s"] for k, r in results.items()}
    ratios = {"minispin packed/padded": rate["ours/packed"] / rate["ours/padded"],
              "transformers packed/padded": rate["hf/packed"] / rate["hf/padded"],
              "padded minispin/transformers": rate["ours/padded"] / rate["hf/padded"],
              "packed minispin/transformers": rate["ours/packed"] / rate["hf/packed"]}
    print("ratios (real tokens/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    sums = [r["loss"] for r in results.values()]
    if max(sums) - min(sums) > 1e-3 * max(1.0, abs(sums[0])):
        print(f"WARNING: the log-prob sums differ ({sums}): not the same computation")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": dev, "results": results, "ratios": ratios}, f, indent=2)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="model shape (default cpu: ~20M params)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and compute dtype")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing in both implementations")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (2 x pairs rows)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="intra-op CPU threads per child (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per implementation; the best counts")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (TFLOP/s)")
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=("ours", "hf"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--lengths", default=None,
                    help="real lengths instead of --seq: smollm2, ultrachat or a lengths JSON file; "
                         "runs padded and packed, real tokens only (see above)")
    ap.add_argument("--layout", choices=("padded", "packed"), default="padded", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl:
        return run_child(args)
    if args.lengths:
        return main_lengths(args)

    device = torch.device(args.device)
    peak, peak_desc, measured = peak_flops(device, args.peak_tflops)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(tmp, args.shape, device)
        # alternate the two implementations and keep each one's best round: on a shared
        # machine other load only ever slows a round down
        for impl in ("ours", "hf") * args.rounds:
            cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--weights", tmp,
                   "--device", args.device, "--dtype", args.dtype, "--pairs", str(args.pairs),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            if args.ac:
                cmd.append("--ac")
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode or not lines:
                raise SystemExit(f"{impl} failed:\n{r.stderr[-4000:]}")
            r = json.loads(lines[-1][7:])
            if impl not in results or r["step_s"] < results[impl]["step_s"]:
                results[impl] = r
    flops_tok = results["ours"]["flops_per_token"]
    for r in results.values():
        r["mfu"] = r["tokens_per_s"] * flops_tok / peak
        if measured:
            r["mfu_measured_peak"] = r["tokens_per_s"] * flops_tok / measured
    o, h = results["ours"], results["hf"]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"SPIN training step (forward, backward, clip, RMSprop) — shape {args.shape} ({o['params'] / 1e6:.1f}M params), "
          f"{args.pairs} pairs = {2 * args.pairs} rows x {args.seq} tokens, {args.dtype}, "
          f"activation checkpointing {'on' if args.ac else 'off'}, {dev}")
    print(f"peak for MFU: {peak_desc}; FLOPs/token {flops_tok / 1e6:.1f}M (6N + attention)")
    if measured:
        print(f"measured bf16 8192^3 matmul: {measured / 1e12:.0f} TFLOP/s; MFU against it: "
              + ", ".join(f"{k} {100 * r['mfu_measured_peak']:.1f}%" for k, r in results.items()))
    print(f"{'':14}{'step (s)':>10}{'tokens/s':>12}{'MFU':>8}{'peak mem (MB)':>15}{'over loaded':>14}{'loss':>10}")
    for name, r in (("minispin", o), ("transformers", h)):
        print(f"{name:14}{r['step_s']:>10.4f}{r['tokens_per_s']:>12.0f}{100 * r['mfu']:>7.1f}%"
              f"{r['peak_bytes'] / 1e6:>15.0f}{r['peak_over_loaded_bytes'] / 1e6:>14.0f}{r['loss']:>10.5f}")
    ratios = {"tokens_per_s": o["tokens_per_s"] / h["tokens_per_s"],
              "mfu": o["mfu"] / h["mfu"],
              "peak_memory": o["peak_bytes"] / h["peak_bytes"]}
    print(f"ratios minispin / transformers: speed {ratios['tokens_per_s']:.2f}x, "
          f"peak memory {ratios['peak_memory']:.2f}x ({o['kind']})")
    if abs(o["loss"] - h["loss"]) > 1e-3 * max(1.0, abs(h["loss"])):
        print(f"WARNING: losses differ ({o['loss']} vs {h['loss']}): not the same computation")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": dev, "peak": peak_desc, "results": results,
                       "ratios": ratios}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
