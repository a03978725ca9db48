"""minispin.generate against full recomputation and against transformers (the oracles)."""
import math

import pytest
import torch

from helpers import STORIES, make_hf_model
from minispin import generate, load_model, load_tokenizer
from minispin.core.sampling import filtered_probs, generate_batch, row_seed, sample_next



@pytest.fixture(scope="module")
def stories():
    return load_model(STORIES)


@pytest.fixture(scope="module")
def stories_hf():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def sharpen(hf, path):
    """Random init gives near-uniform attention, blind to positions; scaled q/k make the
    scores large, so a wrong position or mask changes the tokens."""
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    sharpen(make_hf_model(d, "llama", num_key_value_heads=2), d)
    return load_model(str(d))


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """Window 8: prompts of up to 20 tokens plus 24 new ones decode far past it."""
    d = tmp_path_factory.mktemp("mistral")
    hf = sharpen(make_hf_model(d, "mistral", sliding_window=8, num_key_value_heads=2), d)
    return load_model(str(d)), hf


def prompts_of(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_full(model, prompt, new):
    """The reference: no cache, the whole sequence recomputed for every token."""
    ids = list(prompt)
    for _ in range(new):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


LENGTHS = [3, 11, 1, 20, 7, 16]


# ------------------------------------------------------------- greedy: cache == recompute
@pytest.mark.parametrize("ragged", [False, True])
def test_greedy_cache_equals_full_recompute_llama(tiny_llama, ragged):
    prompts = prompts_of(LENGTHS)
    got = [generate_batch(tiny_llama, [p], 24, temperature=0, eos_id=-1)[0] for p in prompts]
    batched = generate_batch(tiny_llama, prompts, 24, temperature=0, eos_id=-1, ragged_prefill=ragged)
    want = [greedy_full(tiny_llama, p, 24) for p in prompts]
    assert got == want
    assert batched == want


@pytest.mark.parametrize("ragged", [False, True])
def test_greedy_cache_equals_full_recompute_mistral_past_window(tiny_mistral, ragged):
    model, _ = tiny_mistral
    assert model.config.sliding_window == 8
    prompts = prompts_of(LENGTHS, seed=1)
    want = [greedy_full(model, p, 24) for p in prompts]
    assert max(LENGTHS) + 24 > 2 * model.config.sliding_window
    alone = [generate_batch(model, [p], 24, temperature=0, eos_id=-1)[0] for p in prompts]
    batched = generate_batch(model, prompts, 24, temperature=0, eos_id=-1, ragged_prefill=ragged)
    assert alone == want
    assert batched == want


def test_window_matters(tiny_mistral):
    """The Mistral test above can fail: without the window the same weights decode differently."""
    model, _ = tiny_mistral
    prompts = prompts_of(LENGTHS, seed=1)
    windowed = generate(model, prompts, 24, temperature=0, eos_id=-1)
    model.config.sliding_window = None
    try:
        full = generate(model, prompts, 24, temperature=0, eos_id=-1)
    finally:
        model.config.sliding_window = 8
    assert windowed != full


# ------------------------------------------------------------- greedy: == transformers
@pytest.mark.slow
def test_greedy_equals_transformers_stories(stories, stories_hf):
    tok = load_tokenizer(STORIES)
    texts = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw a big",
             "One day, a girl named Sue"]
    prompts = [tok.encode(t, bos=True) for t in texts] + [[1]]
    ours = generate(stories, prompts, 48, temperature=0, eos_id=tok.eos_id)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            hf = stories_hf.generate(torch.tensor([p]), max_new_tokens=48, do_sample=False,
                                     eos_token_id=tok.eos_id, pad_token_id=0)[0, len(p):].tolist()
        if tok.eos_id in hf:
            hf = hf[:hf.index(tok.eos_id)]
        assert o == hf
    assert tok.decode(ours[-1]).startswith("Once upon a time, there was a little girl named Lily")


def test_greedy_equals_transformers_mistral(tiny_mistral):
    model, hf = tiny_mistral
    prompts = prompts_of([5, 20, 13], seed=2)
    ours = generate(model, prompts, 24, temperature=0, eos_id=-1)
    hf.generation_config.eos_token_id = None
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24,
                               do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert o == want


# ------------------------------------------------------------- batching
@pytest.mark.parametrize("ragged", [False, True])
def test_batch_rows_equal_alone_stories(stories, ragged):
    prompts = prompts_of([2, 30, 9, 17, 1, 25], seed=3)
    alone = [generate_batch(stories, [p], 32, temperature=0, eos_id=-1)[0] for p in prompts]
    assert generate_batch(stories, prompts, 32, temperature=0, eos_id=-1, ragged_prefill=ragged) == alone
    # generate() sorts and cuts into batches of 4; the order of results is the input order
    seen = []
    assert generate(stories, prompts, 32, temperature=0, eos_id=-1, batch_size=4,
                    on_batch=lambda idx, outs: seen.append(idx)) == alone
    assert seen == [[1, 5, 3, 2], [0, 4]]  # longest prompts first


def test_prefill_groups_split_and_equal_alone(tiny_mistral, monkeypatch):
    from minispin.core import sampling
    assert sampling.prefill_groups([9, 9, 9], 10 ** 6, 1e9) == [(0, 3)]
    # padding of 30 + 31 tokens of a big model costs more than a second call: two groups
    assert sampling.prefill_groups([40, 39, 10, 9], 50 * 10 ** 6, 1e9) == [(0, 2), (2, 4)]
    assert sampling.prefill_groups([40, 39, 10, 9], 260_000, 1e9) == [(0, 4)]
    model, _ = tiny_mistral
    prompts = prompts_of([3, 20, 11, 12, 1, 16, 16], seed=9)  # sorted: 20 16 16 12 11 3 1
    alone = [generate_batch(model, [p], 20, temperature=0, eos_id=-1)[0] for p in prompts]
    monkeypatch.setattr(sampling, "prefill_groups", lambda lens, n, o: [(0, 1), (1, 3), (3, 7)])
    assert generate_batch(model, prompts, 20, temperature=0, eos_id=-1) == alone


@pytest.mark.slow
def test_eos_stops_rows_and_compaction_keeps_the_rest(stories):
    """Rows stop at different steps; the batch is compacted as they do (checked by a spy)."""
    tok = load_tokenizer(STORIES)
    stop = tok.encode(",", continuation=True)[-1]  # a frequent token as the stop id
    texts = ["Once upon a time", "The sun was", "Tom had a red ball", "A big dog ran", "She said"]
    prompts = [tok.encode(t, bos=True) for t in texts] * 2
    full = [generate_batch(stories, [p], 40, temperature=0, eos_id=-1)[0] for p in prompts]
    want = [f[:f.index(stop)] if stop in f else f for f in full]
    assert len({len(w) for w in want}) > 2, "rows should stop at different steps"
    from minispin.core import model as model_mod
    calls = []
    orig = model_mod.KVCache.keep_rows

    def spy(self, rows):
        calls.append(rows.numel())
        return orig(self, rows)

    model_mod.KVCache.keep_rows = spy
    try:
        got = generate_batch(stories, prompts, 40, temperature=0, eos_id=stop)
    finally:
        model_mod.KVCache.keep_rows = orig
    assert got == want
    assert calls and calls == sorted(calls, reverse=True) and calls[-1] < len(prompts)


def test_eos_default_is_model_eos_and_excluded(stories):
    full = generate(stories, [[1]], 60, temperature=0, eos_id=-1)[0]
    stop = full[10]  # pretend this token is the model's eos
    saved = stories.config.eos_token_id, stories.config.eos_token_ids
    stories.config.eos_token_id, stories.config.eos_token_ids = stop, (stop,)
    try:
        out = generate(stories, [[1]], 60, temperature=0)[0]
    finally:
        stories.config.eos_token_id, stories.config.eos_token_ids = saved
    assert out == full[:full.index(stop)] and len(out) <= 10


@pytest.mark.slow
def test_several_stop_ids(stories):
    """eos_id as a list (Llama 3 stops at <|eot_id|> or <|end_of_text|>): each row stops at
    the first of them it emits, and a config listing several ids is the default."""
    tok = load_tokenizer(STORIES)
    prompts = [tok.encode(t, bos=True) for t in ["Once upon a time", "The sun was", "Tom had a red ball"]]
    full = generate(stories, prompts, 40, temperature=0, eos_id=-1)
    a, b = full[0][12], full[1][7]  # two tokens that stop rows at different steps

    def cut(row):
        ends = [row.index(t) for t in (a, b) if t in row]
        return row[:min(ends)] if ends else row
    want = [cut(f) for f in full]
    assert want[0] != full[0] and want[1] != full[1]
    for eos in ([a, b], {b, a}, (a, b)):
        assert generate(stories, prompts, 40, temperature=0, eos_id=eos) == want
    assert generate(stories, prompts, 40, temperature=0, eos_id=[a, b], compile="eager") == want
    saved = stories.config.eos_token_id, stories.config.eos_token_ids
    stories.config.eos_token_id, stories.config.eos_token_ids = a, (a, b)
    try:
        assert generate(stories, prompts, 40, temperature=0) == want
    finally:
        stories.config.eos_token_id, stories.config.eos_token_ids = saved


@pytest.mark.slow
def test_compiled_static_step_equals_eager(tiny_mistral):
    """The static-shape decode step (whole cache, tensor write position) that torch.compile
    gets; backend 'eager' traces it with dynamo without invoking a C++ compiler."""
    model, _ = tiny_mistral
    prompts = prompts_of(LENGTHS, seed=4)
    eager = generate(model, prompts, 20, temperature=0, eos_id=-1)
    assert generate(model, prompts, 20, temperature=0, eos_id=-1, compile="eager") == eager
    s1 = generate(model, prompts, 20, temperature=1.0, seed=5, eos_id=-1)
    assert generate(model, prompts, 20, temperature=1.0, seed=5, eos_id=-1, compile="eager") == s1


@pytest.mark.slow
def test_compiled_decode_keeps_one_cache_and_never_recompiles(tiny_mistral):
    """Two generate() calls of the same shape: the same cache buffers, and no new compile
    (counted by a counting torch.compile backend); a third shape is kept beside them, a
    fourth evicts the least recently used, so caches of old shapes are not kept alive."""
    from torch._dynamo.testing import CompileCounter
    from minispin.core import sampling
    model, _ = tiny_mistral
    torch._dynamo.reset()  # other tests' compiles of the step and caches must not count here
    sampling._STATIC_CACHES.pop(model, None)
    counter = CompileCounter()
    prompts = prompts_of([5, 9, 3], seed=11)
    want = generate(model, prompts, 12, temperature=0, eos_id=-1)
    assert generate(model, prompts, 12, temperature=0, eos_id=-1, compile=counter) == want
    compiles = counter.frame_count
    assert compiles >= 1
    (cache,) = sampling._STATIC_CACHES[model].values()
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    other = prompts_of([4, 8, 2], seed=12)  # same batch and cache length: the same shape
    assert generate(model, other, 12, temperature=0, eos_id=-1, compile=counter) == \
        generate(model, other, 12, temperature=0, eos_id=-1)
    assert counter.frame_count == compiles
    (again,) = sampling._STATIC_CACHES[model].values()
    assert again is cache and [t.data_ptr() for t in again.k + again.v] == buffers
    generate(model, prompts[:2], 12, temperature=0, eos_id=-1, compile=counter)
    assert len(sampling._STATIC_CACHES[model]) == 2
    generate(model, prompts[:1], 12, temperature=0, eos_id=-1, compile=counter)
    assert len(sampling._STATIC_CACHES[model]) == 2 and cache not in sampling._STATIC_CACHES[model].values()


# ------------------------------------------------------------- sampling
@pytest.mark.slow
def test_same_seed_same_output(stories):
    prompts = prompts_of([4, 9, 1], seed=5)
    a = generate(stories, prompts, 40, temperature=1.0, top_p=0.95, seed=123)
    b = generate(stories, prompts, 40, temperature=1.0, top_p=0.95, seed=123)
    c = generate(stories, prompts, 40, temperature=1.0, top_p=0.95, seed=124)
    assert a == b
    assert a != c
    torch.manual_seed(0)
    d = generate(stories, prompts, 40, temperature=1.0)
    torch.manual_seed(0)
    assert generate(stories, prompts, 40, temperature=1.0) == d  # seed=None follows torch's RNG


def test_sample_depends_on_prompt_seed_not_batch(stories):
    """Per-prompt seeds: the same prompt gets the same sample alone or in any batch."""
    prompts = prompts_of([4, 12, 1, 30, 8], seed=6)
    seeds = [row_seed(7, f"id{i}") for i in range(len(prompts))]
    batched = generate(stories, prompts, 30, temperature=1.0, seeds=seeds, batch_size=5, eos_id=-1)
    alone = [generate(stories, [p], 30, temperature=1.0, seeds=[s], eos_id=-1)[0]
             for p, s in zip(prompts, seeds)]
    assert batched == alone
    reordered = generate(stories, prompts[::-1], 30, temperature=1.0, seeds=seeds[::-1], batch_size=2,
                         eos_id=-1)
    assert reordered[::-1] == batched


def test_top_k_1_and_tiny_top_p_are_greedy(stories):
    prompts = prompts_of([5, 9], seed=8)
    greedy = generate(stories, prompts, 20, temperature=0, eos_id=-1)
    assert generate(stories, prompts, 20, temperature=1.3, top_k=1, seed=1, eos_id=-1) == greedy
    assert generate(stories, prompts, 20, temperature=1.3, top_p=1e-6, seed=1, eos_id=-1) == greedy


def oracle_probs(logits, temperature, top_k, top_p):
    """softmax(logits / T) after top-k then top-p, by transformers' own logits warpers."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    x = logits[None].clone()
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.softmax(x, -1)[0].double()


def pooled_z(counts, p, n):
    """|observed - expected| / binomial sd per bin: tokens with n·p >= 5 each, the rest of the
    kept tokens pooled into one bin (rare tokens alone would make the normal approximation
    meaningless)."""
    big = n * p >= 5
    rest = (~big) & (p > 0)
    obs = torch.cat([counts[big], counts[rest].sum()[None]])
    prob = torch.cat([p[big], p[rest].sum()[None]])
    sd = torch.sqrt(n * prob * (1 - prob)).clamp_min(1e-9)
    return (obs - n * prob).abs() / sd


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 1.0), (1.5, 0, 0.8),
                                                      (1.0, 20, 0.9)])
@pytest.mark.slow
def test_first_token_distribution_matches_softmax(stories, temperature, top_k, top_p):
    """N = 8,000 first tokens after "<s> The", seed 0, against softmax(logits / T) filtered by
    transformers' top-k/top-p warpers. Tolerance: every bin (a token with N·p >= 5, or all
    rarer kept tokens pooled) within 5 binomial standard deviations; tokens the filters
    remove (p = 0) never drawn; total variation distance < 0.05. Sampling at a temperature
    10% off, or without a filter, misses by more than 10 standard deviations."""
    tok = load_tokenizer(STORIES)
    prompt = tok.encode("The", bos=True)
    with torch.no_grad():
        logits = stories(torch.tensor([prompt]))[0, -1]
    p = oracle_probs(logits, temperature, top_k, top_p)
    assert (p > 0.01).sum() >= 8, "want a distribution with several likely tokens"
    N = 8000
    out = generate(stories, [prompt] * N, 1, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=0, eos_id=-1, batch_size=N)
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=p.numel()).double()
    assert pooled_z(counts, p, N).max() <= 5
    assert counts[p == 0].sum() == 0
    assert 0.5 * (counts / N - p).abs().sum() < 0.05
    # the tolerance is tight enough to see a 10% temperature error
    wrong = oracle_probs(logits, temperature * 1.1, top_k, top_p)
    assert pooled_z(counts, wrong, N).max() > 5


def test_sample_next_unit():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, ids = filtered_probs(logits, 1.0, top_k=2)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(probs, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))
    # the inverse CDF: u below p(top) -> token 0, above -> token 1, u -> 1 never leaves the set
    p0 = float(probs[0, 0])
    for u, want in ((0.0, 0), (p0 - 1e-6, 0), (p0 + 1e-6, 1), (1 - 1e-16, 1)):
        assert int(sample_next(logits, torch.tensor([u]), 1.0, 2)) == want
    # top_p 0.5: token 0 alone has p > 0.5, so it is the only one kept
    probs, ids = filtered_probs(logits, 1.0, top_p=0.5)
    assert probs[0, 1:].sum() == 0 and ids[0, 0] == 0
    assert math.isclose(row_seed(1, "a"), row_seed(1, "a")) and row_seed(1, "a") != row_seed(2, "a")
