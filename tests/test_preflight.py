"""A run fails in its first seconds or not at all (docs/reliability.md, "Preflight and disk
faults"). Each case runs train.py, generate.py or judge.py as a user would (in this process
through helpers.run_cli, or as a subprocess where two runs meet) on the tiny stories260K
model, and ends with exit 2 and one line naming the file, setting or fix — for the preflight
cases before any generation or training (no pairs file, no metrics, no export) — or, for a
disk fault, one line naming the file and the stage, with nothing half-written left to be
taken as complete."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from helpers import REPO, STORIES, free_port, run_cli
from test_trust import args, metrics, one_line, write_pairs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shutil.copytree(STORIES, str(tmp_path_factory.mktemp("m") / "model"))


def generating(model, run, *extra):
    """train.py arguments that sample 2 prompts' pairs first (--generate): a preflight that
    lets the run through leaves a pairs file behind."""
    return args(model, run, "--generate", "--num-prompts", "2", *extra)


def assert_nothing_started(run):
    for name in ("pairs.jsonl", "pairs.jsonl.part-0", "ref_logps.jsonl", "metrics.jsonl", "model"):
        assert not os.path.exists(os.path.join(run, "iter0", name)), name


# ---------------------------------------------------------------------- reporters
def test_wandb_without_a_login_is_refused_before_generation(model, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("machine example.org login x password y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run = str(tmp_path / "run")
    line = one_line(capsys, "train.py", *generating(model, run, "--report-to", "tensorboard,wandb"))
    assert "W&B is not logged in" in line and "WANDB_MODE=offline" in line and "wandb login" in line, line
    assert_nothing_started(run)


def test_wandb_counts_as_logged_in_with_a_key_a_netrc_entry_or_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from minispin.run.preflight import PreflightError, check_reporters
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    with pytest.raises(PreflightError):
        check_reporters("wandb")
    netrc.write_text("machine api.wandb.ai login user password k3y\n")
    check_reporters("wandb")
    netrc.write_text("")
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_reporters("wandb")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    check_reporters("wandb")


# ---------------------------------------------------------------------- --out
@pytest.mark.parametrize("where, expect", [
    ("under-a-file", "is a file, not a folder"),
    ("unwritable", "the export folder is not writable (/sys: "),  # sysfs: no new files, even for root
    ("inside-ckpt", "inside the run's working folder"),
    ("is-theta", "is θ_t"),
    ("holds-the-run", "holds the run folder"),
])
def test_a_bad_out_is_refused_before_generation(model, tmp_path, capsys, where, expect):
    run = str(tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    out = {"under-a-file": str(tmp_path / "afile" / "x"), "unwritable": "/sys/minispin-test-out",
           "inside-ckpt": os.path.join(run, "iter0", "ckpt", "m"),
           "is-theta": model, "holds-the-run": str(tmp_path)}[where]
    line = one_line(capsys, "train.py", *generating(model, run, "--out", out))
    assert expect in line and out in line, line
    assert_nothing_started(run)


def test_too_little_room_is_refused_with_the_estimate(model, tmp_path, capsys, monkeypatch):
    import minispin.run.preflight as P
    real = shutil.disk_usage
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: real(p)._replace(free=3_000_000))
    run = str(tmp_path / "run")
    capsys.readouterr()
    rc = run_cli("train.py", *generating(model, run))
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, err
    # a checkpoint holds fp32 weights and RMSprop's square_avg (8 bytes a parameter), 3 on
    # disk at once (2 kept + 1 being written); the export is fp32 (4 bytes a parameter)
    from safetensors.torch import load_file
    n = sum(t.numel() for t in load_file(os.path.join(model, "model.safetensors")).values())
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    assert f"needs about {mb(3 * 8 * n + 4 * n)}" in lines[0], lines[0]
    assert f"(checkpoints {mb(3 * 8 * n)}, the export {mb(4 * n)})" in lines[0], lines[0]
    assert "3.0 MB free" in lines[0] and "keep_checkpoints" in lines[0], lines[0]
    assert f"{n:,} parameters" in out and f"3 x {mb(8 * n)}" in out, out
    assert_nothing_started(run)


def test_the_estimate_counts_the_parameters_the_trainer_trains(model):
    """parameter_count reads only the safetensors headers; the model built and adapted by
    the trainer's own code is the reference (all weights, or only LoRA's adapters)."""
    from minispin.core.lora import apply_lora
    from minispin.run.checkpoint import load_model
    from minispin.run.preflight import parameter_count
    m = load_model(model)
    total = sum(p.numel() for p in m.parameters())
    assert parameter_count(model) == (total, total)
    targets = ("q_proj", "v_proj", "down_proj")
    apply_lora(m, 4, 8.0, targets)
    trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert parameter_count(model, targets, 4) == (total, trained)


# ---------------------------------------------------------------------- the judge
class _Judge(BaseHTTPRequestHandler):
    status = 401
    seen = []

    def do_GET(self):
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        reply = b'{"error": {"message": "invalid api key"}}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("server", ["refused", "401"])
def test_an_http_judge_that_cannot_answer_is_refused_before_generation(model, tmp_path, capsys, monkeypatch,
                                                                        server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    srv = None
    if server == "refused":
        url = f"http://127.0.0.1:{free_port()}/v1"
    else:
        _Judge.seen = []
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    run = str(tmp_path / "run")
    try:
        line = one_line(capsys, "train.py", *generating(model, run, "--relabel", "--judge", "openai",
                                                        "--judge-base-url", url, "--judge-max-retries", "0"))
    finally:
        if srv:
            srv.shutdown()
    assert f"{url}/models" in line, line
    if server == "refused":
        assert "does not answer" in line and "Connection refused" in line, line
    else:
        assert "HTTP 401" in line and "OPENAI_API_KEY" in line, line
        assert _Judge.seen == [("GET", "/v1/models", "Bearer sk-test-key")]  # one free request
    assert "sk-test-key" not in line
    assert_nothing_started(run)


def test_a_judge_is_not_asked_when_the_judged_pairs_are_current(model, tmp_path):
    from minispin.run import recipe as R
    from minispin.run.iteration import judging_needed
    run = str(tmp_path / "run")
    recipe = R.resolve(None, {"run_dir": run, "relabel": True, "judge_backend": "openai", "mix_previous": False})
    assert judging_needed(recipe, 0)  # no pairs yet: they will be sampled, then judged
    pairs = write_pairs(os.path.join(run, "iter0", "pairs.jsonl"), n=2)
    assert judging_needed(recipe, 0)
    with open(pairs) as f:
        judged = [dict(json.loads(x), scores={"real": 50, "generated": 40}, margin=-10, swap=False) for x in f]
    with open(os.path.join(run, "iter0", "judged.jsonl"), "w") as f:
        f.writelines(json.dumps(j) + "\n" for j in judged)
    assert not judging_needed(recipe, 0)


# ---------------------------------------------------------------------- θ_0
def test_theta0_with_nan_weights_is_refused_before_generation(model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    bad = shutil.copytree(model, str(tmp_path / "nan-model"))
    path = os.path.join(bad, "model.safetensors")
    state = load_file(path)
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    run = str(tmp_path / "run")
    line = one_line(capsys, "train.py", *generating(bad, run))
    assert line.endswith("re-download or re-export the model"), line
    assert f"θ_0 = {bad}: {path}: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN" in line, line
    assert_nothing_started(run)
    assert not os.path.exists(os.path.join(run, "fingerprints.json"))  # no fingerprint vouches for it
    line = one_line(capsys, "generate.py", "--model", bad, "--run-dir", run, "--num-prompts", "2",
                    "--device", "cpu", "--no-progress")
    assert "holds NaN" in line, line
    assert_nothing_started(run)


def test_the_finite_check_hashes_exactly_as_sha256_does(tmp_path):
    """sha256_finite reads each tensor on its own boundaries; its digest must still be the
    file's (hashlib over the whole file), with bf16, f16 and odd tensor sizes."""
    import hashlib
    from safetensors.torch import save_file
    from minispin.run.checkpoint import CheckpointError, sha256_finite
    path = str(tmp_path / "m.safetensors")
    tensors = {"a": torch.randn(7, 3).bfloat16(), "b": torch.randn(5).half(), "c": torch.arange(9),
               "d": torch.randn(3, 3, dtype=torch.float64)}
    save_file(tensors, path)
    with open(path, "rb") as f:
        assert sha256_finite(path) == hashlib.sha256(f.read()).hexdigest()
    tensors["b"][4] = float("inf")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="tensor 'b' holds NaN or infinite"):
        sha256_finite(path)


# ---------------------------------------------------------------------- two runs, one --out
@pytest.mark.slow
def test_a_second_run_exporting_to_the_same_out_is_refused_naming_the_first(model, tmp_path, capsys):
    out = str(tmp_path / "shared-export")
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
    for run in (run_a, run_b):
        write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    go = str(tmp_path / "go")
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fault_train.py"), f"pause@1:{go}",
                              *args(model, run_a, "--out", out)], cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        paused = str(tmp_path / "go.paused")
        while not os.path.exists(paused):  # the first run trains, holding the export's lock
            assert first.poll() is None, first.stdout.read()
            threading.Event().wait(0.1)
        line = one_line(capsys, "train.py", *args(model, run_b, "--out", out))
        assert f"--out {out} is in use by the run in {run_a}, pid {first.pid}" in line, line
        assert not os.path.exists(os.path.join(run_b, "iter0", "ref_logps.jsonl"))
    finally:
        open(go, "w").close()
        log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    assert f"exported {out}" in log
    with open(os.path.join(out, "minispin_export.json")) as f:
        assert json.load(f)["format"] == "minispin-export"
    assert not os.path.exists(out + ".minispin.lock")


@pytest.mark.slow
def test_a_staging_folder_left_beside_out_by_a_dead_export_is_removed(model, tmp_path, capsys):
    from minispin.run.checkpoint import STAGING_MARKER
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = str(tmp_path / "exports" / "m")
    os.makedirs(f"{out}.tmp-{dead.pid}")
    with open(os.path.join(f"{out}.tmp-{dead.pid}", STAGING_MARKER), "w") as f:
        f.write(f"{dead.pid}\n")
    shutil.copy(os.path.join(model, "model.safetensors"), f"{out}.tmp-{dead.pid}")
    mine = str(tmp_path / "exports" / f"m.tmp-{dead.pid + 1}")  # no marker: not minispin's, kept
    os.makedirs(mine)
    run = str(tmp_path / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"), n=2)
    rc = run_cli("train.py", *args(model, run, "--out", out, "--max-steps", "1"))
    assert rc == 0
    assert not os.path.exists(f"{out}.tmp-{dead.pid}")
    assert os.path.isdir(mine)
    assert f"removed {out}.tmp-{dead.pid}" in capsys.readouterr().out


# ---------------------------------------------------------------------- extras
@pytest.mark.parametrize("tool, package, expect", [
    ("evaluate.py", "lm_eval", "pip install 'minispin[eval]'"),
    ("plot.py", "matplotlib", "pip install 'minispin[plot]'"),
])
def test_a_missing_extra_is_one_line_naming_its_install(tmp_path, capsys, monkeypatch, tool, package, expect):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    argv = ["--model", STORIES, "--offline", "--limit", "1"] if tool == "evaluate.py" else [str(tmp_path)]
    line = one_line(capsys, tool, *argv)
    assert expect in line, line


def test_plot_names_a_summary_nested_too_deeply(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    os.makedirs(tmp_path / "iter0")
    summary = tmp_path / "iter0" / "summary.json"
    summary.write_text("[" * 100_000 + "]" * 100_000)
    line = one_line(capsys, "plot.py", str(tmp_path))
    assert f"{summary}: not valid JSON (nested too deeply" in line, line


# ---------------------------------------------------------------------- JSON nesting
def test_a_pairs_line_nested_100k_deep_is_one_line_naming_file_and_line(model, tmp_path, capsys):
    run = str(tmp_path / "run")
    pairs = write_pairs(os.path.join(run, "iter0", "pairs.jsonl"), n=2)
    with open(pairs, "a") as f:
        f.write('{"id": "deep", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    line = one_line(capsys, "train.py", *args(model, run))
    assert line.startswith(f"train.py: error: {pairs}:3: malformed JSON") and "nested too deeply" in line, line


def test_a_recipe_nested_100k_deep_is_one_line_naming_it(tmp_path, capsys):
    recipe = tmp_path / "deep.toml"
    recipe.write_text("lr = " + "[" * 100_000 + "]" * 100_000 + "\n")
    line = one_line(capsys, "train.py", "--config", str(recipe))
    assert line.endswith(f"{recipe}: not valid TOML (arrays or tables nested too deeply)"), line


def test_every_json_reader_goes_through_the_nesting_guard():
    """No module of minispin parses JSON with json.load / json.loads directly: each reader goes
    through errors.json_loads (or load_json_file), which turns a RecursionError into the
    one-line error of its file."""
    import re
    offenders = []
    for root, _, files in os.walk(os.path.join(REPO, "minispin")):
        for name in files:
            if name.endswith(".py") and name != "errors.py":
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if re.search(r"\bjson\.loads?\(", line) and "json.loads(json.dumps(" not in line:
                            offenders.append(f"{os.path.relpath(os.path.join(root, name), REPO)}:{i}")
    assert not offenders, offenders


# ---------------------------------------------------------------------- disk faults
class _FailingFile:
    """A file whose writes fail as a full / read-only / failing disk makes them fail: an
    OSError with the errno and no file name (what write() and close() raise)."""

    def __init__(self, f, code):
        self._f, self._code = f, code

    def write(self, data):
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fail_writes_to(monkeypatch, basename, code):
    """Every file named `basename` (or its `.tmp-<pid>` staging copy) opened for writing
    fails its writes with `code`."""
    import builtins
    import re
    real = builtins.open

    def fake(file, mode="r", *a, **kw):
        f = real(file, mode, *a, **kw)
        name = re.sub(r"\.tmp-\d+$", "", os.path.basename(str(file)))
        if name == basename and any(c in mode for c in "wax+"):
            return _FailingFile(f, code)
        return f
    monkeypatch.setattr(builtins, "open", fake)


@pytest.mark.parametrize("file, code, stage", [
    ("pairs.jsonl.part-0", errno.ENOSPC, "generation"),
    ("ref_logps.jsonl", errno.ENOSPC, "the reference pass"),
    ("train_info.json", errno.EIO, "training"),
    ("metrics.jsonl", errno.EROFS, "training"),
    ("config.json", errno.ENOSPC, "the export"),
])
def test_a_disk_fault_in_any_stage_is_one_line_naming_file_and_stage(model, tmp_path, capsys, monkeypatch,
                                                                      file, code, stage):
    run = str(tmp_path / "run")
    if file != "pairs.jsonl.part-0":
        write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    fail_writes_to(monkeypatch, file, code)
    capsys.readouterr()
    rc = run_cli("train.py", *generating(model, run))
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if "error" in x.lower() or "Traceback" in x]
    # generation logs its progress on stderr too; the error is one line, the last
    assert rc == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    line = errors[0]
    assert f"{file}: {os.strerror(code)} during {stage};" in line, line
    monkeypatch.undo()
    left = sorted(os.listdir(os.path.join(run, "iter0")))
    assert not [n for n in left if ".tmp-" in n or n == "model"], left
    if file == "train_info.json":
        assert "train_info.json" not in left  # never half of it


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["error", "short"])
def test_an_export_the_disk_cut_short_is_never_taken_as_complete(model, tmp_path, capsys, monkeypatch, fault):
    """safetensors reports a failed write as its own error (an `os error 28` in its text),
    or, on some systems, not at all: either way no model folder appears, no staging folder
    stays, and the re-run exports from the last checkpoint the weights an uninterrupted
    run exports."""
    from safetensors import SafetensorError
    import minispin.run.checkpoint as C
    run = str(tmp_path / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    real = C.save_file

    def broken(tensors, path, metadata=None):
        if fault == "error":
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    monkeypatch.setattr(C, "save_file", broken)
    line = one_line(capsys, "train.py", *args(model, run, "--keep-checkpoints-after-export"))
    assert "model.safetensors: " in line and "during the export" in line, line
    monkeypatch.undo()
    left = os.listdir(os.path.join(run, "iter0"))
    assert "model" not in left and not [n for n in left if ".tmp-" in n], left
    steps = metrics(run)
    assert run_cli("train.py", *args(model, run)) == 0
    assert metrics(run) == steps  # nothing trained again: resumed at the last step
    base = str(tmp_path / "base")
    write_pairs(os.path.join(base, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", *args(model, base)) == 0
    with open(os.path.join(run, "iter0", "model", "minispin_export.json")) as f, \
            open(os.path.join(base, "iter0", "model", "minispin_export.json")) as g:
        assert json.load(f)["fingerprint"] == json.load(g)["fingerprint"]


def test_a_chain_needs_room_for_every_iterations_export_before_the_first_starts(model, tmp_path, capsys,
                                                                               monkeypatch):
    """--iter 0-2 exports three models: room for one (plus the checkpoints) is not enough."""
    import minispin.run.preflight as P
    from safetensors.torch import load_file
    n = sum(t.numel() for t in load_file(os.path.join(model, "model.safetensors")).values())
    real = shutil.disk_usage
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: real(p)._replace(free=30 * n))  # 24n + 4n < 30n < 24n + 12n
    run = str(tmp_path / "run")
    capsys.readouterr()
    rc = run_cli("train.py", *generating(model, run), "--iter", "0-2")
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, err
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    assert f"(checkpoints {mb(3 * 8 * n)}, the exports {mb(3 * 4 * n)})" in lines[0], lines[0]
    assert "x 3 for iterations 0, 1, 2" in out, out
    assert_nothing_started(run)
