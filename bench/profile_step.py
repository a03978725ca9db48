"""Where the time of one SPIN training step goes, on a GPU: ours (as the trainer takes it:
FSDP2 in a one-process group, fp32 master weights, bf16 compute, clip, RMSprop) and
transformers' forward + backward, on the 1.1B Llama shape of bench/gpu.sh row 4a.

    python bench/profile_step.py [--steps 3] [--rows 8] [--seq 1024]

Prints, for each side, the CUDA time per step split into kernel families (matmul,
attention, elementwise/norm, softmax/loss, reductions, copies and casts, optimizer) and
the ten kernels that take the most time; then ours again with each SDPA backend forced, to
see whether the attention kernel that PyTorch picks is the fastest one for this shape.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

import gpu_rows as G  # noqa: E402

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


def profile(step, steps: int, title: str):
    for _ in range(2):  # warm-up: allocator, cuBLAS handles, SDPA's kernel choice
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    dev_time = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    events = list(prof.key_averages())
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernels = kernels or [e for e in events if dev_time(e) > 0]
    total = sum(dev_time(e) for e in kernels) / steps / 1e3
    fam = collections.Counter()
    for e in kernels:
        fam[family(e.key)] += dev_time(e) / steps / 1e3
    print(f"\n== {title}: {total:.1f} ms of CUDA time per step")
    print("   " + ", ".join(f"{k} {v:.1f} ms ({100 * v / max(total, 1e-9):.0f}%)" for k, v in fam.most_common()))
    for e in sorted(kernels, key=lambda e: -dev_time(e))[:10]:
        print(f"   {dev_time(e) / steps / 1e3:8.2f} ms  x{e.count // steps:<4d} {e.key[:110]}")
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--rows", type=int, default=8, help="rows per step ([real; generated] halves)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU (CUDA kernel times)")
        return 0
    G.DEV, G.P = torch.device("cuda"), G.GPU_PLAN
    G.P.train_rows, G.P.train_seq = args.rows, args.seq
    torch.cuda.set_device(0)
    shape = G.P.llama
    ids, mask = G.spin_batch(args.rows // 2, args.seq, shape["vocab_size"], seed=5)
    ref = torch.zeros(args.rows, device=G.DEV)

    model = G.fsdp_model(shape, False).train()
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=5e-7)

    def ours():
        losses = G.spin_step_loss(model(ids), ids, mask, ref)
        (losses.sum() / len(losses)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    profile(ours, args.steps, "ours: FSDP2 (1 process), fp32 master, bf16 compute, clip, RMSprop")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                profile(ours, 1, f"ours with {backend.name} only")
        except RuntimeError as e:
            print(f"\n== ours with {backend.name} only: not available ({str(e).splitlines()[0][:100]})")
    del model, opt
    G.free()
    hf = G.init_random(G.hf_model(shape, torch.bfloat16)).train()
    hf.config.use_cache = False

    def theirs():
        losses = G.spin_step_loss(hf(input_ids=ids, use_cache=False).logits, ids, mask, ref)
        (losses.sum() / len(losses)).backward()
        hf.zero_grad(set_to_none=True)

    profile(theirs, args.steps, "transformers: bf16 weights, forward + backward only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
