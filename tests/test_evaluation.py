"""evaluate.py and the "minispin" lm-eval backend, against lm-eval's own "hf" backend.

All offline (the "_local" tasks on assets/eval), CPU, small --limit values. The "hf"
backend runs the same requests through transformers: metrics must be equal and every
request's log-likelihood within 1e-4 (fp32), generations identical (greedy).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from helpers import REPO, STORIES, make_hf_model, run_cli  # noqa: E402

from minispin.study import evaluation as E  # noqa: E402


class evaluate:  # the evaluate.py command, run in this process
    main = staticmethod(lambda args: run_cli("evaluate.py", *args))

MC_TASKS = ["arc_challenge", "arc_easy", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande",
            "hellaswag", "mmlu"]


def _hf(path, **kw):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=8, **kw)


def _ours(path, **kw):
    return E.MinispinLM(pretrained=path, dtype="float32", device="cpu", batch_size=8, **kw)


def _run(lm, names, limit):
    return E.run_tasks(lm, E.resolve_tasks(names), offline=True, limit=limit,
                       log_samples=True, bootstrap_iters=0)


def _compare(ours, theirs):
    """Per-request answers and per-task metrics of two lm-eval runs on the same tasks."""
    n_ll = n_gen = 0
    worst = 0.0
    assert sorted(ours["samples"]) == sorted(theirs["samples"])
    for task, samples in theirs["samples"].items():
        mine = {(s["doc_id"], s["filter"]): s for s in ours["samples"][task]}
        assert len(mine) == len(samples) > 0
        for s in samples:
            o = mine[s["doc_id"], s["filter"]]
            assert o["arguments"] == s["arguments"], task  # same prompts
            for a, b in zip(s["resps"], o["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(a, str):
                    assert b == a, f"{task} doc {s['doc_id']}: generation differs"
                    n_gen += 1
                else:
                    assert abs(a[0] - b[0]) < 1e-4, f"{task} doc {s['doc_id']}: {a} vs {b}"
                    worst = max(worst, abs(a[0] - b[0]))
                    n_ll += 1
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if "," in key and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, abs=1e-6), (task, key)
    return n_ll, n_gen, worst



@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mistral"))
    # window 16, GQA; a 4096 context so that no few-shot prompt is truncated and the
    # choices of a question share one packed row
    make_hf_model(path, "mistral", seed=3, num_key_value_heads=2, max_position_embeddings=4096)
    return path


@pytest.mark.slow
def test_stories260k_same_answers_as_hf_backend():
    """All multiple-choice tasks of the suite (25-shot ARC is truncated at 512 tokens)."""
    ours = _run(_ours(STORIES), MC_TASKS, limit=3)
    theirs = _run(_hf(STORIES), MC_TASKS, limit=3)
    n_ll, _, worst = _compare(ours, theirs)
    assert n_ll > 100
    print(f"stories260K: {n_ll} requests, worst |Δ log p| {worst:.2e}")


@pytest.mark.slow
def test_tiny_mistral_same_answers_as_hf_backend(mistral_dir):
    """Sliding window 16 and GQA, packed rows (a question's choices share one row)."""
    names = ["arc_easy", "truthfulqa_mc2", "winogrande", "hellaswag"]
    lm = _ours(mistral_dir)
    packed = []
    score_rows = lm._score_rows

    def spy(batch):
        packed.extend(sum(len(c) > 1 for c, _ in conts) for _, conts in batch)
        return score_rows(batch)

    lm._score_rows = spy
    ours = _run(lm, names, limit=3)
    theirs = _run(_hf(mistral_dir), names, limit=3)
    n_ll, _, worst = _compare(ours, theirs)
    assert n_ll > 30 and max(packed) >= 4  # rows held 4+ multi-token choices
    print(f"tiny mistral: {n_ll} requests, worst |Δ log p| {worst:.2e}")


def test_bos_off_equals_hf_backend_with_add_bos_token_false():
    """The study's evaluation: the early-2024 hf backend added no <s>. add_bos_token=False
    gives the hf backend's own answers with add_bos_token=False — and different ones from
    the default, which starts every request with <s>."""
    def run(lm):  # zero-shot: a few-shot context over 512 tokens would lose its <s> to truncation
        return E.run_tasks(lm, E.resolve_tasks(["arc_easy", "winogrande"], num_fewshot=0), offline=True,
                           limit=3, log_samples=True, bootstrap_iters=0)
    off = run(_ours(STORIES, add_bos_token=False))
    n_ll, _, _ = _compare(off, run(_hf(STORIES, add_bos_token=False)))
    assert n_ll > 10
    on = run(_ours(STORIES))
    first = lambda r: r["samples"]["arc_easy_local"][0]["resps"][0][0][0]  # noqa: E731
    assert abs(first(on) - first(off)) > 1e-3


@pytest.mark.slow
def test_gsm8k_generations_equal_hf_backend():
    """generate_until, greedy, with the task's stop sequences ("Question:", "</s>")."""
    ours = _run(_ours(STORIES), ["gsm8k"], limit=4)
    theirs = _run(_hf(STORIES), ["gsm8k"], limit=4)
    _, n_gen, _ = _compare(ours, theirs)
    assert n_gen == 8  # 4 documents x 2 answer filters (strict, flexible)
    for s in ours["samples"]["gsm8k_local"]:
        assert "Question:" not in s["resps"][0][0]


def test_generate_until_stops_and_max_gen_toks():
    from lm_eval.api.instance import Instance
    from minispin.core.sampling import generate

    lm = _ours(STORIES, gen_chunk=7)  # several rounds per request
    prompt = "Once upon a time"
    ids = lm.tok_encode(prompt)
    full = lm.tok_decode(generate(lm.model, [ids], 60, temperature=0.0, eos_id=lm.eot_token_id)[0])
    stop = full.split()[5]  # a word the greedy text contains
    reqs = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 60}), 0),
            Instance("generate_until", {}, (prompt, {"until": ["@@@"], "max_gen_toks": 9}), 1)]
    out = lm.generate_until(reqs)
    assert out[0] == full.split(stop)[0] and stop not in out[0]
    nine = lm.tok_decode(generate(lm.model, [ids], 9, temperature=0.0, eos_id=lm.eot_token_id)[0])
    assert out[1] == nine and full.startswith(nine)


def test_loglikelihood_rolling_equals_hf_backend():
    """Rolling windows: a text longer than the 512-token context is scored in 2+ windows."""
    from lm_eval.api.instance import Instance

    texts = ["Once upon a time, there was a little girl named Lily.",
             " ".join(["Tom and Sue went to the park to play with a big red ball."] * 60)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = _ours(STORIES)
    assert len(ours.tok_encode(texts[1])) > 2 * ours.max_length
    a = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    b = _hf(STORIES).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert a == pytest.approx(b, abs=1e-3, rel=1e-6)


def test_packed_rows_score_as_separate_rows():
    """The packing (one row per shared context) changes nothing: batch 1, no sharing."""
    lm = _ours(STORIES)
    ctx = lm.tok_encode("Lily went to the park. She saw a")
    conts = [lm.tok.encode(" big dog", continuation=True), lm.tok.encode(" cat", continuation=True),
             lm.tok.encode(" little red bird that sang", continuation=True)]
    reqs = [(None, ctx, c) for c in conts]
    packed = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    lm._batch_size = 1
    single = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in reqs]
    for (a, ga), (b, gb) in zip(packed, single):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


@pytest.mark.slow
def test_offline_suite_end_to_end_prints_table(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = evaluate.main(["--model", STORIES, "--offline", "--limit", "2", "--output", str(out),
                        "--batch-size", "16"])
    assert rc == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| Model |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["Model", "arc_challenge (25)", "arc_easy (25)", "truthfulqa_mc1 (0)",
                       "truthfulqa_mc2 (0)", "winogrande (5)", "gsm8k (5)", "hellaswag (10)",
                       "mmlu (5)", "Average"]
    row = next(line for line in printed.splitlines() if line.startswith("| stories260K |"))
    values = [float(c) for c in row.strip("|").split("|")[1:]]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[-1] == pytest.approx(sum(values[:-1]) / 8, abs=1e-4)
    results = json.loads((out / "stories260K" / "results.json").read_text())
    assert results["n-shot"]["arc_challenge_local"] == 25 and results["n-shot"]["hellaswag_local"] == 10
    assert results["n-shot"]["truthfulqa_mc2_local"] == 0 and results["n-shot"]["gsm8k_local"] == 5
    assert results["n-shot"]["mmlu_clinical_knowledge_local"] == 5
    assert values[0] == pytest.approx(results["results"]["arc_challenge_local"]["acc_norm,none"], abs=1e-4)
    assert values[5] == pytest.approx(results["results"]["gsm8k_local"]["exact_match,strict-match"], abs=1e-4)
    assert values[7] == pytest.approx(results["groups"]["mmlu_local"]["acc,none"], abs=1e-4)
    assert (out / "results.md").read_text().startswith(header)


def test_table_across_iterations_and_default_layout(tmp_path):
    from minispin.run.checkpoint import load_model, save_model

    run = tmp_path / "runs" / "tiny"
    model = load_model(STORIES)
    for t in range(2):
        save_model(model, str(run / f"iter{t}" / "model"), tokenizer_from=STORIES)
    args = ["--offline", "--tasks", "winogrande,arc_easy", "--num-fewshot", "1", "--limit", "3"]
    for t in range(2):
        args += ["--model", str(run / f"iter{t}" / "model")]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert evaluate.main(args) == 0
    finally:
        os.chdir(cwd)
    table = (run / "eval" / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| Model | arc_easy (1) | winogrande (1) | Average |" or \
        lines[0] == "| Model | winogrande (1) | arc_easy (1) | Average |"
    rows = [line for line in lines if line.startswith("| iter")]
    assert [r.split("|")[1].strip() for r in rows] == ["iter0", "iter1"]
    assert rows[0].split("|")[2:] == rows[1].split("|")[2:]  # same weights, same scores
    for t in range(2):
        res = json.loads((run / f"iter{t}" / "eval" / "results.json").read_text())
        assert res["n-shot"]["winogrande_local"] == 1


def test_results_row_and_markdown_table():
    res = {"results": {"arc_easy_local": {"acc,none": 0.1, "acc_norm,none": 0.5},
                       "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.75}},
           "groups": {"mmlu": {"acc,none": 0.3}}}
    tasks = E.resolve_tasks(["arc_easy", "gsm8k", "mmlu", "hellaswag"])
    row = E.results_row(res, tasks)
    assert row == {"arc_easy (25)": 0.5, "gsm8k (5)": 0.25, "mmlu (5)": 0.3,
                   "hellaswag (10)": None, "Average": pytest.approx(0.35)}
    table = E.markdown_table({"sft": row})
    assert table.splitlines()[2] == "| sft | 0.5000 | 0.2500 | 0.3000 | - | 0.3500 |"


def test_local_tasks_reuse_installed_definitions_and_ship_licensed_data():
    tm = E.task_manager(offline=True)
    loaded = tm.load(["arc_easy_local", "hellaswag_local", "mmlu_local"])
    with open(os.path.join(E.LM_EVAL_TASKS, "arc", "arc_easy.yaml")) as f:
        official = yaml.safe_load(f)  # the installed task (its data need the hub)
    local = loaded["tasks"]["arc_easy_local"]
    assert local.config.doc_to_text == official["doc_to_text"]
    assert local.config.metric_list == official["metric_list"]
    assert local.config.dataset_path == "json"
    assert sorted(loaded["groups"]["mmlu_local"].child_names) == [
        "mmlu_clinical_knowledge_local", "mmlu_college_medicine_local"]
    doc = next(iter(loaded["tasks"]["hellaswag_local"].validation_docs()))
    assert doc["query"].startswith("Roof shingle removal: A man is sitting on a roof. he")
    data = os.path.join(REPO, "assets", "eval")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data) for f in fs)
    assert size < 1_500_000
    licences = open(os.path.join(data, "LICENSES.md")).read()
    for folder in ("arc_challenge", "arc_easy", "truthfulqa", "winogrande", "hellaswag", "gsm8k", "mmlu"):
        assert os.path.isdir(os.path.join(data, folder))
        assert re.search(rf"\| `{folder}/` \|.*\| (CC|MIT|Apache)", licences), folder
    for line in open(os.path.join(E.TASK_TEMPLATES, "arc_easy_local.yaml")):
        assert "../shared" not in line


def test_missing_lm_eval_says_how_to_install():
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; "
            f"sys.argv = ['evaluate.py', '--model', {STORIES!r}, '--offline']; "
            "runpy.run_path('evaluate.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert "pip install -e .[eval]" in p.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_split_and_gather(tmp_path):
    """gloo, 2 ranks, each a whole model: same table as one process. (Zero-shot: lm-eval
    draws few-shot examples from one random stream per rank, so shots differ by rank count.)"""
    common = ["--model", STORIES, "--offline", "--tasks", "arc_easy,winogrande",
              "--num-fewshot", "0", "--limit", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", os.path.join(REPO, "evaluate.py"), *common,
                        "--output", str(tmp_path / "two")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    shares = [int(n) for n in re.findall(r"rank \d/2: answered (\d+) requests", p.stderr)]
    assert len(shares) == 2 and sum(shares) >= 5 * 4 + 5 * 2 and all(0 < n < 30 for n in shares)
    assert evaluate.main(common + ["--output", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "stories260K" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "stories260K" / "results.json").read_text())
    assert two["n-samples"]["arc_easy_local"]["effective"] == 5
    for task in ("arc_easy_local", "winogrande_local"):
        for key in ("acc,none", "acc_norm,none") if task == "arc_easy_local" else ("acc,none",):
            assert two["results"][task][key] == pytest.approx(one["results"][task][key], abs=1e-9)
    table_two = (tmp_path / "two" / "results.md").read_text().splitlines()[2]
    table_one = (tmp_path / "one" / "results.md").read_text().splitlines()[2]
    assert table_two == table_one
