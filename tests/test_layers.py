"""The import layers the README draws, enforced: a wrong arrow fails here, not in review.

Bottom to top: ``policyloop.contract`` (errors, manifest and signature, event records,
posterior) imports nothing of the project; ``policyloop.bus`` and ``policyloop.registry`` build
on it; ``serving`` and ``online`` sit side by side on those and never import each other;
``models`` (the only torch folder) may use everything below it; the CLI and its command bodies
in ``policyloop`` sit on top. ``policyloop_client`` (``clients/python``, the library apps
install) imports nothing of the project; of the project only the top (``simulate``, the
demo's traffic) imports it. Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONTRACT, BUS, REGISTRY = "policyloop.contract", "policyloop.bus", "policyloop.registry"
SIMULATORS, TOP = "policyloop.simulators", "policyloop"

# layer -> the layers its modules may import (each may always import itself).
ALLOWED: dict[str, set[str]] = {
    "protos": set(),
    "policyloop_client": set(),
    CONTRACT: set(),
    BUS: {CONTRACT},
    REGISTRY: {CONTRACT, BUS},
    SIMULATORS: {CONTRACT},
    "online": {CONTRACT, BUS, REGISTRY},
    "serving": {CONTRACT, BUS, REGISTRY, "protos"},
    "models": {CONTRACT, BUS, REGISTRY, SIMULATORS, "online"},
    TOP: {CONTRACT, BUS, REGISTRY, SIMULATORS, "online", "serving", "models", "protos",
          "policyloop_client"},  # simulate and the demo drive traffic as an app does
}
TORCH_LAYERS = {"models", TOP}  # the CLI imports torch only inside train/export commands
PACKAGES = ("protos", "policyloop", "online", "serving", "models", "policyloop_client")
FOLDER = {"policyloop_client": ROOT / "clients" / "python"}  # the others are at the root


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to, or None outside the project.

    >>> layer_of("policyloop.bus.kafka"), layer_of("policyloop.cli"), layer_of("numpy")
    ('policyloop.bus', 'policyloop', None)
    """
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``, relative ones resolved."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # ``from policyloop.bus import interface`` imports policyloop.bus.interface.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, module: str) -> list[str]:
    """Every import in ``source`` (the text of ``module``) that breaks the layering."""
    own = layer_of(module)
    assert own is not None, module
    wrong = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top == "torch" and own not in TORCH_LAYERS:
            wrong.append(f"{module}:{line} imports torch")
        if name in ("policyloop", "policyloop.__version__"):
            continue  # the package's __init__ holds only the version string
        target = layer_of(name)
        if target is None or target == own:
            continue
        if target not in ALLOWED[own]:
            wrong.append(f"{module}:{line} imports {name} ({own} may not import {target})")
    return wrong


def project_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in PACKAGES:
        base = FOLDER.get(package, ROOT)
        for path in sorted((base / package).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules.append((name, path))
    return modules


def test_every_import_follows_the_layers() -> None:
    modules = project_modules()
    assert len(modules) > 50
    wrong = [v for name, path in modules for v in violations(path.read_text(), name)]
    assert wrong == []


def test_the_package_init_imports_nothing() -> None:
    assert imported_modules((ROOT / "policyloop" / "__init__.py").read_text(), "policyloop") == []


@pytest.mark.parametrize(("module", "source", "complaint"), [
    ("policyloop.contract.events", "from serving.config import ServeConfig", "may not import"),
    ("online.learner", "def f():\n    from serving import exploration", "may not import serving"),
    ("serving.dataplane", "import online.join", "may not import online"),
    ("policyloop.bus.kafka", "from policyloop.registry.local import LocalRegistry",
     "may not import policyloop.registry"),
    ("policyloop.registry.onnx_head", "import torch", "imports torch"),
    ("online.linear", "from ..models import policies", "may not import models"),
    ("policyloop_client.client", "from protos import decision_pb2",
     "may not import protos"),
])
def test_a_wrong_arrow_is_caught(module: str, source: str, complaint: str) -> None:
    wrong = violations(source, module)
    assert len(wrong) == 1 and complaint in wrong[0]


def test_allowed_arrows_pass() -> None:
    assert violations("from policyloop.contract.errors import InvalidArgument\nimport numpy",
                      "policyloop.bus.local_log") == []
    assert violations("from models.export import export_command", "policyloop.cli") == []


_BLOCK_TORCH = """
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, _NoTorch())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("imported", len(sys.argv) - 1, "modules")
"""


def test_everything_but_models_imports_with_torch_blocked() -> None:
    """The serving and learner images have no torch: every module they copy must import."""
    names = [name for name, _ in project_modules() if layer_of(name) != "models"]
    assert {"serving.server", "online.learner", "policyloop.cli", CONTRACT} <= set(names)
    result = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *names], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_blocker_really_blocks_torch() -> None:
    result = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, "models.policies"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "torch is blocked" in result.stderr
