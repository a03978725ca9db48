"""Trustworthy runs (docs/reliability.md, "Trust"): nothing outside the run is deleted, no
stale or corrupt state is trained on silently, no secret reaches the disk, hostile files
fail fast. Each case runs a command as a user would (train.py / generate.py / judge.py, in
this process through helpers.run_cli, or as a subprocess where a umask or a kill is
needed) and ends with exit 2 and one line naming the file or key, or with a result equal to
an uninterrupted run. Models are stories260K copies and runs last a few steps."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import REPO, STORIES, run_cli

WORDS = "the cat sat on a mat and then ran to see dog bird tree sun moon star red blue".split()


def write_pairs(path, n=8, seed=0):
    import random
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=4))}],
                                "real": " ".join(rng.choices(WORDS, k=8)),
                                "generated": " ".join(rng.choices(WORDS, k=6))}) + "\n")
    return path


def args(model, run, *extra):
    return ["--model", model, "--run-dir", run, "--device", "cpu", "--no-progress", "--batch-size", "2",
            "--micro-batch-size", "1", "--max-length", "64", "--max-prompt-length", "32", "--lr", "1e-3",
            "--epochs", "1", "--checkpoint-every", "2", "--heldout-examples", "0", "--no-mix-previous", *extra]


def metrics(run, t=0):
    with open(os.path.join(run, f"iter{t}", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_line(capsys, script, *argv):
    capsys.readouterr()
    rc = run_cli(script, *argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shutil.copytree(STORIES, str(tmp_path_factory.mktemp("m") / "model"))


@pytest.fixture(scope="module")
def base(model, tmp_path_factory):
    """An uninterrupted 4-step run: the losses every resumed run must equal."""
    run = str(tmp_path_factory.mktemp("base") / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", *args(model, run)) == 0
    return {"run": run, "metrics": metrics(run)}


def fresh(base, tmp_path, name="run"):
    run = str(tmp_path / name)
    os.makedirs(os.path.join(run, "iter0"))
    shutil.copy(os.path.join(base["run"], "iter0", "pairs.jsonl"), os.path.join(run, "iter0", "pairs.jsonl"))
    return run


def stop_after(n):
    """A trainer hook: the loss of step n+1 becomes NaN, so the run stops after step n
    (exit 1) with its checkpoints intact."""
    from minispin.run.resume import add_hook
    add_hook("loss", lambda step, loss: loss * float("nan") if step == n else loss)


def interrupted(model, run, n, *extra):
    from minispin.run.resume import clear_hooks
    stop_after(n)
    try:
        assert run_cli("train.py", *args(model, run, *extra)) == 1
    finally:
        clear_hooks()


def same_losses(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x["step"], x["loss"], y["loss"])


# ---------------------------------------------------------------------- 1. export
@pytest.mark.slow
def test_out_never_deletes_a_folder_minispin_did_not_write(model, base, tmp_path, capsys):
    run = fresh(base, tmp_path)
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("ten years of work")
    line = one_line(capsys, "train.py", *args(model, run, "--out", str(precious)))
    assert str(precious) in line and "never deletes" in line
    assert (precious / "chapter1.tex").read_text() == "ten years of work"
    assert not os.path.exists(os.path.join(run, "iter0", "ckpt"))  # refused before any training
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    line = one_line(capsys, "train.py", *args(model, run, "--out", str(a_file)))
    assert str(a_file) in line and a_file.read_text() == "x"


@pytest.mark.slow
def test_exports_carry_the_marker_and_umask_modes_and_may_be_replaced(model, base, tmp_path):
    """Under umask 022 every exported file (model and peft adapter) is 0644, every folder
    0755; the marker lets --force replace minispin's own export."""
    run = fresh(base, tmp_path)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *args(model, run, "--max-steps", "1", "--lora-rank", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr[-3000:]
    for folder in ("model", "adapter"):
        root = os.path.join(run, "iter0", folder)
        assert os.stat(root).st_mode & 0o777 == 0o755
        names = os.listdir(root)
        assert "minispin_export.json" in names and any(n.endswith(".safetensors") for n in names)
        for n in names:
            assert os.stat(os.path.join(root, n)).st_mode & 0o777 == 0o644, (folder, n)
    r = subprocess.run(cmd + ["--force"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------------- 2. fingerprints
@pytest.mark.slow
def test_retrained_theta_at_the_same_path_is_noticed(model, tmp_path, capsys):
    """θ_1 = iter0/model retrained with --force: iteration 1's reference log-probs are
    computed again (first loss ln 2, not a stale reference's), and pairs sampled from the
    old θ_1 are refused, naming the file and the command that makes them again."""
    run = str(tmp_path / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", *args(model, run, "--max-steps", "1")) == 0
    write_pairs(os.path.join(run, "iter1", "pairs.jsonl"), seed=1)
    it1 = args(model, run, "--iter", "1", "--max-steps", "1")
    assert run_cli("train.py", *it1) == 0
    assert abs(metrics(run, 1)[0]["loss"] - math.log(2)) < 1e-6
    assert run_cli("train.py", *args(model, run, "--max-steps", "2", "--force")) == 0  # θ_1 changes
    capsys.readouterr()
    assert run_cli("train.py", *it1, "--force") == 0
    out = capsys.readouterr().out
    assert "reference pass: log p_θt for 8 pairs (0 cached)" in out
    assert abs(metrics(run, 1)[-1]["loss"] - math.log(2)) < 1e-6  # the new θ_1 is the reference
    # pairs sampled from θ_1 (generate.py records its fingerprint), then θ_1 retrained again
    os.remove(os.path.join(run, "iter1", "pairs.jsonl"))
    gen = ["--run-dir", run, "--iter", "1", "--num-prompts", "2", "--max-new-tokens", "4",
           "--device", "cpu", "--no-progress"]
    assert run_cli("generate.py", *gen) == 0
    assert run_cli("train.py", *args(model, run, "--max-steps", "1", "--force")) == 0
    pairs = os.path.join(run, "iter1", "pairs.jsonl")
    line = one_line(capsys, "train.py", *it1, "--force")
    assert pairs in line and "another θ_1" in line and "--overwrite" in line
    line = one_line(capsys, "generate.py", *gen)
    assert pairs in line and "--overwrite" in line
    assert run_cli("generate.py", *gen, "--overwrite") == 0
    assert run_cli("train.py", *it1, "--force", "--batch-size", "1") == 0


@pytest.mark.slow
def test_a_copied_run_folder_resumes(model, base, tmp_path, capsys):
    run = fresh(base, tmp_path, "original")
    interrupted(model, run, 2)
    copy = str(tmp_path / "copied elsewhere")
    shutil.copytree(run, copy)
    capsys.readouterr()
    assert run_cli("train.py", *args(model, copy)) == 0
    assert "resumed from" in capsys.readouterr().out
    same_losses(metrics(copy), base["metrics"])


# ---------------------------------------------------------------------- 3. checkpoints
def _flip_a_float(ckpt):
    f = os.path.join(ckpt, "rank0.safetensors")
    raw = bytearray(open(f, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n + 5] ^= 0x01  # one bit of a stored weight: every header check still passes
    open(f, "wb").write(raw)
    return f


def _edit_step(ckpt):
    f = os.path.join(ckpt, "checkpoint.json")
    index = json.load(open(f))
    index["extra"][0]["step"] = 1
    json.dump(index, open(f, "w"))
    return f


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip_a_float, _edit_step])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(model, base, tmp_path, capsys, damage):
    run = fresh(base, tmp_path)
    args_ = args(model, run, "--keep-checkpoints", "3", "--checkpoint-every", "1")
    from minispin.run.resume import clear_hooks
    stop_after(3)
    try:
        assert run_cli("train.py", *args_) == 1
    finally:
        clear_hooks()
    ckpt = os.path.join(run, "iter0", "ckpt")
    named = damage(os.path.join(ckpt, "step_3"))
    capsys.readouterr()
    assert run_cli("train.py", *args_) == 0
    cap = capsys.readouterr()
    assert named in cap.err and "skipping a damaged checkpoint" in cap.err
    assert "resuming from" in cap.err and "step_2" in cap.err and "resumed from" in cap.out
    same_losses(metrics(run), base["metrics"])


# ---------------------------------------------------------------------- 4. the resume key
def test_every_training_key_reaches_the_trainer():
    """The resume key is derived from TrainSettings; every training key of a recipe must be
    one of its fields (or be declared as not the trainer's), so none can be left out."""
    from minispin.run.recipe import Training
    from minispin.core.settings import TrainSettings
    not_the_trainers = {"sft_limit"}  # iteration.run_sft's: which records, in the data fingerprint
    assert {f.name for f in fields(Training)} - {f.name for f in fields(TrainSettings)} == not_the_trainers


def test_resume_refuses_another_mixed_precision(model, base, tmp_path, capsys):
    run = fresh(base, tmp_path)
    interrupted(model, run, 2, "--mixed-precision", "bf16")
    line = one_line(capsys, "train.py", *args(model, run, "--mixed-precision", "fp32"))
    assert "mixed_precision: 'bf16' -> 'fp32'" in line and "start fresh" in line


# ---------------------------------------------------------------------- 5. secrets
class Judge(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "70"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_no_url_credential_or_key_reaches_the_run_folder(model, base, tmp_path, capsys, monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    key, password = "sk-trust-KEY-0123456789abcdef", "hunter2PASSWORDzz"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = fresh(base, tmp_path)
        url = f"http://judge-user:{password}@127.0.0.1:{server.server_port}/v1?api_key={password}"
        capsys.readouterr()
        assert run_cli("train.py", *args(model, run, "--max-steps", "1", "--relabel", "--judge", "openai",
                                         "--judge-base-url", url)) == 0
        printed = capsys.readouterr()
        # a URL password in an error message is redacted too, argparse's own included
        line = one_line(capsys, "judge.py", "--iter", f"http://u:{password}@h/v1")   # echoed by argparse
        assert password not in line and "***" in line, line
        for bad in (f"ftp://u:{password}@host/v1", f"http://u:{password}@host:99999/v1"):
            line = one_line(capsys, "judge.py", "--iter", "0", "--run-dir", run, "--backend", "openai",
                            "--base-url", bad)
            assert password not in line and "***" in line, line
    finally:
        server.shutdown()
    assert os.path.isfile(os.path.join(run, "iter0", "judged.jsonl"))
    for secret in (key, password):
        assert secret not in printed.out + printed.err
        for root, _, files in os.walk(run):
            for n in files:
                assert secret.encode() not in open(os.path.join(root, n), "rb").read(), (secret, n)


# ---------------------------------------------------------------------- 6. the lock
def test_an_empty_lock_left_by_a_crash_is_taken_over(model, base, tmp_path, capsys):
    run = fresh(base, tmp_path)
    open(os.path.join(run, ".minispin.lock"), "w").close()  # the full-disk leftover
    capsys.readouterr()
    assert run_cli("train.py", *args(model, run, "--max-steps", "1")) == 0
    assert "took over" in capsys.readouterr().err


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    import errno
    from minispin.run.lock import LOCK_NAME, RunLock, RunLockError

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(RunLockError, match="No space left on device"):
        RunLock(str(tmp_path)).__enter__()
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / LOCK_NAME)


# ---------------------------------------------------------------------- 7. hostile folders
def _escaping_index(m, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(m, "model.safetensors"), outside)
    from safetensors import safe_open
    with safe_open(os.path.join(m, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    os.remove(os.path.join(m, "model.safetensors"))
    json.dump({"weight_map": {k: "../outside.safetensors" for k in keys}},
              open(os.path.join(m, "model.safetensors.index.json"), "w"))
    return "model.safetensors.index.json"


def _symlink_out(m, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(os.path.join(m, "model.safetensors"), outside)
    os.symlink(outside, os.path.join(m, "model.safetensors"))
    return "model.safetensors"


def _ten_million_layers(m, tmp_path):
    cfg = json.load(open(os.path.join(m, "config.json")))
    cfg["num_hidden_layers"] = 10 ** 7
    json.dump(cfg, open(os.path.join(m, "config.json"), "w"))
    return "config.json"


def _huge_vocab(m, tmp_path):
    cfg = json.load(open(os.path.join(m, "config.json")))
    cfg["vocab_size"] = 10 ** 9
    json.dump(cfg, open(os.path.join(m, "config.json"), "w"))
    return "config.json"


def _deep_json(m, tmp_path):
    open(os.path.join(m, "config.json"), "w").write("[" * 100000 + "]" * 100000)
    return "config.json"


def _template(text):
    def plant(m, tmp_path):
        open(os.path.join(m, "chat_template.jinja"), "w").write(text)
        return "chat_template.jinja"
    return plant


@pytest.mark.parametrize("plant", [
    _escaping_index, _symlink_out, _ten_million_layers, _huge_vocab, _deep_json,
    _template("{{ 'x' * 3000000000 }}"),
    _template("{% for m in messages %}{{ m.content.ljust(3000000000) }}{% endfor %}"),
    _template("{{ '{:>2999999999}'.format(1) }}{{ '%0999999999d' % 1 }}"),
    _template("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"),
], ids=["index-escapes", "symlink-out", "1e7-layers", "1e9-vocab", "nested-json", "3GB-string",
        "3GB-ljust", "3GB-format-width", "1e10-loop"])
def test_hostile_model_folder_fails_fast_naming_the_file(base, tmp_path, capsys, monkeypatch, plant):
    import minispin.run.chat
    monkeypatch.setattr(minispin.run.chat, "TIME_LIMIT", 1.0)
    m = shutil.copytree(STORIES, str(tmp_path / "model"))
    name = plant(m, tmp_path)
    run = fresh(base, tmp_path)
    extra = ("--template", "checkpoint") if name == "chat_template.jinja" else ()
    line = one_line(capsys, "train.py", *args(m, run, *extra))
    assert os.path.join(m, name) in line, line


# Each of these builds 9-16 million characters in one step (a few more steps would be
# gigabytes): refused BEFORE the step, naming it, not by the output stream's count or the timer.
A = "{% set a = 'x' * 3000 %}"
GROWING_TEMPLATES = {
    "~ doubling": ("{% set ns = namespace(x='ab') %}{% for i in range(23) %}{% set ns.x = ns.x ~ ns.x %}"
                   "{% endfor %}{{ ns.x|length }}", "a concatenation (~)"),
    "~ in set": ("{% set a = 'x' * 3000000 %}{% set b = a ~ a %}{{ b|length }}", "a concatenation (~)"),
    "replace filter": (A + "{{ a|replace('x', a)|length }}", "a replace"),
    "str.replace": (A + "{{ a.replace('x', a)|length }}", "a str.replace"),
    "join filter": (A + "{{ ([a] * 3000)|join|length }}", "a join"),
    "str.join": (A + "{{ ''.join([a] * 3000)|length }}", "a str.join"),
    "center filter": ("{{ 'x'|center(5000000) }}", "'center' filter with a size argument"),
    "indent filter": ("{{ ('x\\n' * 3000)|indent(3000)|length }}", "an indent"),
    "str.expandtabs": ("{{ ('\\t' * 3000).expandtabs(3000)|length }}", "a str.expandtabs"),
    "str.format fields": (A + "{{ ('{0}' * 3000).format(a)|length }}", "a format"),
    "% fields": (A + "{{ (('%(a)s' * 3000) % {'a': a})|length }}", "a % format"),
    "format filter fields": (A + "{{ ('%(a)s' * 3000)|format(a=a)|length }}", "a format"),
    "wordwrap filter": (A + "{{ ('x ' * 3000)|wordwrap(1, wrapstring=a)|length }}", "a wordwrap"),
    "printed list": (A + "{{ [a] * 3000 }}", "an output expression"),
}


@pytest.mark.parametrize("name", GROWING_TEMPLATES)
def test_a_template_step_that_would_grow_past_the_limit_is_refused_before_it_runs(name, monkeypatch):
    import minispin.run.chat as C
    monkeypatch.setattr(C, "TIME_LIMIT", 60.0)  # the size rule must stop it, not the timer
    source, step = GROWING_TEMPLATES[name]
    template = C.ChatTemplate("checkpoint", source, "m/chat_template.jinja", {"eos_token": "</s>"})
    with pytest.raises(C.TokenizerError) as e:
        template.render([{"role": "user", "content": "hi"}])
    assert f"{step}" in str(e.value) and "past the output limit" in str(e.value), str(e.value)
    assert "m/chat_template.jinja" in str(e.value)


def test_the_size_rules_render_what_plain_jinja_renders():
    """The same steps, small: minispin's checked environment writes what jinja's own
    sandbox writes (the checks refuse; they never change a result)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    import minispin.run.chat as C
    source = ("{% set ns = namespace(x='ab') %}{% for i in range(3) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}"
              "{{ ns.x }}|{{ 'x' ~ 1 ~ none ~ [1, 'a'] }}|{{ 'ab'|replace('a', 'cc') }}|{{ 'aaa'.replace('a', 'b', 2) }}|"
              "{{ [1, 'a', none]|join(', ') }}|{{ messages|join(',', attribute='role') }}|{{ '-'.join(['x', 'y']) }}|"
              "{{ 'x'|center(7) }}|{{ 'a\nb'|indent(2, true) }}|{{ 'a\tb'.expandtabs(4) }}|"
              "{{ '{0}{0}{1}{}'.format('p', 'q') if false else '{0}{0}{1}'.format('p', 'q') }}|"
              "{{ '{a}-{b[0]}'.format_map({'a': 1, 'b': 'xy'}) }}|{{ '%s=%d' % ('k', 3) }}|{{ '%(a)s%(a)s' % {'a': 'q'} }}|"
              "{{ '%s'|format('z') }}|{{ '%(n)s'|format(n='w') }}|{{ 'aa bb cc'|wordwrap(2, wrapstring='/') }}|"
              "{{ messages[0] }}|{{ {'k': [1, 2]} }}|{{ 3.5 }}|{{ bos_token }}{{ eos_token }}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    ours = C.ChatTemplate("checkpoint", source, "m", tokens).render(messages)
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    assert ours == plain.render(messages=messages, tools=None, documents=None,
                                add_generation_prompt=False, **tokens)
    assert "abababababababab|x1None[1, 'a']|ccb|bba|" in ours   # and it is not empty


# ---------------------------------------------------------------------- 8. validation
@pytest.mark.parametrize("flags, named", [
    (["--lr", "0"], "'lr' must be > 0"),
    (["--label-smoothing", "0.5"], "label_smoothing"),
    (["--label-smoothing", "1", "--loss-type", "robust"], "label_smoothing"),
    (["--iter", "-1"], "--iter"),
    (["--seed", str(10 ** 20)], "'seed'"),
    (["--config", ""], "--config"),
    (["--run-dir", ""], "--run-dir"),
    (["--out", ""], "--out"),
    (["--model", ""], "--model"),
])
def test_nonsense_is_refused_before_work(tmp_path, capsys, flags, named):
    argv = ["--model", STORIES, "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    line = one_line(capsys, "train.py", *argv, *flags)
    assert named in line, line
    assert not os.path.exists(tmp_path / "run" / "iter0" / "ckpt")


def test_judge_cache_is_never_aimed_at_a_pairs_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    pairs = write_pairs(str(tmp_path / "run" / "iter0" / "pairs.jsonl"))
    before = open(pairs, "rb").read()
    common = ["--iter", "0", "--run-dir", str(tmp_path / "run"), "--backend", "openai",
              "--base-url", "http://127.0.0.1:9/v1"]
    line = one_line(capsys, "judge.py", *common, "--cache", pairs)
    assert pairs in line
    other = str(tmp_path / "other.jsonl")
    shutil.copy(pairs, other)
    line = one_line(capsys, "judge.py", *common, "--cache", other)
    assert other in line and "pairs or judged file" in line
    assert open(pairs, "rb").read() == before and open(other, "rb").read() == before


def test_a_cache_without_final_newline_keeps_its_last_record(tmp_path):
    from minispin.study.judge import ScoreCache
    path = tmp_path / "cache.jsonl"
    rec = {"key": "k1", "score": 80}
    path.write_text(json.dumps({"key": "k0", "score": 10}) + "\n" + json.dumps(rec))  # edited by hand
    cache = ScoreCache(str(path))
    cache.put({"key": "k2", "score": 5})
    cache.close()
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["k0", "k1", "k2"]


def test_judge_module_does_not_import_the_training_machinery():
    # nor the openai package: only the OpenAI-compatible judge needs it (the judge extra)
    code = ("import sys, minispin.study.judge; print('minispin.run.distributed' in sys.modules, "
            "'minispin.run.trainer' in sys.modules, 'openai' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False", "False"], r.stderr[-2000:]


def test_a_hugging_face_cache_snapshot_still_loads(tmp_path):
    """The one allowed link out of a model folder: an HF hub cache snapshot's files are
    symlinks to ../../blobs/<sha>; they load as before (and equal the plain folder)."""
    import torch
    from minispin.run.checkpoint import load_model
    repo = tmp_path / "models--org--stories"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for name in os.listdir(STORIES):
        shutil.copy(os.path.join(STORIES, name), repo / "blobs" / f"blob-{name}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob-{name}"), snap / name)
    a, b = load_model(str(snap)).state_dict(), load_model(STORIES).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
