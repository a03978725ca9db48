"""The measurements behind bench/gpu.sh: one function per row group, run in a worker process.

    python bench/gpu_rows.py --groups 1,4 --results R.json --deadlines '{"1": T1, "4": T4}' [--dry]

bench/gpu_check.py starts this (one worker per group on a GPU, one for all groups with
--dry) and prints the table; bench/README.md says what each row measures. Choices:

* Ours and transformers run on the SAME random weights: transformers builds its model on
  the device and ours takes its tensors (`load_state_dict(..., assign=True)`: the module
  names are the same), so a 7B pair costs one copy of the weights and no disk. Models
  that have no transformers twin (the FSDP rows) are built on the meta device and
  materialized on the device with `to_empty`. Nothing 7B is ever made on the CPU.
* Random weights are drawn here (normal(0, 0.02), norms uniform(0.5, 1.5)), not left to
  transformers' init, so both sides and every version of transformers see the same
  numbers; the correctness rows also sharpen q/k so that attention is not near uniform
  (where a wrong position or window would hardly move the logits).
* Every timed call follows an untimed call of the same shape, so rates exclude compile
  and warm-up; compiled calls also count the graphs dynamo compiled during the timed call
  (0 expected) and time a shorter call, so that a per-call cost such as a recompile or a
  CUDA-graph re-record shows up as the gap between the end-to-end and decode-only rates.
* Figures go to the results file after every measurement (`Report.put`), so a worker
  killed at its deadline keeps what it had measured; a row that raises records its
  one-line cause and the next row runs.
* --dry: tiny shapes on the CPU, torch.compile with the "eager" backend (dynamo only), so
  that CI runs every line here in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, BENCH]

import cards  # noqa: E402
from gpu_check import OWN_PROCESS_GROUP, ROWS  # noqa: E402  (standard library only)
from minispin.run import distributed as D  # noqa: E402
from minispin.core.model import ModelArgs  # noqa: E402
from minispin.run.config import model_args_from_hf  # noqa: E402
from minispin.core.loss import LN2, answer_logps, sequence_logps, spin_loss  # noqa: E402
from minispin.core.model import build_model  # noqa: E402
from minispin.core.sampling import generate, generate_batch  # noqa: E402

# ---------------------------------------------------------------------------- shapes
COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
LLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                max_position_embeddings=4096)
MISTRAL_WINDOW = dict(model_type="mistral", vocab_size=32000, hidden_size=1024,
                      intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, sliding_window=128, max_position_embeddings=4096)
MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  sliding_window=4096, max_position_embeddings=32768)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Plan:
    """Every size the rows use; GPU and --dry differ only here."""
    llama: dict                      # rows 1, 4: the 1.1B shape
    mistral: dict                    # row 1: sliding window shorter than the sequence
    m7b: dict                        # rows 2, 3, 4c, 6
    logit_rows: int = 2
    logit_seq: int = 256
    mistral_seq: int = 384
    greedy_prompt: int = 32
    mistral_prompt: int = 160        # longer than the window: decoding starts past it
    greedy_new: int = 64
    warm_new: int = 8                # untimed call before each timed one
    decode_prompt: int = 128
    decode_new: int = 128
    decode_short: int = 32
    sample_batch: int = 64
    sample_prompt: int = 256
    sample_new: int = 256
    sample_short: int = 64
    train_rows: int = 8              # [real; generated] rows of one step
    train_seq: int = 1024
    warmup_steps: int = 2
    timed_steps: int = 4
    lora_rows: int = 4
    lora_rank: int = 16
    probe_layers: int = 4            # 6c: full-width 7B blocks
    probe_pairs: int = 8             # 6c: the 7B recipe's micro-batch per GPU
    probe_batch: int = 4             # 6a/6b
    probe_prompt: int = 256
    compile_probe_layers: int = 2
    compile: object = True           # generate(compile=...): True = inductor + CUDA graphs
    train_compile: object = True     # rows 7a/7b: compile_train's backend (True = inductor)
    compile_reserve_s: float = 45.0  # skip a compiled measurement with less time left
    e2e: dict = field(default_factory=dict)


GPU_PLAN = Plan(llama=LLAMA_1B, mistral=MISTRAL_WINDOW, m7b=MISTRAL_7B,
                e2e=dict(num_prompts=16, max_new_tokens=64, heldout_examples=8,
                         heldout_max_new_tokens=64, batch_size=4, epochs=1))
DRY_PLAN = Plan(llama=dict(TINY, model_type="llama"),
                mistral=dict(TINY, model_type="mistral", sliding_window=8),
                m7b=dict(TINY, model_type="mistral", sliding_window=64),
                logit_seq=24, mistral_seq=24, greedy_prompt=6, mistral_prompt=12, greedy_new=8,
                warm_new=2, decode_prompt=8, decode_new=8, decode_short=2, sample_batch=4,
                sample_prompt=8, sample_new=8, sample_short=2, train_rows=4, train_seq=32,
                warmup_steps=1, timed_steps=2, lora_rows=2, lora_rank=4, probe_layers=2,
                probe_pairs=2, probe_batch=3, probe_prompt=12, compile="eager", train_compile="eager",
                compile_reserve_s=0.0,
                e2e=dict(num_prompts=4, max_new_tokens=16, heldout_examples=2,
                         heldout_max_new_tokens=16, batch_size=4, epochs=1))

DEV: torch.device = torch.device("cpu")
P: Plan = DRY_PLAN
DEADLINE = math.inf
HF_COMPILE = False


# ---------------------------------------------------------------------------- reporting
def log(msg: str):
    print(msg, flush=True)


def one_line(e: BaseException) -> str:
    """'Type: first line of the message (file:line of the deepest frame in this repo)'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename).startswith(REPO)]
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {msg}{where}"


class Report:
    """Rows and environment, rewritten to the results file after every change."""

    def __init__(self, path: str):
        self.path, self.env, self.rows = path, {}, {}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"env": self.env, "rows": self.rows}, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def put(self, key: str, **fields):
        self.rows.setdefault(key, {}).update(fields)
        self.save()

    @contextlib.contextmanager
    def row(self, key: str):
        """Run one row: status running -> ok (unless the body set another), or error with
        the one-line cause; the full traceback goes to the log."""
        t0 = time.time()
        self.put(key, status="running")
        log(f"row {key}: start ({left():.0f}s left in this group's budget)")
        try:
            yield
            if self.rows[key].get("status") == "running":
                self.put(key, status="ok")
        except Exception as e:  # a row's failure is a table entry, not the end of the check
            cause = one_line(e)
            log(f"row {key}: ERROR {cause}")
            traceback.print_exc(file=sys.stdout)
            self.put(key, status="error", note=cause)
        finally:
            self.put(key, seconds=round(time.time() - t0, 1))
            log(f"row {key}: {self.rows[key]['status']} in {time.time() - t0:.1f}s")
            free()


R = Report(os.devnull)


# ---------------------------------------------------------------------------- helpers
def left() -> float:
    return DEADLINE - time.time()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def mem_reset():
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def mem_peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else None


def mem_now():
    return torch.cuda.memory_allocated() if DEV.type == "cuda" else None


def gb(x) -> str:
    return "n/a (CPU)" if x is None else f"{x:.1f} GB"


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def same_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def random_prompts(n: int, length: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def card_name() -> str:
    return torch.cuda.get_device_name() if DEV.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def environment():
    from importlib.metadata import version  # not `import transformers`: rows 5 and 6 never need it
    R.env.update(card=card_name(), torch=torch.__version__, cuda=torch.version.cuda,
                 transformers=version("transformers"), python=sys.version.split()[0],
                 datasheet_tflops=cards.datasheet_bf16_tflops(card_name()) if DEV.type == "cuda" else None)
    if DEV.type == "cuda":
        R.env["memory_gb"] = round(torch.cuda.get_device_properties(DEV).total_memory / 1e9, 1)
    R.save()


def ceilings() -> dict:
    """Measured bf16 matmul rate and copy bandwidth (once per worker)."""
    if "matmul_tflops" not in R.env:
        n, nbytes, reps = (8192, 1 << 30, 20) if DEV.type == "cuda" else (128, 1 << 22, 2)
        R.env.update(matmul_n=n, matmul_tflops=float(f"{cards.measure_matmul_tflops(DEV, n, reps=reps):.4g}"),
                     copy_tbps=float(f"{cards.measure_copy_tbps(DEV, nbytes, reps=reps):.4g}"))
        R.save()
        log(f"measured: bf16 matmul {n}^3 {R.env['matmul_tflops']} TFLOP/s, "
            f"copy {R.env['copy_tbps']} TB/s (read + write)")
    return R.env


# ---------------------------------------------------------------------------- models
def hf_model(shape: dict, dtype):
    """A transformers Llama/Mistral of this shape, built on the device (weights: init_random)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    Config, Model = ((MistralConfig, MistralForCausalLM) if shape["model_type"] == "mistral"
                     else (LlamaConfig, LlamaForCausalLM))
    cfg = Config(**{k: v for k, v in shape.items() if k != "model_type"}, **COMMON)
    with default_dtype(dtype), torch.device(DEV):
        model = Model(cfg)
    model.eval()
    model.generation_config.eos_token_id = None  # both sides make exactly max_new_tokens
    return model


@torch.no_grad()
def init_random(model, seed: int = 0, sharpen: float = 1.0):
    """normal(0, 0.02) matrices, uniform(0.5, 1.5) norms, q/k times `sharpen`; works on
    plain and FSDP-sharded (DTensor) parameters alike."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if name.endswith("norm.weight"):
            t.uniform_(0.5, 1.5, generator=g)
        else:
            t.normal_(0.0, 0.02, generator=g)
            if sharpen != 1.0 and name.endswith(("q_proj.weight", "k_proj.weight")):
                t.mul_(sharpen)
    return model


def ours_from(hf):
    """Our Transformer over transformers' own tensors (no copy)."""
    ours = build_model(model_args_from_hf(hf.config.to_dict(), source="transformers config"), device="meta")
    ours.load_state_dict(hf.state_dict(), assign=True, strict=True)
    return ours.eval()


def our_args(shape: dict) -> ModelArgs:
    return model_args_from_hf(dict(shape, **COMMON), source="gpu_rows shape")


def our_model(shape: dict, dtype):
    """Ours alone: meta -> dtype -> device, random weights."""
    model = build_model(our_args(shape), device="meta").to(dtype)
    model.to_empty(device=DEV)
    return init_random(model).eval()


_DIST = None


def dist_env():
    """The one-process group the trainer makes for `python train.py` (nccl / gloo)."""
    global _DIST
    if _DIST is None:
        _DIST = D.init_distributed(DEV.type)
    return _DIST


def fsdp_model(shape: dict, activation_checkpointing: bool, compile: bool = False):
    """As trainer.py loads θ: FSDP2 per block + root, bf16 compute / fp32 master on GPU;
    compile: each block through torch.compile first, as compile_train does."""
    env = dist_env()
    model = build_model(our_args(shape), device="meta")
    if activation_checkpointing:
        D.apply_activation_checkpointing(model)
    if compile:
        D.compile_blocks(model, train_compile_backend())
    D.shard_model(model, D.device_mesh(env), D.mixed_precision_policy("auto", DEV))
    model.to_empty(device=env.device)
    return init_random(model)


def spin_batch(pairs: int, seq: int, vocab: int, seed: int):
    """[real; generated] rows: each pair shares a prompt (first half), answers differ."""
    g = torch.Generator().manual_seed(seed)
    half = seq // 2
    prompt = torch.randint(3, vocab, (pairs, half), generator=g)
    real = torch.randint(3, vocab, (pairs, seq - half), generator=g)
    gen = torch.randint(3, vocab, (pairs, seq - half), generator=g)
    ids = torch.cat([torch.cat([prompt, real], 1), torch.cat([prompt, gen], 1)]).to(DEV)
    mask = torch.zeros_like(ids)
    mask[:, half:] = 1
    return ids, mask


def spin_step_loss(logits, ids, mask, ref):
    """logits: full (B, T, V) logits, or already the (B,) log-probs (ours, from
    loss.answer_logps, the trainer's forward)."""
    pairs = ids.shape[0] // 2
    logps = logits if logits.dim() == 1 else sequence_logps(logits, ids, mask)
    losses, _ = spin_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=0.1)
    return losses


def time_steps(step, tokens: int) -> dict:
    """Warm-up steps, then the median of timed steps; peak memory over all of them.
    first_s: the first warm-up step (with compile_train: the compile, mostly)."""
    mem_reset()
    first_s = None
    for _ in range(P.warmup_steps):
        _, t = timed(step)
        first_s = t if first_s is None else first_s
    times, loss = [], None
    for _ in range(P.timed_steps):
        loss, t = timed(step)
        times.append(t)
    med = sorted(times)[len(times) // 2]
    return dict(step_s=med, tokens_per_s=tokens / med, peak_gb=mem_peak_gb(), loss=loss, first_s=first_s)


# ---------------------------------------------------------------------------- row 1
def group_1():
    ceilings()
    torch.set_float32_matmul_precision("highest")  # the fp32 references are fp32, not TF32
    for (k_logits, k_greedy), shape, seq, prompt_len in (
            (("1a", "1c"), P.llama, P.logit_seq, P.greedy_prompt),
            (("1b", "1d"), P.mistral, P.mistral_seq, P.mistral_prompt)):
        hf32 = init_random(hf_model(shape, torch.float32), sharpen=2.0)
        hf16 = hf_model(shape, torch.bfloat16)
        hf16.load_state_dict(hf32.state_dict())
        our32, our16 = ours_from(hf32), ours_from(hf16)
        noise = None
        with R.row(k_logits):
            noise = check_logits(k_logits, shape, hf32, hf16, our32, our16, seq)
        with R.row(k_greedy):
            check_greedy(k_greedy, shape, hf32, hf16, our32, our16, prompt_len, noise)
        del hf32, hf16, our32, our16
        free()


@torch.no_grad()
def check_logits(key, shape, hf32, hf16, our32, our16, seq):
    ids = torch.tensor(random_prompts(P.logit_rows, seq, shape["vocab_size"], seed=1), device=DEV)
    ref = hf32(input_ids=ids).logits.float()
    o32 = our32(ids).float()
    h16 = hf16(input_ids=ids).logits.float()
    o16 = our16(ids).float()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    fp32_rel, err_ours, err_hf = rel(o32, ref), rel(o16, ref), rel(h16, ref)
    noise = float((h16 - ref).abs().max())  # how far bf16 moves a logit: the greedy tie scale
    window = shape.get("sliding_window")
    R.put(key, ours=f"err {err_ours:.2e}", hf=f"err {err_hf:.2e}", ratio=err_ours / err_hf if err_hf else None,
          goal="<=1.5x hf; fp32 rel<=1e-4", passed=fp32_rel <= 1e-4 and err_ours <= 1.5 * err_hf,
          note=f"{P.logit_rows}x{seq} tokens{f', window {window}' if window else ''}; err = "
               f"|bf16 - fp32 ref|/|ref|; fp32 ours vs hf: rel {fp32_rel:.1e}, max|d| "
               f"{float((o32 - ref).abs().max()):.1e}; bf16 ours vs hf: rel {rel(o16, h16):.1e}",
          figures=dict(fp32_rel=fp32_rel, bf16_err_ours=err_ours, bf16_err_hf=err_hf,
                       bf16_ours_vs_hf=rel(o16, h16), bf16_logit_noise=noise))
    return noise


def check_greedy(key, shape, hf32, hf16, our32, our16, prompt_len, noise):
    """fp32: equal for every token. bf16: equal, or apart only at a tie: where the fp32 logits
    of the two choices are closer than twice the most bf16 moves a logit (each side may move
    that far), the two bf16 runs can rank them either way without a bug."""
    new = P.greedy_new
    prompt = random_prompts(1, prompt_len, shape["vocab_size"], seed=2)[0]
    ids = torch.tensor([prompt], device=DEV)

    def hf_greedy(hf):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def our_greedy(model):
        return generate(model, [prompt], new, temperature=0.0, eos_id=-1)[0]

    a32, b32 = our_greedy(our32), hf_greedy(hf32)
    a16, b16 = our_greedy(our16), hf_greedy(hf16)
    n32, n16 = same_prefix(a32, b32), same_prefix(a16, b16)
    note = f"prompt {prompt_len}; bf16: {n16}/{new} equal"
    tie, gap = True, None
    if n16 < new:
        with torch.no_grad():
            logits = hf32(input_ids=torch.tensor([prompt + a16[:n16]], device=DEV)).logits[0, -1].float()
        gap = abs(float(logits[a16[n16]] - logits[b16[n16]]))
        tie = noise is not None and gap <= 2 * noise
        note += (f", first divergence at token {n16}: fp32 logit gap of the two choices {gap:.3g} vs "
                 f"2 x bf16 logit noise {noise if noise is None else f'{2 * noise:.3g}'} "
                 f"({'a tie' if tie else 'NOT a tie'})")
    if n32 < new:
        note += f"; fp32 first divergence at token {n32}"
    R.put(key, ours=f"{n32}/{new} equal (fp32)", hf=f"{new} tokens", goal=f"{new}/{new}; bf16 only at ties",
          passed=n32 == new and tie, note=note,
          figures=dict(fp32_equal=n32, bf16_equal=n16, new=new, bf16_gap=gap, bf16_noise=noise))


# ---------------------------------------------------------------------------- rows 2, 3
def generation_rows(key_eager, key_compiled, run_ours, run_hf, rows, prompt_len, new, short,
                    roofline, goal, greedy):
    """Ours eager vs transformers (row a), ours compiled vs transformers (row b).

    run_ours(n, compile) / run_hf(n, **kw) make n new tokens per row and return them."""
    tokens = rows * new
    figs = {}
    with R.row(key_eager):
        timed(lambda: run_ours(P.warm_new, False))
        out_ours, t = timed(lambda: run_ours(new, False))
        figs["ours_eager"] = tokens / t
        R.put(key_eager, ours=f"{figs['ours_eager']:,.1f} tok/s", goal=">= transformers", figures=dict(figs))
        log(f"row {key_eager}: ours eager {figs['ours_eager']:,.1f} tok/s ({t:.2f}s)")
        timed(lambda: run_hf(P.warm_new))
        out_hf, t = timed(lambda: run_hf(new))
        figs["hf_eager"] = tokens / t
        log(f"row {key_eager}: transformers eager {figs['hf_eager']:,.1f} tok/s ({t:.2f}s)")
        note = f"{rows} x ({prompt_len}+{new}) tokens, prefill included"
        if greedy:
            note += f"; greedy equal to transformers for {same_prefix(out_ours[0], out_hf[0])}/{new} tokens (bf16)"
        R.put(key_eager, hf=f"{figs['hf_eager']:,.1f} tok/s", ratio=figs["ours_eager"] / figs["hf_eager"],
              passed=figs["ours_eager"] >= figs["hf_eager"], note=note, figures=dict(figs))
    with R.row(key_compiled):
        if left() < P.compile_reserve_s:
            R.put(key_compiled, status="skipped", note=f"skipped: {left():.0f}s left in the budget, "
                  f"a compile needs about {P.compile_reserve_s:.0f}s (rerun with --only)")
            return
        g0 = graphs_compiled()
        _, t_compile = timed(lambda: run_ours(P.warm_new, P.compile))
        g1 = graphs_compiled()
        log(f"row {key_compiled}: compile + warm-up {t_compile:.1f}s, {g1 - g0} graphs")
        _, t = timed(lambda: run_ours(new, P.compile))
        g2 = graphs_compiled()
        figs.update(ours_compiled=tokens / t, compile_s=t_compile, graphs_first_call=g1 - g0,
                    graphs_timed_call=g2 - g1, roofline_tok_s=roofline)
        hf = figs.get("hf_eager")
        note = (f"compile + warm-up {t_compile:.1f}s ({g1 - g0} graphs); graphs compiled by the timed "
                f"call: {g2 - g1}; weight-read roofline at the measured copy bandwidth {roofline:,.0f} "
                f"tok/s (ours at {100 * figs['ours_compiled'] / roofline:.0f}%)")
        R.put(key_compiled, ours=f"{figs['ours_compiled']:,.1f} tok/s",
              hf=f"{hf:,.1f} tok/s" if hf else "n/a", ratio=figs["ours_compiled"] / hf if hf else None,
              goal=f">= {goal:,} tok/s", passed=figs["ours_compiled"] >= goal, note=note, figures=dict(figs))
        if left() > t + 10:  # a shorter call: what is paid per call (recompile, re-record) cancels
            _, t_short = timed(lambda: run_ours(short, P.compile))
            figs["ours_compiled_decode_only"] = rows * (new - short) / max(t - t_short, 1e-9)
            note += f"; decode-only {figs['ours_compiled_decode_only']:,.0f} tok/s"
            R.put(key_compiled, note=note, figures=dict(figs))
        log(f"row {key_compiled}: ours compiled {figs['ours_compiled']:,.1f} tok/s")
        if not HF_COMPILE:
            R.put(key_compiled, note=note + "; transformers' static cache + compile: not timed (--hf-compile)")
        else:
            if left() < P.compile_reserve_s:
                R.put(key_compiled, note=note + "; transformers static+compile skipped: budget")
                return
            # the static cache's length is prompt + max_new_tokens: warm up with the same length
            timed(lambda: run_hf(new, cache_implementation="static"))
            _, t = timed(lambda: run_hf(new, cache_implementation="static"))
            figs["hf_static_compiled"] = tokens / t
            R.put(key_compiled, note=note + f"; transformers static cache + compile "
                  f"{figs['hf_static_compiled']:,.1f} tok/s", figures=dict(figs))


def group_2():
    env = ceilings()
    hf = init_random(hf_model(P.m7b, torch.bfloat16))
    ours = ours_from(hf)
    prompt = random_prompts(1, P.decode_prompt, P.m7b["vocab_size"], seed=3)
    ids = torch.tensor(prompt, device=DEV)
    roofline = env["copy_tbps"] * 1e12 / (2 * ours.num_params())  # every bf16 weight read once a token

    def run_ours(n, compile):
        return generate(ours, prompt, n, temperature=0.0, eos_id=-1, batch_size=1, compile=compile)

    def run_hf(n, **kw):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, pad_token_id=0, **kw)
        return out[:, ids.shape[1]:].tolist()

    generation_rows("2a", "2b", run_ours, run_hf, 1, P.decode_prompt, P.decode_new, P.decode_short, roofline,
                    goal=150, greedy=True)


def group_3():
    env = ceilings()
    hf = init_random(hf_model(P.m7b, torch.bfloat16))
    ours = ours_from(hf)
    B = P.sample_batch
    prompts = random_prompts(B, P.sample_prompt, P.m7b["vocab_size"], seed=4)
    ids = torch.tensor(prompts, device=DEV)
    roofline = B * env["copy_tbps"] * 1e12 / (2 * ours.num_params())  # KV-cache reads left out

    def run_ours(n, compile):
        return generate(ours, prompts, n, temperature=1.0, eos_id=-1, seed=0, batch_size=B, compile=compile)

    def run_hf(n, **kw):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, pad_token_id=0, **kw)
        return out[:, ids.shape[1]:].tolist()

    generation_rows("3a", "3b", run_ours, run_hf, B, P.sample_prompt, P.sample_new, P.sample_short, roofline,
                    goal=5000, greedy=False)


# ---------------------------------------------------------------------------- row 4
def train_compile_backend() -> str:
    return "inductor" if P.train_compile is True else P.train_compile


def rmsprop(params, lr: float, compile: bool):
    """The trainer's optimizer (torch's defaults α 0.99, ε 1e-8, foreach); under
    compile_train its compiled update (optim.CompiledRMSprop)."""
    if compile:
        from minispin.core.optim import CompiledRMSprop
        return CompiledRMSprop(params, lr=lr, alpha=0.99, eps=1e-8, backend=train_compile_backend())
    return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8, foreach=True)


def train_ours(shape, ac, compile=False):
    model = fsdp_model(shape, ac, compile).train()
    opt = rmsprop([p for p in model.parameters() if p.requires_grad], 5e-7, compile)
    ids, mask = spin_batch(P.train_rows // 2, P.train_seq, shape["vocab_size"], seed=5)
    ref = torch.zeros(P.train_rows, device=DEV)  # precomputed reference: read, not computed

    def step():
        # the trainer's forward: lm_head on the answer positions only, in fp32 (fp32_logits)
        losses = spin_step_loss(answer_logps(model, ids, mask), ids, mask, ref)
        (losses.sum() / len(losses)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(losses.detach().mean())  # the trainer reads its metrics every step too

    out = time_steps(step, P.train_rows * P.train_seq)
    out["flops_per_token"] = model.flops_per_token(P.train_seq)
    out["params"] = model.num_params()
    del model, opt
    return out


def train_hf(shape, ac):
    hf = init_random(hf_model(shape, torch.bfloat16)).train()
    hf.config.use_cache = False
    if ac:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = spin_batch(P.train_rows // 2, P.train_seq, shape["vocab_size"], seed=5)
    ref = torch.zeros(P.train_rows, device=DEV)

    def step():
        losses = spin_step_loss(hf(input_ids=ids, use_cache=False).logits, ids, mask, ref)
        (losses.sum() / len(losses)).backward()
        hf.zero_grad(set_to_none=True)
        return float(losses.detach().mean())

    out = time_steps(step, P.train_rows * P.train_seq)
    del hf
    return out


def group_4():
    env = ceilings()
    sheet = env.get("datasheet_tflops")
    measured = max(env["matmul_tflops"], 1e-6)
    peak = (sheet or measured) * 1e12
    for key, ac in (("4a", False), ("4b", True)):
        with R.row(key):
            o = train_ours(P.llama, ac)
            free()
            log(f"row {key}: ours {o['tokens_per_s']:,.0f} tok/s, step {o['step_s']:.3f}s, peak {gb(o['peak_gb'])}")
            fpt = o["flops_per_token"]
            mfu_o = o["tokens_per_s"] * fpt / peak
            R.put(key, ours=f"{o['tokens_per_s']:,.0f} tok/s {100 * mfu_o:.1f}%",
                  goal="-" if ac else ">= 45% MFU", passed=None if ac else mfu_o >= 0.45, figures=dict(ours=o))
            h = train_hf(P.llama, ac)
            log(f"row {key}: transformers {h['tokens_per_s']:,.0f} tok/s, step {h['step_s']:.3f}s, peak {gb(h['peak_gb'])}")
            mfu_h = h["tokens_per_s"] * fpt / peak
            R.put(key, hf=f"{h['tokens_per_s']:,.0f} tok/s {100 * mfu_h:.1f}%",
                  ratio=o["tokens_per_s"] / h["tokens_per_s"],
                  note=f"{o['params'] / 1e9:.2f}B params, {P.train_rows}x{P.train_seq} tokens; MFU = "
                       f"tok/s x {fpt / 1e9:.2f} GFLOP/token (6N + attention) over "
                       f"{f'{sheet:g} (datasheet)' if sheet else f'{measured:g} (measured)'} TFLOP/s; over "
                       f"the measured {measured:g}: ours {100 * o['tokens_per_s'] * fpt / measured / 1e12:.1f}%, "
                       f"hf {100 * h['tokens_per_s'] * fpt / measured / 1e12:.1f}%; peak memory ours "
                       f"{gb(o['peak_gb'])} (FSDP2, fp32 master + RMSprop), hf {gb(h['peak_gb'])} "
                       f"(bf16 weights, forward + backward only)",
                  figures=dict(ours=o, hf=h, mfu_ours=mfu_o, mfu_hf=mfu_h))
    with R.row("4c"):
        lora_row()
    with R.row("4d"):
        lora_recipe_row()
    if R.rows.get("4e", {}).get("status") in (None, "running"):
        R.put("4e", status="error", note="not run: row 4d failed before it")


def apply_our_lora(model, rank: int, alpha: float, targets):
    """ADAPT HERE once minispin.core.lora exists: adapters on `targets`, base frozen."""
    from minispin.core import lora
    for name in ("apply_lora", "add_lora", "inject_lora"):
        fn = getattr(lora, name, None)
        if fn is not None:
            out = fn(model, rank=rank, alpha=alpha, targets=targets)
            return model if out is None else out
    raise RuntimeError("minispin.core.lora has no apply_lora(model, rank=, alpha=, targets=): "
                       "adapt apply_our_lora in bench/gpu_rows.py")


def lora_row():
    try:
        import minispin.core.lora  # noqa: F401
    except ImportError:
        R.put("4c", status="skipped", ours="-", hf="-", goal="-", note="skipped: no LoRA yet (minispin.core.lora missing)")
        return
    shape, rank, rows = P.m7b, P.lora_rank, P.lora_rows
    ids, mask = spin_batch(rows // 2, P.train_seq, shape["vocab_size"], seed=6)
    ref = torch.zeros(rows, device=DEV)

    def timed_training(model, forward):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.RMSprop(params, lr=5e-7)

        def step():
            losses = spin_step_loss(forward(ids), ids, mask, ref)
            (losses.sum() / len(losses)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(losses.detach().mean())
        return dict(time_steps(step, rows * P.train_seq), trainable=sum(p.numel() for p in params))

    ours = apply_our_lora(our_model(shape, torch.bfloat16), rank, 2 * rank, LORA_TARGETS).train()
    D.apply_activation_checkpointing(ours)
    o = timed_training(ours, lambda x: ours(x))
    del ours
    free()
    R.put("4c", ours=f"{o['tokens_per_s']:,.0f} tok/s", goal="-", figures=dict(ours=o))
    from peft import LoraConfig, get_peft_model
    hf = init_random(hf_model(shape, torch.bfloat16)).train()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                       target_modules=LORA_TARGETS))
    h = timed_training(pm, lambda x: pm(input_ids=x, use_cache=False).logits)
    R.put("4c", hf=f"{h['tokens_per_s']:,.0f} tok/s", ratio=o["tokens_per_s"] / h["tokens_per_s"],
          note=f"rank {rank}, {rows}x{P.train_seq} tokens, bf16 base, AC; peak memory ours "
               f"{gb(o['peak_gb'])}, peft {gb(h['peak_gb'])}; trainable {o['trainable'] / 1e6:.1f}M "
               f"vs {h['trainable'] / 1e6:.1f}M", figures=dict(ours=o, hf=h))


RECIPE_LORA = dict(alpha=16.0, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def recipe_lora_model(compile: bool = False):
    """configs/zephyr-7b-lora-1gpu.toml's model on the 7B shape: one process, FSDP2 with the
    bf16 policy, a bf16 base, fp32 adapters (rank 64, alpha 16, dropout 0.1, q/k/v/o),
    activation checkpointing; compile: each block through torch.compile (compile_train)."""
    from minispin.core import lora
    env = dist_env()
    rank = 64 if DEV.type == "cuda" else P.lora_rank
    settings = lora.LoRASettings(rank, RECIPE_LORA["alpha"], RECIPE_LORA["dropout"], RECIPE_LORA["targets"])
    free()
    mem_reset()
    model = D.build_sharded_model(our_args(P.m7b), env, D.device_mesh(env),
                                  D.mixed_precision_policy("bf16", DEV), torch.bfloat16,
                                  activation_checkpointing=True, lora=settings,
                                  compile=train_compile_backend() if compile else False)
    init = lora.initial_adapters(model, seed=0)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name in init:
                local.copy_(init[name])
            elif "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=g)
    return model.train(), rank


def sum_loss_step(losses, params, opt) -> float:
    """The optimizer half of a LoRA micro-step, the same for ours and transformers+peft:
    backward of the summed losses, foreach clipping at 1.0, the update; the mean loss read
    back as the trainer reads its metrics."""
    losses.sum().backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(losses.detach().mean())


def recipe_lora_steps(model, fp32_logits: bool = True, compile: bool = False) -> dict:
    """The trainer's micro-step on one pair of 2 x train_seq tokens (loss.spin_step, RMSprop
    over the adapters — compiled under compile_train — foreach clipping), timed."""
    from minispin.core.loss import spin_step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = rmsprop(params, 1e-5, compile)
    ids, mask = spin_batch(1, P.train_seq, P.m7b["vocab_size"], seed=7)
    batch, ref = {"input_ids": ids, "loss_mask": mask}, torch.zeros(2, device=DEV)

    def step():
        return sum_loss_step(spin_step(model, batch, ref, fp32_logits=fp32_logits)[0], params, opt)

    out = time_steps(step, 2 * P.train_seq)
    del opt
    return out


def lora_recipe_row():
    """4d: the 1-GPU LoRA recipe's micro-step (its peak memory is what docs/training.md's
    24 GB budget predicts, about 18.7 GB); 4e: the same model and step with bf16 logits,
    so that the price of fp32 logits (issue: <= 3%) is measured on one model, one card,
    one process."""
    model, rank = recipe_lora_model()
    o = recipe_lora_steps(model, fp32_logits=True)
    budget = 22.0  # a 24 GB card minus the CUDA context and allocator slack
    peak = o["peak_gb"]
    R.put("4d", ours=f"{o['tokens_per_s']:,.0f} tok/s, peak {gb(peak)}", hf="-",
          goal=f"peak <= {budget:g} GB", passed=None if peak is None else peak <= budget,
          note=f"rank {rank}, alpha 16, q/k/v/o, 1 pair x {P.train_seq} tokens x 2 rows, bf16 base, "
               f"fp32 adapters, AC, FSDP2 one process; docs/training.md predicts ~18.7 GB",
          figures=dict(ours=o, rank=rank))
    with R.row("4e"):
        b = recipe_lora_steps(model, fp32_logits=False)
        cost = o["step_s"] / b["step_s"] - 1
        R.put("4e", ours=f"fp32 logits {100 * cost:+.1f}% step time", hf="-",
              ratio=b["step_s"] / o["step_s"], goal="<= +3% over bf16 logits", passed=cost <= 0.03,
              note=f"row 4d's model and step: fp32_logits on {o['step_s'] * 1e3:.1f} ms "
                   f"({o['tokens_per_s']:,.0f} tok/s), off {b['step_s'] * 1e3:.1f} ms "
                   f"({b['tokens_per_s']:,.0f} tok/s); ratio = off/on step time",
              figures=dict(fp32=o, bf16=b))
    del model


# ---------------------------------------------------------------------------- row 7
def compile_skipped(key: str) -> bool:
    if left() >= P.compile_reserve_s:
        return False
    R.put(key, status="skipped", ours="-", hf="-", goal="-",
          note=f"skipped: {left():.0f}s left, a compile needs about {P.compile_reserve_s:.0f}s "
               f"(rerun with --only {key})")
    return True


def peft_recipe_steps(rank: int) -> dict:
    """transformers + peft with the 1-GPU LoRA recipe's adapters (rank 64, alpha 16, dropout
    0.1, q/k/v/o), gradient checkpointing, bf16 weights, on 4d's batch: full bf16 logits
    (transformers' forward), the same SPIN loss, clipping and RMSprop."""
    from peft import LoraConfig, get_peft_model
    hf = init_random(hf_model(P.m7b, torch.bfloat16)).train()
    hf.config.use_cache = False
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=RECIPE_LORA["alpha"],
                                       lora_dropout=RECIPE_LORA["dropout"],
                                       target_modules=list(RECIPE_LORA["targets"])))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=1e-5, foreach=True)
    ids, mask = spin_batch(1, P.train_seq, P.m7b["vocab_size"], seed=7)
    ref = torch.zeros(2, device=DEV)

    def step():
        return sum_loss_step(spin_step_loss(pm(input_ids=ids, use_cache=False).logits, ids, mask, ref), params, opt)

    out = time_steps(step, 2 * P.train_seq)
    del pm, hf, opt
    return out


def group_7():
    """compile_train's step (each block through torch.compile, then FSDP2, and RMSprop's
    update compiled; configs off by
    default until these rows show it faster): 7a on row 4a's 1.1B full fine-tuning, 7b on
    row 4d's 1-GPU 7B LoRA recipe; each against transformers (7b: with peft) and against our
    eager step measured in the same worker, which is what decides the recipes' default."""
    env = ceilings()
    sheet = env.get("datasheet_tflops")
    measured = max(env["matmul_tflops"], 1e-6)
    peak = (sheet or measured) * 1e12
    with R.row("7a"):
        if not compile_skipped("7a"):
            g0 = graphs_compiled()
            c = train_ours(P.llama, False, compile=True)
            graphs = graphs_compiled() - g0
            free()
            log(f"row 7a: ours compiled {c['tokens_per_s']:,.0f} tok/s, step {c['step_s']:.3f}s, "
                f"first step {c['first_s']:.1f}s, {graphs} graphs")
            fpt = c["flops_per_token"]
            mfu_c = c["tokens_per_s"] * fpt / peak
            R.put("7a", ours=f"{c['tokens_per_s']:,.0f} tok/s {100 * mfu_c:.1f}%", goal=">= 45% MFU, >= 1.0x",
                  figures=dict(compiled=c, graphs=graphs))
            e = train_ours(P.llama, False)
            free()
            h = train_hf(P.llama, False)
            log(f"row 7a: ours eager {e['tokens_per_s']:,.0f} tok/s, transformers {h['tokens_per_s']:,.0f} tok/s")
            ratio = c["tokens_per_s"] / h["tokens_per_s"]
            mfu_h = h["tokens_per_s"] * fpt / peak
            R.put("7a", hf=f"{h['tokens_per_s']:,.0f} tok/s {100 * mfu_h:.1f}%", ratio=ratio,
                  passed=mfu_c >= 0.45 and ratio >= 1.0,
                  note=f"row 4a's step with compile_train: compiled/eager {c['tokens_per_s'] / e['tokens_per_s']:.2f}x "
                       f"(eager {e['tokens_per_s']:,.0f} tok/s, this worker); compile + first step "
                       f"{c['first_s']:.1f}s, {graphs} graphs; MFU over "
                       f"{f'{sheet:g} (datasheet)' if sheet else f'{measured:g} (measured)'} TFLOP/s; peak "
                       f"memory compiled {gb(c['peak_gb'])}, eager {gb(e['peak_gb'])}, hf {gb(h['peak_gb'])}",
                  figures=dict(compiled=c, eager=e, hf=h, graphs=graphs, mfu_compiled=mfu_c, mfu_hf=mfu_h))
    with R.row("7b"):
        if not compile_skipped("7b"):
            g0 = graphs_compiled()
            model, rank = recipe_lora_model(compile=True)
            c = recipe_lora_steps(model, compile=True)
            graphs = graphs_compiled() - g0
            del model
            free()
            log(f"row 7b: ours compiled {c['tokens_per_s']:,.0f} tok/s, first step {c['first_s']:.1f}s, {graphs} graphs")
            R.put("7b", ours=f"{c['tokens_per_s']:,.0f} tok/s, peak {gb(c['peak_gb'])}", goal=">= 1.0x",
                  figures=dict(compiled=c, graphs=graphs))
            model, _ = recipe_lora_model()
            e = recipe_lora_steps(model)
            del model
            free()
            h = peft_recipe_steps(rank)
            log(f"row 7b: ours eager {e['tokens_per_s']:,.0f} tok/s, transformers + peft {h['tokens_per_s']:,.0f} tok/s")
            ratio = c["tokens_per_s"] / h["tokens_per_s"]
            R.put("7b", hf=f"{h['tokens_per_s']:,.0f} tok/s", ratio=ratio, passed=ratio >= 1.0,
                  note=f"row 4d's recipe step with compile_train: compiled/eager "
                       f"{c['tokens_per_s'] / e['tokens_per_s']:.2f}x (eager {e['tokens_per_s']:,.0f} tok/s); "
                       f"compile + first step {c['first_s']:.1f}s, {graphs} graphs; peak memory compiled "
                       f"{gb(c['peak_gb'])}, eager {gb(e['peak_gb'])}, transformers + peft {gb(h['peak_gb'])} "
                       f"(rank {rank}, alpha 16, dropout 0.1, q/k/v/o, gradient checkpointing, full bf16 logits)",
                  figures=dict(compiled=c, eager=e, hf=h, graphs=graphs))
    packed_row()


def real_length_batches(pairs: int, steps: int, seq: int, vocab: int, seed: int) -> list:
    """collate_pairs batches of `pairs` pairs whose lengths follow the study's UltraChat rows
    under scripts/padding.py's stated assumption, scaled to rows of at most `seq` tokens."""
    import random
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import padding
    from minispin.run.rows import TokenizedPair, collate_pairs
    scale = min(1.0, seq / 1024)
    table = [[max(1, round(scale * len(x))) for x in (p.prompt, p.real, p.generated)]
             for p in padding.ultrachat_items(512, 60.0, 250.0, 256)]
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [collate_pairs([TokenizedPair(f"{b}/{i}", ids(p), ids(r), ids(q))
                           for i, (p, r, q) in enumerate(rng.choices(table, k=pairs))], 0)
            for b in range(steps)]


def train_ours_lengths(shape, packed: bool) -> dict:
    """Row 4a's step over real-length batches, padded or packed (flex_attention's block
    mask on CUDA, the dense mask on the CPU); tokens/s of real tokens."""
    from minispin.core.loss import batch_inputs
    from minispin.core.packing import pack_batch
    model = fsdp_model(shape, False).train()
    opt = rmsprop([p for p in model.parameters() if p.requires_grad], 5e-7, False)
    n = P.warmup_steps + P.timed_steps
    pairs = P.train_rows // 2
    batches = real_length_batches(pairs, n, P.train_seq, shape["vocab_size"], seed=7)
    capacity = max(int(b["lengths"].max()) for b in batches)
    real = [int(b["lengths"].sum()) for b in batches]
    if packed:
        batches = [pack_batch(b, capacity=capacity, block_mask=DEV.type == "cuda", device=DEV) for b in batches]
    batches = [{k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    positions = sum(b["input_ids"].numel() for b in batches[P.warmup_steps:])
    ref = torch.zeros(P.train_rows, device=DEV)
    at = iter(range(n))

    def step():
        b = batches[next(at)]
        model_kw, rows = batch_inputs(b)
        logps = answer_logps(model, b["input_ids"], b["loss_mask"], **rows, **model_kw)
        losses, _ = spin_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=0.1)
        (losses.sum() / len(losses)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(losses.detach().mean())

    mem_reset()
    for _ in range(P.warmup_steps):
        step()
    total = 0.0
    for _ in range(P.timed_steps):
        _, t = timed(step)
        total += t
    tokens = sum(real[P.warmup_steps:])
    out = dict(tokens_per_s=tokens / total, real_tokens=tokens, positions=positions, peak_gb=mem_peak_gb())
    del model, opt
    return out


def packed_row():
    with R.row("7c"):
        a = train_ours_lengths(P.llama, packed=False)
        free()
        b = train_ours_lengths(P.llama, packed=True)
        free()
        ratio = b["tokens_per_s"] / a["tokens_per_s"]
        log(f"row 7c: padded {a['tokens_per_s']:,.0f}, packed {b['tokens_per_s']:,.0f} real tok/s")
        R.put("7c", ours=f"packed {b['tokens_per_s']:,.0f} real tok/s", hf=f"padded {a['tokens_per_s']:,.0f}",
              ratio=ratio, goal="packed >= 1.0x padded", passed=ratio >= 1.0,
              note=f"{P.train_rows // 2} pairs per step, UltraChat lengths (scripts/padding.py's assumption); "
                   f"positions computed: padded {a['positions']}, packed {b['positions']} for "
                   f"{a['real_tokens']} real tokens; peak memory padded {gb(a['peak_gb'])}, packed {gb(b['peak_gb'])}",
              figures=dict(padded=a, packed=b))


# ---------------------------------------------------------------------------- row 5
def group_5():
    from minispin.run.recipe import write_variant as write_recipe_variant
    with R.row("5"):
        tmp = tempfile.mkdtemp(prefix="gpucheck-e2e-")
        try:
            recipe = write_recipe_variant(os.path.join(tmp, "short.toml"), P.e2e)
            run = os.path.join(tmp, "run")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                   "--master-port", str(free_port()), "train.py", "--config", recipe,
                   "--device", DEV.type, "--run-dir", run, "--no-progress"]
            log("row 5: " + " ".join(cmd))
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, **OWN_PROCESS_GROUP)
            t0 = time.time()
            try:
                out, err = proc.communicate(timeout=max(10.0, left() - 5))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the worker it started
                out, err = proc.communicate()
            wall = time.time() - t0
            for line in (out + err).strip().splitlines()[-20:]:
                log("  | " + line)
            model_dir = os.path.join(run, "iter0", "model")
            exported = (os.path.isfile(os.path.join(model_dir, "config.json"))
                        and any(f.endswith(".safetensors") for f in os.listdir(model_dir)))
            metrics = os.path.join(run, "iter0", "metrics.jsonl")
            loss0 = None
            if os.path.isfile(metrics):
                with open(metrics) as f:
                    first = f.readline()
                loss0 = json.loads(first)["loss"] if first.strip() else None
            rc = proc.returncode
            last_err = next((l for l in reversed(err.strip().splitlines()) if l.strip()), "")
            note = (f"{wall:.0f}s, {'nccl on cuda' if DEV.type == 'cuda' else 'gloo on cpu'}, recipe "
                    + ", ".join(f"{k}={v}" for k, v in P.e2e.items()))
            if loss0 is not None:
                note += f"; step-1 loss - ln2 = {loss0 - LN2:+.1e}"
            if rc != 0:
                note += f"; {'timed out' if rc == -signal.SIGKILL else 'stderr'}: {last_err[:200]}"
            R.put("5", ours=f"rc {rc}, {'exported' if exported else 'no export'}", hf="-",
                  goal="rc 0 + exported model", passed=rc == 0 and exported, note=note,
                  figures=dict(rc=rc, exported=exported, seconds=wall, loss0=loss0))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- row 6
SDPA_BACKENDS = (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient"), ("math", "math"))


def sdpa_calls(fn) -> tuple:
    """Run fn under the profiler: (Counter backend -> SDPA calls, attention kernel names).
    The backend is read off the aten op SDPA dispatched to (…_flash_attention, …_math…),
    which names it the same way on every device."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    calls, kernels = Counter(), set()
    for ev in prof.key_averages():
        name = ev.key.lower()
        if "scaled_dot_product" in name and name != "aten::scaled_dot_product_attention" \
                and "backward" not in name:
            kind = next((k for word, k in SDPA_BACKENDS if word in name), f"other ({ev.key})")
            calls[kind] += ev.count
        elif any(w in name for w in ("flash", "fmha", "attention", "cudnn", "sdpa")) \
                and not name.startswith("aten::"):
            kernels.add(ev.key[:60])
    return calls, sorted(kernels)


def packed_rows(model):
    """lm-eval's packing: a shared context then two continuations, each seeing the context
    and itself (the boolean block mask of minispin.study.evaluation, restated)."""
    a = model.config
    ctx, cont = P.probe_prompt // 2, P.probe_prompt // 4
    seg = torch.tensor([0] * ctx + [1] * cont + [2] * cont, device=DEV)
    pos = torch.tensor(list(range(ctx)) + list(range(ctx, ctx + cont)) * 2, device=DEV)
    diff = pos[:, None] - pos[None, :]
    allowed = ((seg[None, :] == 0) | (seg[None, :] == seg[:, None])) & (diff >= 0)
    if a.sliding_window:
        allowed &= diff < a.sliding_window
    ids = torch.tensor(random_prompts(2, len(seg), a.vocab_size, seed=9), device=DEV)
    with torch.no_grad():
        return model(ids, pos[None].expand(2, -1), allowed[None, None].expand(2, 1, -1, -1),
                     return_hidden=True)


def probe_sdpa(model):
    a = model.config
    B, T = P.probe_batch, P.probe_prompt
    lens = [T - (i * T) // (2 * B) for i in range(B)]  # ragged: left padding in one batch
    padded = [p[:n] for p, n in zip(random_prompts(B, T, a.vocab_size, seed=7), lens)]
    ids = torch.tensor(random_prompts(2, T, a.vocab_size, seed=8), device=DEV)

    def forward():
        with torch.no_grad():
            return model(ids)

    def prefill(new):
        return lambda: generate_batch(model, padded, new, temperature=0.0, eos_id=-1, ragged_prefill=False)

    kinds = {}
    kinds["causal forward"], k1 = sdpa_calls(forward)
    kinds["padded prefill"], k2 = sdpa_calls(prefill(1))
    with_decode, k3 = sdpa_calls(prefill(3))  # the prefill again, plus 2 decode steps
    kinds["decode step"] = with_decode - kinds["padded prefill"]
    kinds["packed rows"], k4 = sdpa_calls(lambda: packed_rows(model))
    summary = "; ".join(f"{k}: " + (", ".join(f"{b} x{n}" for b, n in c.items()) or "no SDPA call seen")
                        for k, c in kinds.items())
    math_in = [k for k, c in kinds.items() if "math" in c]
    unseen = [k for k, c in kinds.items() if not c]
    short = ("math: " + ", ".join(k.split()[0] for k in math_in)) if math_in else "no math path"
    R.put("6a", ours=short + (f"; none seen: {len(unseen)}" if unseen else ""), hf="-", goal="no math fallback", passed=not math_in and not unseen,
          note=f"{a.n_layers} layers, bf16, GQA {a.n_heads}/{a.n_kv_heads}: {summary}; kernels: "
               + (", ".join(sorted(set(k1 + k2 + k3 + k4))[:6]) or "none listed"),
          figures={k: dict(c) for k, c in kinds.items()})


def probe_compiled_twice(model):
    a = model.config
    B, T, new = P.probe_batch, P.probe_prompt, 4 * P.warm_new
    lens = [T - (i * T) // (2 * B) for i in range(B)]
    prompts = [p[:n] for p, n in zip(random_prompts(B, T, a.vocab_size, seed=10), lens)]

    def run():
        return generate(model, prompts, new, temperature=0.0, eos_id=-1, batch_size=B, compile=P.compile)

    g0 = graphs_compiled()
    out1, t1 = timed(run)
    g1, m1 = graphs_compiled(), mem_now()
    out2, t2 = timed(run)
    g2, m2 = graphs_compiled(), mem_now()
    # the compiled step must compute what the eager one does: the same greedy tokens
    eager = generate(model, prompts, new, temperature=0.0, eos_id=-1, batch_size=B, compile=False)
    agree = [same_prefix(a, b) for a, b in zip(out2, eager)]
    repeat = sum(a == b for a, b in zip(out1, out2))
    max_len = -(-(T + new) // 256) * 256  # the compiled path's cache length
    cache = 2 * a.n_layers * B * a.n_kv_heads * max_len * a.head_dim * 2  # K and V, bf16
    growth = None if m1 is None else m2 - m1
    recompiles = g2 - g1
    R.put("6b", ours=f"{recompiles} recompiles, " + ("mem n/a" if growth is None else f"+{growth / 1e6:.1f} MB"),
          hf="-", goal="0 recompiles, no growth",
          passed=recompiles == 0 and (growth is None or growth < cache / 2),
          note=f"compiled == eager for {sum(n == new for n in agree)}/{B} rows (shortest common "
               f"prefix {min(agree)}/{new} tokens), call 2 == call 1 for {repeat}/{B} rows; "
               f"batch {B}, prompts {min(lens)}-{T} + {new}, {a.n_layers} layers: call 1 {t1:.1f}s "
               f"({g1 - g0} graphs), call 2 {t2:.2f}s; memory allocated after call 1 "
               f"{gb(None if m1 is None else m1 / 1e9)}, after call 2 {gb(None if m2 is None else m2 / 1e9)}; "
               f"one KV cache is {cache / 1e6:.1f} MB",
          figures=dict(graphs_call1=g1 - g0, graphs_call2=recompiles, seconds_call1=t1, seconds_call2=t2,
                       mem_after_1=m1, mem_after_2=m2, cache_bytes=cache))


def probe_fsdp_7b():
    """One training step as the trainer takes it, with the reference computed the way
    precompute mode does (eval, no grad, 2 x the micro-batch in one forward)."""
    shape = dict(P.m7b, num_hidden_layers=P.probe_layers)
    pairs, T = P.probe_pairs, P.train_seq
    model = fsdp_model(shape, activation_checkpointing=True)
    ids2, mask2 = spin_batch(2 * pairs, T, shape["vocab_size"], seed=11)  # [real 2p; gen 2p]
    rows = list(range(pairs)) + list(range(2 * pairs, 3 * pairs))  # the micro-batch: pairs 0..p-1
    ids, mask = ids2[rows], mask2[rows]
    mem_reset()
    model.eval()
    with torch.no_grad():
        ref_trainer = answer_logps(model, ids2, mask2)[rows]   # the trainer's forward (fp32 logits)
        ref_same = answer_logps(model, ids, mask)
    model.train()
    opt = torch.optim.RMSprop(model.parameters(), lr=5e-7, alpha=0.99, eps=1e-8)
    logps = answer_logps(model, ids, mask)
    losses, _ = spin_loss(logps[:pairs], logps[pairs:], ref_trainer[:pairs], ref_trainer[pairs:], beta=0.1)
    same, _ = spin_loss(logps[:pairs].detach(), logps[pairs:].detach(), ref_same[:pairs], ref_same[pairs:], beta=0.1)
    (losses.sum() / pairs).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    peak = mem_peak_gb()
    d_trainer, d_same = float(losses.mean()) - LN2, float(same.mean()) - LN2
    drift = float((logps.detach() - ref_trainer).abs().max())
    R.put("6c", ours=f"{gb(peak)}, loss-ln2 {d_trainer:+.1e}", hf="-", goal="|loss - ln2| <= 1e-3",
          passed=abs(d_trainer) <= 1e-3,
          note=f"{P.probe_layers} Mistral-7B blocks + embeddings/head ({model.num_params() / 1e9:.2f}B), "
               f"{2 * pairs}x{T} tokens, AC, {'bf16 compute / fp32 master' if DEV.type == 'cuda' else 'fp32'}; "
               f"reference in one forward of {4 * pairs} rows (trainer's 2 x micro): loss - ln2 "
               f"{d_trainer:+.2e}, max |log p - ref| {drift:.2e} nats; same-shape reference: {d_same:+.2e}",
          figures=dict(peak_gb=peak, loss_minus_ln2=d_trainer, same_shape_loss_minus_ln2=d_same,
                       max_logp_drift=drift, params=model.num_params()))
    del model, opt


def group_6():
    model = our_model(dict(P.m7b, num_hidden_layers=P.compile_probe_layers), torch.bfloat16)
    with R.row("6a"):
        probe_sdpa(model)
    with R.row("6b"):
        probe_compiled_twice(model)
    del model
    free()
    with R.row("6c"):
        probe_fsdp_7b()


GROUPS = {"1": group_1, "2": group_2, "3": group_3, "4": group_4, "5": group_5, "6": group_6, "7": group_7}


def main(argv=None):
    global DEV, P, R, DEADLINE, HF_COMPILE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True, help="e.g. 1,4,5")
    ap.add_argument("--results", required=True, help="JSON file the figures go to")
    ap.add_argument("--deadlines", required=True, help='JSON {"group": unix time}')
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--hf-compile", action="store_true")
    args = ap.parse_args(argv)
    DEV = torch.device("cpu" if args.dry else "cuda")
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_rows.py: no CUDA device (use --dry on a machine without a GPU)")
    P = DRY_PLAN if args.dry else GPU_PLAN
    HF_COMPILE = args.hf_compile or args.dry  # --dry walks every path (on a CPU nothing compiles)
    R = Report(args.results)
    deadlines = json.loads(args.deadlines)
    environment()
    try:
        for g in args.groups.split(","):
            DEADLINE = float(deadlines[g])
            log(f"group {g}: start, {left():.0f}s budget")
            try:
                GROUPS[g]()
            except Exception as e:  # set-up shared by the group's rows failed
                cause = one_line(e)
                log(f"group {g}: ERROR {cause}")
                traceback.print_exc(file=sys.stdout)
                for key in rows_of(g):
                    if R.rows.get(key, {}).get("status") in (None, "running"):
                        R.put(key, status="error", note=cause)
            free()
    finally:
        if _DIST is not None:
            D.close_distributed(_DIST)


def rows_of(group: str):
    return [key for key, g, _ in ROWS if g == group]


if __name__ == "__main__":
    main()
