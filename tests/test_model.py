"""Our forward pass against transformers' (the oracle) on tiny random and real models."""
import pytest
import torch

from helpers import STORIES, make_hf_model
from minispin import KVCache, load_model, load_tokenizer

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
    import minispin.model as M
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
