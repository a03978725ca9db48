"""Every bad input the reliability issue found, attacked from the command line: each must end
with exit status 2, ONE line on stderr, and name the file (and line or key) or the flag.
The CLIs run in this process (tests/helpers.run_cli); nothing trains, so each case takes
well under a second once the modules are loaded."""
import json
import os
import shutil
import struct

import pytest

from helpers import REPO, STORIES, run_cli

GSM8K = os.path.join(REPO, "assets", "data", "gsm8k", "train.jsonl")


def one_line_error(capsys, script, *argv):
    capsys.readouterr()
    rc = run_cli(script, *argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"{script}: error:"), lines[0]
    return lines[0]


def pairs_file(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


PAIR = {"id": "p0", "prompt": [{"role": "user", "content": "say hi"}], "real": "hi there", "generated": "hello"}


def train_args(tmp_path, *extra, model=STORIES):
    return ("--model", model, "--run-dir", tmp_path / "run", "--device", "cpu", "--no-progress",
            "--batch-size", "1", "--micro-batch-size", "1", *extra)


# ---------------------------------------------------------------------- flags (item 4)
@pytest.mark.parametrize("flags, named", [
    (["--noise", "ref-logit=nan"], "ref-logit"),
    (["--noise", "ref-logit=abc"], "ref-logit"),
    (["--device", "gpu"], "device"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda"], "cuda"),
    (["--export-dtype", "int8"], "--export-dtype"),
    (["--relabel", "--threshold", "-3"], "judge_threshold"),
    (["--lr", "inf"], "'lr'"),
    (["--lr", "nan"], "'lr'"),
    (["--beta", "0"], "'beta'"),
    (["--epochs", "0"], "'epochs'"),
    (["--max-prompt-length", "600", "--max-length", "512"], "max_prompt_length"),
    (["--batch-size", "x"], "--batch-size"),
    (["--loss-type", "dpo"], "--loss-type"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, flags, named):
    import torch
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    line = one_line_error(capsys, "train.py", *train_args(tmp_path, *flags))
    assert named in line
    assert not (tmp_path / "run").exists()  # refused before any file was written


def test_unknown_recipe_key_names_it_its_file_and_the_closest_key(tmp_path, capsys):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('model = "x"\nlearning_rate = 1e-6\n')
    line = one_line_error(capsys, "train.py", "--config", recipe)
    assert str(recipe) in line and "'learning_rate'" in line and "did you mean 'lr'" in line
    recipe.write_text('[iterations.1]\nbetaa = 0.5\n')
    line = one_line_error(capsys, "train.py", "--config", recipe)
    assert str(recipe) in line and "'betaa'" in line and "did you mean 'beta'" in line


# ---------------------------------------------------------------------- bad models (item 5)
def model_copy(tmp_path, name="model"):
    return shutil.copytree(STORIES, tmp_path / name)


def rewrite_json(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def lying_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def first_tensor(h):
    return next(k for k in h if k != "__metadata__")


MODEL_CASES = {
    "config.json is a list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "hidden_size is a string": lambda d: rewrite_json(d / "config.json", lambda c: dict(c, hidden_size="64")),
    "zero heads": lambda d: rewrite_json(d / "config.json", lambda c: dict(c, num_attention_heads=0)),
    "rope_scaling without factor": lambda d: rewrite_json(
        d / "config.json", lambda c: dict(c, rope_scaling={"rope_type": "linear"})),
    "unsupported model_type": lambda d: rewrite_json(d / "config.json", lambda c: dict(c, model_type="gpt2")),
    "config.json not JSON": lambda d: (d / "config.json").write_text('{"hidden_size": 64,'),
    "config.json not UTF-8": lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}'),
    "header shape lies": lambda d: lying_header(
        d / "model.safetensors", lambda h: h[first_tensor(h)].update(shape=[7, 7])),
    "header dtype lies": lambda d: lying_header(
        d / "model.safetensors", lambda h: h[first_tensor(h)].update(dtype="F64")),
    "header without data_offsets": lambda d: lying_header(
        d / "model.safetensors", lambda h: h[first_tensor(h)].pop("data_offsets")),
    "truncated shard": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-5000]),
    "garbage tokenizer.model": lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage" * 50),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_folders_name_the_file(tmp_path, capsys, case):
    model = model_copy(tmp_path)
    MODEL_CASES[case](model)
    pairs = pairs_file(tmp_path / "pairs.jsonl", [PAIR])
    line = one_line_error(capsys, "train.py", *train_args(tmp_path, "--pairs", pairs, model=str(model)))
    assert str(model) in line, line


@pytest.mark.parametrize("case", ["unsupported model_type", "truncated shard", "config.json not JSON"])
def test_evaluate_on_a_bad_model_is_one_line(tmp_path, capsys, case):
    pytest.importorskip("lm_eval")
    model = model_copy(tmp_path)
    MODEL_CASES[case](model)
    line = one_line_error(capsys, "evaluate.py", "--model", model, "--offline", "--tasks", "arc_easy",
                          "--limit", "1", "--output", tmp_path / "eval")
    assert str(model) in line


# ---------------------------------------------------------------------- bad data (item 5)
DATA_CASES = {
    "real is null": [dict(PAIR, real=None)],
    "a bare 42 line": [PAIR, "42"],
    "noise is text": [dict(PAIR, noise="abc")],
    "lone surrogate in the prompt": ['{"id": "s", "prompt": [{"role": "user", "content": "x\\ud800"}], '
                                     '"real": "a", "generated": "b"}'],
    "invalid JSON": [PAIR, '{"id": "p1", oops'],
    "empty file": [],
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_pairs_files_name_the_file_and_line(tmp_path, capsys, case):
    pairs = pairs_file(tmp_path / "pairs.jsonl", DATA_CASES[case])
    line = one_line_error(capsys, "train.py", *train_args(tmp_path, "--pairs", pairs))
    assert pairs in line
    if case not in ("empty file",):
        assert f"{pairs}:" in line  # with the line (or row) it is on


def test_invalid_utf8_in_a_data_file_names_it(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "b"}\n')
    line = one_line_error(capsys, "generate.py", "--model", STORIES, "--data", data, "--out",
                          tmp_path / "pairs.jsonl", "--no-progress")
    assert str(data) in line


def test_empty_data_file_writes_nothing(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    out = tmp_path / "pairs.jsonl"
    line = one_line_error(capsys, "generate.py", "--model", STORIES, "--data", data, "--out", out, "--no-progress")
    assert str(data) in line and not out.exists()


def test_unwritable_run_folder_is_one_line(tmp_path, capsys):
    # /proc refuses new entries even to root (chmod would not stop root)
    line = one_line_error(capsys, "train.py", "--model", STORIES, "--run-dir", "/proc/minispin-test-run",
                          "--device", "cpu", "--no-progress")
    assert "/proc/minispin-test-run" in line


def test_debug_shows_the_traceback(tmp_path, capsys):
    pairs = pairs_file(tmp_path / "pairs.jsonl", ["42"])
    capsys.readouterr()
    assert run_cli("train.py", *train_args(tmp_path, "--pairs", pairs, "--debug")) == 2
    assert "Traceback" in capsys.readouterr().err
