"""Models and data named by Hugging Face Hub id (minispin/hub.py), against a cache laid out by
hand the way huggingface_hub lays it out (models--ORG--NAME/snapshots/<commit>/..., refs/main),
with HF_HUB_OFFLINE=1: nothing here reaches the network."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

TINY_SFT = os.path.join(REPO, "assets", "models", "tiny-sft")
GSM8K_TRAIN = os.path.join(REPO, "assets", "data", "gsm8k", "train.jsonl")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, kind, repo, files, commit=COMMIT, ref="main"):
    """Put `files` ({path in repo: source file}) into a hand-made huggingface_hub cache."""
    root = os.path.join(cache, f"{kind}s--{repo.replace('/', '--')}")
    for rel, src in files.items():
        dst = os.path.join(root, "snapshots", commit, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(src, dst)
    if ref:
        os.makedirs(os.path.join(root, "refs"), exist_ok=True)
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(commit)
    return os.path.join(root, "snapshots", commit)


def offline_env(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return dict(env, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"),
                PYTHONPATH=REPO)


def train(env, *argv, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--no-progress", *map(str, argv)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def model_files():
    return {name: os.path.join(TINY_SFT, name) for name in os.listdir(TINY_SFT)}


@pytest.mark.slow
def test_train_py_runs_on_a_model_and_data_named_by_hub_id_from_an_offline_cache(tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache_repo(cache, "model", "someorg/tiny-sft", model_files())
    data = cache_repo(cache, "dataset", "someorg/gsm8k-mini",
                      {"data/train-00000-of-00001.jsonl": GSM8K_TRAIN})
    run = tmp_path / "run"
    p = train(offline_env(cache), "--model", "someorg/tiny-sft", "--data", "someorg/gsm8k-mini:train",
              "--run-dir", run, "--num-prompts", 8, "--max-steps", 1,
              "--heldout-examples", 0, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.load(open(run / "iter0" / "train_info.json"))
    assert os.path.realpath(info["theta"]) == os.path.realpath(snapshot)
    assert os.path.realpath(info["recipe"]["data"]) == os.path.realpath(
        os.path.join(data, "data", "train-00000-of-00001.jsonl"))
    assert (run / "iter0" / "model" / "config.json").is_file()
    assert "plan for iteration 0: 1. generate 8 prompts (256 new tokens at most) -> 2. reference pass 8 pairs" \
        in p.stdout, p.stdout[:2000]


@pytest.mark.parametrize("value, fetch", [
    ("someorg/not-cached", "hf download someorg/not-cached"),
    ("someorg/tiny-sft@v2", "hf download someorg/tiny-sft --revision v2"),
])
def test_an_id_missing_from_an_offline_cache_exits_2_with_one_line_naming_it_and_its_fetch_command(
        tmp_path, value, fetch):
    cache = tmp_path / "hub"
    cache_repo(cache, "model", "someorg/tiny-sft", model_files())   # main only: no v2
    p = train(offline_env(cache), "--model", value, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "--model" in lines[0] and value in lines[0] and f"`{fetch}`" in lines[0], lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "run" / "iter0").exists()


def test_a_recipe_key_is_named_as_the_source_of_a_missing_id(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "someorg/absent@{COMMIT}"\ndata = "{GSM8K_TRAIN}"\n')
    p = train(offline_env(tmp_path / "hub"), "--config", recipe, cwd=tmp_path)
    assert p.returncode == 2
    line = p.stderr.strip()
    assert f"'model' in {recipe}" in line and f"hf download someorg/absent --revision {COMMIT}" in line, line


def test_a_local_path_wins_over_a_hub_id_of_the_same_name(tmp_path, monkeypatch):
    from minispin.run import hub
    os.makedirs(tmp_path / "someorg")
    shutil.copytree(TINY_SFT, tmp_path / "someorg" / "tiny-sft")
    monkeypatch.chdir(tmp_path)
    assert hub.parse("someorg/tiny-sft", "model") is None
    assert hub.parse("someorg/other", "model") == hub.HubRef("model", "someorg/other", None)


@pytest.mark.slow
def test_a_missing_local_model_or_data_path_names_its_flag_and_says_it_does_not_exist(tmp_path):
    env = offline_env(tmp_path / "hub")
    p = train(env, "--model", tmp_path / "nowhere", cwd=tmp_path)
    assert p.returncode == 2
    assert f"θ_0 = {tmp_path / 'nowhere'} (--model) does not exist" in p.stderr, p.stderr
    p = train(env, "--data", tmp_path / "none.jsonl", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert p.returncode == 2
    assert f"{tmp_path / 'none.jsonl'} (--data) does not exist" in p.stderr, p.stderr
    os.makedirs(tmp_path / "empty")
    p = train(env, "--model", tmp_path / "empty", cwd=tmp_path)
    assert p.returncode == 2 and "(--model) is not a model folder (no config.json" in p.stderr, p.stderr


def test_dataset_ids_name_one_file_of_a_split_or_of_the_repository(tmp_path, monkeypatch):
    """ORG/NAME:SPLIT and hf://datasets/ORG/NAME[@REV]/FILE resolve to the cached file; a split
    of several shards to a pattern matching them, or, when none can, is refused with their names. In-process: huggingface_hub reads
    HF_HUB_CACHE when imported, so the cache is given to its functions through its constants."""
    from huggingface_hub import constants

    from minispin.run import hub
    cache = tmp_path / "hub"
    snap = cache_repo(cache, "dataset", "someorg/mix", {
        "data/train-00000-of-00001.jsonl": GSM8K_TRAIN,
        "data/test-00000-of-00002.jsonl": GSM8K_TRAIN, "data/test-00001-of-00002.jsonl": GSM8K_TRAIN,
        "README.md": GSM8K_TRAIN})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    want = os.path.join(snap, "data", "train-00000-of-00001.jsonl")
    for value in ("someorg/mix:train", "hf://datasets/someorg/mix:train",
                  "hf://datasets/someorg/mix/data/train-00000-of-00001.jsonl",
                  f"hf://datasets/someorg/mix@{COMMIT}/data/train-00000-of-00001.jsonl"):
        assert os.path.realpath(hub.resolve(value, "data", "--data")) == os.path.realpath(want), value
    # a split of several shards: one pattern matching exactly them, read in name order
    pattern = hub.resolve("someorg/mix:test", "data", "--data")
    assert sorted(map(os.path.realpath, glob.glob(pattern))) == [
        os.path.realpath(os.path.join(snap, "data", f"test-0000{i}-of-00002.jsonl")) for i in (0, 1)]
    from minispin.run.data import read_sft
    one, _ = read_sft(GSM8K_TRAIN)
    both, _ = read_sft(pattern)
    assert [ex.real for ex in both] == [ex.real for ex in one] * 2
    snap2 = cache_repo(cache, "dataset", "someorg/scattered", {
        "a/valid-0.jsonl": GSM8K_TRAIN, "b/valid-1.jsonl": GSM8K_TRAIN})
    assert snap2
    with pytest.raises(hub.HubError, match=r"split 'valid' is 2 files that no one pattern names: .* "
                                           r"hf://datasets/someorg/scattered/a/valid-0.jsonl \(the others: b/valid-1"):
        hub.resolve("someorg/scattered:valid", "data", "--data")
    with pytest.raises(hub.HubError, match="no file of split 'validation'"):
        hub.resolve("someorg/mix:validation", "data", "--data")
    # --print-config (local_only) leaves an id that is not cached as it is, and raises nothing
    assert hub.resolve("someorg/absent:train", "data", "--data", local_only=True) == "someorg/absent:train"


def test_a_missing_smollm2_folder_is_named_with_the_command_that_makes_it():
    from minispin.run import hub
    line = hub.missing("model", "models/SmolLM2-135M-Instruct", "--model")
    assert line == ("models/SmolLM2-135M-Instruct (--model) does not exist; make it with "
                    "`minispin-fetch-smollm2 --out models/SmolLM2-135M-Instruct` (in a checkout: "
                    "`python scripts/fetch_smollm2.py --out models/SmolLM2-135M-Instruct`)")


def tool(env, script, *argv, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_evaluate_py_and_generate_py_take_a_model_named_by_hub_id(tmp_path):
    cache = tmp_path / "hub"
    cache_repo(cache, "model", "someorg/tiny-sft", model_files())
    env = offline_env(cache)
    p = tool(env, "evaluate.py", "--model", "someorg/tiny-sft", "--offline", "--tasks", "arc_easy",
             "--num-fewshot", "0", "--limit", "2", "--output", tmp_path / "eval", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| tiny-sft |" in p.stdout, p.stdout[-2000:]
    assert (tmp_path / "eval" / "tiny-sft" / "results.json").is_file()
    out = tmp_path / "pairs.jsonl"
    # the recipe's own θ_0 is an id that is not cached: --model replaces it, so it is not fetched
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "someorg/absent"\ndata = "{GSM8K_TRAIN}"\n')
    p = tool(env, "generate.py", "--config", recipe, "--model", "someorg/tiny-sft", "--num-prompts", 2,
             "--max-new-tokens", 4, "--out", out, "--run-dir", tmp_path / "run", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("script", ["evaluate.py", "generate.py"])
def test_evaluate_py_and_generate_py_name_an_uncached_model_id_and_its_fetch_command(
        tmp_path, script, monkeypatch, capsys):
    from huggingface_hub import constants

    from helpers import run_cli
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):   # evaluate.py --offline sets them
        monkeypatch.setenv(name, "1")
    monkeypatch.chdir(tmp_path)
    rc = run_cli(script, "--model", "someorg/absent@v1",
                 "--offline" if script == "evaluate.py" else "--no-progress")
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--model" in lines[0] and "someorg/absent@v1" in lines[0], lines[0]
    assert "`hf download someorg/absent --revision v1`" in lines[0], lines[0]
