"""noise.py: ref-logit noise, NEFTune, adaptive plan (CPU, seconds)."""
import math

import pytest
import torch

from minispin.config import ModelArgs
from minispin.model import build_model
from minispin.noise import (NoiseConfig, add_neftune, add_ref_logit_noise, adaptive_plan,
                            noised_sequence_logps, pair_generator, parse_noise_spec,
                            row_generators, sequence_logps, side_names, side_sigmas)


def _batch(B=4, T=40, V=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, 5 + b: T - 3 * b] = 1  # different answer spans, padding at the end
    return logits, labels, mask


# ---------------------------------------------------------------- ref-logit noise
def test_sigma_zero_rows_bit_identical():
    logits, labels, mask = _batch()
    clean = sequence_logps(logits, labels, mask)
    sigma = torch.tensor([0.0, 0.5, 0.0, 2.0])
    noisy = noised_sequence_logps(logits, labels, mask, sigma, torch.Generator().manual_seed(1))
    assert torch.equal(noisy[0], clean[0]) and torch.equal(noisy[2], clean[2])
    assert not torch.equal(noisy[1], clean[1]) and not torch.equal(noisy[3], clean[3])
    # all zero: the very same tensor comes back, the log-probs are bit-identical
    assert add_ref_logit_noise(logits, mask, 0.0) is logits
    assert torch.equal(noised_sequence_logps(logits, labels, mask, torch.zeros(4)), clean)
    assert logits.dtype == torch.float32 and torch.equal(logits, _batch()[0])  # input untouched


def test_noise_statistics_match_sigma_and_stay_in_answer():
    B, T, V = 3, 60, 128
    logits = torch.randn(B, T, V)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, 10:50] = 1
    sigma = torch.tensor([0.0, 0.5, 2.0])
    out = add_ref_logit_noise(logits, mask, sigma, torch.Generator().manual_seed(0))
    diff = out - logits
    assert torch.equal(diff[:, :10], torch.zeros_like(diff[:, :10]))   # prompt positions
    assert torch.equal(diff[:, 50:], torch.zeros_like(diff[:, 50:]))   # padding
    assert torch.equal(diff[0], torch.zeros_like(diff[0]))              # σ = 0 row
    for b in (1, 2):
        d = diff[b, 10:50].flatten().double()
        n = d.numel()  # 5120 draws: std of the std estimate ≈ σ/√(2n) ≈ 1%
        assert abs(d.mean()) < 4 * sigma[b] / math.sqrt(n)
        assert abs(d.std() / sigma[b] - 1) < 0.05
        # Gaussian, not uniform: about 4.6% of draws beyond 2σ
        assert 0.03 < (d.abs() > 2 * sigma[b]).double().mean() < 0.065


def test_frozen_draw_independent_of_batch_and_padding():
    logits, labels, mask = _batch(B=3, T=40)
    ids = ["a", "b", "c"]
    sides = ["real", "generated", "real"]
    full = noised_sequence_logps(logits, labels, mask, 0.5, row_generators(ids, sides, seed=7))
    # row 1 alone, with 5 extra padding positions: same noise, same log-prob
    pad = 5
    l1 = torch.cat([logits[1:2], torch.randn(1, pad, logits.shape[-1])], 1)
    lab1 = torch.cat([labels[1:2], torch.zeros(1, pad, dtype=torch.long)], 1)
    m1 = torch.cat([mask[1:2], torch.zeros(1, pad, dtype=torch.long)], 1)
    alone = noised_sequence_logps(l1, lab1, m1, 0.5, [pair_generator(7, "b", "generated")])
    assert torch.allclose(alone[0], full[1], atol=1e-5, rtol=0)
    # frozen: the same every time; fresh (per epoch): differs between epochs
    again = noised_sequence_logps(logits, labels, mask, 0.5, row_generators(ids, sides, seed=7))
    assert torch.equal(again, full)
    e0 = noised_sequence_logps(logits, labels, mask, 0.5, row_generators(ids, sides, 7, epoch=0))
    e1 = noised_sequence_logps(logits, labels, mask, 0.5, row_generators(ids, sides, 7, epoch=1))
    assert not torch.equal(e0, e1) and not torch.equal(e0, full)


def test_noise_lowers_reference_confidence_on_average():
    # E[log softmax(z + ε)[y]] < log softmax(z)[y] for a confident y (Jensen): the noised
    # reference is less sure, the direction the study wanted
    V = 32
    logits = torch.zeros(200, 1, V)
    logits[:, 0, 0] = 6.0
    labels = torch.zeros(200, 1, dtype=torch.long)
    mask = torch.ones(200, 1)
    clean = sequence_logps(logits, labels, mask)
    noisy = noised_sequence_logps(logits, labels, mask, 1.0, torch.Generator().manual_seed(0))
    assert noisy.mean() < clean.mean()


def test_side_sigmas_follow_origin_through_swap():
    pairs = [{"id": "1", "swap": False, "noise": 0.3}, {"id": "2", "swap": True, "noise": 0.0},
             {"id": "3", "swap": True, "noise": 0.7}]
    ch, rj = side_sigmas(pairs, NoiseConfig(ref_sigma=0.5, side="real"))
    assert ch.tolist() == [0.5, 0.0, 0.0] and rj.tolist() == [0.0, 0.5, 0.5]
    ch, rj = side_sigmas(pairs, NoiseConfig(ref_sigma=0.5, side="both"))
    assert ch.tolist() == [0.5] * 3 and rj.tolist() == [0.5] * 3
    ch, rj = side_sigmas(pairs, NoiseConfig(side="real", adaptive=True))
    assert torch.allclose(ch, torch.tensor([0.3, 0.0, 0.0])) and torch.allclose(rj, torch.tensor([0.0, 0.0, 0.7]))
    assert side_names(pairs) == (["real", "generated", "generated"], ["generated", "real", "real"])
    ch, rj = side_sigmas(pairs, NoiseConfig())  # off by default
    assert ch.tolist() == [0.0] * 3 and rj.tolist() == [0.0] * 3


def test_parse_noise_spec():
    assert not NoiseConfig().active
    c = parse_noise_spec("ref-logit=0.5,side=both,mode=fresh,neftune=5,seed=3")
    assert (c.ref_sigma, c.side, c.mode, c.neftune_alpha, c.seed) == (0.5, "both", "fresh", 5.0, 3)
    assert parse_noise_spec("") == NoiseConfig()
    for bad in ("ref-logit", "side=left", "colour=1", "ref-logit=-1"):
        with pytest.raises(ValueError):
            parse_noise_spec(bad)


# ---------------------------------------------------------------- NEFTune
def _tiny_model():
    args = ModelArgs(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
    m = build_model(args, device="cpu")
    m.init_weights(generator=torch.Generator().manual_seed(0))
    return m


def _embed_capture(model):
    seen = []
    h = model.model.embed_tokens.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    return seen, h


def test_neftune_within_bounds_train_only():
    model = _tiny_model()
    ids = torch.randint(0, 128, (4, 50), generator=torch.Generator().manual_seed(1))
    clean_emb = model.model.embed_tokens.weight[ids].detach()
    model.eval()
    with torch.no_grad():
        ref_logits = model(ids)
    alpha = 5.0
    handle = add_neftune(model, alpha, generator=torch.Generator().manual_seed(0))
    seen, cap = _embed_capture(model)  # registered after NEFTune: sees the noised output
    L, d = 50, 32
    bound = alpha / math.sqrt(L * d)

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
    with handle.paused():
        model(ids)
    assert torch.equal(seen[-1], clean_emb)

    # per-row α: a row with α = 0 is untouched, the others within their own bound
    handle.alpha = torch.tensor([0.0, 5.0, 0.0, 1.0])
    model(ids)
    noise = seen[-1] - clean_emb
    assert torch.equal(noise[0], torch.zeros_like(noise[0])) and torch.equal(noise[2], torch.zeros_like(noise[2]))
    assert 0 < noise[1].abs().max() <= bound * (1 + 1e-5)
    assert 0 < noise[3].abs().max() <= bound / 5 * (1 + 1e-5)

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


# ---------------------------------------------------------------- adaptive plan
def test_adaptive_plan_only_small_margins_get_noise():
    pairs = [
        {"id": "big+", "scores": {"real": 40, "generated": 60}, "margin": 20},
        {"id": "at", "scores": {"real": 50, "generated": 55}, "margin": 5},
        {"id": "below", "scores": {"real": 50, "generated": 54}, "margin": 4},
        {"id": "zero", "scores": {"real": 50, "generated": 50}, "margin": 0},
        {"id": "neg-small", "scores": {"real": 54, "generated": 50}, "margin": -4},
        {"id": "neg-at", "scores": {"real": 55, "generated": 50}},  # margin from scores: -5
        {"id": "big-", "scores": {"real": 90, "generated": 10}, "margin": -80},
        {"id": "unparsable", "scores": {"real": None, "generated": 70}, "margin": None, "swap": True},
    ]
    out, s = adaptive_plan(pairs, threshold=5, sigma=0.5)
    got = {p["id"]: (p["swap"], p["noise"]) for p in out}
    assert got == {"big+": (True, 0.0), "at": (True, 0.0), "below": (False, 0.5), "zero": (False, 0.5),
                   "neg-small": (False, 0.5), "neg-at": (False, 0.0), "big-": (False, 0.0),
                   "unparsable": (False, 0.5)}
    assert s == {"pairs": 8, "threshold": 5, "sigma": 0.5, "decided": 4, "swapped": 2, "kept": 2,
                 "noised": 4, "unscored": 1}
    assert "noise" not in pairs[0] and pairs[7]["swap"] is True  # pure: inputs untouched
    # threshold 0: the judge decides everything scored (margin 0 swaps)
    out0, s0 = adaptive_plan(pairs, threshold=0, sigma=0.5)
    assert [p["noise"] for p in out0] == [0.0] * 7 + [0.5]
    assert {p["id"] for p in out0 if p["swap"]} == {"big+", "at", "below", "zero"}


def test_adaptive_noise_reaches_only_small_margin_rows():
    """End to end on the log-prob level: the plan's σ changes only small-margin pairs'
    reference log-probs (what the trainer's loss sees)."""
    judged = [{"id": str(i), "margin": m} for i, m in enumerate([30, 2, -1, -12])]
    plan, _ = adaptive_plan(judged, threshold=5, sigma=0.5)
    cfg = NoiseConfig(adaptive=True, side="both")
    s_ch, s_rj = side_sigmas(plan, cfg)
    ch_sides, rj_sides = side_names(plan)
    logits, labels, mask = _batch(B=4)
    clean = sequence_logps(logits, labels, mask)
    ids = [p["id"] for p in plan]
    noisy_ch = noised_sequence_logps(logits, labels, mask, s_ch, row_generators(ids, ch_sides))
    noisy_rj = noised_sequence_logps(logits, labels, mask, s_rj, row_generators(ids, rj_sides))
    changed = [not torch.equal(noisy_ch[i], clean[i]) or not torch.equal(noisy_rj[i], clean[i]) for i in range(4)]
    assert changed == [False, True, True, False]


def test_apply_fixes_modes():
    from minispin.noise import apply_fixes
    judged = [{"id": "a", "scores": {"real": 10, "generated": 40}, "margin": 30, "swap": True},
              {"id": "b", "scores": {"real": 50, "generated": 52}, "margin": 2, "swap": False},
              {"id": "c", "scores": {"real": None, "generated": 52}, "margin": None, "swap": False},
              {"id": "d", "scores": {"real": 50, "generated": 45}, "margin": -5, "swap": False, "noise": 0.9}]
    sw = lambda ps: [p["swap"] for p in ps]
    nz = lambda ps: [p["noise"] for p in ps]
    plain, s = apply_fixes(judged)
    assert sw(plain) == [False] * 4 and nz(plain) == [0.0] * 4 and s["mode"] == "plain"
    rel, s = apply_fixes(judged, relabel=True, threshold=5)
    assert sw(rel) == [True, False, False, False] and nz(rel) == [0.0] * 4 and s["swapped"] == 1
    rel0, _ = apply_fixes(judged, relabel=True, threshold=0)
    assert sw(rel0) == [True, True, False, False]
    noi, s = apply_fixes(judged, ref_sigma=0.5)
    assert sw(noi) == [False] * 4 and nz(noi) == [0.5] * 4 and s["mode"] == "noise"
    both, s = apply_fixes(judged, relabel=True, ref_sigma=0.5)
    assert sw(both) == [True, False, False, False] and nz(both) == [0.5] * 4 and s["mode"] == "relabel+noise"
    ada, s = apply_fixes(judged, adaptive=True, threshold=5, adaptive_sigma=0.25)
    assert sw(ada) == [True, False, False, False] and nz(ada) == [0.0, 0.25, 0.25, 0.0]
    assert s["mode"] == "adaptive" and s["noised"] == 2
    unjudged = [{"id": "x", "real": "r", "generated": "g"}]
    assert apply_fixes(unjudged)[0][0]["swap"] is False
    with pytest.raises(ValueError, match="judge.py"):
        apply_fixes(unjudged, relabel=True)
    with pytest.raises(ValueError):
        apply_fixes(judged, adaptive=True, ref_sigma=0.5)


def test_same_draws_as_the_trainers_loss():
    """loss.sequence_logps(noise_std=...) promises the draws of add_ref_logit_noise: the two
    must agree on the noised reference log-probs (so either can precompute for the other)."""
    loss = pytest.importorskip("minispin.loss")
    logits, ids, mask = _batch(B=4, T=30, V=64, seed=3)
    sigma = torch.tensor([0.5, 0.0, 1.0, 0.5])
    keys, sides = ["k0", "k1", "k2", "k3"], ["real", "real", "generated", "generated"]
    theirs = loss.sequence_logps(logits, ids, mask, noise_std=sigma, generator=row_generators(keys, sides, 5))
    ours = noised_sequence_logps(logits[:, :-1], ids[:, 1:], mask[:, 1:], sigma, row_generators(keys, sides, 5))
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)
    clean = loss.sequence_logps(logits, ids, mask)
    assert torch.equal(theirs[1], clean[1])
    assert not torch.allclose(theirs[0], clean[0])
