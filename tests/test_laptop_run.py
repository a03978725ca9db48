"""The README's main command, shortened: SPIN iteration 0 end to end on CPU, then
iteration 1 under torchrun with 2 processes, checking what a user would look at."""
import pytest
import json
import os
import subprocess
import sys

import torch

from helpers import REPO, free_port
from minispin import load_model
from minispin.run.recipe import write_variant as write_recipe_variant

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

pytestmark = pytest.mark.slow  # every test here starts a real model, a wheel or a subprocess run


def short_recipe(tmp_path):
    """configs/tiny.toml with fewer prompts, steps and held-out examples."""
    return write_recipe_variant(str(tmp_path / "short.toml"), {
        "num_prompts": 16, "max_new_tokens": 48, "heldout_examples": 8, "batch_size": 4, "epochs": 1})


def test_default_run_iteration_0_then_1_with_torchrun(tmp_path):
    recipe, run = short_recipe(tmp_path), str(tmp_path / "run")
    out = subprocess.run([sys.executable, "train.py", "--config", recipe, "--run-dir", run, "--no-progress"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SPIN iteration 0 summary" in out.stdout and "answer NLL/token" in out.stdout
    it0 = os.path.join(run, "iter0")
    pairs = [json.loads(line) for line in open(os.path.join(it0, "pairs.jsonl"))]
    assert len(pairs) == 16 and all(p["generated"] is not None for p in pairs)
    metrics = [json.loads(line) for line in open(os.path.join(it0, "metrics.jsonl"))]
    assert len(metrics) == 4 and abs(metrics[0]["loss"] - 0.693147) < 1e-3
    summary = json.load(open(os.path.join(it0, "summary.json")))
    assert summary["heldout"]["examples"] == 8
    assert set(summary["heldout"]["before"]) == {"answer_nll", "format_rate", "exact_match"}
    theta1 = load_model(os.path.join(it0, "model"))
    theta0 = load_model(json.load(open(os.path.join(it0, "train_info.json")))["theta"])
    moved = max((a - b).abs().max().item() for a, b in zip(theta1.parameters(), theta0.parameters()))
    assert moved > 0, "iteration 0 did not change the weights"

    port = free_port()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master-port", str(port), "train.py", "--config", recipe, "--iter", "1",
                          "--run-dir", run, "--no-progress"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SPIN iteration 1 summary" in out.stdout
    info = json.load(open(os.path.join(run, "iter1", "train_info.json")))
    assert info["world_size"] == 2 and set(info["sources"]) == {"iter0", "iter1"}  # SPIN mixes t-1
    assert os.path.isfile(os.path.join(run, "iter1", "model", "model.safetensors"))
    x = torch.randint(0, theta1.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(load_model(os.path.join(run, "iter1", "model"))(x)).all()

    # README: python plot.py runs/<name> draws the curves of both iterations
    out = subprocess.run([sys.executable, "plot.py", run, "--out", str(tmp_path / "plots")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("training.png", "heldout.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
