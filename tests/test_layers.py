"""The package's layers, read from the source: minispin/core imports nothing of the run or the
study (only torch, the standard library and itself), and no two modules import each other,
directly or around a cycle. Function-level imports count: a cycle hidden in a function is
still a cycle for a reader."""
import ast
import os
import sys

from helpers import REPO

PKG = os.path.join(REPO, "minispin")


def module_name(path):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def modules():
    out = {}
    for dp, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                out[module_name(os.path.join(dp, f))] = os.path.join(dp, f)
    return out


def imports_of(name, path, known):
    """The minispin modules `name` imports, and every top-level package it imports."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    ours, outside = set(), set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name.split(".")[0] == "minispin" else outside).add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module
            if mod.split(".")[0] != "minispin":
                outside.add(mod)
                continue
            for a in node.names:   # `from minispin.run import recipe` names a module
                ours.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    resolved = set()
    for m in ours:
        while m not in known and "." in m:
            m = m.rsplit(".", 1)[0]
        resolved.add(m)
    return resolved - {name}, {m.split(".")[0] for m in outside}


def graph():
    known = modules()
    return {n: imports_of(n, p, known) for n, p in known.items()}


def test_the_core_imports_only_torch_the_standard_library_and_itself():
    bad = []
    for name, (ours, outside) in graph().items():
        if not name.startswith("minispin.core"):
            continue
        for m in sorted(ours):
            if not m.startswith("minispin.core"):
                bad.append(f"{name} imports {m}")
        for m in sorted(outside):
            if m not in sys.stdlib_module_names and m not in ("torch", "__future__"):
                bad.append(f"{name} imports the package {m}")
    assert not bad, "the core must stand alone:\n" + "\n".join(bad)


def test_no_module_imports_itself_around_a_cycle():
    g = {n: ours for n, (ours, _) in graph().items()}
    # a module's package __init__ runs first whenever the module is imported: edges to
    # packages (minispin, minispin.core, ...) are not cycles of the code
    g = {n: {m for m in deps if not os.path.isfile(os.path.join(REPO, *m.split("."), "__init__.py"))}
         for n, deps in g.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_layer_check_sees_a_core_module_that_imports_the_run(tmp_path):
    """The check itself can fail: a core module importing the run is reported."""
    core = tmp_path / "minispin" / "core"
    core.mkdir(parents=True)
    (tmp_path / "minispin" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "bad.py").write_text("from ..run import errors\nimport numpy\n")
    known = {"minispin", "minispin.core", "minispin.core.bad", "minispin.run", "minispin.run.errors"}
    ours, outside = imports_of("minispin.core.bad", str(core / "bad.py"), known)
    assert ours == {"minispin.run.errors"} and outside == {"numpy"}


def test_importing_the_core_loads_no_module_of_the_run_or_the_study():
    """At run time too: the package's own __init__ must not pull the run in behind the core."""
    import subprocess
    code = ("import sys, minispin.core.model, minispin.core.sampling, minispin.core.loss, "
            "minispin.core.noise, minispin.core.lora, minispin.core.optim\n"
            "print(' '.join(m for m in sys.modules if m.startswith('minispin.') "
            "and not m.startswith('minispin.core')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
