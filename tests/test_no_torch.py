"""Serving and online learning run in slim images without torch: prove they import without it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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


def _modules(package: str) -> list[str]:
    return [package] + [f"{package}.{info.name}"
                        for info in pkgutil.iter_modules([str(ROOT / package)])]


def test_serving_and_online_import_with_torch_blocked() -> None:
    names = _modules("serving") + _modules("online")
    assert len(names) > 2
    result = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *names], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_blocker_really_blocks_torch() -> None:
    result = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, "models.policies"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "torch is blocked" in result.stderr
