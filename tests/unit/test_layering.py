"""The data flow image -> features -> scorer -> map -> threshold stays one-directional."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "anomaly"

# module prefix -> anomaly modules it must never import
FORBIDDEN = {
    "anomaly.errors": ["anomaly."],
    "anomaly.metrics": ["anomaly.data", "anomaly.features", "anomaly.scorers", "anomaly.detector", "anomaly.cli"],
    "anomaly.data": ["anomaly.features", "anomaly.scorers", "anomaly.detector", "anomaly.metrics", "anomaly.cli"],
    "anomaly.features": ["anomaly.scorers", "anomaly.index", "anomaly.detector", "anomaly.data", "anomaly.cli"],
    "anomaly.index": ["anomaly.scorers", "anomaly.features", "anomaly.detector", "anomaly.cli"],
    "anomaly.scorers": ["anomaly.features", "anomaly.data", "anomaly.detector", "anomaly.metrics", "anomaly.cli"],
    "anomaly.detector": ["anomaly.metrics", "anomaly.benchmark", "anomaly.cli"],
    # torch-free: nothing that imports torch or timm (a test also runs it in a fresh process)
    "anomaly.runtime": [
        "anomaly.detector",
        "anomaly.features",
        "anomaly.scorers",
        "anomaly.export",
        "anomaly.serve",
        "anomaly.cli",
        "anomaly.metrics",
        "anomaly.benchmark",
        "anomaly.streaming",
        "torch",
        "timm",
    ],
    "anomaly.results": ["anomaly.", "torch"],
    "anomaly.serve": ["anomaly.cli", "anomaly.export", "anomaly.metrics", "anomaly.benchmark"],
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_upward_imports(path: Path) -> None:
    module = _module(path)
    for prefix, banned in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = [
                name for name in _imports(path) for b in banned if name.startswith(b) and not name.startswith(prefix)
            ]
            assert not bad, f"{module} imports {bad}"
