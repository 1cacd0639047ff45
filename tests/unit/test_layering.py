"""The data flow image -> features -> scorer -> map -> threshold -> result stays one-directional.

Every module of the package has a rule; a new module without one fails ``test_every_module_has_a_rule``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "anomaly"

_APP = ["anomaly.cli", "anomaly.benchmark", "anomaly.report", "anomaly.evaluation", "anomaly.outputs"]
_MODEL = ["anomaly.detector", "anomaly.streaming", "anomaly.features", "anomaly.scorers", "anomaly.index"]
_TORCH_FREE = ["torch", "timm", *[m for m in _MODEL if m != "anomaly.index"]]  # the FAISS wrapper is torch-free

# module prefix -> modules it must never import (its own sub-modules excepted)
FORBIDDEN: dict[str, list[str]] = {
    "anomaly.errors": ["anomaly."],
    "anomaly._fs": ["anomaly.", "!anomaly.errors"],
    "anomaly._runtime": ["anomaly.", "!anomaly.errors"],
    "anomaly.config": ["anomaly.", "!anomaly.errors"],
    "anomaly.tables": ["anomaly.", "!anomaly.errors", "!anomaly._fs", "torch"],  # _fs: a reader restores a swap
    "anomaly.distances": ["anomaly.", "!anomaly.index", "torch"],
    "anomaly.results": ["anomaly.", "torch"],
    "anomaly.maps": ["anomaly.", "torch"],
    "anomaly.thresholds": ["anomaly.", "!anomaly.errors", "torch"],
    "anomaly.metrics": ["anomaly.", "!anomaly.errors", "torch"],
    "anomaly.decisions": [
        "anomaly.",
        "!anomaly.maps",
        "!anomaly.results",
        "!anomaly.thresholds",
        "!anomaly.errors",
        "torch",
    ],
    "anomaly.runtime": [*_APP, *_TORCH_FREE, "anomaly.export", "anomaly.serve"],  # no torch: deployable alone
    "anomaly.export": ["anomaly.cli", "anomaly.benchmark", "anomaly.report", "anomaly.evaluation", "anomaly.serve"],
    "anomaly.serve": ["anomaly.cli", "anomaly.benchmark", "anomaly.report", "anomaly.evaluation", "torch", "timm"],
    "anomaly.data": [*_APP, *_MODEL, "anomaly.metrics", "anomaly.maps", "anomaly.thresholds", "torch"],
    "anomaly.model_dir": [*_APP, *_MODEL, "anomaly.data", "torch"],
    "anomaly.features": [
        *_APP,
        "anomaly.detector",
        "anomaly.streaming",
        "anomaly.scorers",
        "anomaly.index",
        "anomaly.data",
    ],
    "anomaly.index": [*_APP, "anomaly.detector", "anomaly.streaming", "anomaly.scorers", "anomaly.features"],
    "anomaly.scorers": [
        *_APP,
        "anomaly.detector",
        "anomaly.streaming",
        "anomaly.features",
        "anomaly.data",
        "anomaly.metrics",
    ],
    "anomaly.detector": [*_APP, "anomaly.streaming", "anomaly.metrics"],
    "anomaly.streaming": [*_APP, "anomaly.metrics"],
    "anomaly.discovery": [*_APP, "anomaly.detector", "anomaly.streaming", "anomaly.scorers", "anomaly.index"],
    "anomaly.outputs": ["anomaly.cli", "anomaly.benchmark", "anomaly.report", "anomaly.evaluation", *_TORCH_FREE],
    "anomaly.evaluation": ["anomaly.cli", "anomaly.benchmark", "anomaly.report", *_TORCH_FREE],
    "anomaly.report": ["anomaly.cli", "anomaly.benchmark", *_TORCH_FREE],
    "anomaly.distributed": ["anomaly.cli", "anomaly.benchmark", "anomaly.report", "anomaly.evaluation"],
    "anomaly.benchmark": ["anomaly.cli"],
    "anomaly.cli": [],  # the top: may use everything
    "anomaly.__main__": [],
    "anomaly": [],  # the package root: Detector is imported lazily there, on first use
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rule(module: str) -> str | None:
    matches = [p for p in FORBIDDEN if module == p or (p != "anomaly" and module.startswith(p + "."))]
    return max(matches, key=len) if matches else None


MODULES = sorted(PACKAGE.rglob("*.py"))


def _violations(module: str, imports: set[str]) -> list[str]:
    prefix = _rule(module)
    assert prefix is not None, f"{module} has no layering rule"
    banned = [b for b in FORBIDDEN[prefix] if not b.startswith("!")]
    allowed = [b[1:] for b in FORBIDDEN[prefix] if b.startswith("!")]

    def within(name: str, prefix: str) -> bool:
        return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")

    return [
        name
        for name in sorted(imports)
        for b in banned
        if within(name, b) and not within(name, prefix) and not any(within(name, a) for a in allowed)
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_imports(path: Path) -> None:
    module = _module(path)
    assert not _violations(module, _imports(path)), f"{module} imports {_violations(module, _imports(path))}"


def test_every_module_has_a_rule() -> None:
    assert all(_rule(_module(p)) is not None for p in MODULES)


def test_the_rules_catch_violations() -> None:
    assert _violations("anomaly.data.io", {"anomaly.detector", "numpy"}) == ["anomaly.detector"]
    assert _violations("anomaly.outputs", {"torch", "anomaly.results"}) == ["torch"]
    assert _violations("anomaly.thresholds", {"anomaly.errors"}) == []
    assert _violations("anomaly.scorers.musc", {"anomaly.scorers.base", "anomaly.features"}) == ["anomaly.features"]
