"""The study's recipes against the study's own code, restated here (github
Joyyang158/self-improvement-of-LLMs at 43ad657):

* rows: --dump-rows under study-zephyr and study-llama2 equals a restatement of
  SPIN/spin/run_spin.py's "W/o System Prompt" apply_chat_template (prompt = template of
  [user] + generation prompt, no system turn; each answer = template of the whole
  [user, assistant] list, its "<|assistant|>\\n" strip never firing) followed by
  SPIN/spin/alignment/utils.py's tokenize_batch_element, with the `tokenizers` library on
  the checkpoint's tokenizer.json as the tokenizer (transformers renders a checkpoint's own
  chat template, as the study's tokenizer.apply_chat_template did);
* prompts: the selection equals HF datasets' Dataset.shuffle(seed=42).select(range(k)), on
  records of the study's reformatted layout including ones our reader cannot use;
* schedule: last_batch = "fill" forms the batches accelerate's data loader forms for HF
  Trainer (BatchSamplerShard, even_batches), the study's steps per epoch = ceil.
"""
import json
import os

import pytest

from helpers import run_cli
from test_fidelity import MISTRAL_JSON, fidelity_pairs, mistral, tokenize_batch_element_restated  # noqa: F401  (fixture)

tokenizers = pytest.importorskip("tokenizers")

# a Llama-2-chat-style template of our own, standing in for a checkpoint that ships one
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
                   "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
                   "{% endif %}{% endfor %}")


def zephyr_texts(pair):
    """apply_chat_template of the study, on the zephyr layout (the checkpoint's template, and
    the DEFAULT_CHAT_TEMPLATE get_tokenizer falls back to), written out by hand."""
    q = pair["prompt"][0]["content"]
    prompt = f"<|user|>\n{q}</s>\n<|assistant|>\n"
    return prompt, f"{prompt}{pair['real']}</s>\n", f"{prompt}{pair['generated']}</s>\n"


def checkpoint_texts(template):
    """apply_chat_template of the study with the checkpoint's own template, rendered by
    transformers' tokenizer.apply_chat_template as the study's code called it."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=MISTRAL_JSON, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = template

    def texts(pair):
        user = {"role": "user", "content": pair["prompt"][0]["content"]}
        prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        out = [prompt]
        for side in ("real", "generated"):
            text = tok.apply_chat_template([user, {"role": "assistant", "content": pair[side]}], tokenize=False)
            out.append(text[len("<|assistant|>\n"):] if text.startswith("<|assistant|>\n") else text)
        return tuple(out)
    return texts


def study_rows_restated(tk, pair, texts, max_length=1024, max_prompt_length=512):
    """The study's rows: its apply_chat_template's texts, then SPIN's tokenize_batch_element
    (its SPIN/spin/alignment/utils.py is uclaml/SPIN's, restated once in test_fidelity)."""
    return tokenize_batch_element_restated(tk, pair["id"], *texts(pair), max_length, max_prompt_length)


def dump(config, model, pairs, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "pairs.jsonl"
    # the study's own layout: real / generated as [user, assistant] conversations
    src.write_text("".join(json.dumps({"id": p["id"], "real": [p["prompt"][0], {"role": "assistant", "content": p["real"]}],
                                       "generated": [p["prompt"][0], {"role": "assistant", "content": p["generated"]}]}) + "\n"
                           for p in pairs))
    out = tmp_path / "rows.jsonl"
    rc = run_cli("train.py", "--config", config, "--model", model, "--pairs", src, "--dump-rows", out,
                 "--run-dir", tmp_path / "run", "--device", "cpu", "--no-progress")
    assert rc == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def check_equal(ours, want):
    assert len(ours) == len(want) >= 120
    for a, b in zip(ours, want):
        assert (a["id"], a["side"]) == (b["id"], b["side"])
        for k in ("input_ids", "labels", "attention_mask"):
            assert a[k] == b[k], (a["id"], a["side"], k)


def test_dump_rows_under_study_zephyr_equal_the_studys_rows(mistral, tmp_path):  # noqa: F811
    pairs = fidelity_pairs()
    ours = dump("study-zephyr", mistral, pairs, tmp_path)
    tk = tokenizers.Tokenizer.from_file(MISTRAL_JSON)
    check_equal(ours, [row for p in pairs for row in study_rows_restated(tk, p, zephyr_texts)])
    # the cases are really there: both truncations, the question inside the labels, no <s>
    assert sum(r["labels"].count(-100) == 512 for r in ours) >= 8                  # prompts cut
    assert any(len(r["input_ids"]) - r["labels"].count(-100) == 512 for r in ours)  # answers cut
    assert all(r["input_ids"][0] != 1 for r in ours)
    for r in ours[:20]:
        answer = [t for t in r["labels"] if t != -100]
        prompt = r["input_ids"][:r["labels"].count(-100)]
        if len(prompt) < 512:   # an uncut prompt: the labelled answer starts with the prompt again
            assert answer[:len(prompt) - 1] == prompt[:len(prompt) - 1], r["id"]


@pytest.mark.slow
@pytest.mark.parametrize("template", ["none", "llama2"])
def test_dump_rows_under_study_llama2_equal_the_studys_rows(mistral, tmp_path, template):  # noqa: F811
    """study-llama2 takes the checkpoint's own template (get_tokenizer), else the zephyr
    layout (its DEFAULT_CHAT_TEMPLATE): both are the study's rows."""
    import shutil
    model = mistral
    texts = zephyr_texts
    if template == "llama2":
        model = str(tmp_path / "llama2-template")
        shutil.copytree(mistral, model)
        cfg_path = os.path.join(model, "tokenizer_config.json")
        cfg = json.load(open(cfg_path))
        json.dump(dict(cfg, chat_template=LLAMA2_TEMPLATE), open(cfg_path, "w"))
        texts = checkpoint_texts(LLAMA2_TEMPLATE)
    pairs = fidelity_pairs()
    ours = dump("study-llama2", model, pairs, tmp_path)
    tk = tokenizers.Tokenizer.from_file(MISTRAL_JSON)
    check_equal(ours, [row for p in pairs for row in study_rows_restated(tk, p, texts)])
    if template == "llama2":
        assert all("[INST]" in tk.decode(r["input_ids"][:12]) for r in ours[:4])


def test_study_rows_differ_from_spins(mistral, tmp_path):  # noqa: F811
    """The issue's finding, kept true: the study's rows are not uclaml/SPIN's on any pair."""
    pairs = fidelity_pairs()[:24]
    study = dump("study-zephyr", mistral, pairs, tmp_path / "a")
    spin = dump("spin-official-zephyr", mistral, pairs, tmp_path / "b")
    assert sum(a["input_ids"] == b["input_ids"] for a, b in zip(study, spin)) == 0


def reformatted_records(n):
    """Records of the study's SPIN/reformatted layout, some of which our reader cannot use
    (no user turn) and some blank (kept, as generate.py keeps them)."""
    recs = []
    for i in range(n):
        user, answer = f"question {i}: how  much is {i} + {i}?", f"{2 * i}"
        if i % 97 == 5:
            user = ""                                # blank prompt: kept
        if i % 89 == 7:
            answer = "  "                            # blank answer: kept
        first = {"role": "user", "content": user}
        if i % 53 == 3:
            first = {"role": "assistant", "content": user}   # no user turn: we cannot use it
        recs.append({"generated": [first, {"role": "assistant", "content": ""}],
                     "real": [first, {"role": "assistant", "content": answer}]})
    return recs


@pytest.mark.parametrize("k", [300, 2000])
def test_prompt_selection_equals_datasets_shuffle(tmp_path, k):
    datasets = pytest.importorskip("datasets")
    from minispin.run.pairs import read_sft_prompts
    from minispin.run.recipe import resolve
    recs = reformatted_records(2000)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = datasets.Dataset.from_list(recs).shuffle(seed=42).select(range(k))
    theirs = [(row["real"][0]["content"], row["real"][1]["content"]) for row in ds
              if row["real"][0]["role"] == "user"]   # what we leave out: no user turn
    recipe = resolve("study-zephyr", {"data": str(path), "num_prompts": k})
    examples, stats = read_sft_prompts(recipe)
    ours = [(ex.prompt[0]["content"], ex.real) for ex in examples]
    assert ours == theirs
    assert len(theirs) < k and stats.skipped                      # skipped records were selected
    assert any(not q for q, _ in ours) and any(not a.strip() for _, a in ours)   # blanks kept
    # the other rule (shuffle what survives) draws another selection: this test can fail
    usable, _ = read_sft_prompts(resolve("study-zephyr", {"data": str(path), "num_prompts": k,
                                                          "shuffle_rows": "usable"}))
    assert [(ex.prompt[0]["content"], ex.real) for ex in usable][:50] != ours[:50]


@pytest.mark.parametrize("n,world,micro", [(100, 2, 8), (20000, 8, 8), (45, 3, 4), (64, 4, 8)])
def test_fill_last_batch_is_accelerates(n, world, micro):
    """last_batch = "fill": the global batches of an epoch are those HF Trainer's data loader
    gives its processes under accelerate (per-device BatchSampler, drop_last False,
    BatchSamplerShard with even_batches): ceil(n / batch) steps, the last completed with the
    epoch's first pairs. Positions are in the epoch's order on both sides."""
    accelerate_dl = pytest.importorskip("accelerate.data_loader")
    from torch.utils.data import BatchSampler
    from minispin.run.recipe import resolve
    from minispin.core.train import epoch_steps, global_batch
    B = micro * world
    shards = [list(accelerate_dl.BatchSamplerShard(BatchSampler(range(n), micro, drop_last=False), world, r,
                                                   even_batches=True)) for r in range(world)]
    theirs = [sorted(i for r in range(world) for i in shards[r][s]) for s in range(len(shards[0]))]
    recipe = resolve("tiny", {"batch_size": B, "micro_batch_size": micro, "last_batch": "fill", "epochs": 1})
    t = recipe.training
    steps = epoch_steps(n, t.batch_size, t.last_batch)
    import torch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    where = {p: i for i, p in enumerate(order)}
    ours = [sorted(where[i] for i in global_batch(n, s, t.batch_size, steps, recipe.seed)) for s in range(steps)]
    assert steps == len(theirs) == -(-n // B)
    assert [sorted(set(b)) for b in ours] == [sorted(set(b)) for b in theirs]
    assert [len(b) for b in ours] == [len(b) for b in theirs]


@pytest.mark.parametrize("name", ["study-zephyr", "study-zephyr-noise", "study-zephyr-judge", "study-llama2"])
def test_fidelity_doc_lists_every_key_of_each_study_recipe(name):
    """docs/fidelity.md's table of each study run names every key the recipe sets, with the
    recipe's value: the table cannot drift from the recipe."""
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from helpers import REPO
    raw = tomllib.load(open(os.path.join(REPO, "configs", f"{name}.toml"), "rb"))
    doc = open(os.path.join(REPO, "docs", "fidelity.md"), encoding="utf-8").read()
    start = doc.index(f"### `configs/{name}.toml`")
    section = doc[start:doc.find("\n### ", start + 1) if "\n### " in doc[start + 1:] else None]
    section = section.split("\n## ")[0]

    def shown(v):
        return json.dumps(v) if isinstance(v, (bool, str)) else repr(v)
    want = [(f"`{k}`", shown(v)) for k, v in raw.items() if k != "iterations"]
    want += [(f"`{k}` [iterations.{t}]", shown(v)) for t, table in raw.get("iterations", {}).items()
             for k, v in table.items()]
    for key, value in want:
        assert f"| {key} | `{value}` |" in section, (name, key, value)


def test_the_study_recipes_ultrachat_id_selects_the_prompts_of_reformat_pys_file(tmp_path, monkeypatch):
    """study-zephyr names HuggingFaceH4/ultrachat_200k:train_sft, three Parquet shards on the
    Hub. Read through a hand-made offline cache, its selection equals the study's pipeline,
    restated: `datasets` loads the shards (its own file order), reformat.py keeps
    messages[0] and messages[1] of every row as "real", then shuffle(seed=42).select(k)."""
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    from minispin.run.pairs import read_sft_prompts
    from minispin.run.recipe import resolve
    from test_hub import COMMIT, cache_repo
    shards, start = {}, 0
    for i, n in enumerate((250, 200, 150)):   # unequal shards: a wrong file order moves prompts
        recs = [{"prompt": f"q{j}", "prompt_id": f"{j:08x}",
                 "messages": [{"role": "user", "content": f"q{j}: what is {j} * 3?"},
                              {"role": "assistant", "content": f"{3 * j}"},
                              {"role": "user", "content": "and times 4?"},
                              {"role": "assistant", "content": f"{4 * j}"}][:2 + 2 * (j % 2)]}
                for j in range(start, start + n)]
        start += n
        src = tmp_path / "src" / f"train_sft-{i:05d}-of-00003-{i}a7.parquet"
        src.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(recs), src)
        shards[f"data/{src.name}"] = str(src)
    test_shard = tmp_path / "src" / "test_sft-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "t", "prompt_id": "t", "messages": [
        {"role": "user", "content": "test only"}, {"role": "assistant", "content": "no"}]}]), test_shard)
    cache = tmp_path / "hub"
    cache_repo(cache, "dataset", "HuggingFaceH4/ultrachat_200k",
               dict(shards, **{"data/test_sft-00000-of-00001.parquet": str(test_shard)}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    k = 120
    loaded = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "src" / "train_sft-*.parquet")},
                                   split="train", cache_dir=str(tmp_path / "ds-cache"))
    reformatted = [{"real": [m["messages"][0], m["messages"][1]],
                    "generated": [m["messages"][0], {"role": "assistant", "content": ""}]} for m in loaded]
    ds = datasets.Dataset.from_list(reformatted).shuffle(seed=42).select(range(k))
    theirs = [(row["real"][0]["content"], row["real"][1]["content"]) for row in ds]

    recipe = resolve("study-zephyr", {"num_prompts": k}, fetch=("data",))
    assert recipe.named["data"] == "HuggingFaceH4/ultrachat_200k:train_sft"
    examples, stats = read_sft_prompts(recipe)
    assert [(ex.prompt[0]["content"], ex.real) for ex in examples] == theirs
    assert stats.records == 600
