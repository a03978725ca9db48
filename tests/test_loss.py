"""loss.py against values computed by hand (float64 loops, math module)."""
import math

import pytest
import torch
import torch.nn.functional as F

from minispin.run.rows import collate_pairs, truncate_pair, TokenizedPair
from minispin.core.noise import noised_sequence_logps
from minispin.core.loss import LN2, sequence_logps, sft_step, spin_loss


def _hand_logps(logits, ids, mask):
    """Σ over masked t of log softmax(logits[t-1])[ids[t]], in float64 with explicit loops."""
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                row = [float(v) for v in logits[b, t - 1]]
                m = max(row)
                lse = m + math.log(sum(math.exp(v - m) for v in row))
                total += row[int(ids[b, t])] - lse
        out.append(total)
    return out


def _batch(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 2:5] = 1   # padding after position 4
    mask[2, 6:] = 1    # a one-token answer
    if B > 3:
        mask[3:, 1:] = 1
    return logits, ids, mask


def test_sequence_logps_matches_hand_computation():
    logits, ids, mask = _batch()
    got = sequence_logps(logits, ids, mask)
    want = _hand_logps(logits, ids, mask)
    assert got.dtype == torch.float32
    for g, w in zip(got.tolist(), want):
        assert g == pytest.approx(w, abs=1e-4)


def test_sequence_logps_is_fp32_for_bf16_logits():
    logits, ids, mask = _batch(1)
    got = sequence_logps(logits.bfloat16(), ids, mask)
    want = _hand_logps(logits.bfloat16().float(), ids, mask)
    assert got.dtype == torch.float32
    for g, w in zip(got.tolist(), want):
        assert g == pytest.approx(w, abs=1e-4)


def test_sequence_logps_gradient_matches_log_softmax():
    logits, ids, mask = _batch(2)
    a = logits.clone().double().requires_grad_()
    sequence_logps(a, ids, mask).sum().backward()
    b = logits.clone().double().requires_grad_()
    lp = torch.log_softmax(b[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (lp * mask[:, 1:]).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def _hand_losses(pr, pg, rr, rg, beta, eps):
    d = (pr - rr) - (pg - rg)
    z = beta * d
    ls = lambda x: -math.log1p(math.exp(-x))  # log σ(x)
    return {
        "sigmoid": -(1 - eps) * ls(z) - eps * ls(-z),
        "hinge": max(0.0, 1 - z),
        "ipo": (d - 1 / (2 * beta)) ** 2,
        "ipo_sum": (d - 1 / (2 * beta)) ** 2,
        "robust": (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps),
    }


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "ipo_sum", "robust"])
def test_each_loss_type_matches_hand_values(loss_type):
    # (policy real, policy generated, reference real, reference generated)
    rows = [(-10.0, -12.0, -11.0, -11.5),   # Δ = 1.5
            (-20.0, -5.0, -19.0, -7.0),     # Δ = -3
            (-3.0, -40.0, -30.0, -41.0),    # Δ = 26: hinge saturates at 0
            (-7.0, -7.0, -7.0, -7.0)]       # Δ = 0
    t = [torch.tensor(c, dtype=torch.float32) for c in zip(*rows)]
    for beta, eps in [(0.1, 0.0), (0.5, 0.2)]:
        losses, stats = spin_loss(*t, beta=beta, loss_type=loss_type, label_smoothing=eps)
        for i, r in enumerate(rows):
            assert float(losses[i]) == pytest.approx(_hand_losses(*r, beta, eps)[loss_type], rel=1e-5, abs=1e-6)
    # hand values written out for SPIN's own setting (β = 0.1, Δ = 1.5 -> βΔ = 0.15)
    first = spin_loss(*(x[:1] for x in t), beta=0.1, loss_type=loss_type)[0].item()
    want = {"sigmoid": math.log(1 + math.exp(-0.15)), "hinge": 0.85, "ipo": (1.5 - 5.0) ** 2,
            "ipo_sum": (1.5 - 5.0) ** 2,
            "robust": math.log(1 + math.exp(-0.15))}[loss_type]
    assert first == pytest.approx(want, rel=1e-6)


def test_step_zero_loss_is_ln2():
    """Policy == reference: Δ = 0 exactly, so -log σ(0) = ln 2, bit for bit, from real logits."""
    logits, ids, mask = _batch(3, B=4)
    lp = sequence_logps(logits, ids, mask)
    ref = sequence_logps(logits.clone(), ids, mask)
    losses, stats = spin_loss(lp[:2], lp[2:], ref[:2], ref[2:], beta=0.1)
    assert torch.equal(losses, torch.full((2,), LN2, dtype=torch.float32))
    assert abs(float(losses.mean()) - 0.693147) < 1e-6
    assert float(stats["rewards/accuracies"].sum()) == 0 and float(stats["rewards/margins"].abs().sum()) == 0


def test_metrics_and_swap():
    pr, pg = torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0])
    rr, rg = torch.tensor([-11.0, -11.0]), torch.tensor([-11.5, -11.5])
    swap = torch.tensor([False, True])
    losses, st = spin_loss(pr, pg, rr, rg, beta=0.1, swap=swap)
    assert st["rewards/real"].tolist() == pytest.approx([0.1, 0.1])          # β(-10 - -11)
    assert st["rewards/generated"].tolist() == pytest.approx([-0.05, -0.05])  # β(-12 - -11.5)
    assert st["rewards/margins"].tolist() == pytest.approx([0.15, -0.15])     # chosen - rejected
    assert st["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert st["logps/real"].tolist() == [-10.0, -10.0] and st["logps/generated"].tolist() == [-12.0, -12.0]
    # TRL's names go by label: pair 1 was swapped, so its chosen side is the generated answer
    assert st["rewards/chosen"].tolist() == pytest.approx([0.1, -0.05])
    assert st["rewards/rejected"].tolist() == pytest.approx([-0.05, 0.1])
    assert st["logps/chosen"].tolist() == [-10.0, -12.0] and st["logps/rejected"].tolist() == [-12.0, -10.0]
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))])
    # a swapped pair is the unswapped pair with real and generated exchanged
    l2, _ = spin_loss(pg[1:], pr[1:], rg[1:], rr[1:], beta=0.1)
    assert float(losses[1]) == pytest.approx(float(l2[0]))


def test_bad_loss_settings():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        spin_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_noise_off_is_bit_identical_and_per_row():
    logits, ids, mask = _batch(4, B=4)
    clean = sequence_logps(logits, ids, mask)
    zero = noised_sequence_logps(logits, ids, mask, noise_std=torch.zeros(4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clean, zero)
    sigma = torch.tensor([0.0, 0.5, 0.0, 2.0])
    noisy = noised_sequence_logps(logits, ids, mask, noise_std=sigma, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[0], clean[0]) and torch.equal(noisy[2], clean[2])
    assert noisy[1] != clean[1] and noisy[3] != clean[3]
    # the same draws by hand: row 1 then row 3, each an (n_answer, V) block, in order
    g = torch.Generator().manual_seed(0)
    x = logits.clone().double()
    for b in (1, 3):
        pos = mask[b, 1:].nonzero().flatten()
        x[b, pos] += torch.randn((len(pos), logits.shape[2]), generator=g).double() * float(sigma[b])
    want = _hand_logps(x, ids, mask)
    assert noisy.tolist() == pytest.approx(want, abs=1e-4)
    # per-row generators: a row's draw does not depend on the other rows
    gens = [torch.Generator().manual_seed(100 + b) for b in range(4)]
    a = noised_sequence_logps(logits, ids, mask, noise_std=sigma, generator=gens)
    gens2 = [torch.Generator().manual_seed(100 + b) for b in range(4)]
    only3 = noised_sequence_logps(logits, ids, mask, noise_std=torch.tensor([0, 0, 0, 2.0]), generator=gens2)
    assert torch.equal(a[3], only3[3])


def test_sft_step_is_cross_entropy_on_answer_tokens():
    logits, ids, mask = _batch(5)
    policy = lambda x, logits_at, logits_dtype: logits[logits_at]  # noqa: E731  (fixed logits)
    nll, stats = sft_step(policy, {"input_ids": ids, "loss_mask": mask})
    n = stats["tokens"]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=-100, reduction="sum")
    assert n == int(mask[:, 1:].sum())
    assert float(nll) == pytest.approx(float(ce), rel=1e-5)


def test_truncation_rule():
    bos = 1
    prompt = [bos] + list(range(10, 30))           # 21 tokens
    real, gen = list(range(100, 140)), list(range(200, 210))
    # fits: nothing changes
    assert truncate_pair(prompt, gen, gen, 64, 32, bos)[3] == (False, False, False)
    # too long: the prompt keeps <s> and its END, then answers are cut to the room left
    p, r, g, cut = truncate_pair(prompt, real, gen, 40, 8, bos)
    assert p == [bos] + list(range(23, 30)) and len(p) == 8
    assert r == list(range(100, 132)) and len(p) + len(r) == 40
    assert g == gen and cut == (True, True, False)
    # a long answer alone cuts a short prompt? no: the prompt is only shortened if it is
    # longer than max_prompt_length
    p, r, g, cut = truncate_pair(prompt[:5], real, gen, 30, 8, bos)
    assert p == prompt[:5] and len(r) == 25 and cut == (False, True, False)
    with pytest.raises(ValueError):
        truncate_pair(prompt, real, gen, 32, 32, bos)


def test_collate_pairs_layout():
    items = [TokenizedPair("s/a", [1, 5, 6], [7, 2], [8, 9, 9, 2], swap=True, noise=0.5),
             TokenizedPair("s/b", [1, 5], [7, 7, 7, 2], [2])]
    b = collate_pairs(items, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0, 0], [1, 5, 7, 7, 7, 2, 0],
                                       [1, 5, 6, 8, 9, 9, 2], [1, 5, 2, 0, 0, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0],
                                       [0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0]]
    assert b["swap"].tolist() == [True, False] and b["noise"].tolist() == [0.5, 0.0]
    assert b["keys"] == ["s/a", "s/b"]


def test_spin_step_ipo_averages_log_probs_per_answer_token_as_trl():
    """TRL's IPO divides each sequence log-prob (policy and reference) by its answer's token
    count before Δ; ipo_sum keeps the sums. Checked by hand on fixed logits."""
    from minispin.core.loss import spin_step
    logits, ids, mask = _batch(7, B=4)
    policy = lambda x, logits_at, logits_dtype: logits[logits_at]  # noqa: E731  (fixed logits)
    ref = torch.tensor([-30.0, -20.0, -25.0, -40.0])
    batch = {"input_ids": ids, "loss_mask": mask}
    lp = sequence_logps(logits, ids, mask)
    n = mask[:, 1:].sum(1).double()
    beta = 0.1
    # floats, not 0-d tensors: pytest >= 9 iterates a tensor handed to approx and fails on 0-d
    for loss_type, scale in (("ipo", n.tolist()), ("ipo_sum", [1.0] * 4)):
        losses, _ = spin_step(policy, batch, ref, beta=beta, loss_type=loss_type)
        for i in range(2):
            d = (float(lp[i]) / scale[i] - float(ref[i]) / scale[i]) - \
                (float(lp[2 + i]) / scale[2 + i] - float(ref[2 + i]) / scale[2 + i])
            assert float(losses[i]) == pytest.approx((d - 1 / (2 * beta)) ** 2, rel=1e-5)


def test_answer_logps_fp32_logits_under_bf16_weights():
    """lm_head on the answer positions only, in fp32: under bf16 weights the log-probs are
    those of the bf16 hidden states with unrounded logits (float64 hand computation);
    bf16 logits (uclaml/SPIN's, fp32_logits=False) are measurably further off. In fp32
    the answer-only path equals the full-logits path."""
    from helpers import TINY
    from minispin.core.model import ModelArgs
    from minispin.core.loss import answer_logps
    from minispin.core.model import Transformer
    torch.manual_seed(0)
    args = ModelArgs(dim=TINY["hidden_size"], n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=512, intermediate_size=TINY["intermediate_size"])
    model = Transformer(args).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)        # logits of a trained model's size (tens)
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 40, dtype=torch.long)
    mask[0, 10:] = 1
    mask[1, 25:35] = 1
    mask[2, 39:] = 1
    with torch.no_grad():
        torch.testing.assert_close(answer_logps(model, ids, mask), sequence_logps(model(ids), ids, mask),
                                   rtol=1e-5, atol=1e-4)
        model = model.to(torch.bfloat16)
        hidden = model(ids, return_hidden=True).double()
        exact = torch.tensor(_hand_logps(hidden @ model.lm_head.weight.double().T, ids, mask))
        fp32 = answer_logps(model, ids, mask).double()
        bf16 = answer_logps(model, ids, mask, fp32_logits=False).double()
    assert fp32.dtype == torch.float64 and (fp32 - exact).abs().max() < 1e-3
    assert (bf16 - exact).abs().max() > 10 * (fp32 - exact).abs().max()


def test_wide_logits_gradients_equal_autograd():
    """model.WideLogits (bf16 in, fp32 logits out, bf16 saved) against plain autograd of
    F.linear(h.float(), W.float()), in forward and in both gradients."""
    from minispin.core.model import WideLogits
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    up = torch.randn(2, 5, 40, generator=g)
    out = WideLogits.apply(h, w, torch.float32)
    assert out.dtype == torch.float32
    (out * up).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.linear(h2.float(), w2.float())
    (ref * up).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torch.mm's out_dtype path")
def test_wide_logits_on_cuda_is_a_bf16_gemm_with_fp32_output():
    """On CUDA, WideLogits' forward is one bf16 GEMM that writes fp32 (model._wide_mm): the
    logits equal the float64 products of the bf16 operands up to fp32 sums, and the call
    allocates its output and no fp32 copy of the head (V x D) beside it."""
    from minispin.core.model import WideLogits
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(64, 256, device="cuda", generator=g).bfloat16()
    w = torch.randn(32000, 256, device="cuda", generator=g).bfloat16()
    exact = h.double() @ w.double().T
    WideLogits.apply(h, w, torch.float32)  # warm-up: cuBLAS's workspace is allocated once
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = WideLogits.apply(h, w, torch.float32)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert out.dtype == torch.float32 and out.shape == (64, 32000)
    assert float((out.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    assert extra < out.numel() * 4 + w.numel() * 2, extra  # the old path added w.numel() * 4
