"""Packed batches (minispin/packing.py, train.py --packing) against padded ones.

The padded layout is the reference: collate_pairs pads every row to the micro-batch's
longest, and the model runs plain causal attention (or SPIN's key mask). A packed batch must
give each row the same log-probability and the same gradient, up to fp32 rounding, and a
packed training run the same losses, gradient norms and exported weights.
"""
import json
import os
import random

import pytest
import torch

from helpers import make_hf_model, run_cli

from minispin.core.loss import answer_logps, batch_inputs, spin_step
from minispin.core.model import ModelArgs, build_model
from minispin.core.noise import noised_answer_logps, reference_noise
from minispin.core.packing import layout_padding, pack_batch, plan_bins
from minispin.run.rows import TokenizedPair, collate_pairs

TOL = 1e-5


def tiny_model(window=None, n_kv_heads=2, seed=0):
    args = ModelArgs(model_type="mistral", vocab_size=512, dim=64, n_layers=2, n_heads=4,
                     n_kv_heads=n_kv_heads, head_dim=16, intermediate_size=128, sliding_window=window)
    model = build_model(args, device="cpu")
    model.init_weights(0.2, torch.Generator().manual_seed(seed))  # sharp attention: a leak would show
    return model


def unequal_pairs(with_attention=False, seed=1):
    """Four pairs whose rows run from 4 to 80 tokens: one long real answer beside short ones."""
    rnd = random.Random(seed)
    tokens = lambda n: [rnd.randrange(3, 512) for _ in range(n)]  # noqa: E731
    items = []
    for i, (lp, lr, lg) in enumerate([(5, 40, 3), (12, 2, 30), (3, 1, 1), (20, 60, 9)]):
        att = tuple([rnd.choice([1, 1, 1, 0]) for _ in range(n)] for n in (lp, lr, lg)) if with_attention else None
        items.append(TokenizedPair(f"s/{i}", tokens(lp), tokens(lr), tokens(lg), noise=0.5 * (i % 2),
                                   attention=att))
    return items


def logps_of(model, batch, **kw):
    model_kw, rows = batch_inputs(batch)
    return answer_logps(model, batch["input_ids"], batch["loss_mask"], **rows, **model_kw, **kw)


def test_bins_hold_at_most_the_longest_row_and_every_row_once():
    lengths = [80, 5, 40, 33, 7, 2, 80, 1]
    bins = plan_bins(lengths)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 80 for b in bins)
    assert len(bins) == 4   # 248 tokens need ceil(248 / 80) = 4 bins: 80 | 80 | 40+33+7 | 5+2+1


def test_padding_fraction_counts_padded_positions_over_all_positions():
    # by hand: [3, 5] pads to 2 x 5 = 10 positions, [2, 3, 5] to 15; tokens 8 + 10 = 18
    info = layout_padding([[3, 5], [2, 3, 5]])
    assert (info["row_tokens"], info["padded_positions"]) == (18, 25)
    assert info["padding_fraction"] == round(1 - 18 / 25, 4)
    # packed: [5], [3] -> 2 bins of width 5; [5], [3, 2] -> 2 bins of width 5
    assert info["packed_positions"] == 20 and info["padding_fraction_packed"] == round(1 - 18 / 20, 4)


def test_the_packed_mask_never_crosses_rows_and_restarts_positions():
    batch = pack_batch(collate_pairs(unequal_pairs(), 0))
    rows, pos, mask = batch["row_ids"], batch["positions"], batch["attn_mask"][:, 0]
    for s in range(rows.shape[0]):
        for q in range(rows.shape[1]):
            if rows[s, q] < 0:
                continue
            seen = mask[s, q].nonzero().flatten()
            # exactly the earlier tokens of the same row, itself included
            assert (rows[s, seen] == rows[s, q]).all() and len(seen) == int(pos[s, q]) + 1
    # every row's tokens, in order
    padded = collate_pairs(unequal_pairs(), 0)
    for r, n in enumerate(padded["lengths"].tolist()):
        assert batch["input_ids"][rows == r].tolist() == padded["input_ids"][r, :n].tolist()


@pytest.mark.parametrize("window,attention,n_kv", [(None, False, 2), (7, False, 2), (None, True, 4), (7, True, 2)],
                         ids=["causal", "window", "spin-attention-mask", "window+mask"])
def test_packed_rows_give_the_padded_log_probs_and_gradients(window, attention, n_kv):
    """Rows of 4 to 80 tokens: the packed forward gives each row's log-prob and the
    backward each weight's gradient as the padded layout does, to fp32 rounding; with a
    sliding window shorter than the rows and with uclaml/SPIN's attention-mask rows."""
    items = unequal_pairs(with_attention=attention)
    padded = collate_pairs(items, 0)
    packed = pack_batch(padded, window=window)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    grads = []
    values = []
    for batch in (padded, packed):
        model = tiny_model(window, n_kv)
        lp = logps_of(model, batch)
        (lp * torch.linspace(0.5, 1.5, lp.numel())).sum().backward()
        values.append(lp.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(values[1], values[0], atol=TOL, rtol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=TOL, rtol=1e-5, msg=n)


def test_reference_noise_lands_on_the_same_answer_tokens_when_packed():
    """The study's per-answer reference noise: each row draws from its own generator in its
    own token order, so the packed log-probs equal the padded ones."""
    items = unequal_pairs()
    padded = collate_pairs(items, 0)
    packed = pack_batch(padded)
    model = tiny_model()
    out = []
    with torch.no_grad():
        for batch in (padded, packed):
            std, gens = reference_noise(batch["keys"], batch["noise"], "both", seed=3)
            model_kw, rows = batch_inputs(batch)
            out.append(noised_answer_logps(model, batch["input_ids"], batch["loss_mask"], std, gens,
                                           **rows, **model_kw))
        clean = logps_of(model, padded)
    torch.testing.assert_close(out[1], out[0], atol=TOL, rtol=1e-6)
    assert (out[0] - clean).abs().max() > 1.0   # the noise is there


def test_spin_step_on_a_packed_batch_equals_the_padded_step():
    items = unequal_pairs()
    padded = collate_pairs(items, 0)
    model = tiny_model()
    with torch.no_grad():
        ref = logps_of(model, padded) + torch.linspace(-1, 1, 8)
    for loss_type in ("sigmoid", "ipo"):
        a, sa = spin_step(model, padded, ref, loss_type=loss_type)
        b, sb = spin_step(model, pack_batch(padded), ref, loss_type=loss_type)
        torch.testing.assert_close(b, a, atol=TOL, rtol=1e-6)
        torch.testing.assert_close(sb["rewards/margins"], sa["rewards/margins"], atol=TOL, rtol=1e-6)


def test_flex_attention_block_mask_gives_the_dense_mask_log_probs():
    """The CUDA path's BlockMask, checked on the CPU in a no-grad forward (flex_attention
    has no CPU backward): same log-probs as the dense mask, with a window and SPIN's mask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    items = unequal_pairs(with_attention=True)
    padded = collate_pairs(items, 0)
    model = tiny_model(window=7)
    with torch.no_grad():
        dense = logps_of(model, pack_batch(padded, window=7))
        flex = logps_of(model, pack_batch(padded, window=7, block_mask=True))
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------- train.py end to end
WORDS = ("the cat sat on a mat and then ran to see dog bird tree sun moon star red blue "
         "big small happy sad jumped over under").split()


def write_unequal_pairs(path, n=16, seed=0):
    """Pairs whose answers run from 1 to 40 words, so a micro-batch pads a lot."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"p{i}", "gen": {},
                "prompt": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))}],
                "real": " ".join(rng.choices(WORDS, k=rng.choice([1, 3, 40]))),
                "generated": " ".join(rng.choices(WORDS, k=rng.choice([1, 2, 25])))}) + "\n")


def train_run(tmp_path, model, name, *extra):
    run = str(tmp_path / name)
    write_unequal_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    args = ["--model", model, "--batch-size", "8", "--micro-batch-size", "4", "--max-length", "160",
            "--max-prompt-length", "48", "--lr", "1e-3", "--max-steps", "4", "--checkpoint-every", "0",
            "--device", "cpu", "--no-progress", "--run-dir", run, *extra]
    assert run_cli("train.py", *args) == 0
    with open(os.path.join(run, "iter0", "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    with open(os.path.join(run, "iter0", "train_info.json")) as f:
        return run, recs, json.load(f)


def exported(run):
    from safetensors.torch import load_file
    return load_file(os.path.join(run, "iter0", "model", "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--ref-mode", "online"), ("--lora-rank", "4"),
                                   ("--compile-train", "--ref-mode", "online")],
                         ids=["precompute", "online", "lora", "compiled"])
def test_a_packed_run_trains_the_padded_runs_losses_gradients_and_weights(tmp_path, extra):
    """4 steps of 2 micro-batches of 4 pairs with answers of 1 to 40 words, on a GQA
    Mistral with a window shorter than the rows: --packing gives every step's loss, margin
    and gradient norm, and the exported weights, of the padded run within 1e-5, with the
    reference precomputed or online, under LoRA, and through compiled blocks (both runs
    compiled); both runs record the same padding measure."""
    model = str(tmp_path / "model")
    make_hf_model(model, "mistral", num_key_value_heads=2, sliding_window=16, sharpen=1.0)
    run_a, a, info_a = train_run(tmp_path, model, "padded", *extra)
    run_b, b, info_b = train_run(tmp_path, model, "packed", "--packing", *extra)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= TOL, (x["step"], x["loss"], y["loss"])
        assert abs(x["rewards/margins"] - y["rewards/margins"]) <= 10 * TOL
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert a[-1]["loss"] != a[0]["loss"]   # it trained
    wa, wb = exported(run_a), exported(run_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=TOL, rtol=1e-5, msg=k)
    assert info_a["padding_fraction"] == info_b["padding_fraction"] > 0.3
    assert info_a["padding_fraction_packed"] < info_a["padding_fraction"]


def test_packing_with_neftune_is_refused_in_one_line(tmp_path, capsys):
    model = str(tmp_path / "model")
    make_hf_model(model, "llama")
    run = str(tmp_path / "run")
    write_unequal_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    capsys.readouterr()
    rc = run_cli("train.py", "--model", model, "--run-dir", run, "--device", "cpu", "--packing",
                 "--noise", "neftune=5", "--no-progress")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "packing" in err[0] and "neftune" in err[0]
