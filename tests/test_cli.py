"""What every command-line tool shares, tried from the command line: a mistyped flag is one
line with the flag meant (and exit 2); --help shows the defaults; the recipe's cpu_threads
is torch's thread count in generate.py, judge.py and evaluate.py as in train.py;
train.py --print-config prints a recipe that resolves to the same settings, and a run
names the settings that differ from its recipe file; evaluate.py on a hub suite without
network is one line that names --offline. The CLIs run in this process (helpers.run_cli)
and stop before any model work, except the last, which is a separate process."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, STORIES, free_port, run_cli

SCRIPTS = ("train.py", "generate.py", "judge.py", "evaluate.py", "plot.py")


def stderr_line(capsys, script, *argv):
    capsys.readouterr()
    rc = run_cli(script, *argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, (rc, lines)
    return lines[0]


@pytest.mark.parametrize("script, typo, meant", [
    ("train.py", "--learning-rate", "--lr"),               # transformers' name for it
    ("train.py", "--num-train-epochs", "--epochs"),
    ("train.py", "--warmup-ration", "--warmup-ratio"),     # a typo
    ("train.py", "--epoch", "--epochs"),                   # a prefix: argparse would have run it as --epochs
    ("generate.py", "--num-prompt", "--num-prompts"),
    ("generate.py", "--learning-rate", None),              # generate has no --lr: no guess
    ("generate.py", "--temprature", "--temperature"),
    ("generate.py", "--per-device-train-batch-size", None),
    ("judge.py", "--treshold", "--threshold"),
    ("evaluate.py", "--num-fewshots", "--num-fewshot"),
    ("plot.py", "--smoth", "--smooth"),
])
def test_a_mistyped_flag_is_one_line_with_the_flag_meant(tmp_path, monkeypatch, capsys, script, typo, meant):
    monkeypatch.chdir(tmp_path)   # were a typo taken as a flag, nothing would run in the checkout
    # judge.py and evaluate.py need their required flag, or argparse names that first
    required = {"judge.py": ["--iter", "0"], "evaluate.py": ["--model", STORIES], "plot.py": ["runs"]}
    line = stderr_line(capsys, script, *required.get(script, []), f"{typo}=1")
    assert line.startswith(f"{script}: error: unrecognized argument {typo}"), line
    if meant:
        assert f"(did you mean {meant}?)" in line
    else:
        assert "did you mean" not in line


def toml(v):
    """A default as the help writes it: TOML's spelling."""
    return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else repr(v)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(capsys, script):
    """Each flag with a default shows it; a recipe key's flag names the rule (the recipe's
    value, else the built-in one) and the built-in value."""
    import argparse
    import importlib

    from minispin.cli.args import ArgumentParser
    from minispin.run.recipe import KEYS
    module = importlib.import_module("minispin.cli." + script[:-3])
    if hasattr(module, "build_parser"):
        parser = module.build_parser()
    else:   # plot.py builds its parser in main: catch it there
        made = []
        monkey = pytest.MonkeyPatch()
        monkey.setattr(ArgumentParser, "parse_args", lambda self, *a, **k: made.append(self) or exit(0))
        try:
            with pytest.raises(SystemExit):
                module.main([])
        finally:
            monkey.undo()
        parser, = made
    checked = 0
    for action in parser._actions:
        if not action.option_strings or argparse.SUPPRESS in (action.help, action.default):
            continue
        formatter = parser._get_formatter()
        shown = " ".join(formatter._expand_help(action).split())
        if "[recipe key" in (action.help or ""):
            assert f"default: the recipe's, else {toml(KEYS[action.dest].default)}" in shown, shown
            checked += 1
        elif not any(action.default is v for v in (None, False, True)):
            assert str(action.default) in shown and "default" in shown, shown
            checked += 1
    assert checked


def recipe_with(tmp_path, text_extra="", **keys):
    from minispin.run import recipe as R
    path = str(tmp_path / "r.toml")
    R.write_variant(path, {k: v for k, v in keys.items()})
    with open(path, "a") as f:
        f.write(text_extra)
    return path


class Seen(Exception):
    """Raised by a patched entry point: the CLI got as far as its work, with these threads."""


@pytest.mark.parametrize("script", ["generate.py", "judge.py", "evaluate.py"])
def test_every_tool_runs_with_the_recipes_cpu_threads(tmp_path, monkeypatch, script):
    import minispin.cli.evaluate  # noqa: F401  (the modules the scripts run)
    import minispin.cli.generate
    import minispin.cli.judge
    import minispin.study.evaluation
    before = torch.get_num_threads()
    want = before + 1 if before < 4 else before - 1       # not what torch runs with now
    seen = []

    def record(*a, **k):
        seen.append(torch.get_num_threads())
        raise Seen
    monkeypatch.setattr(minispin.cli.generate, "generate_pairs_file", record)
    monkeypatch.setattr(minispin.cli.judge, "make_judge", record)
    monkeypatch.setattr(minispin.study.evaluation, "MinispinLM", record)
    config = recipe_with(tmp_path, cpu_threads=want)
    argv = {"generate.py": ["--run-dir", tmp_path / "run"], "judge.py": ["--iter", "0", "--run-dir", tmp_path / "run"],
            "evaluate.py": ["--model", STORIES, "--offline", "--output", tmp_path / "eval"]}[script]
    try:
        with pytest.raises(Seen):
            run_cli(script, "--config", config, *argv)
    finally:
        torch.set_num_threads(before)
    assert seen == [want]


def test_print_config_resolves_to_the_same_recipe(tmp_path, capsys):
    try:
        import tomllib
    except ImportError:   # Python 3.10
        import tomli as tomllib

    from minispin.run import recipe as R
    config = recipe_with(tmp_path, "\n[iterations.1]\nmax_new_tokens = 32\nlr = 2e-7\n")
    flags = ["--config", config, "--iter", "1", "--lr", "1e-3", "--no-mix-previous", "--report-to",
             "tensorboard,wandb", "--run-dir", tmp_path / "elsewhere"]
    capsys.readouterr()
    assert run_cli("train.py", *flags, "--print-config") == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists()               # printed, nothing run
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    assert tomllib.loads(printed)["max_new_tokens"] == 32     # valid TOML, the table applied
    expected = R.resolve(config, {"lr": 1e-3, "mix_previous": False, "report_to": "tensorboard,wandb",
                                  "run_dir": str(tmp_path / "elsewhere")}, iteration=1)
    again = R.resolve(str(path))
    assert R.as_dict(again) == R.as_dict(expected)
    assert expected.training.lr == 1e-3 and expected.generation.max_new_tokens == 32

    # what a run prints first: the settings that differ from the file's top-level keys
    block = R.format_overrides(expected)
    lines = block.splitlines()
    assert lines[0] == f"settings beyond {config}:"
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(
        ["run_dir", "lr", "mix_previous", "report_to", "max_new_tokens"])
    assert f"max_new_tokens = 32  ({config} [iterations.1])" in block and "lr = 0.001  (--lr)" in block
    assert R.format_overrides(R.resolve(config)) == ""


@pytest.mark.parametrize("script, stubs, flags, line", [
    ("train.py", {"run_iteration": None}, ["--beta", "0.25"], "  beta = 0.25  (--beta)"),
    ("generate.py", {"generate_pairs_file": None}, ["--temperature", "0.5"], "  temperature = 0.5  (--temperature)"),
    ("judge.py", {"judge_file": {"failed": 0, "items_failed": 0}, "make_judge": None, "format_summary": "summary"},
     ["--iter", "0", "--backend", "local", "--threshold", "7"], "  judge_threshold = 7.0  (--threshold)"),
])
def test_a_run_prints_the_changed_settings_first(script, stubs, flags, line, tmp_path, capsys, monkeypatch):
    """A run says first, on stdout, which settings are not the recipe file's own."""
    import importlib
    cli = importlib.import_module(f"minispin.cli.{script[:-3]}")
    for name, returns in stubs.items():
        monkeypatch.setattr(cli, name, lambda *a, returns=returns, **k: returns)
    capsys.readouterr()
    assert run_cli(script, "--run-dir", tmp_path / "run", *flags, "--no-progress") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("settings beyond ") and out[0].endswith("tiny.toml:")
    assert line in out, out
    if script == "judge.py":  # --quiet: only the summary
        assert run_cli(script, "--run-dir", tmp_path / "run", *flags, "--quiet") == 0
        assert "settings beyond" not in str(capsys.readouterr())


def test_a_hub_suite_without_network_is_one_line_that_names_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}   # a proxy would answer
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=REPO)           # a hub that refuses every connection, an empty cache
    p = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--model", STORIES,   # --suite spin
                        "--limit", "2", "--output", str(tmp_path / "eval")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("evaluate.py: error: cannot reach the Hugging Face Hub") and "--offline" in lines[0]
