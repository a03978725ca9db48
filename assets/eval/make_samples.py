"""Rebuild the small offline eval samples in assets/eval/ from the full files.

A maintainer's tool, never run by tests or by evaluate.py: it reads the full data set
files (by default ../shared/assets/eval and ../shared/assets/data/gsm8k, the project's
development copies) and writes, per task, the first rows of the evaluation split and a
separate pool of few-shot examples, all as JSON lines in the schema of the Hugging Face
data set that the installed lm-eval task reads, so the official task definitions run
on them unchanged (see docs/evaluation.md for where the local tasks differ).

    python assets/eval/make_samples.py [--src ../shared/assets] [--rows 200] [--pool 50]

Rows are taken from the top of each file (no shuffling): `--limit N` on a local task
then scores the same documents as `--limit N` on the official one, where the split is
the same.
"""
import argparse
import csv
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{os.path.relpath(path, HERE)}: {len(rows)} rows, {os.path.getsize(path) // 1024} KiB")


def hellaswag_row(r):
    """The shared file has `ctx` = activity label + ": " + context, without the
    ctx_a/ctx_b split of Rowan/hellaswag. We put the whole context in ctx_a and leave
    ctx_b empty; lm-eval's process_docs then renders the same query text, except that
    the official one capitalizes the first letter of ctx_b (which we cannot locate)."""
    label, sep, rest = r["ctx"].partition(": ")
    if not sep:
        label, rest = "", r["ctx"]
    return {"activity_label": label, "ctx_a": rest, "ctx_b": "", "ctx": r["ctx"],
            "endings": r["endings"], "label": str(r["label"])}


def mmlu_rows(path, subject):
    """Header-less CSV (question, A, B, C, D, answer letter) -> cais/mmlu schema."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    return [{"question": q, "subject": subject, "choices": [a, b, c, d],
             "answer": "ABCD".index(ans.strip())} for q, a, b, c, d, ans in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.path.join(HERE, "..", "..", "..", "shared", "assets"))
    ap.add_argument("--rows", type=int, default=200, help="evaluation rows per task")
    ap.add_argument("--pool", type=int, default=50, help="few-shot pool rows per task")
    a = ap.parse_args()
    ev = os.path.join(a.src, "eval")
    n, p = a.rows, a.pool

    # ARC-Challenge: only the test split is available; the few-shot pool is the rows
    # that follow the evaluation sample (disjoint from it).
    rows = read_jsonl(os.path.join(ev, "arc_challenge", "test.jsonl"))
    write_jsonl(os.path.join(HERE, "arc_challenge", "test.jsonl"), rows[:n])
    write_jsonl(os.path.join(HERE, "arc_challenge", "fewshot.jsonl"), rows[n:n + p])

    # ARC-Easy: real train split for the few-shot pool.
    with open(os.path.join(ev, "arc_easy", "test.json")) as f:
        test = json.load(f)
    with open(os.path.join(ev, "arc_easy", "train.json")) as f:
        train = json.load(f)
    write_jsonl(os.path.join(HERE, "arc_easy", "test.jsonl"), test[:n])
    write_jsonl(os.path.join(HERE, "arc_easy", "fewshot.jsonl"), train[:p])

    # TruthfulQA: zero-shot, validation only.
    rows = read_jsonl(os.path.join(ev, "truthfulqa", "truthfulqa_mc_validation.jsonl"))
    write_jsonl(os.path.join(HERE, "truthfulqa", "validation.jsonl"), rows[:n])

    # WinoGrande: dev (= winogrande_xl validation); few-shot pool from the rows after it.
    rows = read_jsonl(os.path.join(ev, "winogrande", "dev.jsonl"))
    write_jsonl(os.path.join(HERE, "winogrande", "validation.jsonl"), rows[:n])
    write_jsonl(os.path.join(HERE, "winogrande", "fewshot.jsonl"), rows[n:n + p])

    # HellaSwag: val, converted to the Rowan/hellaswag fields process_docs reads.
    rows = [hellaswag_row(r) for r in read_jsonl(os.path.join(ev, "hellaswag", "val.jsonl"))]
    write_jsonl(os.path.join(HERE, "hellaswag", "validation.jsonl"), rows[:n])
    write_jsonl(os.path.join(HERE, "hellaswag", "fewshot.jsonl"), rows[n:n + p])

    # GSM8K: real train split for the few-shot pool.
    gsm = os.path.join(a.src, "data", "gsm8k")
    write_jsonl(os.path.join(HERE, "gsm8k", "test.jsonl"), read_jsonl(os.path.join(gsm, "test.jsonl"))[:n])
    write_jsonl(os.path.join(HERE, "gsm8k", "fewshot.jsonl"), read_jsonl(os.path.join(gsm, "train.jsonl"))[:p])

    # MMLU: the two subjects available, all rows (dev = the 5 few-shot examples).
    for subject in ("clinical_knowledge", "college_medicine"):
        for split in ("dev", "test"):
            src = os.path.join(ev, "mmlu", f"{subject}_{split}.csv")
            write_jsonl(os.path.join(HERE, "mmlu", f"{subject}_{split}.jsonl"), mmlu_rows(src, subject))


if __name__ == "__main__":
    main()
