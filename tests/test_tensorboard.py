"""--report-to tensorboard: the event files hold metrics.jsonl's numbers under TRL's names,
read back with TensorBoard's own reader; a killed and resumed run leaves each step once;
without the tensorboard package the flag is a one-line error before any model loads.
--report-to tensorboard,wandb with WANDB_MODE=offline: the W&B run file, read back with
W&B's own record schema, holds the same numbers at the same steps."""
import glob
import json
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, make_hf_model, run_cli

pytest.importorskip("tensorboard", reason="tensorboard is a test dependency (pip install -e .[test])")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# uclaml/SPIN's and TRL's scalar names (HF Trainer prefixes "train/" and calls lr
# "learning_rate"), written out here rather than taken from minispin
EXPECTED_TAGS = {"train/loss", "train/rewards/real", "train/rewards/generated", "train/rewards/accuracies",
                 "train/rewards/margins", "train/logps/real", "train/logps/generated",
                 "train/learning_rate", "train/grad_norm", "train/epoch",
                 # TRL's DPOTrainer names, by label (chosen = the real answer, no judge here)
                 "train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen", "train/logps/rejected"}
WORDS = "the cat sat on a mat and then ran to see dog bird tree sun moon star red blue".split()


def tb_tag(key):
    return "train/learning_rate" if key == "lr" else "train/" + key


def write_pairs(path, n=16):
    rng = random.Random(0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            words = lambda a, b: " ".join(rng.choices(WORDS, k=rng.randint(a, b)))  # noqa: E731
            f.write(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": words(2, 6)}],
                                "real": words(4, 12), "generated": words(2, 12), "gen": {}}) + "\n")


def read_events(folder):
    acc = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0 = keep every event
    acc.Reload()
    return acc


class Stop(Exception):
    """Raised by a trainer hook: the run dies after a step, as a killed one would."""


def test_event_files_equal_metrics_jsonl_and_resume_writes_each_step_once(tmp_path):
    model, run = str(tmp_path / "model"), str(tmp_path / "run")
    make_hf_model(model, "llama")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    args = ["--model", model, "--run-dir", run, "--batch-size", "4", "--micro-batch-size", "2",
            "--max-length", "80", "--max-prompt-length", "48", "--lr", "1e-3", "--epochs", "2",
            "--checkpoint-every", "3", "--heldout-examples", "0", "--device", "cpu", "--no-progress",
            "--report-to", "tensorboard"]
    from minispin.run.resume import add_hook, clear_hooks

    def die_after_5(trainer, done):
        if done == 5:
            raise Stop
    add_hook("step_end", die_after_5)
    try:
        with pytest.raises(Stop):
            run_cli("train.py", *args)
    finally:
        clear_hooks()
    work = os.path.join(run, "iter0")
    assert sorted(os.listdir(os.path.join(work, "ckpt"))) == ["step_3"]
    assert read_events(work).Scalars("train/loss")[-1].step == 5   # steps 4, 5 logged, then lost

    assert run_cli("train.py", *args) == 0                          # resumes from step_3
    recs = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == list(range(1, 9))
    events = [f for f in os.listdir(work) if f.startswith("events.out.tfevents.")]
    assert len(events) == 3          # one per process that trained, one for the diagnostics after the export
    acc = read_events(work)
    assert EXPECTED_TAGS <= set(acc.Tags()["scalars"])
    for key in recs[0]:
        if key == "step":
            continue
        got = acc.Scalars(tb_tag(key))
        assert [e.step for e in got] == list(range(1, 9)), key      # every step once, in order
        assert [e.value for e in got] == [np.float32(r[key]) for r in recs], key


@pytest.mark.slow
def test_missing_tensorboard_is_one_line_before_any_model_loads():
    code = ("import runpy, sys; sys.modules['tensorboard'] = None; "
            "sys.argv = ['train.py', '--report-to', 'tensorboard', '--model', 'no/such/model', "
            "'--device', 'cpu', '--no-progress']; runpy.run_path('train.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and "pip install tensorboard" in lines[0]
    assert "no/such/model" not in p.stderr and p.stdout == ""    # stopped before the model was looked at


def wandb_records(path):
    """The records of a W&B run file: LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last) after
    W&B's 7-byte file header, each record a wandb_internal.proto Record."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                       # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            yield rec


SECRET = "pw4WandbXq9"


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_jsonl_beside_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is a test dependency (pip install -e .[test])")
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")     # no network, no account
    monkeypatch.setenv("WANDB_CONSOLE", "off")      # leave pytest's stdout alone
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    model, run = str(tmp_path / "model"), str(tmp_path / "run")
    make_hf_model(model, "llama")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", "--model", model, "--run-dir", run, "--batch-size", "4", "--micro-batch-size", "2",
                   "--max-length", "80", "--max-prompt-length", "48", "--lr", "1e-3", "--epochs", "1",
                   "--heldout-examples", "0", "--device", "cpu", "--no-progress",
                   "--report-to", "tensorboard,wandb",
                   "--judge-base-url", f"http://wb-user:{SECRET}@127.0.0.1:9/v1?api_key={SECRET}") == 0
    work = os.path.join(run, "iter0")
    # W&B writes the run's recipe into its files: the URL's credentials are redacted first
    for root, _, files in os.walk(run):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(root, name)
    recs = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert EXPECTED_TAGS <= set(read_events(work).Tags()["scalars"])   # TensorBoard as well
    # two W&B runs of the iteration: training, then the diagnostics after the export
    files = glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb"))
    run_file, = [f for f in files if any(r.WhichOneof("record_type") == "history" and
                                         any((i.key or "/".join(i.nested_key)) == "train/loss"
                                             for i in r.history.item)
                                         for r in wandb_records(f))]
    assert len(files) == 2
    history, names = [], []
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            names.append((rec.run.project, rec.run.display_name))
        elif kind == "exit":
            names.append(("exit", rec.exit.exit_code))
    assert names[0] == ("minispin", "tiny-iter0") and ("exit", 0) in names
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    for h, r in zip(history, recs):
        for key, value in r.items():
            if key != "step":
                assert h[tb_tag(key)] == pytest.approx(value, rel=1e-12, abs=0), key
        assert "train/loss" in h and "train/rewards/chosen" in h
