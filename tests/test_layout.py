"""The house rules of the package layout, checked over the source with ``ast`` (no import
of the package needed for the static rules):

* ``reference/`` never imports ``kernels`` (the goldens must not depend on what they judge);
* ``kernels/`` never imports a model's reference (``reference.deepseek_v4``/``reference.qwen3``);
* no import cycle in the package, counting function-level imports too (a lazy import
  that closes a cycle is still a cycle in the design);
* the runtime's stage tables import their kernels directly (a missing stage is an import
  error, never a silent fallback to the reference), and nothing uses ``importlib``;
* outside ``models/`` nothing branches on the model type (no ``isinstance`` against a model's
  config class, no comparison with a ``model_type`` string or a model's preset name);
* no file over 600 lines in ``llm_kernels/`` or ``benchmarks/``;
* no private name (``_x``) imported from another module of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "llm_kernels"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = here.split(".") if is_pkg else here.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, top_level_only: bool) -> set[str]:
    """Package modules imported by module ``name`` (``from X import y`` counts X.y when that
    is a module, else X)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()

    def visit(n):
        if isinstance(n, ast.Import):
            for a in n.names:
                out.add(a.name)
        elif isinstance(n, ast.ImportFrom):
            mod = _resolve(n, name, is_pkg)
            for a in n.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in MODULES else mod)
        elif isinstance(n, (ast.If, ast.Try)) and top_level_only:  # module-level guarded imports
            for c in ast.iter_child_nodes(n):
                visit(c)

    for n in nodes:
        visit(n)
    return {m for m in out if m.startswith("llm_kernels")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_references_never_import_kernels():
    bad = {m: sorted(i for i in _imports(m, False) if _under(i, "llm_kernels.kernels"))
           for m in MODULES if _under(m, "llm_kernels.reference")}
    assert not {m: v for m, v in bad.items() if v}


def test_kernels_never_import_a_model_reference():
    refs = ("llm_kernels.reference.deepseek_v4", "llm_kernels.reference.qwen3")
    bad = {m: sorted(i for i in _imports(m, False) if any(_under(i, r) for r in refs))
           for m in MODULES if _under(m, "llm_kernels.kernels")}
    assert not {m: v for m, v in bad.items() if v}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = dfs(u)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = {m: {i for i in _imports(m, False) if i in MODULES and i != m} for m in MODULES}
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("model", ["deepseek_v4", "qwen3"])
def test_runtime_imports_its_kernels_directly(model):
    import importlib

    name = f"llm_kernels.runtime.{model}.stages"
    direct = _imports(name, True)
    stages = importlib.import_module(name)
    fused, ref = vars(stages.FUSED_OPS), vars(stages.REFERENCE_OPS)
    kernel_stages = [k for k in fused if fused[k] is not ref[k]]
    assert set(kernel_stages) == set(stages.FUSED_STAGES) and kernel_stages
    for k in kernel_stages:
        mod = fused[k].__module__
        # a model's own kernels, or a model-neutral one (kernels/common, e.g. ``linear``)
        assert _under(mod, f"llm_kernels.kernels.{model}") or _under(mod, "llm_kernels.kernels.common"), (k, mod)
        assert mod in direct, f"{k}: {mod} is not imported at the top of {name}"
    assert stages.backend_stages("fused") == {k: "fused" if k in kernel_stages else "reference" for k in ref}
    with pytest.raises(ValueError, match="backend"):
        stages.stages("fusd")


def test_nothing_loads_code_by_name():
    """No ``importlib.import_module`` / ``spec_from_file_location`` / ``__import__``: code is
    reached by import statements the graph above can see (``importlib.metadata`` is fine)."""
    words = ("import_module", "spec_from_file_location", "module_from_spec", "__import__")
    users = [m for m, p in MODULES.items() if any(w in p.read_text() for w in words)]
    assert users == []


def _model_words() -> tuple[set[str], set[str]]:
    from llm_kernels import models

    types = set(models.model_types())
    classes = {models.get(t).config_class.__name__ for t in types}
    return types | set(models.preset_names()), classes


def test_no_model_type_branches_outside_models():
    words, classes = _model_words()
    found = []
    for name, path in MODULES.items():
        if _under(name, "llm_kernels.models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                cls = node.args[1] if len(node.args) > 1 else None
                names = {getattr(c, "id", getattr(c, "attr", None)) for c in
                         (cls.elts if isinstance(cls, ast.Tuple) else [cls])}
                if names & classes:
                    found.append(f"{path.name}:{node.lineno} isinstance {names & classes}")
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(isinstance(c, str) and c in words for c in consts):
                    found.append(f"{path.name}:{node.lineno} compares with {consts}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "endswith"):
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                if any(isinstance(a, str) and any(w.startswith(a) for w in words if len(a) >= 4) for a in args):
                    found.append(f"{path.name}:{node.lineno} {node.func.attr}{args}")
    assert found == []


@pytest.mark.parametrize("folder", ["llm_kernels", "benchmarks"])
def test_no_file_over_600_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_no_private_names_cross_modules():
    """``from X import _name`` between package modules: a helper used by two modules is
    public (and documented) in one of them."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = _resolve(node, name, path.name == "__init__.py")
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {mod}.{a.name}" for a in node.names
                          if mod.startswith("llm_kernels") and a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []
