"""The house's layers point one way. Read from the source (every import, function-level ones
included; imports under ``if TYPE_CHECKING:`` are annotations, not dependencies):

- no import cycles between modules;
- the core (config, options, shift, components, model, checkpoint, generate, processing,
  tokenizer, the file helpers) imports nothing above it;
- data imports at most the tokenizer module and the file helpers from the core;
- probes import nothing from kvshift_lens at all (they read models through TransformerLens'
  protocol), and the figures of viz nothing from train, repro, the report or the CLI;
- the run-folder contract imports only the file helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvshift_lens", "probes")

CORE = {"kvshift_lens", "kvshift_lens._files", "kvshift_lens._lazy", "kvshift_lens.options",
        "kvshift_lens.config",
        "kvshift_lens.shift", "kvshift_lens.model", "kvshift_lens.checkpoint",
        "kvshift_lens.generate", "kvshift_lens.processing", "kvshift_lens.tokenizer",
        "kvshift_lens.hooked_transformer", "kvshift_lens.zoo.registry"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    modules = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            modules[_module_name(path)] = path
    edges = {}
    for name, path in modules.items():
        raw = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        edges[name] = {m for m in raw if m in modules and m != name}
    return edges


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in edges:
        if v not in index:
            strong(v)
    return out


def _is_package_init(edges: dict[str, set[str]], name: str) -> bool:
    return any(other.startswith(name + ".") for other in edges)


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ re-exporting its submodules is not a cycle in the sense that matters
    # (submodules importing siblings through the package); drop the package -> submodule edges.
    pruned = {k: {m for m in v if not (_is_package_init(edges, k) and m.startswith(k + "."))}
              for k, v in edges.items()}
    cycles = [sorted(c) for c in _strongly_connected(pruned) if len(c) > 1]
    assert not cycles, cycles


def _violations(edges: dict[str, set[str]], who, allowed) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in edges.items() if who(a) for b in deps if not allowed(b))


def test_core_imports_nothing_above_it():
    edges = graph()

    def is_core(m: str) -> bool:
        return m in CORE or m.startswith("kvshift_lens.components")

    assert _violations(edges, is_core, is_core) == []


def test_data_imports_only_the_tokenizer_from_the_core():
    edges = graph()
    allowed = {"kvshift_lens.tokenizer", "kvshift_lens._files", "kvshift_lens"}
    bad = _violations(edges, lambda m: m.startswith("kvshift_lens.data"),
                      lambda m: m in allowed or m.startswith("kvshift_lens.data"))
    assert bad == []


def test_probes_do_not_import_kvshift_lens():
    edges = graph()
    assert _violations(edges, lambda m: m.startswith("probes"),
                       lambda m: m.startswith("probes")) == []


def test_viz_draws_without_training_or_reports():
    edges = graph()
    above = ("kvshift_lens.train", "kvshift_lens.repro", "kvshift_lens.report", "kvshift_lens.cli",
             "kvshift_lens.demo", "kvshift_lens.run_folder")
    assert _violations(edges, lambda m: m.startswith("kvshift_lens.viz"),
                       lambda m: not m.startswith(above)) == []


def test_the_run_folder_contract_stands_alone():
    edges = graph()
    assert edges["kvshift_lens.run_folder"] <= {"kvshift_lens._files"}
