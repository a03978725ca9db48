"""Peak memory while loading a ~400 MB checkpoint: ours vs transformers, one run.

Writes a random fp32 Llama checkpoint (~100M parameters) to a temp folder, then loads it
in fresh subprocesses and reports each one's peak RSS growth (ru_maxrss after load and one read of every
weight, minus
RSS after `import torch`), as a multiple of the checkpoint's size on disk.

    python bench/bench_load.py [--size-mb 400] [--keep DIR] [--rounds 3]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import resource, sys, time, torch
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
which, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
if which == "minispin":
    from minispin import load_model
else:
    from transformers import AutoModelForCausalLM
# warm up the loader on the tiny stories260K model so that one-time library set-up
# (allocator arenas, thread pools) is not counted as the cost of loading the big file
warm = sys.argv[3] + "/assets/models/stories260K"
_ = load_model(warm) if which == "minispin" else AutoModelForCausalLM.from_pretrained(warm)
del _
base = rss_mb()
t0 = time.perf_counter()
if which == "minispin":
    m = load_model(path, dtype=torch.float32)
else:
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
# read every weight once: a lazily mmapped load has not paid for its pages until then
with torch.no_grad():
    for p in m.parameters():
        p.sum()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{base:.1f} {peak:.1f} {dt:.3f}")
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=400, help="target checkpoint size (fp32)")
    ap.add_argument("--keep", help="write the checkpoint here instead of a temp folder")
    ap.add_argument("--rounds", type=int, default=3, help="alternating loads per loader; the fastest counts")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    import torch
    from minispin import ModelArgs, build_model, save_model

    # dim 1024, vocab 32000, untied: ~4.2M params per layer + 65.5M embedding/head
    n_layers = max(1, round((args.size_mb * 1e6 / 4 - 2 * 32000 * 1024) / (12.6 * 1024 * 1024)))
    margs = ModelArgs(model_type="llama", vocab_size=32000, dim=1024, n_layers=n_layers, n_heads=16,
                      n_kv_heads=16, head_dim=64, intermediate_size=2816, max_position_embeddings=2048)
    folder = args.keep or tempfile.mkdtemp(prefix="bench_load_")
    model = build_model(margs, device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, folder, max_shard_size="10GB")
    del model
    size_mb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20
    print(f"checkpoint: {folder}  {size_mb:.0f} MiB, {n_layers} layers, fp32")
    rows = {}
    # alternate the two loaders and keep each one's fastest round: on a shared machine
    # other load only ever slows a round down
    for _ in range(args.rounds):
        for which in ("minispin", "transformers"):
            out = subprocess.run([sys.executable, "-c", CHILD, which, folder, REPO], capture_output=True, text=True)
            if out.returncode:
                print(which, "failed:", out.stderr[-500:])
                continue
            base, peak, dt = map(float, out.stdout.split()[-3:])
            print(f"{which:13s} peak RSS growth {peak - base:7.0f} MiB = {(peak - base) / size_mb:.2f}x file size, load {dt:.2f}s")
            if which not in rows or dt < rows[which]["seconds"]:
                rows[which] = dict(peak_growth_mib=peak - base, ratio_to_file=(peak - base) / size_mb, seconds=dt)
    if len(rows) == 2:
        m, t = rows["minispin"], rows["transformers"]
        print(f"ours / transformers peak growth: {m['peak_growth_mib'] / t['peak_growth_mib']:.2f}x; "
              f"load time (best of {args.rounds}): {m['seconds']:.2f}s / {t['seconds']:.2f}s = "
              f"{m['seconds'] / t['seconds']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
