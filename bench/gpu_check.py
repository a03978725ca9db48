"""bench/gpu.sh: every GPU claim of minispin measured by one command, in about eight minutes.

    bash bench/gpu.sh                    # on a machine with one CUDA GPU
    bash bench/gpu.sh --dry              # every row with tiny shapes on the CPU (CI runs this)
    bash bench/gpu.sh --only 2,6c        # some rows again (a row name selects its group)
    bash bench/gpu.sh --out DIR          # gpu_check.json (every figure) + gpu_check.log; default $OUT

GPU time comes rarely and by the minute, so this script is built to spend it well:
* A time budget (--time, default 495 s) is split among the row groups (BUDGET_S, scaled
  to --time). Budgets roll over: what a group leaves unused goes to the next, and group g
  must end by the sum of the budgets up to g. Cheap rows run first, the two
  compile-heavy decode rows last, so one slow compile cannot starve the rest.
* Each group runs in its own worker process (bench/gpu_rows.py): a crash, a hang or a
  CUDA error costs only that group, GPU memory is returned between groups, and a worker
  past its deadline is killed with what it had measured kept (it writes its figures after
  every measurement). A failing row prints its one-line cause in the table.
* This file imports nothing but the standard library: it only starts workers, stamps
  their output with the time, and prints one table at the end.
* --dry runs all groups in ONE worker (on a small CPU machine, importing torch and
  transformers per group would cost more than the rows) and marks every row "dry".
Exit status: 0 when every selected row ran (passed, failed its goal or was skipped),
1 when a row raised, timed out or its worker died.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

ROWS = [  # (row, group, what)
    ("1a", "1", "bf16 logits vs fp32, Llama 1.1B shape"),
    ("1b", "1", "bf16 logits vs fp32, Mistral, window < seq"),
    ("1c", "1", "greedy == transformers, Llama 1.1B"),
    ("1d", "1", "greedy == transformers, Mistral window"),
    ("2a", "2", "decode batch 1, Mistral-7B, eager"),
    ("2b", "2", "decode batch 1, Mistral-7B, compiled"),
    ("3a", "3", "sampling batch 64, 256+256, eager"),
    ("3b", "3", "sampling batch 64, 256+256, compiled"),
    ("4a", "4", "SPIN step 1.1B full FSDP2 bf16, no AC"),
    ("4b", "4", "SPIN step 1.1B full FSDP2 bf16, AC"),
    ("4c", "4", "SPIN step 7B LoRA"),
    ("4d", "4", "7B LoRA as the 1-GPU recipe trains it"),
    ("4e", "4", "4d: cost of fp32 logits over bf16"),
    ("5", "5", "tiny recipe iter 0, torchrun, nccl"),
    ("6a", "6", "SDPA backend per attention call"),
    ("6b", "6", "compiled generate() x2: recompiles, mem"),
    ("6c", "6", "FSDP2 step, 4 Mistral-7B blocks"),
    ("7a", "7", "4a with compile_train (compiled blocks)"),
    ("7b", "7", "4d with compile_train, vs transformers+peft"),
    ("7c", "7", "4a on real lengths: packed vs padded"),
]
ORDER = ["1", "4", "5", "6", "7", "2", "3"]  # cheap and robust first, compile-heavy last
# a worker gets its own process group, so that it is killed with everything it started
# (compile workers, torchrun); not its own session, so that whoever kills this script's
# session still reaches it
OWN_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
BUDGET_S = {"1": 55, "4": 75, "5": 35, "6": 40, "7": 130, "2": 75, "3": 85}  # sums to the default --time
# (an H200 run took 1: ~45 s, 4: 41 s with 4c/4d, 5: 24 s, 6: 30 s, 2: 65 s, 3: 77 s; 7 (two
# compiles, 1.1B and 7B LoRA, plus the eager and transformers steps beside them) is an estimate)


def stamp(t0: float) -> str:
    return f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:5.1f}s]"


class Log:
    """Prints with a time stamp and keeps a copy for the log file."""

    def __init__(self, t0: float):
        self.t0, self.lines, self.lock = t0, [], threading.Lock()

    def __call__(self, line: str, raw: bool = False):
        text = line if raw else f"{stamp(self.t0)} {line}"
        with self.lock:
            print(text, flush=True)
            self.lines.append(text)


def selected_groups(only: str | None):
    if not only:
        return list(ORDER)
    wanted = set()
    group_of = {key: g for key, g, _ in ROWS}
    for name in only.split(","):
        name = name.strip()
        if name in BUDGET_S:
            wanted.add(name)
        elif name in group_of:
            wanted.add(group_of[name])
        else:
            sys.exit(f"gpu_check.py: --only: unknown row '{name}' (rows: "
                     f"{', '.join(k for k, _, _ in ROWS)}; or a group 1-7)")
    return [g for g in ORDER if g in wanted]


def run_worker(groups, deadlines, args, log) -> dict:
    """One worker for these groups; returns its results with timeouts and crashes filled in."""
    fd, path = tempfile.mkstemp(prefix="gpucheck-", suffix=".json")
    os.close(fd)
    os.unlink(path)  # the worker creates it; its absence means it never got going
    cmd = [sys.executable, os.path.join(HERE, "gpu_rows.py"), "--groups", ",".join(groups),
           "--results", path, "--deadlines", json.dumps({g: deadlines[g] for g in groups})]
    cmd += ["--dry"] * args.dry + ["--hf-compile"] * args.hf_compile
    log(f"worker for group(s) {','.join(groups)}: until +{deadlines[groups[-1]] - log.t0:.0f}s")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, **OWN_PROCESS_GROUP)
    tail = []

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-20]
            log("  " + line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, deadlines[groups[-1]] - time.time()))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"group(s) {','.join(groups)}: over budget, killing the worker")
    finally:  # over budget, or this script interrupted: the worker's group goes with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    results = {"env": {}, "rows": {}}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
        os.unlink(path)
    last = next((l.strip() for l in reversed(tail) if l.strip()), "")[:200]
    for key, g, _ in ROWS:
        if g not in groups:
            continue
        row = results["rows"].setdefault(key, {})
        if row.get("status") in (None, "running"):
            row["status"] = "timeout" if timed_out else "error"
            cause = ("over the time budget" if timed_out
                     else f"worker exited with status {proc.returncode}: {last}")
            row["note"] = cause + (f" (partial: {row['note']})" if row.get("note") else "")
    return results


def table(env: dict, rows: dict, dry: bool, elapsed: float, budget: float, groups) -> list:
    card = env.get("card", "?")
    head = [f"== minispin GPU check: {card}"
            + (f" ({env['memory_gb']} GB)" if env.get("memory_gb") else "")
            + f" | torch {env.get('torch', '?')}"
            + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
            + f" | transformers {env.get('transformers', '?')} | {'DRY (CPU, tiny shapes)' if dry else 'GPU'} ==",
            f"bf16 matmul {env.get('matmul_n', '?')}^3: {env.get('matmul_tflops', '?')} TFLOP/s measured, "
            f"datasheet {env.get('datasheet_tflops') or 'n/a'} | device copy {env.get('copy_tbps', '?')} TB/s "
            f"(read + write) | {elapsed:.0f}s of {budget:.0f}s"]
    w = (4, 42, 32, 22, 6, 26)
    head.append(f"{'row':<{w[0]}} {'what':<{w[1]}} {'ours':<{w[2]}} {'transformers':<{w[3]}} "
                f"{'ratio':>{w[4]}}  {'goal':<{w[5]}} pass")
    for key, g, what in ROWS:
        if g not in groups:
            continue
        r = rows.get(key, {})
        status = r.get("status", "not run")
        if status in ("error", "timeout", "not run"):
            verdict = status.upper()
        elif dry:
            verdict = "dry"
        elif status == "skipped":
            verdict = "skipped"
        else:
            verdict = {True: "PASS", False: "FAIL", None: "-"}[r.get("passed")]
        ratio = r.get("ratio")
        ratio = f"{ratio:.2f}" if isinstance(ratio, (int, float)) else "-"
        head.append(f"{key:<{w[0]}} {what:<{w[1]}} {str(r.get('ours', '-')):<{w[2]}} "
                    f"{str(r.get('hf', '-')):<{w[3]}} {ratio:>{w[4]}}  {str(r.get('goal', '-')):<{w[5]}} {verdict}")
        if r.get("note"):
            head.append(f"{'':<{w[0]}}   {r['note']}")
    return head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, every row marked dry")
    ap.add_argument("--only", default=None, help="rows or groups to run, e.g. 2,6c")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.log (default: $OUT)")
    ap.add_argument("--time", type=float, default=495.0, help="total time budget in seconds (default 495)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="row 2/3: also time transformers' static cache + compile (costs its compile)")
    args = ap.parse_args(argv)
    groups = selected_groups(args.only)
    out = args.out or os.environ.get("OUT") or None
    t0 = time.time()
    log = Log(t0)
    total = sum(BUDGET_S[g] for g in groups)
    deadlines, end = {}, t0
    for g in groups:
        end += BUDGET_S[g] * args.time / total
        # --dry: one worker, nothing to cut short inside it; every row may use the whole budget
        deadlines[g] = t0 + args.time if args.dry else end
    log(f"gpu check: groups {','.join(groups)}, budget {args.time:.0f}s{' (dry)' if args.dry else ''}")
    env, rows = {}, {}
    for batch in ([groups] if args.dry else [[g] for g in groups]):
        res = run_worker(batch, deadlines, args, log)
        for k, v in res.get("env", {}).items():
            env.setdefault(k, v)
        rows.update(res["rows"])
    elapsed = time.time() - t0
    for line in table(env, rows, args.dry, elapsed, args.time, groups):
        log(line, raw=True)
    bad = [k for k, g, _ in ROWS if g in groups and rows.get(k, {}).get("status") not in ("ok", "skipped")]
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump({"env": env, "rows": rows, "dry": args.dry, "groups": groups, "elapsed_s": elapsed,
                       "budget_s": args.time, "argv": sys.argv[1:]}, f, indent=1, default=str)
        with open(os.path.join(out, "gpu_check.log"), "w") as f:
            f.write("\n".join(log.lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
