"""generate.py and minispin.run.pairs: the pairs file, bad input, resume after a kill, torchrun ==
one process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, STORIES, free_port, run_cli, undocumented_flags
from minispin.run import distributed as D
from minispin import generate as sample, load_model, load_tokenizer
from minispin.run.pairs import generate_pairs_file
from minispin.run.recipe import resolve

DATA = os.path.join(REPO, "assets", "data", "gsm8k", "train.jsonl")



@pytest.fixture(scope="module")
def stories():
    return load_model(STORIES), load_tokenizer(STORIES)


def run(out, model=STORIES, overwrite=False, strict=False, **keys):
    """generate.py's job through the library: recipe keys -> generate_pairs_file's summary."""
    env = D.init_distributed("cpu")   # an existing group is used, and left open
    try:
        return generate_pairs_file(resolve(None, keys), 0, env, model_dir=str(model), out=str(out),
                                   overwrite=overwrite, strict=strict, progress=False)
    finally:
        D.close_distributed(env)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


RECORDS = [
    {"prompt_id": "p-ultra", "messages": [{"role": "user", "content": "Tell me about a cat."},
                                          {"role": "assistant", "content": "A cat is small."},
                                          {"role": "user", "content": "More?"},
                                          {"role": "assistant", "content": "It purrs."}]},
    {"prompt": "Why is the sky blue?", "completion": "Light scatters."},
    {"messages": [{"role": "user", "content": "no answer here"}]},
    {"question": "What is 2 + 3?", "answer": "5"},
    {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Hi Lily!"},
                  {"role": "assistant", "content": "Hello."}]},
]


def test_pairs_file_format_template_and_greedy_output(tmp_path, stories):
    model, tok = stories
    data = write_jsonl(tmp_path / "sft.jsonl", RECORDS)
    out = tmp_path / "pairs.jsonl"
    summary = run(out, data=data, temperature=0, max_new_tokens=20, seed=3)
    assert summary["skipped"] == {"no assistant answer": 1} and summary["generated"] == 4
    got = lines(out)
    assert [r["id"] for r in got][0] == "p-ultra"  # the record's own prompt_id
    assert [r["prompt"][0]["content"] for r in got] == ["Tell me about a cat.", "Why is the sky blue?",
                                                        "What is 2 + 3?", "Hi Lily!"]
    assert [r["real"] for r in got] == ["A cat is small.", "Light scatters.", "5", "Hello."]
    for r in got:
        assert set(r) == {"id", "prompt", "real", "generated", "gen"}
        assert r["prompt"] == [{"role": "user", "content": r["prompt"][0]["content"]}]
        g = r["gen"]
        assert (g["temperature"], g["top_p"], g["top_k"], g["max_new_tokens"], g["seed"]) == (0.0, 1.0, 0, 20, 3)
        assert g["template"] == "zephyr" and g["empty_system"] is True and g["iter"] == 0
        # the prompt is exactly the training template (with SPIN's empty system turn)
        ids, _ = tok.encode_chat(r["prompt"], add_generation_prompt=True, empty_system=True)
        assert r["prompt"][0]["content"] in tok.decode(ids)
        assert g["prompt_tokens"] == len(ids) and g["truncated"] is False
        want = sample(model, [ids], 20, temperature=0, eos_id=tok.eos_id)[0]
        assert r["generated"] == tok.decode(want)
        assert g["new_tokens"] == len(want) and g["finished"] == (len(want) < 20)


def test_prompt_rendering_is_the_training_template(stories):
    _, tok = stories
    text = tok.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True,
                                   empty_system=True)
    assert text == "<|system|>\n</s>\n<|user|>\nQ</s>\n<|assistant|>\n"


def cli_error(capsys, *argv):
    """generate.py's exit status 2 and its one-line error."""
    capsys.readouterr()
    assert run_cli("generate.py", *argv, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_errors(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[1], RECORDS[3], '{"prompt": "x", oops'])
    err = cli_error(capsys, "--model", STORIES, "--data", bad, "--out", tmp_path / "o.jsonl")
    assert f"{bad}:3: malformed JSON" in err

    no_answer = write_jsonl(tmp_path / "strict.jsonl", [RECORDS[1], RECORDS[2]])
    err = cli_error(capsys, "--model", STORIES, "--data", no_answer, "--out", tmp_path / "o.jsonl", "--strict")
    assert f"{no_answer}:2: record has no assistant answer" in err

    err = cli_error(capsys, "--model", tmp_path / "nowhere", "--data", no_answer, "--out", tmp_path / "o.jsonl")
    assert err == f"generate.py: error: model folder '{tmp_path / 'nowhere'}' does not exist"

    err = cli_error(capsys, "--iter", 2, "--run-dir", tmp_path / "run", "--data", no_answer)
    assert "iter1/model' does not exist" in err and "train.py --iter 1" in err
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_missing_model_is_one_line_from_the_shell(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--model", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"generate.py: error: model folder '{tmp_path / 'x'}' does not exist"]


def test_long_prompt_keeps_its_end_and_is_counted(tmp_path, stories):
    model, tok = stories
    long_q = " ".join(f"word{i}" for i in range(200)) + " What is the last word?"
    data = write_jsonl(tmp_path / "sft.jsonl", [RECORDS[1], {"prompt": long_q, "completion": "word199"}])
    out = tmp_path / "pairs.jsonl"
    s = run(out, data=data, temperature=0, max_new_tokens=16, max_length=200, max_prompt_length=64)
    assert s["truncated"] == 1
    short, long_ = lines(out)
    assert short["gen"]["truncated"] is False
    assert long_["gen"]["truncated"] is True and long_["gen"]["prompt_tokens"] == 64
    full, _ = tok.encode_chat(long_["prompt"], add_generation_prompt=True, empty_system=True)
    kept = [full[0]] + full[-63:]  # <s> + the END of the prompt
    assert kept[0] == tok.bos_id and len(full) > 64
    text = tok.decode(kept)
    assert "What is the last word?" in text and "word0 " not in text and "<|system|>" not in text
    assert long_["generated"] == tok.decode(sample(model, [kept], 16, temperature=0, eos_id=tok.eos_id)[0])
    # the rule is training's: rows.truncate_pair gives the same prompt for an answer of 16 + eos
    from minispin.run.rows import truncate_pair
    assert truncate_pair(full, [5], [0] * 17, 200, 64, tok.bos_id)[0] == kept


def test_rerun_keeps_lines_and_generates_only_the_rest(tmp_path):
    out = tmp_path / "pairs.jsonl"
    a = run(out, data=DATA, num_prompts=4, max_new_tokens=12)
    first = open(out).read().splitlines()
    b = run(out, data=DATA, num_prompts=7, max_new_tokens=12)
    second = open(out).read().splitlines()
    assert (a["generated"], b["already_done"], b["generated"]) == (4, 4, 3)
    assert second[:4] == first and len(second) == 7
    c = run(out, data=DATA, num_prompts=7, max_new_tokens=12)
    assert c["generated"] == 0 and open(out).read().splitlines() == second
    d = run(out, data=DATA, num_prompts=2, max_new_tokens=12, overwrite=True, seed=9)
    assert d["generated"] == 2 and len(lines(out)) == 2 and lines(out)[0]["gen"]["seed"] == 9


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{"prompt_id": "a1", "messages": RECORDS[0]["messages"]},
            {"prompt_id": "b2", "messages": RECORDS[4]["messages"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_sft.parquet")
    out = tmp_path / "pairs.jsonl"
    run(out, data=str(tmp_path / "train_sft.parquet"), max_new_tokens=8)
    assert [r["id"] for r in lines(out)] == ["a1", "b2"]


def test_existing_process_group_is_used_not_destroyed(tmp_path):
    import torch.distributed as dist
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s = run(tmp_path / "p.jsonl", data=DATA, num_prompts=2, max_new_tokens=8)
        assert dist.is_initialized() and s["world_size"] == 1 and s["generated"] == 2
    finally:
        dist.destroy_process_group()


def test_help_documents_every_flag(capsys):
    assert run_cli("generate.py", "--help") == 0
    text = capsys.readouterr().out
    assert undocumented_flags(text) == [] and "--max-new-tokens" in text and "--batch-size" in text


# ---------------------------------------------------------------- processes

def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0, 1])
def test_torchrun_two_processes_write_the_same_pairs(tmp_path, temperature):
    common = ["--model", STORIES, "--data", DATA, "--num-prompts", 10, "--max-new-tokens", 24,
              "--temperature", temperature, "--batch-size", 3, "--no-progress"]
    two = tmp_path / "two" / "pairs.jsonl"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                        os.path.join(REPO, "generate.py"), "--out", str(two)] + [str(a) for a in common],
                       capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 process(es)" in r.stderr
    one = tmp_path / "one" / "pairs.jsonl"
    assert run_cli("generate.py", "--out", one, "--batch-size", 4, *common[:-3], "--no-progress") == 0
    assert open(two).read() == open(one).read()  # same lines, same (SFT) order
    assert len(lines(one)) == 10 and not [p for p in os.listdir(two.parent) if ".part-" in p]


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = [sys.executable, os.path.join(REPO, "generate.py"), "--model", STORIES, "--data", DATA,
            "--out", str(out), "--num-prompts", "40", "--max-new-tokens", "64", "--batch-size", "1",
            "--no-progress"]
    part = f"{out}.part-0"
    proc = subprocess.Popen(args, env=cli_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            if os.path.exists(part) and open(part).read().count("\n") >= 3:
                break
            assert proc.poll() is None, "generate.py ended before it could be killed"
            time.sleep(0.02)
        assert proc.poll() is None, "generate.py ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # the merge never ran
    before = open(part).read().splitlines()
    assert 3 <= len(before) < 40
    with open(part, "a") as f:  # as if the kill tore the line being written
        f.write('{"id": "torn", "prompt": [{"role": "us')
    s = run(out, data=DATA, num_prompts=40, max_new_tokens=64, gen_batch_size=1)
    assert s["already_done"] == len(before) and s["generated"] == 40 - len(before)
    after = open(out).read().splitlines()
    ids = [json.loads(line)["id"] for line in after]
    assert len(ids) == 40 == len(set(ids))
    from minispin.run.data import read_sft
    assert ids == [ex.id for ex in read_sft(DATA, limit=40)[0]]  # SFT order
    assert set(before) <= set(after)  # every line written before the kill kept as it was
    assert not os.path.exists(part)
