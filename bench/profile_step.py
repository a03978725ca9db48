"""Where the time of one SPIN training step goes, on a GPU: ours (as the trainer takes it:
FSDP2 in a one-process group, fp32 master weights, bf16 compute, the trainer's forward
`loss.answer_logps`, foreach clipping and RMSprop) and transformers' forward + backward,
on the 1.1B Llama shape of bench/gpu.sh row 4a — or, with --model 7b-lora, the 1-GPU LoRA
recipe's micro-step of row 4d (no transformers side then).

    python bench/profile_step.py [--model 1b|7b-lora] [--logits both|fp32|bf16] [--compile]
                                 [--steps 3] [--rows 8] [--seq 1024] [--no-hf] [--no-sdpa]

Prints, for each variant, the CUDA kernel time per step split into kernel families
(matmul, attention, elementwise/norm, softmax/loss, reductions, copies and casts,
optimizer) and the ten kernels that take the most time, beside the wall-clock time per
step: wall well above kernel time means the GPU waited (on the CPU launching kernels, or a
host sync). User annotations (`Optimizer.step#RMSprop.step`, FSDP's ranges) are ranges,
not kernels, and are left out of the sums (an earlier version counted the optimizer's
twice). --logits both profiles fp32 and bf16 logits (`fp32_logits`) on the same model and
lists the kernels whose time grew most with fp32: where the fp32-logit cost goes. Without
--no-sdpa, ours runs again with each SDPA backend forced.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

import gpu_rows as G  # noqa: E402
from minispin.core.loss import answer_logps, spin_step  # noqa: E402

FAMILIES = (("matmul", ("gemm", "sm90_xmma", "cutlass", "ampere_", "cublas", "matmul", "nvjet")),
            ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
            ("optimizer", ("multi_tensor", "foreach", "rmsprop", "_amp")),
            ("softmax/loss", ("softmax", "logsumexp", "log_softmax", "gather", "nll")),
            ("reduce", ("reduce", "norm_kernel", "sum_kernel")),
            ("copy/cast", ("copy", "cat", "convert", "to_copy", "fill", "memcpy", "memset")),
            ("elementwise", ("elementwise", "vectorized", "pointwise", "triton")))


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")


def dev_time(e) -> float:
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)


def profile(step, steps: int, title: str) -> dict:
    """{kernel name: ms per step}; prints the families, the top kernels and wall vs kernel time."""
    for _ in range(2):  # warm-up: allocator, cuBLAS handles, SDPA's kernel choice, compiles
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = list(prof.key_averages())
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    kernels = kernels or [e for e in events if dev_time(e) > 0 and not getattr(e, "is_user_annotation", False)]
    per = {e.key: dev_time(e) / steps / 1e3 for e in kernels}
    total = sum(per.values())
    fam = collections.Counter()
    for name, ms in per.items():
        fam[family(name)] += ms
    counts = {e.key: e.count // steps for e in kernels}
    print(f"\n== {title}: {total:.1f} ms of CUDA kernels per step; wall {wall:.1f} ms per step "
          f"(profiler on; GPU idle ~{max(0.0, wall - total):.1f} ms)")
    print("   " + ", ".join(f"{k} {v:.1f} ms ({100 * v / max(total, 1e-9):.0f}%)" for k, v in fam.most_common()))
    for name in sorted(per, key=lambda k: -per[k])[:10]:
        print(f"   {per[name]:8.2f} ms  x{counts[name]:<4d} {name[:110]}")
    return per


def compare(fp32: dict, bf16: dict):
    """The kernels whose time per step changed most from bf16 to fp32 logits."""
    delta = {k: fp32.get(k, 0.0) - bf16.get(k, 0.0) for k in set(fp32) | set(bf16)}
    print(f"\n== fp32 logits minus bf16 logits: {sum(fp32.values()) - sum(bf16.values()):+.2f} ms of CUDA "
          f"kernels per step; the largest changes:")
    for name in sorted(delta, key=lambda k: -abs(delta[k]))[:10]:
        print(f"   {delta[name]:+8.2f} ms  {name[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("1b", "7b-lora"), default="1b",
                    help="1b: row 4a's full fine-tuning; 7b-lora: row 4d's 1-GPU LoRA recipe step")
    ap.add_argument("--logits", choices=("both", "fp32", "bf16"), default="both",
                    help="fp32_logits on, off, or both (and their difference)")
    ap.add_argument("--compile", action="store_true",
                    help="compile_train: each block, and RMSprop's update, through torch.compile")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--rows", type=int, default=8, help="1b: rows per step ([real; generated] halves)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' forward + backward")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the forced-SDPA-backend runs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU (CUDA kernel times)")
        return 0
    G.DEV, G.P = torch.device("cuda"), G.GPU_PLAN
    G.P.train_rows, G.P.train_seq = args.rows, args.seq
    torch.cuda.set_device(0)
    modes = {"both": (True, False), "fp32": (True,), "bf16": (False,)}[args.logits]
    tag = ", compiled blocks" if args.compile else ""

    if args.model == "7b-lora":
        model, rank = G.recipe_lora_model(compile=args.compile)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = G.rmsprop(params, 1e-5, args.compile)
        ids, mask = G.spin_batch(1, args.seq, G.P.m7b["vocab_size"], seed=7)
        batch, ref = {"input_ids": ids, "loss_mask": mask}, torch.zeros(2, device=G.DEV)

        def ours(fp32_logits):
            losses, _ = spin_step(model, batch, ref, fp32_logits=fp32_logits)
            losses.sum().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        title = f"ours: 7B LoRA recipe step (rank {rank}, AC, bf16 base){tag}"
    else:
        shape = G.P.llama
        ids, mask = G.spin_batch(args.rows // 2, args.seq, shape["vocab_size"], seed=5)
        ref = torch.zeros(args.rows, device=G.DEV)
        model = G.fsdp_model(shape, False, compile=args.compile).train()
        opt = G.rmsprop([p for p in model.parameters() if p.requires_grad], 5e-7, args.compile)

        def ours(fp32_logits):
            losses = G.spin_step_loss(answer_logps(model, ids, mask, fp32_logits), ids, mask, ref)
            (losses.sum() / len(losses)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        title = f"ours: 1.1B, FSDP2 (1 process), fp32 master, bf16 compute, clip, RMSprop{tag}"

    per = {}
    for fp32 in modes:
        per[fp32] = profile(lambda: ours(fp32), args.steps, f"{title}, {'fp32' if fp32 else 'bf16'} logits")
    if len(modes) == 2:
        compare(per[True], per[False])
    if not args.no_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    profile(lambda: ours(modes[0]), 1, f"ours with {backend.name} only")
            except RuntimeError as e:
                print(f"\n== ours with {backend.name} only: not available ({str(e).splitlines()[0][:100]})")
    del model, opt
    G.free()
    if args.no_hf or args.model != "1b":
        return 0
    hf = G.init_random(G.hf_model(G.P.llama, torch.bfloat16)).train()
    hf.config.use_cache = False

    def theirs():
        losses = G.spin_step_loss(hf(input_ids=ids, use_cache=False).logits, ids, mask, ref)
        (losses.sum() / len(losses)).backward()
        hf.zero_grad(set_to_none=True)

    profile(theirs, args.steps, "transformers: bf16 weights, forward + backward only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
