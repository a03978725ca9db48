"""Training checkpoints (minispin.run.distributed save/load) and the run-folder lock (minispin.run.lock).

Oracles: the state before saving, compared bit for bit with the state loaded into a fresh model
and optimizer, and with the state after one more step from each; the `safetensors` library
reading our rank files; for resharding, a 2-process torchrun job that writes its full state
with safetensors' own save_file (this file is the worker: `python tests/test_resume.py ...`);
pickle itself, for the planted payload (the test shows it runs when unpickled, so the test can
fail). All on CPU/gloo with a tiny random Llama (2 layers, d=64).
"""
import copy
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, make_hf_model, run_cli

sys.path.insert(0, REPO)
from minispin.run import distributed as D  # noqa: E402
from minispin.run.lock import LOCK_NAME, RunLock, RunLockError, clean_orphans  # noqa: E402


# ---------------------------------------------------------------------- shared by the worker
def build(env, model_dir, optimizer="adamw"):
    policy = D.load_sharded_model(model_dir, env, D.device_mesh(env))
    if optimizer == "rmsprop":
        opt = torch.optim.RMSprop(policy.parameters(), lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return policy, opt, sched


def train_step(policy, opt, sched, seed):
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(seed))
    logits = policy(ids).float()
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def extra_of(sched, step, rank=0):
    return {"step": step, "resume_key": {"beta": 0.1, "loss_type": "sigmoid", "examples": 16},
            "scheduler": sched.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "noise": torch.Generator().manual_seed(100 + rank).get_state()}}


def full_state(policy, opt):
    """Every model and optimizer tensor, unsharded, on the CPU (torch's own get_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor
    model_sd, optim_sd = get_state_dict(policy, opt)

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
    out = {f"model/{k}": full(v) for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        out.update({f"optim/{fqn}/{name}": full(v) for name, v in state.items()})
    return out, copy.deepcopy(optim_sd["param_groups"])


def differences(a: dict, b: dict):
    if set(a) != set(b):
        return [f"keys differ: {sorted(set(a) ^ set(b))[:4]}"]
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def worker(model_dir, out):
    """torchrun -nproc 2: load the 1-process checkpoint, check it against its reference, take one
    step, save a 2-process checkpoint with its reference (safetensors' save_file) for the test."""
    from safetensors.torch import load_file, save_file
    env = D.init_distributed("cpu")
    policy, opt, sched = build(env, model_dir)
    extra = D.load_checkpoint(os.path.join(out, "one", "step_2"), policy, opt, env)
    sched.load_state_dict(extra["scheduler"])
    ref = load_file(os.path.join(out, "one_ref.safetensors"))
    state, _ = full_state(policy, opt)
    bad = differences(state, {k: v for k, v in ref.items() if not k.startswith("rng/")})
    if extra["step"] != 2 or not torch.equal(extra["rng"]["cpu"], ref["rng/cpu"]):
        bad.append("extra")
    if env.is_main:
        with open(os.path.join(out, "check_1to2.json"), "w") as f:
            json.dump({"differences": bad, "world_size": env.world_size}, f)
    train_step(policy, opt, sched, seed=3)
    D.save_checkpoint(os.path.join(out, "two", "step_3"), policy, opt, extra_of(sched, 3, env.rank), env)
    state, _ = full_state(policy, opt)  # a collective: every rank gathers
    if env.is_main:
        save_file(state, os.path.join(out, "two_ref.safetensors"))
    D.close_distributed(env)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env():
    env = D.init_distributed("cpu")
    yield env
    D.close_distributed(env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("resume") / "model")
    make_hf_model(path, sharpen=1.0)
    return path


@pytest.fixture(scope="module")
def saved(env, model_dir, tmp_path_factory):
    """A 2-step RMSprop checkpoint to damage."""
    root = tmp_path_factory.mktemp("saved")
    policy, opt, sched = build(env, model_dir, "rmsprop")
    for s in range(2):
        train_step(policy, opt, sched, seed=s)
    path = str(root / "ckpt" / "step_2")
    D.save_checkpoint(path, policy, opt, extra_of(sched, 2), env)
    return path


def damaged_copy(saved, tmp_path):
    path = str(tmp_path / "ckpt" / "step_2")
    shutil.copytree(saved, path)
    return path


# ---------------------------------------------------------------------- round trip
@pytest.mark.parametrize("optimizer", ["rmsprop", "adamw"])
def test_save_load_bit_exact_and_training_goes_on_identically(env, model_dir, tmp_path, optimizer):
    from safetensors import safe_open
    policy, opt, sched = build(env, model_dir, optimizer)
    for s in range(2):
        train_step(policy, opt, sched, seed=s)
    before, groups = full_state(policy, opt)
    extra = extra_of(sched, 2)
    path = str(tmp_path / "ckpt" / "step_2")
    D.save_checkpoint(path, policy, opt, extra, env)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_2"]
    assert sorted(os.listdir(path)) == ["checkpoint.json", "rank0.safetensors"]

    # the safetensors library reads our file: one process, so each chunk is the whole tensor
    with safe_open(os.path.join(path, "rank0.safetensors"), framework="pt") as f:
        assert not differences({k: f.get_tensor(k) for k in before}, before)
        assert torch.equal(f.get_tensor("extra/rng/cpu"), extra["rng"]["cpu"])

    fresh, fresh_opt, fresh_sched = build(env, model_dir, optimizer)
    assert differences(full_state(fresh, fresh_opt)[0], before)  # the load has work to do
    got = D.load_checkpoint(path, fresh, fresh_opt, env)
    after, groups_after = full_state(fresh, fresh_opt)
    assert not differences(after, before)
    assert groups_after == groups and type(groups_after[0].get("betas", ())) is tuple
    fresh_sched.load_state_dict(got["scheduler"])
    assert fresh_sched.state_dict() == sched.state_dict()
    assert got["step"] == 2 and got["resume_key"] == extra["resume_key"]
    assert torch.equal(got["rng"]["cpu"], extra["rng"]["cpu"]) and got["rng"]["cpu"].dtype == torch.uint8
    assert torch.equal(got["rng"]["noise"], extra["rng"]["noise"])

    # the optimizer's step counters, moments and lr all came back: the next step is the same
    train_step(policy, opt, sched, seed=7)
    train_step(fresh, fresh_opt, fresh_sched, seed=7)
    assert not differences(full_state(fresh, fresh_opt)[0], full_state(policy, opt)[0])


def test_keep_newest_and_no_tmp_left(env, model_dir, tmp_path):
    policy, opt, sched = build(env, model_dir, "rmsprop")
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        D.save_checkpoint(str(root / f"step_{step}"), policy, opt, extra_of(sched, step), env, keep=2)
    assert sorted(os.listdir(root)) == ["step_2", "step_3"]
    assert D.latest_checkpoint(str(root)) == str(root / "step_3")


@pytest.mark.slow
def test_reshard_one_to_two_and_two_to_one(env, model_dir, tmp_path):
    """1 process saves -> 2 processes load it; 2 processes save -> 1 process loads it."""
    from safetensors.torch import load_file, save_file
    policy, opt, sched = build(env, model_dir)
    for s in range(2):
        train_step(policy, opt, sched, seed=s)
    D.save_checkpoint(str(tmp_path / "one" / "step_2"), policy, opt, extra_of(sched, 2), env)
    state, _ = full_state(policy, opt)
    save_file(dict(state, **{"rng/cpu": torch.get_rng_state()}), str(tmp_path / "one_ref.safetensors"))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), model_dir, str(tmp_path)]
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "check_1to2.json") as f:
        assert json.load(f) == {"differences": [], "world_size": 2}

    index = json.load(open(tmp_path / "two" / "step_3" / "checkpoint.json"))
    emb = index["tensors"]["model/model.embed_tokens.weight"]["chunks"]
    assert [(c["file"], c["offsets"], c["sizes"]) for c in emb] == [
        ("rank0.safetensors", [0, 0], [256, 64]), ("rank1.safetensors", [256, 0], [256, 64])]
    fresh, fresh_opt, _ = build(env, model_dir)
    extra = D.load_checkpoint(str(tmp_path / "two" / "step_3"), fresh, fresh_opt, env)
    assert not differences(full_state(fresh, fresh_opt)[0], load_file(str(tmp_path / "two_ref.safetensors")))
    assert extra["step"] == 3  # and rank 0's RNG, not rank 1's:
    assert torch.equal(extra["rng"]["noise"], torch.Generator().manual_seed(100).get_state())


# ---------------------------------------------------------------------- refusals
class Planted:
    """Unpickling this creates `marker`: what a hostile checkpoint file could do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder, marker):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(Planted(marker), f)
    torch.save({"step": Planted(marker)}, os.path.join(folder, "trainer_rank0.pt"))


def test_planted_payload_would_run_when_unpickled(tmp_path):
    """The control: the payload does create its file when something unpickles it."""
    plant(str(tmp_path / "step_3"), str(tmp_path / "pwned"))
    with open(tmp_path / "step_3" / ".metadata", "rb") as f:
        pickle.load(f)
    assert os.path.exists(tmp_path / "pwned")
    os.remove(tmp_path / "pwned")
    torch.load(str(tmp_path / "step_3" / "trainer_rank0.pt"), weights_only=False)
    assert os.path.exists(tmp_path / "pwned")


def test_planted_pickle_checkpoint_is_refused_unread(env, model_dir, tmp_path):
    marker = str(tmp_path / "pwned")
    step = str(tmp_path / "ckpt" / "step_3")
    plant(step, marker)
    policy, opt, _ = build(env, model_dir)
    assert D.latest_checkpoint(str(tmp_path / "ckpt")) == step
    with pytest.raises(D.TrainCheckpointError) as e:
        D.load_checkpoint(step, policy, opt, env)
    msg = str(e.value)
    assert "\n" not in msg and step in msg and "pickle" in msg
    assert f"Delete {tmp_path / 'ckpt'}" in msg and "--run-dir" in msg
    assert not os.path.exists(marker)


def test_train_py_resume_refuses_planted_pickle(env, model_dir, tmp_path, capsys):
    """End to end: train.py on a run folder whose checkpoint is a planted pickle."""
    run = tmp_path / "run"
    os.makedirs(run / "iter0")
    with open(run / "iter0" / "pairs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": f"say {i}"}],
                                "real": "the cat sat on a mat", "generated": "a dog ran", "gen": {}}) + "\n")
    marker = str(tmp_path / "pwned")
    plant(str(run / "iter0" / "ckpt" / "step_1"), marker)
    rc = run_cli("train.py", "--model", model_dir, "--run-dir", str(run), "--batch-size", "2",
                 "--micro-batch-size", "1", "--max-length", "48", "--max-prompt-length", "24",
                 "--epochs", "1", "--device", "cpu", "--no-progress")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not os.path.exists(marker)
    assert len(err.splitlines()) == 1 and "step_1" in err and "--run-dir" in err, err
    assert not os.path.exists(run / "iter0" / "model")


def test_non_finite_state_is_not_saved(env, model_dir, tmp_path):
    policy, opt, sched = build(env, model_dir, "adamw")
    train_step(policy, opt, sched, seed=0)
    root = tmp_path / "ckpt"
    D.save_checkpoint(str(root / "step_1"), policy, opt, extra_of(sched, 1), env)
    assert D.all_finite(policy, opt)
    weight = dict(policy.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    with torch.no_grad():
        weight.to_local()[3, 5] = float("inf")
    assert not D.all_finite(policy) and not D.all_finite(policy, opt)
    with pytest.raises(D.TrainCheckpointError, match=r"after step 2 is not finite \(model/model.layers.1.mlp.up_proj"):
        D.save_checkpoint(str(root / "step_2"), policy, opt, extra_of(sched, 2), env)
    with torch.no_grad():
        weight.to_local()[3, 5] = 0.0
        next(iter(opt.state.values()))["exp_avg_sq"].to_local()[0] = float("nan")
    assert D.all_finite(policy) and not D.all_finite(policy, opt)
    with pytest.raises(D.TrainCheckpointError, match=r"after step 3 is not finite \(optim/"):
        D.save_checkpoint(str(root / "step_3"), policy, opt, extra_of(sched, 3), env)
    assert sorted(os.listdir(root)) == ["step_1"]  # the last finite checkpoint, nothing else
    fresh, fresh_opt, _ = build(env, model_dir, "adamw")
    assert D.load_checkpoint(str(root / "step_1"), fresh, fresh_opt, env)["step"] == 1


def _truncate(path):
    f = os.path.join(path, "rank0.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    return f


def _bad_json(path):
    with open(os.path.join(path, "checkpoint.json"), "w") as f:
        f.write('{"format": "minispin-train-checkpoint", ')
    return os.path.join(path, "checkpoint.json")


def _escaping_file(path):
    index = json.load(open(os.path.join(path, "checkpoint.json")))
    index["tensors"]["model/model.norm.weight"]["chunks"][0]["file"] = "../../../etc/passwd"
    json.dump(index, open(os.path.join(path, "checkpoint.json"), "w"))
    return os.path.join(path, "checkpoint.json")


def _lying_header(path):
    """The index says a chunk is 64 floats; the rank file's header is edited to say 32."""
    f = os.path.join(path, "rank0.safetensors")
    raw = open(f, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model/model.norm.weight"]["shape"] = [32]
    new = json.dumps(header).encode()
    new += b" " * (n - len(new))
    open(f, "wb").write(raw[:8] + new + raw[8 + n:])
    return f


def _no_index(path):
    os.remove(os.path.join(path, "checkpoint.json"))
    return path


@pytest.mark.parametrize("damage", [_truncate, _bad_json, _escaping_file, _lying_header, _no_index])
def test_damaged_checkpoint_one_line_error_naming_the_file(env, model_dir, saved, tmp_path, damage):
    path = damaged_copy(saved, tmp_path)
    named = damage(path)
    policy, opt, _ = build(env, model_dir, "rmsprop")
    with pytest.raises(D.TrainCheckpointError) as e:
        D.load_checkpoint(path, policy, opt, env)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(named) and "--run-dir" in msg, msg


def test_checkpoint_of_another_optimizer_is_refused(env, model_dir, saved):
    policy, opt, _ = build(env, model_dir, "adamw")  # saved with RMSprop
    with pytest.raises(D.TrainCheckpointError, match="--optimizer") as e:
        D.load_checkpoint(saved, policy, opt, env)
    assert "exp_avg" in str(e.value)


def test_extra_must_be_json_and_tensors(env, model_dir, tmp_path):
    policy, opt, sched = build(env, model_dir, "rmsprop")
    with pytest.raises(D.TrainCheckpointError, match="extra/resume_key/when is a set"):
        D.save_checkpoint(str(tmp_path / "step_1"), policy, opt, {"step": 1, "resume_key": {"when": {1}}}, env)
    assert not os.path.exists(tmp_path / "step_1.tmp")


# ---------------------------------------------------------------------- the lock
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path, capsys):
    folder = str(tmp_path / "run")
    code = ("import sys\nfrom minispin.run.lock import RunLock\n"
            f"with RunLock({folder!r}):\n    print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError) as e:
            with RunLock(folder):
                pass
        msg = str(e.value)
        assert "\n" not in msg and f"pid {holder.pid} on {socket.gethostname()}" in msg
        assert os.path.join(folder, LOCK_NAME) in msg
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind
        holder.wait()
    assert json.load(open(os.path.join(folder, LOCK_NAME)))["pid"] == holder.pid
    with RunLock(folder):
        assert json.load(open(os.path.join(folder, LOCK_NAME)))["pid"] == os.getpid()
        with RunLock(folder):  # re-entrant in one process
            pass
        assert os.path.exists(os.path.join(folder, LOCK_NAME))
    assert f"left by pid {holder.pid}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(folder, LOCK_NAME))


def test_lock_from_another_host_or_unreadable_is_refused(tmp_path):
    folder = str(tmp_path)
    lock = os.path.join(folder, LOCK_NAME)
    with open(lock, "w") as f:
        json.dump({"pid": dead_pid(), "host": "node-elsewhere", "since": 0}, f)
    with pytest.raises(RunLockError, match="on node-elsewhere"):
        RunLock(folder).__enter__()
    with RunLock(folder, rank=1):  # under torchrun only rank 0 takes (and checks) the lock
        pass
    # an unreadable lock is judged by its flock: held by a live process -> refused, untouched
    with open(lock, "w") as f:
        f.write("garbage")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", lock],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError, match="in use by a process that is starting"):
            RunLock(folder).__enter__()
        assert open(lock).read() == "garbage"
    finally:
        holder.kill()
        holder.wait()
    # ... and nobody holding it (a crash before the pid was written): taken over
    with RunLock(folder):
        assert json.load(open(lock))["pid"] == os.getpid()
    assert not os.path.exists(lock)


def test_lock_on_a_read_only_folder_is_a_one_line_error(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes into read-only folders: have the kernel's refusal raised
        real_open = os.open

        def refused(path, *a, **k):
            if str(path).endswith(LOCK_NAME):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *a, **k)
        monkeypatch.setattr(os, "open", refused)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(RunLockError, match="cannot create the lock file .Permission denied."):
            RunLock(str(tmp_path)).__enter__()
    finally:
        os.chmod(tmp_path, 0o755)
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_clean_orphans_removes_dead_writers_litter_only(tmp_path):
    gone = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        it = tmp_path / "iter0"
        os.makedirs(it / f"model.tmp-{gone}" / "sub")
        open(it / f"pairs.jsonl.tmp-{gone}", "w").close()
        os.makedirs(it / "ckpt" / "step_3.tmp")
        os.makedirs(it / "ckpt" / "step_2")
        os.makedirs(it / f"model.tmp-{live.pid}")
        os.makedirs(it / f"model.old-{gone}")
        open(it / f"x.tmp-{os.getpid()}", "w").close()
        open(it / "notes.tmp-abc", "w").close()
        removed = clean_orphans(str(tmp_path))
    finally:
        live.kill()
        live.wait()
    assert sorted(os.path.relpath(p, it) for p in removed) == sorted(
        [f"model.tmp-{gone}", f"pairs.jsonl.tmp-{gone}", os.path.join("ckpt", "step_3.tmp")])
    assert sorted(os.listdir(it)) == sorted(["ckpt", f"model.tmp-{live.pid}", f"model.old-{gone}",
                                             f"x.tmp-{os.getpid()}", "notes.tmp-abc"])
    assert os.listdir(it / "ckpt") == ["step_2"]
