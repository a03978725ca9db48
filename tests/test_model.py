"""Our forward pass against transformers' (the oracle) on tiny random and real models."""
import pytest
import torch

from helpers import STORIES, make_hf_model
from minispin import KVCache, generate, load_model, load_tokenizer

CASES = {
    "llama-mha-untied": ("llama", dict()),
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-gqa-untied-theta": ("llama", dict(num_key_value_heads=1, rope_theta=500000.0)),
    # window 20 < a third of the 80-token sequence
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=20)),
    "mistral-window-tied": ("mistral", dict(num_key_value_heads=4, sliding_window=7, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    ours = load_model(str(tmp_path))
    assert ours.config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    torch.manual_seed(1)
    x = torch.randint(0, 512, (3, 80))
    with torch.no_grad():
        got, want = ours(x), hf(x).logits
    assert got.shape == (3, 80, 512)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_window_changes_the_output(tmp_path):
    """Guards the test above: a window that mattered must change late positions."""
    make_hf_model(tmp_path, "mistral", sliding_window=8)
    m = load_model(str(tmp_path))
    x = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        windowed = m(x)
        m.config.sliding_window = None
        full = m(x)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-6)
    assert (windowed[:, 20:] - full[:, 20:]).abs().max() > 1e-3


def test_stories260k_matches_transformers_and_tells_its_story():
    from transformers import AutoModelForCausalLM
    ours = load_model(STORIES)
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    x = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    tok = load_tokenizer(STORIES)
    ids = [tok.bos_id]
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    text = tok.decode(ids)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_cached_decoding_equals_full_forward(tmp_path, model_type):
    make_hf_model(tmp_path, model_type, num_key_value_heads=2, sliding_window=12) if model_type == "mistral" \
        else make_hf_model(tmp_path, model_type, num_key_value_heads=2)
    m = load_model(str(tmp_path))
    x = torch.randint(0, 512, (2, 48))
    cache = KVCache(m.config, 2, 64, torch.float32, "cpu")
    with torch.no_grad():
        steps = [m(x[:, :20], cache=cache, cache_pos=0)]
        steps += [m(x[:, i:i + 1], cache=cache, cache_pos=i) for i in range(20, 48)]
        torch.testing.assert_close(torch.cat(steps, 1), m(x), atol=1e-5, rtol=0)


def test_bf16_runs_on_cpu_and_matches_transformers_bf16():
    from transformers import AutoModelForCausalLM
    m = load_model(STORIES, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16).eval()
    ref = load_model(STORIES)
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, fp32 = m(x), ref(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        # same bf16 arithmetic as transformers ...
        torch.testing.assert_close(out.float(), hf(x).logits.float(), atol=2e-2, rtol=0)
    # ... and within bf16's precision of the fp32 result (8 mantissa bits: ~3% of the range)
    assert (out.float() - fp32).abs().max() < 0.03 * fp32.abs().max()


def test_rope_layout_matters(tmp_path):
    """Guards the parity tests: interleaved-pair rotary (the llama2.c layout) on the same
    weights must give visibly different logits, so rotate_half is really being checked."""
    import minispin.core.model as M
    make_hf_model(tmp_path, "llama")
    m = load_model(str(tmp_path))
    x = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        good = m(x)
        original = M.rotate_half
        try:
            def interleaved(t):
                return torch.stack((-t[..., 1::2], t[..., ::2]), dim=-1).flatten(-2)
            M.rotate_half = interleaved
            bad = m(x)
        finally:
            M.rotate_half = original
    assert (good - bad).abs().max() > 1e-2


# ------------------------------------------------------------------ key mask inside rows
@pytest.fixture(scope="module")
def masked_pair(tmp_path_factory):
    """GQA Llama and windowed GQA Mistral, each with transformers' eager and sdpa copies."""
    from transformers import AutoModelForCausalLM
    out = {}
    for case, (model_type, kw) in {"llama-gqa": ("llama", dict(num_key_value_heads=2)),
                                   "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=20))}.items():
        d = tmp_path_factory.mktemp(case)
        make_hf_model(d, model_type, **kw)
        out[case] = (load_model(str(d)), {impl: AutoModelForCausalLM.from_pretrained(
            str(d), dtype=torch.float32, attn_implementation=impl).eval() for impl in ("eager", "sdpa")})
    return out


def _key_mask(B=3, T=72):
    """SPIN-like: 0 on scattered tokens (its eos inside prompt and answer), one row all 1."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, [10, 11, 40, 71]] = 0
    mask[1, [5, 30, 31, 32, 33]] = 0
    return mask


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window"])
def test_attention_mask_inside_rows_matches_transformers(masked_pair, case, impl, fold, monkeypatch):
    """attention_mask = 0 in the middle of rows: logits equal transformers' at EVERY
    position, the masked ones included (SPIN's loss reads them), with and without the GQA
    fold, positions 0..T-1 as transformers computes them."""
    import minispin.core.model as M
    monkeypatch.setattr(M, "FOLD_GQA_ON_CPU", fold)
    ours, hf = masked_pair[case]
    x = torch.randint(3, 512, (3, 72), generator=torch.Generator().manual_seed(4))
    mask = _key_mask()
    with torch.no_grad():
        got, want = ours(x, attention_mask=mask), hf[impl](x, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # guards: the hidden keys change what follows them, and all-ones is plain causal
        assert (got[:2, 45:] - ours(x)[:2, 45:]).abs().max() > 1e-2
        torch.testing.assert_close(got[2], ours(x)[2], atol=1e-5, rtol=0)


def test_query_that_sees_no_key_attends_to_itself(masked_pair):
    """A row whose first tokens are masked: those queries see no key. They stay finite
    (they attend to themselves) and change nothing else: every other position equals
    transformers (sdpa), whose own answer there differs between eager and sdpa."""
    ours, hf = masked_pair["llama-gqa"]
    x = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :2] = 0
    mask[0, 20] = 0
    with torch.no_grad():
        got, want = ours(x, attention_mask=mask), hf["sdpa"](x, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 2:], want[0, 2:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
    with torch.no_grad():
        # attending to itself alone, a query gets its own value whatever its position: the
        # same as its token run on its own
        alone = torch.cat([ours(x[:1, :1])[0], ours(x[:1, 1:2])[0]])
        torch.testing.assert_close(got[0, :2], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_gqa_fold_equals_the_gqa_flag(tmp_path, model_type, monkeypatch):
    """The fold that GPUs take (query heads folded into the query axis, no enable_gqa),
    forced on CPU: padded prefill bit for bit, cached decode steps within 1e-5 (a 2-row
    matmul rounds differently from a 1-row one), and the same greedy tokens."""
    import minispin.core.model as M
    make_hf_model(tmp_path, model_type, num_key_value_heads=1,
                  **(dict(sliding_window=12) if model_type == "mistral" else {}))
    m = load_model(str(tmp_path))
    x = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[0, :7] = 0  # padding-like
    mask[1, 20] = 0

    def run():
        with torch.no_grad():
            padded = m(x, attention_mask=mask)
            cache = KVCache(m.config, 2, 64, torch.float32, "cpu")
            steps = [m(x[:, :20], cache=cache, cache_pos=0)]
            steps += [m(x[:, i:i + 1], cache=cache, cache_pos=i) for i in range(20, 48)]
        return padded, torch.cat(steps, 1), generate(m, [x[0, :9].tolist(), x[1].tolist()], 16, temperature=0, eos_id=-1)

    flag = run()
    monkeypatch.setattr(M, "FOLD_GQA_ON_CPU", True)
    fold = run()
    assert torch.equal(flag[0], fold[0])
    torch.testing.assert_close(flag[1], fold[1], atol=1e-5, rtol=0)
    assert flag[2] == fold[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the GPU's SDPA kernels")
def test_masked_gqa_attention_reaches_the_fused_kernel_on_gpu(tmp_path):
    """With only the memory-efficient kernel allowed, SDPA raises unless every masked call
    (padded prefill, key mask, cached decode steps) can use it: the GQA fold's purpose.
    (An explicit mask with enable_gqa has no fused kernel on most torch releases.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    make_hf_model(tmp_path, "mistral", num_key_value_heads=2, sliding_window=20)
    m = load_model(str(tmp_path), dtype=torch.bfloat16, device="cuda")
    x = torch.randint(3, 512, (3, 72), generator=torch.Generator().manual_seed(4)).cuda()
    prompts = [x[0, :9].tolist(), x[1].tolist(), x[2, :30].tolist()]
    with torch.no_grad():
        ref = m(x, attention_mask=_key_mask().cuda())
        eager_tokens = generate(m, prompts, 16, temperature=0, eos_id=-1)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            fused = m(x, attention_mask=_key_mask().cuda())
            assert generate(m, prompts, 16, temperature=0, eos_id=-1) == eager_tokens
    torch.testing.assert_close(fused.float(), ref.float(), atol=0, rtol=0)


@pytest.mark.slow
def test_compiled_block_forward_backward_equals_eager():
    """compile_train's unit (distributed.compile_blocks: each Block through torch.compile's
    inductor, in place) against the eager model it was copied from: the same logits and the
    same gradient of every weight, and the same state-dict keys (checkpoints and the HF
    loader see no compile wrapper)."""
    import copy
    from minispin.core.model import ModelArgs
    from minispin.core.fsdp import compile_blocks
    from minispin.core.model import Transformer
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=512,
                     intermediate_size=128)
    eager = Transformer(args)
    eager.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    compiled = compile_blocks(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    up = torch.randn(2, 24, 512, generator=torch.Generator().manual_seed(2))
    for model in (eager, compiled):
        (model(ids) * up).sum().backward()
    torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-5, atol=1e-5)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():  # fp32 sums in another order: ~1e-6 of the scale
        scale = float(p.grad.abs().max())
        assert float((grads[name].grad - p.grad).abs().max()) <= 1e-5 * scale, name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
