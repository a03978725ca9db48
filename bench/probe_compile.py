"""Is the compiled decode right on a GPU, and does it keep memory flat across calls?

    python bench/probe_compile.py

A 2-layer model of the Mistral-7B width (random, q/k and the head sharpened so greedy has no
near-ties): greedy tokens of generate(compile=True) against the eager path, in fp32 (matmuls
without TF32: the two must agree) and in bf16 (they may part at a near-tie); memory allocated
after each of three compiled calls of the same shape; the static cache's address each time.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minispin.core.model import ModelArgs  # noqa: E402
from minispin.core.model import build_model  # noqa: E402
from minispin.core.sampling import _STATIC_CACHES, generate  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
args = ModelArgs(model_type="mistral", vocab_size=32000, dim=4096, n_layers=2, n_heads=32, n_kv_heads=8,
                 head_dim=128, intermediate_size=14336, max_position_embeddings=4096, sliding_window=4096)
g = torch.Generator().manual_seed(0)
lens = [256, 224, 192, 160]
prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lens]
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = build_model(args, device="cuda", dtype=dtype)
    model.init_weights(generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
        model.lm_head.weight.mul_(40.0)
    eager = generate(model, prompts, 32, temperature=0.0, eos_id=-1, batch_size=4)
    for call in range(3):
        out = generate(model, prompts, 32, temperature=0.0, eos_id=-1, batch_size=4, compile=True)
        torch.cuda.synchronize()
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(out, eager)]
        cache = next(iter(_STATIC_CACHES[model].values()))
        print(f"{str(dtype)[6:]} call {call + 1}: compiled == eager prefix {agree} of 32; "
              f"allocated {torch.cuda.memory_allocated() / 1e6:.1f} MB; cache k[0] at {cache.k[0].data_ptr():#x}; "
              f"caches kept {len(_STATIC_CACHES[model])}", flush=True)
    del model, cache
    torch.cuda.empty_cache()
from torch._dynamo.utils import counters  # noqa: E402
print({k: dict(v) for k, v in counters.items() if k in ("inductor", "stats")})
