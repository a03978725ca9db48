"""LoRA (minispin/core/lora.py) on CPU: adapters against peft's maths, dropout under activation
checkpointing, SPIN with only the adapters training, the merged and the peft-format exports against transformers and peft, 1 process
== 2 under torchrun, kill + resume, and a bf16 base with fp32 adapters under FSDP2.

peft and transformers are the oracles here; minispin itself never imports them. The tiny
random Llama of test_train (2 layers, d = 64, unsharpened attention) keeps runs at seconds;
the losses of different process counts are compared with test_train's tolerance (1e-5).
"""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_hf_model
from test_train import (TOL, assert_same_losses, common, fresh_run, metrics, torchrun, train,
                        write_pairs)

RANK, ALPHA = 4, 8.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = ["--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lr", "1e-3", "--warmup-ratio", "0",
        "--heldout-examples", "0"]


def lora_args(model, run, *extra):
    return common(model) + LORA + ["--run-dir", run, *extra]


def frozen_snapshot(into: dict):
    """A step_end hook: after the last step, the policy's frozen weights, gathered."""
    def hook(trainer, done):
        if done == trainer.total_steps:
            for name, p in trainer.policy.named_parameters():
                if not p.requires_grad:
                    into[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return hook


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from minispin.run.resume import add_hook, clear_hooks
    root = tmp_path_factory.mktemp("lora")
    model = str(root / "model")
    make_hf_model(model, "llama", sharpen=1.0)
    pairs = write_pairs(str(root / "pairs.jsonl"))
    base = str(root / "base")
    write_pairs(os.path.join(base, "iter0", "pairs.jsonl"))
    frozen = {}
    add_hook("step_end", frozen_snapshot(frozen))
    try:
        assert train.main(lora_args(model, base, "--keep-checkpoints-after-export")) == 0
    finally:
        clear_hooks()
    return {"root": root, "model": model, "pairs": pairs, "base": base, "base_metrics": metrics(base),
            "frozen": frozen}


def ours_with_adapter(base_model, adapter_dir, rank=RANK, alpha=ALPHA):
    """minispin's model + our LoRA modules holding the adapter file's weights (unmerged)."""
    from minispin import load_model
    from minispin.core.lora import apply_lora
    from minispin.run.checkpoint import PEFT_PREFIX
    model = apply_lora(load_model(base_model), rank, alpha, TARGETS)
    state = {k[len(PEFT_PREFIX):]: v for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    return model.eval()


def ids(n=2, t=40, seed=0):
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the adapters
@pytest.mark.slow
def test_adapters_start_at_the_base_and_compute_peft_lora(setup):
    """B = 0: logits bit-identical to the base; A ~ U(±1/√in) as peft draws it; with B random,
    our LoRALinear equals peft's LoRA on transformers' model with the same A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from minispin import load_model
    from minispin.core.lora import adapters_disabled, apply_lora, lora_modules
    x = ids()
    base = load_model(setup["model"])
    with torch.no_grad():
        want = base(x)
        ours = apply_lora(load_model(setup["model"]), RANK, ALPHA, TARGETS, seed=1)
        assert torch.equal(ours(x), want)
        mods = dict(lora_modules(ours))
        assert len(mods) == 2 * 7
        a = mods["model.layers.0.mlp.down_proj"].lora_A.weight
        assert a.shape == (RANK, 128) and a.abs().max() <= 1 / math.sqrt(128) and a.std() > 0.3 / math.sqrt(128)
        g = torch.Generator().manual_seed(2)
        for m in mods.values():
            m.lora_B.weight.normal_(0, 0.5, generator=g)
        got = ours(x)
        assert (got - want).abs().max() > 1e-2
        with adapters_disabled(ours):
            assert torch.equal(ours(x), want)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n in ours.state_dict() if ".lora_" in n]
    hf = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))).eval()
    sd = {f"base_model.model.{k}".replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
          for k, v in ours.state_dict().items() if ".lora_" in k}
    missing, unexpected = peft.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, got, atol=1e-4, rtol=0)


def test_dropout_masks_are_redrawn_alike_under_activation_checkpointing(setup):
    """lora_dropout > 0 with activation checkpointing: the recomputed forward draws the same
    masks (checkpoint restores the RNG), so the gradients equal those of a plain backward."""
    from minispin import load_model
    from minispin.core.fsdp import apply_activation_checkpointing
    from minispin.core.lora import apply_lora, lora_modules
    grads = []
    for ac in (False, True):
        model = apply_lora(load_model(setup["model"]), RANK, ALPHA, TARGETS, dropout=0.3, seed=1)
        with torch.no_grad():
            for i, (_, m) in enumerate(lora_modules(model)):
                m.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        if ac:
            apply_activation_checkpointing(model)
        model.train()
        torch.manual_seed(7)
        model(ids()).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        with torch.no_grad():  # dropout is on: two training forwards differ, eval is fixed
            assert (model(ids()) - model(ids())).abs().max() > 1e-3
            model.eval()
            assert torch.equal(model(ids()), model(ids()))
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_only_the_adapters_get_gradients_and_optimizer_state(setup):
    """One SPIN backward through the sharded LoRA policy: every base weight has no gradient;
    B has one (A's is zero at step 0, as B = 0); the trainer's optimizer holds the adapters."""
    from minispin.run import distributed as D
    from minispin.run.data import read_pairs
    from minispin.run.rows import collate_pairs, tokenize_pairs
    from minispin.core.loss import spin_step
    from minispin.core.lora import LoRASettings
    from minispin.run.recipe import resolve
    from minispin.run.tokenizer import load_tokenizer
    env = D.init_distributed("cpu")
    try:
        policy = D.load_sharded_model(setup["model"], env, D.device_mesh(env),
                                      lora=LoRASettings(RANK, ALPHA, 0.0, TARGETS))
        tok = load_tokenizer(setup["model"])
        items, _ = tokenize_pairs(tok, read_pairs(setup["pairs"]), "iter0", 80, 48)
        batch = collate_pairs(items[:2], tok.pad_id)
        with torch.no_grad():
            ref = policy_logps(policy, batch)  # θ_t: the policy itself at step 0
        losses, _ = spin_step(policy, batch, ref)
        assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6, rtol=0)
        losses.sum().backward()
        for name, p in policy.named_parameters():
            if ".lora_" not in name:
                assert not p.requires_grad and p.grad is None, name
            elif ".lora_B." in name:
                assert p.grad is not None and p.grad.full_tensor().abs().max() > 0, name
            else:
                assert p.grad is not None and p.grad.full_tensor().abs().max() == 0, name
        recipe = resolve(None, {"lora_rank": RANK, "model": setup["model"]})
        from minispin.core.train import build_optimizer
        from minispin.run.iteration import train_settings
        opt, _ = build_optimizer(policy, train_settings(recipe), total_steps=1)
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        assert in_opt == {id(p) for n, p in policy.named_parameters() if ".lora_" in n}
    finally:
        D.close_distributed(env)


def policy_logps(policy, batch):
    from minispin.core.loss import sequence_logps
    return sequence_logps(policy(batch["input_ids"]), batch["input_ids"], batch["loss_mask"])


# ---------------------------------------------------------------------- training
def test_step0_is_ln2_and_the_base_is_bit_identical_after_training(setup):
    ms = setup["base_metrics"]
    assert len(ms) == 8 and abs(ms[0]["loss"] - math.log(2)) < 1e-6  # precomputed reference
    assert min(abs(m["loss"] - math.log(2)) for m in ms[1:]) > 1e-3      # the adapters moved
    from minispin import load_model
    want = load_model(setup["model"]).state_dict()
    frozen = setup["frozen"]
    assert set(frozen) == set(want)  # every base weight, and nothing else, is frozen
    for k, v in want.items():
        assert torch.equal(frozen[k], v), k
    # the checkpoint holds the adapters and their optimizer state only, in fp32
    index = json.load(open(os.path.join(setup["base"], "iter0", "ckpt", "step_8", "checkpoint.json")))
    names = [k for k in index["tensors"] if k.startswith(("model/", "optim/"))]
    assert names and all(".lora_" in k for k in names)
    assert {index["tensors"][k]["dtype"] for k in names if not k.endswith("/step")} == {"F32"}


@pytest.mark.slow
def test_online_reference_is_the_base_with_adapters_off(setup):
    run = fresh_run(setup, "online")
    assert train.main(lora_args(setup["model"], run, "--ref-mode", "online")) == 0
    online = metrics(run)
    assert online[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert_same_losses(online, setup["base_metrics"])
    assert not os.path.exists(os.path.join(run, "iter0", "ref_logps.jsonl"))


# ---------------------------------------------------------------------- exports
def test_merged_export_is_base_plus_scaled_BA_and_loads_in_transformers(setup):
    from transformers import AutoModelForCausalLM
    from minispin import load_model
    out = os.path.join(setup["base"], "iter0", "model")
    adapter = os.path.join(setup["base"], "iter0", "adapter")
    merged = load_file(os.path.join(out, "model.safetensors"))
    base = load_file(os.path.join(setup["model"], "model.safetensors"))
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert set(merged) == set(base)
    moved = 0
    for k, w in base.items():
        stem = "base_model.model." + k[:-len(".weight")]
        if k.rsplit(".", 2)[-2] in TARGETS:
            a, b = lora[stem + ".lora_A.weight"], lora[stem + ".lora_B.weight"]
            torch.testing.assert_close(merged[k], w + (ALPHA / RANK) * (b @ a), atol=1e-7, rtol=0)
            moved += int((merged[k] - w).abs().max() > 1e-4)
        else:
            assert torch.equal(merged[k], w), k
    assert moved == 14  # every adapted projection changed
    x = ids()
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(x).logits
        ours = ours_with_adapter(setup["model"], adapter)(x)
        torch.testing.assert_close(hf, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_model(out)(x), ours, atol=1e-4, rtol=0)


def test_peft_loads_the_adapter_onto_the_base_with_our_logits(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    adapter = os.path.join(setup["base"], "iter0", "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (RANK, ALPHA, sorted(TARGETS))
    hf = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    x = ids(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, ours_with_adapter(setup["model"], adapter)(x),
                                   atol=1e-4, rtol=0)
        with peft.disable_adapter():
            base = peft(x).logits
        assert (peft(x).logits - base).abs().max() > 1e-2  # the adapter does something


# ---------------------------------------------------------------------- processes
@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup):
    run = fresh_run(setup, "tr2")
    r = torchrun(lora_args(setup["model"], run, "--micro-batch-size", "2", "--activation-checkpointing"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 process(es)" in r.stdout and "LoRA rank 4" in r.stdout
    ms = metrics(run)
    assert_same_losses(ms, setup["base_metrics"])
    for x, y in zip(ms, setup["base_metrics"]):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_kill_midway_and_resume_with_another_process_count(setup):
    """SIGKILL rank 0 of a 2-process LoRA run after step 5 (checkpoints at 3 and 6); the same
    command as ONE process resumes from step_3 (the adapters reshard) and the losses equal
    the uninterrupted run's."""
    run = fresh_run(setup, "kill")
    args = lora_args(setup["model"], run, "--micro-batch-size", "2")
    r = torchrun(args, fault="kill@5")
    assert r.returncode != 0
    assert sorted(os.listdir(os.path.join(run, "iter0", "ckpt"))) == ["step_3"]
    assert not os.path.exists(os.path.join(run, "iter0", "model"))
    assert train.main(args) == 0
    ms = metrics(run)
    assert [m["step"] for m in ms] == list(range(1, 9))
    assert_same_losses(ms, setup["base_metrics"])
    assert os.path.isfile(os.path.join(run, "iter0", "adapter", "adapter_config.json"))


@pytest.mark.slow
def test_bf16_base_fp32_adapters_under_fsdp(setup, capsys):
    """The base stored in bf16, adapters and optimizer state in fp32 (one FSDP2 unit per
    block holds both): step 0 is exactly ln 2 (online reference), the bf16 base is bit-
    identical after training, and 2 processes under torchrun match 1 (same micro-batches,
    so only the fp32 gradient reduction differs)."""
    from minispin.run.resume import add_hook, clear_hooks
    extra = ("--lora-base-dtype", "bfloat16", "--ref-mode", "online", "--max-steps", "4",
             "--keep-checkpoints-after-export")
    one = fresh_run(setup, "bf16-1")
    frozen = {}
    add_hook("step_end", frozen_snapshot(frozen))
    try:
        assert train.main(lora_args(setup["model"], one, *extra)) == 0
    finally:
        clear_hooks()
    ms = metrics(one)
    assert ms[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert "x the norm of this iteration's update" in capsys.readouterr().out  # the rounding note
    from minispin import load_model
    for k, v in load_model(setup["model"], dtype=torch.bfloat16).state_dict().items():
        assert frozen[k].dtype == torch.bfloat16 and torch.equal(frozen[k], v), k
    index = json.load(open(os.path.join(one, "iter0", "ckpt", "step_4", "checkpoint.json")))
    dtypes = {k: t["dtype"] for k, t in index["tensors"].items() if k.startswith(("model/", "optim/"))}
    assert dtypes and all(".lora_" in k for k in dtypes)
    assert {d for k, d in dtypes.items() if not k.endswith("/step")} == {"F32"}
    two = fresh_run(setup, "bf16-2")
    r = torchrun(lora_args(setup["model"], two, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base frozen in bfloat16" in r.stdout and "compute bfloat16" in r.stdout
    assert_same_losses(metrics(two), ms, tol=1e-4)


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("flags, says", [
    ({"lora_alpha": 32.0}, "--lora-alpha sets up LoRA, which is off"),
    ({"lora_rank": 8, "lora_targets": "q_proj,lm_head"}, "unknown target module 'lm_head'"),
    ({"lora_rank": 8, "lora_targets": "q_proj,q_proj"}, "listed twice"),
    ({"lora_rank": 8, "lora_dropout": 1.0}, "'lora_dropout' must be < 1"),
    ({"lora_rank": 8, "lora_base_dtype": "bfloat16", "mixed_precision": "fp32"}, "a bfloat16 base computes in bf16"),
    ({"lora_rank": -1}, "'lora_rank' must be >= 0"),
])
def test_impossible_lora_settings_are_refused_in_one_line(flags, says):
    from minispin.run.recipe import RecipeError, resolve
    with pytest.raises(RecipeError) as e:
        resolve(None, flags)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_a_checkpoint_of_another_lora_setting(setup, capsys):
    run = fresh_run(setup, "changed")
    shutil.copytree(os.path.join(setup["base"], "iter0", "ckpt"), os.path.join(run, "iter0", "ckpt"))
    assert train.main(lora_args(setup["model"], run, "--lora-alpha", "4")) == 2
    err = capsys.readouterr().err
    assert "lora_alpha: 8.0 -> 4.0" in err and len(err.strip().splitlines()) == 1
    full = common(setup["model"]) + ["--run-dir", run, "--lr", "1e-3", "--warmup-ratio", "0",
                                     "--heldout-examples", "0"]
    assert train.main(full) == 2  # full fine-tuning from a LoRA checkpoint
    err = capsys.readouterr().err
    assert "lora_rank: 4 -> 0" in err and len(err.strip().splitlines()) == 1


def test_the_1gpu_recipe_and_its_adapter_count():
    """configs/zephyr-7b-lora-1gpu.toml resolves, and its adapters on a meta-device
    Mistral-7B number what docs/training.md's memory table says: r × Σ(in + out) × 32."""
    from minispin.core.model import ModelArgs
    from minispin.core.lora import apply_lora, parse_targets
    from minispin.core.model import build_model
    from minispin.run.recipe import resolve
    t = resolve("zephyr-7b-lora-1gpu").training
    assert (t.lora_rank, t.micro_batch_size, t.batch_size, t.activation_checkpointing,
            t.lora_base_dtype) == (64, 1, 64, True, "bfloat16")
    args = ModelArgs(model_type="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                     n_kv_heads=8, head_dim=128, intermediate_size=14336)
    model = apply_lora(build_model(args, device="meta"), t.lora_rank, t.lora_alpha,
                       parse_targets(t.lora_targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 64 * ((4096 + 4096) * 2 + (4096 + 1024) * 2) * 32 == 54_525_952
    assert sum(p.numel() for p in model.parameters()) - trainable == 7_241_732_096
