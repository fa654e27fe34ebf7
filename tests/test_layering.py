"""The package's layering (magdiff_jax/__init__.py has the diagram), read from every import statement in the source,
function-level imports included: who may import whom, no cycle between packages or between modules, and PyTorch
only where the core never goes."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "magdiff_jax"

# the layers, top to bottom: a package imports only packages on a lower line (magdiff_jax/__init__.py)
LEVELS = (("cli",), ("demo",), ("train",), ("pipelines", "eval"), ("data", "convert"), ("export", "cpu"), ("models",),
          ("layers", "diffusion", "sharding", "distributed"), ("utils",))
LEVEL = {pkg: i for i, line in enumerate(LEVELS) for pkg in line}
TORCH = ("torch", "diffusers", "torchvision")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            # `from magdiff_jax import cpu` imports the module magdiff_jax.cpu
            if node.module == "magdiff_jax":
                found += [(f"magdiff_jax.{alias.name}", node.lineno) for alias in node.names]
    return sorted(found, key=lambda item: item[1])


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "magdiff_jax" and len(parts) > 1 else None


@pytest.fixture(scope="module")
def graph():
    """{module: [(imported magdiff_jax module or third-party top-level name, line)]} over the whole package."""
    return {_module_name(p): (p, _imports(p)) for p in sorted(ROOT.rglob("*.py"))}


def test_every_package_has_a_level(graph):
    packages = {_package(m) for m in graph} - {None, "torch_port"}
    assert packages <= set(LEVEL), sorted(packages - set(LEVEL))


def test_imports_point_down(graph):
    """Every import of another package goes to a lower line of LEVELS; PyTorch's port imports utils/ alone and
    nothing imports it."""
    bad = []
    for module, (path, imports) in graph.items():
        pkg = _package(module)
        for target, line in imports:
            tpkg = _package(target)
            if not tpkg or tpkg == pkg:
                continue
            if pkg == "torch_port" or tpkg == "torch_port":
                ok = pkg == "torch_port" and tpkg == "utils"
            else:
                ok = LEVEL[tpkg] > LEVEL[pkg]
            if not ok:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {pkg} imports {target}")
    assert not bad, "\n".join(bad)


# convert/'s one optional torch path: pickle-based weights read with torch.load(weights_only=True), imported inside
# the function that needs it (the torch extra)
TORCH_READERS = {"magdiff_jax.convert.safetensors_io"}


def test_pytorch_only_in_the_port(graph):
    bad = [f"{path.relative_to(ROOT.parent)}:{line}: imports {target}"
           for module, (path, imports) in graph.items()
           if _package(module) != "torch_port" and module not in TORCH_READERS
           for target, line in imports if target.split(".")[0] in TORCH]
    assert not bad, "\n".join(bad)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (a list of nodes, first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_cycle_between_packages(graph):
    edges = defaultdict(set)
    for module, (_, imports) in graph.items():
        pkg = _package(module)
        for target, _ in imports:
            tpkg = _package(target)
            if pkg and tpkg and tpkg != pkg:
                edges[pkg].add(tpkg)
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_no_cycle_between_modules(graph):
    known = set(graph)
    edges = defaultdict(set)
    for module, (_, imports) in graph.items():
        for target, _ in imports:
            # `from magdiff_jax.x import name` may name a module or an attribute: take the longest known module
            while target and target not in known:
                target = target.rpartition(".")[0]
            parent = module.rpartition(".")[0]
            if target and target != module and target != parent and not module.startswith(f"{target}."):
                edges[module].add(target)
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_checks_see_a_violation(tmp_path):
    """The import reader finds function-level imports and `from magdiff_jax import x` forms."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from magdiff_jax.train.trainer import train\n\nfrom magdiff_jax import cpu\n")
    assert _imports(path) == [("magdiff_jax.train.trainer", 2), ("magdiff_jax", 4), ("magdiff_jax.cpu", 4)]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
