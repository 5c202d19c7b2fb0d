"""The dependency arrows of DESIGN.md: `gemma/` is a plain PyTorch library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# transformers is the test oracle only; sentencepiece is an optional extra imported lazily.
FORBIDDEN_IN_GEMMA = {"ray", "fastapi", "starlette", "uvicorn", "deployments", "transformers"}


def imported_modules(path: Path, top_level: bool = True) -> set[str]:
    """The modules `path` imports (absolute imports, lazy ones included): their top-level packages, or in full."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n.split(".")[0] for n in names} if top_level else names


def test_gemma_imports_no_serving_code():
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_modules(p) & FORBIDDEN_IN_GEMMA)
        for p in (ROOT / "gemma").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_import_gemma_loads_no_optional_dependency():
    code = "import sys, gemma; print(sorted(m for m in ('ray', 'transformers', 'sentencepiece', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def gemma_module_imports() -> dict[str, set[str]]:
    """Every gemma module's imports of other gemma modules, lazy ones (inside functions) included; imports under
    `if TYPE_CHECKING:` never run and are left out. `from gemma.x import y` is an edge to gemma.x.y where that is a
    module, else to gemma.x."""
    modules = {}
    for path in (ROOT / "gemma").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {
            id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges |= {target(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                edges |= {target(f"{base}.{a.name}") for a in node.names}
        graph[name] = {e for e in edges if e is not None and e != name}
    return graph


def test_no_import_cycle_in_gemma_lazy_imports_included():
    graph = gemma_module_imports()
    assert {"gemma.model", "gemma.cpu.fastpath", "gemma.engine.llm_engine"} <= graph.keys()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_model_and_parallel_know_nothing_of_the_cpu_fast_path():
    """model.py is the algebra and parallel.py tensor parallelism: the CPU kernels are applied from gemma.cpu."""
    graph = gemma_module_imports()
    for name in ("gemma.model", "gemma.parallel", "gemma.layers"):
        assert not {m for m in graph[name] if m.startswith("gemma.cpu")}, name


def test_no_test_module_imports_another():
    """Tests share code through tests/helpers only: importing a test module (or conftest) runs its collection-time
    code a second time and hides which module a fixture comes from."""
    offenders = {}
    for path in (ROOT / "tests").rglob("*.py"):
        names = {n.rpartition(".")[2] for n in imported_modules(path, top_level=False)}
        bad = sorted(n for n in names if n.startswith("test_") or n == "conftest")
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders

