"""noise.py: the reference-logit noise training applies (noised_sequence_logps, a wrapper of
loss.sequence_logps), and NEFTune. CPU, seconds."""
import math

import pytest
import torch
import torch.nn.functional as F

from minispin.core.model import ModelArgs
from minispin.core.noise import noised_sequence_logps
from minispin.core.loss import sequence_logps
from minispin.core.model import build_model
from minispin.core.noise import add_neftune, answer_generator, reference_noise
from minispin.run.recipe import RecipeError, parse_noise


def _batch(B=4, T=40, V=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, 5 + b: T - 3 * b] = 1  # different answer spans, padding at the end
    return logits, ids, mask


def _restated(logits, ids, mask, sigma, gens):
    """The noised reference log-prob, written out independently of loss.py: row b's answer
    positions (predicting ids[t+1] from logits[t]) get σ_b·N(0, 1) from its own generator,
    one (n_b, V) draw, before an fp32 log-softmax."""
    out = []
    for b in range(logits.shape[0]):
        pos = mask[b, 1:].bool().nonzero().flatten()
        x = logits[b, pos].float()
        if sigma[b] > 0:
            x = x + torch.randn(x.shape, generator=gens[b]) * float(sigma[b])
        out.append(F.log_softmax(x, -1).gather(1, ids[b, pos + 1][:, None]).sum())
    return torch.stack(out)


# ---------------------------------------------------------------- reference-logit noise
def test_noised_logps_equal_an_independent_restatement_and_sigma_zero_is_clean():
    logits, ids, mask = _batch()
    keys = ["a", "b", "c", "d"]
    sigma = torch.tensor([0.0, 0.5, 0.0, 2.0])
    gens = lambda: [answer_generator(7, k, "real") for k in keys]  # noqa: E731
    ours = noised_sequence_logps(logits, ids, mask, noise_std=sigma, generator=gens())
    torch.testing.assert_close(ours, _restated(logits, ids, mask, sigma, gens()), atol=1e-4, rtol=0)
    clean = sequence_logps(logits, ids, mask)
    assert torch.equal(ours[0], clean[0]) and torch.equal(ours[2], clean[2])   # bit for bit
    assert not torch.equal(ours[1], clean[1]) and not torch.equal(ours[3], clean[3])
    assert torch.equal(logits, _batch()[0])                                    # input untouched


def test_noise_variance_is_sigma_squared():
    """Zero logits over V tokens: E[log p(y)] = -log V - σ²/2 + O(1/V) per token under
    N(0, σ²) noise, so the noise's scale shows in the mean log-prob (not only its sign)."""
    V, n = 4096, 400
    logits = torch.zeros(1, n + 1, V)
    ids = torch.randint(0, V, (1, n + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, n + 1, dtype=torch.long)
    for sigma in (0.5, 1.0):
        got = noised_sequence_logps(logits, ids, mask, noise_std=torch.tensor([sigma]),
                             generator=[answer_generator(1, "k", "real")])
        want = -n * (math.log(V) + sigma ** 2 / 2)
        assert abs(float(got) - want) < 4 * sigma * math.sqrt(n), (sigma, float(got), want)


def test_frozen_draw_independent_of_batch_and_padding():
    logits, ids, mask = _batch(B=3, T=40)
    keys = ["a", "b", "c"]
    full = noised_sequence_logps(logits, ids, mask, noise_std=torch.full((3,), 0.5),
                          generator=[answer_generator(7, k, "real") for k in keys])
    pad = 5  # row 1 alone, with 5 extra padding positions: same noise, same log-prob
    l1 = torch.cat([logits[1:2], torch.randn(1, pad, logits.shape[-1])], 1)
    i1 = torch.cat([ids[1:2], torch.zeros(1, pad, dtype=torch.long)], 1)
    m1 = torch.cat([mask[1:2], torch.zeros(1, pad, dtype=torch.long)], 1)
    alone = noised_sequence_logps(l1, i1, m1, noise_std=torch.tensor([0.5]), generator=[answer_generator(7, "b", "real")])
    assert torch.allclose(alone[0], full[1], atol=1e-5, rtol=0)


def test_fresh_draws_differ_by_step_and_repeat_for_the_same_step():
    logits, ids, mask = _batch(B=2)
    sigma = torch.full((2,), 0.5)
    run = lambda draw: noised_sequence_logps(logits, ids, mask, noise_std=sigma, generator=[  # noqa: E731
        answer_generator(3, k, "real", draw) for k in ("a", "b")])
    assert torch.equal(run(4), run(4))            # a resumed run redraws step 4 exactly
    assert not torch.equal(run(4), run(5))        # the next step draws anew
    assert not torch.equal(run(None), run(0))     # frozen is its own draw


def test_reference_noise_follows_the_side_of_origin():
    sigma = torch.tensor([0.3, 0.0, 0.7])
    keys = ["x", "y", "z"]
    s, gens = reference_noise(keys, sigma, "real", seed=1)
    assert s.tolist() == pytest.approx([0.3, 0.0, 0.7, 0.0, 0.0, 0.0]) and len(gens) == 6
    s, _ = reference_noise(keys, sigma, "generated", seed=1)
    assert s.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.3, 0.0, 0.7])
    s, _ = reference_noise(keys, sigma, "both", seed=1)
    assert s.tolist() == pytest.approx([0.3, 0.0, 0.7] * 2)
    assert reference_noise(keys, torch.zeros(3), "both", seed=1) is None   # nothing drawn at all
    # the real and the generated answer of a pair draw from different generators
    _, gens = reference_noise(["x"], torch.tensor([1.0]), "both", seed=1)
    assert not torch.equal(torch.randn(5, generator=gens[0]), torch.randn(5, generator=gens[1]))


def test_noise_lowers_reference_confidence_on_average():
    # E[log softmax(z + ε)[y]] < log softmax(z)[y] for a confident y (Jensen): the noised
    # reference is less sure, the direction the study wanted
    V = 32
    logits = torch.zeros(200, 2, V)
    logits[:, 0, 0] = 6.0
    ids = torch.zeros(200, 2, dtype=torch.long)
    mask = torch.ones(200, 2)
    clean = sequence_logps(logits, ids, mask)
    noisy = noised_sequence_logps(logits, ids, mask, noise_std=torch.ones(200),
                           generator=[answer_generator(0, str(i), "real") for i in range(200)])
    assert noisy.mean() < clean.mean()


def test_parse_noise_spec():
    c = parse_noise("ref-logit=0.5,side=both,mode=fresh,neftune=5,seed=3", seed=42)
    assert (c.ref_sigma, c.side, c.mode, c.neftune_alpha, c.seed) == (0.5, "both", "fresh", 5.0, 3)
    off = parse_noise("", seed=42)
    assert not off.active and off.seed == 42
    for bad in ("ref-logit", "side=left", "colour=1", "ref-logit=-1", "ref-logit=nan", "neftune=inf",
                "ref-logit=abc", "seed=x"):
        with pytest.raises(RecipeError):
            parse_noise(bad, seed=0)


# ---------------------------------------------------------------- NEFTune
def _tiny_model():
    args = ModelArgs(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
    m = build_model(args, device="cpu")
    m.init_weights(generator=torch.Generator().manual_seed(0))
    return m


def test_neftune_within_bounds_train_only():
    model = _tiny_model()
    ids = torch.randint(0, 128, (4, 50), generator=torch.Generator().manual_seed(1))
    clean_emb = model.model.embed_tokens.weight[ids].detach()
    model.eval()
    with torch.no_grad():
        ref_logits = model(ids)
    alpha = 5.0
    handle = add_neftune(model, alpha, generator=torch.Generator().manual_seed(0))
    seen = []
    cap = model.model.embed_tokens.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    bound = alpha / math.sqrt(50 * 32)

    model.train()
    model(ids)
    noise = seen[-1] - clean_emb
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.95 * bound           # uniform fills its interval
    assert abs(noise.mean()) < 0.05 * bound
    assert abs(noise.std() / (bound / math.sqrt(3)) - 1) < 0.05   # U(-b, b) has std b/√3
    assert handle.last_bound == pytest.approx(bound)

    # eval mode (generation) and no_grad (a reference pass): no noise, bit-identical logits
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), ref_logits)
    model.train()
    with torch.no_grad():
        model(ids)
    assert torch.equal(seen[-1], clean_emb)
    handle.remove()
    model(ids)
    assert torch.equal(seen[-1], clean_emb)
    cap.remove()


def test_neftune_zero_alpha_is_plain():
    model = _tiny_model().train()
    ids = torch.randint(0, 128, (2, 20))
    plain = model(ids)
    h = add_neftune(model, 0.0)
    assert torch.equal(model(ids), plain)
    h.remove()
