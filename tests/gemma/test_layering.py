"""The dependency arrows of DESIGN.md: `gemma/` is a plain PyTorch library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# transformers is the test oracle only; sentencepiece is an optional extra imported lazily.
FORBIDDEN_IN_GEMMA = {"ray", "fastapi", "starlette", "uvicorn", "deployments", "transformers"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


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
