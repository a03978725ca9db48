"""A real install: the wheel of this checkout, installed into a fresh venv, used from an
empty folder where the checkout cannot be imported — `import minispin`, the console
scripts, the tiny recipe's iteration 0 end to end and the offline eval, all on the files
the wheel carries.

The venv sees this environment's packages, so torch and the other dependencies come from
here (no downloads): --system-site-packages, and, where this environment is itself a venv
(CI's is), a .pth file naming its site-packages folders — their own .pth files, among them
an editable minispin's, are not run. minispin itself must then come from the venv, which
the test checks through minispin.__file__ and the paths a run prints.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "LICENSES.md",
           "minispin", "configs", "assets")

pytestmark = pytest.mark.slow  # every test here starts a real model, a wheel or a subprocess run


def sh(cmd, cwd, env=None, timeout=300):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{cmd} -> {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building the wheel without build isolation needs setuptools")
    root = tmp_path_factory.mktemp("install")
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src = root / "src"
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.makedirs(src, exist_ok=True)
            shutil.copy(path, src / name)
    sh([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", root / "dist"], root)
    wheel, = glob.glob(str(root / "dist" / "minispin-*.whl"))
    venv = root / "venv"
    sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], root)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    purelib = sh([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    outer = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    with open(os.path.join(purelib.strip(), "outer-environment.pth"), "w") as f:
        f.write("".join(p + "\n" for p in outer))
    # this environment's pip, run by the venv's python, installs into the venv; --ignore-installed
    # because the outer environment may hold an (editable) minispin of the same version
    sh([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], root)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=str(bin_dir) + os.pathsep + env.get("PATH", ""))
    return {"venv": str(venv), "bin": bin_dir, "work": work, "env": env}


def test_recipe_by_name_or_path_from_any_folder(tmp_path, monkeypatch):
    """In a checkout, from another folder: the shipped recipe by name, by file name and by
    its checkout path, and the assets it names, all found; a wrong name lists the shipped."""
    from minispin.run import recipe as R
    monkeypatch.chdir(tmp_path)
    tiny = os.path.join(REPO, "configs", "tiny.toml")
    for name in ("tiny", "tiny.toml", "configs/tiny.toml", None):
        assert os.path.samefile(R.find_recipe(name), tiny), name
    r = R.resolve("tiny")
    assert os.path.samefile(r.model.path, os.path.join(REPO, "assets", "models", "tiny-sft"))
    assert os.path.samefile(r.eval.eval_data, os.path.join(REPO, "assets", "data", "gsm8k", "test.jsonl"))
    with pytest.raises(R.RecipeError, match=r"recipe tiniest not found \(a TOML file, or one of: .*tiny"):
        R.find_recipe("tiniest")


def test_import_and_recipes_come_from_the_venv(installed):
    code = ("import json, minispin, minispin.cli.train; from minispin.run import recipe as R; "
            "r = R.resolve('tiny'); "
            "print(json.dumps([minispin.__file__, r.source, r.model.path, r.data.path]))")
    out = sh([installed["bin"] / "python", "-c", code], installed["work"], installed["env"])
    paths = json.loads(out.strip().splitlines()[-1])
    for path in paths:   # the package, the recipe by name, and the assets it names
        assert path.startswith(installed["venv"]) and os.path.exists(path), path
        assert not path.startswith(REPO), path


def test_console_scripts_run_the_tiny_recipe_from_an_empty_folder(installed):
    work, env, bin_dir = installed["work"], installed["env"], installed["bin"]
    for tool in ("minispin-train", "minispin-generate", "minispin-judge", "minispin-eval", "minispin-plot",
                 "minispin-fetch-smollm2"):
        assert f"usage: {tool}" in sh([bin_dir / tool, "--help"], work, env)
    # the installed tiny recipe, shortened (written with its own write_variant, from the venv)
    code = ("from minispin.run.recipe import write_variant; write_variant('short.toml', {'num_prompts': 8, "
            "'max_new_tokens': 32, 'batch_size': 4, 'epochs': 1, 'heldout_examples': 2, "
            "'heldout_max_new_tokens': 32})")
    sh([bin_dir / "python", "-c", code], work, env)
    out = sh([bin_dir / "minispin-train", "--config", "short.toml", "--no-progress"], work, env)
    assert "SPIN iteration 0 summary" in out
    assert f"θ_0 = {installed['venv']}" in out                     # the tiny model the wheel carries
    it0 = os.path.join(work, "runs", "tiny", "iter0")
    assert len(open(os.path.join(it0, "pairs.jsonl")).readlines()) == 8
    assert len(open(os.path.join(it0, "metrics.jsonl")).readlines()) == 2   # 8 pairs / batch 4, 1 epoch
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert os.path.isfile(os.path.join(it0, "model", name)), name
    # what to run next is spelt the way the user ran it: the console script, not python train.py
    p = subprocess.run([str(bin_dir / "minispin-train"), "--config", "short.toml", "--iter", "2"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "train iteration 1 first (`minispin-train --iter 1 --config short.toml`)" \
        in p.stderr, p.stderr
    # the offline eval: task files and samples from the package
    out = sh([bin_dir / "minispin-eval", "--model", os.path.join(it0, "model"), "--offline",
              "--tasks", "arc_easy", "--limit", "2", "--num-fewshot", "0"], work, env)
    assert "| iter0 |" in out
