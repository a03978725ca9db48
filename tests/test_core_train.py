"""The core's training step on its own (minispin.core.train): at θ = θ_t the SPIN loss is ln 2,
its gradient is the one a hand-written SPIN loss gives, a step changes the weights, and two
steps in a row equal one step, a save of the states, a fresh start and a second step.
No run, no files: a tiny random model in one process. CPU, seconds."""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
import pytest

from minispin.core.model import ModelArgs, build_model
from minispin.core.settings import NoiseSettings, TrainSettings
from minispin.core.train import NonFiniteStep, build_optimizer, spin_metrics, spin_micro_step, train_step

ARGS = ModelArgs(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 intermediate_size=48, max_position_embeddings=64)
BETA = 0.1


def settings(**kw):
    base = dict(beta=BETA, loss_type="sigmoid", label_smoothing=0.0, ref_mode="precompute",
                optimizer="rmsprop", lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                optim_eps=1e-8, rmsprop_alpha=0.99, lr_scheduler="constant", warmup_ratio=0.0, epochs=1,
                batch_size=4, last_batch="drop", max_grad_norm=10.0, mixed_precision="fp32",
                fp32_logits=True, lora_rank=0, lora_alpha=16.0, lora_dropout=0.0, lora_targets="all",
                lora_base_dtype="auto", seed=0, noise=NoiseSettings(), max_steps=0, micro_batch_size=2,
                ref_batch_size=0, activation_checkpointing=False, compile_train=False, packing=False,
                report_to="none", checkpoint_every=0, keep_checkpoints=1, keep_checkpoints_after_export=False,
                export_dtype="float32")
    base.update(kw)
    return TrainSettings(**base)


@pytest.fixture(scope="module", autouse=True)
def group_of_one():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield


def model():
    m = build_model(ARGS, device="cpu")
    m.init_weights(generator=torch.Generator().manual_seed(0))
    return m


def batch(seed: int, pairs: int = 2):
    """[real; generated] rows of `pairs` pairs, right-padded, answers of unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    T = 12
    ids = torch.randint(1, ARGS.vocab_size, (2 * pairs, T), generator=g)
    mask = torch.zeros(2 * pairs, T, dtype=torch.long)
    for r in range(2 * pairs):
        start, end = 4, 6 + (r * 3) % 6
        mask[r, start:end] = 1
        ids[r, end:] = 0
    return {"input_ids": ids, "loss_mask": mask, "swap": torch.zeros(pairs, dtype=torch.bool)}


def hand_logps(m, b):
    """log p of each row's answer tokens: a full log-softmax over every position, by hand."""
    logp = F.log_softmax(m(b["input_ids"]).float(), dim=-1)[:, :-1]
    tok = logp.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    return (tok * b["loss_mask"][:, 1:]).sum(1)


def reference(m, b):
    with torch.no_grad():
        return hand_logps(m, b)


def test_the_first_step_loss_is_ln2_and_its_gradient_is_the_hand_written_spin_losses():
    cfg, theta = settings(), model()
    b = batch(1)
    ref = reference(theta, b)
    ours = copy.deepcopy(theta)
    sums = spin_micro_step(ours, b, ref, cfg, world_size=1)
    assert sums["loss"] / 2 == pytest.approx(math.log(2), abs=1e-6)
    hand = copy.deepcopy(theta)
    lp = hand_logps(hand, b)
    delta = (lp[:2] - ref[:2]) - (lp[2:] - ref[2:])
    (-F.logsigmoid(BETA * delta)).sum().div(cfg.batch_size).backward()
    for (name, p), q in zip(ours.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def run_steps(m, cfg, steps, opt=None, sched=None):
    opt, sched = (opt, sched) if opt else build_optimizer(m, cfg, total_steps=4)
    recs = []
    for s in steps:
        micro = [lambda b=b: spin_micro_step(m, b, reference(THETA, b), cfg, 1) for b in (batch(0), batch(1))]
        recs.append(train_step(m, opt, micro, lambda sums: spin_metrics(sums, cfg.batch_size), cfg.max_grad_norm, "cpu"))
        sched.step()
    return recs, opt, sched


THETA = model()


def test_steps_lower_the_loss_and_two_steps_resume_bit_identically_from_saved_states():
    cfg = settings()
    straight = copy.deepcopy(THETA)
    recs, _, _ = run_steps(straight, cfg, [0, 1])
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and recs[1]["loss"] < recs[0]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(straight.parameters(), THETA.parameters()))
    first = copy.deepcopy(THETA)
    _, opt, sched = run_steps(first, cfg, [0])
    saved = copy.deepcopy((first.state_dict(), opt.state_dict(), sched.state_dict()))
    again = model()
    again.load_state_dict(saved[0])
    opt2, sched2 = build_optimizer(again, cfg, total_steps=4)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    run_steps(again, cfg, [1], opt2, sched2)
    for (name, a), b in zip(straight.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name


def test_a_non_finite_loss_stops_the_step_before_the_optimizer_touches_the_weights():
    cfg, m = settings(), copy.deepcopy(THETA)
    opt, _ = build_optimizer(m, cfg, total_steps=1)
    before = copy.deepcopy(m.state_dict())
    nan = lambda loss: loss * float("nan")  # noqa: E731
    micro = [lambda: spin_micro_step(m, batch(3), reference(THETA, batch(3)), cfg, 1, hook=nan)]
    with pytest.raises(NonFiniteStep):
        train_step(m, opt, micro, lambda sums: spin_metrics(sums, cfg.batch_size), cfg.max_grad_norm, "cpu")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
