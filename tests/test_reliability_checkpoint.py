"""A damaged learner checkpoint stops ``policyloop learn`` with one line naming the file and
the way out; it never gives a traceback, and never silently starts fresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from online.config import LearnConfig
from online.learner import Learner
from policyloop.contract.errors import InvalidArgument
from policyloop.registry.local import LocalRegistry
from tests.bandit_stream import register_untrained_routing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint")
    register_untrained_routing(LocalRegistry(root / "registry"))
    return root


def _config(root: Path, checkpoint: Path) -> LearnConfig:
    return LearnConfig(registry=root / "registry", policy="routing", bus_path=root / "bus",
                       partitions=1, checkpoint=checkpoint, gate=False)


@pytest.fixture(scope="module")
def good(root: Path) -> dict:
    """A checkpoint the learner itself wrote."""
    path = root / "good.json"
    Learner(_config(root, path)).checkpoint()
    state = json.loads(path.read_text())
    Learner(_config(root, path))  # and it restores
    return state


def _damage(good: dict, how: str) -> str:
    text = json.dumps(good)
    if how == "truncated":
        return text[: len(text) // 2]
    if how == "empty":
        return ""
    if how == "list":
        return "[1, 2, 3]"
    if how == "missing":
        return json.dumps({k: v for k, v in good.items() if k != "joiner"})
    if how == "wrong_types":
        return json.dumps({**good, "positions": 5})
    if how == "binary":
        return "\x00\xff garbage"
    raise AssertionError(how)


@pytest.mark.parametrize(("how", "problem"), [
    ("truncated", "is not valid JSON"), ("empty", "is empty"), ("list", "JSON list"),
    ("missing", "lacks joiner"), ("wrong_types", "does not load"),
    ("binary", "is not valid JSON")])
def test_a_damaged_checkpoint_is_refused_with_its_problem(root: Path, good: dict,
                                                          tmp_path: Path, how: str,
                                                          problem: str) -> None:
    path = tmp_path / "ckpt.json"
    path.write_text(_damage(good, how))
    with pytest.raises(InvalidArgument, match=problem) as caught:
        Learner(_config(root, path))
    assert str(path) in str(caught.value) and "start this learner fresh" in str(caught.value)
    assert path.read_text() == _damage(good, how)  # left where it was, for the operator


def test_a_directory_in_the_checkpoints_place_is_refused(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.json"
    path.mkdir()
    with pytest.raises(InvalidArgument, match="cannot be read"):
        Learner(_config(root, path))


def test_the_cli_says_one_line_and_exits_2(root: Path, good: dict, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.json"
    path.write_text(_damage(good, "truncated"))
    done = subprocess.run(
        [sys.executable, "-m", "policyloop.cli", "learn", "--registry", str(root / "registry"),
         "--policy", "routing", "--bus-path", str(root / "bus"), "--partitions", "1",
         "--checkpoint", str(path), "--idle-exit", "0.5", "--no-gate"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"policyloop learn: checkpoint {path}: is not valid JSON")
