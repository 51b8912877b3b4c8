"""docs/your-own-policy.md runs as written: every block, in order, in an empty folder.

``toml`` blocks are written to the file their first line names; ``bash`` lines run as the
``policyloop`` command (a line ending in ``&`` stays in the background until the end);
``python`` blocks run as scripts. The tutorial's ports 50051 and 9464 become free ones.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_processes import stop_all

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "your-own-policy.md"
BLOCK = re.compile(r"```(toml|bash|python)\n(.*?)```", re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(TUTORIAL.read_text())]


def test_the_tutorial_has_each_kind_of_block() -> None:
    kinds = [kind for kind, _ in blocks()]
    assert {"toml", "bash", "python"} <= set(kinds)


@pytest.mark.slow
def test_every_block_of_the_tutorial_runs(tmp_path: Path) -> None:
    ports = {"50051": str(_free_port()), "9464": str(_free_port())}
    background: list[subprocess.Popen[bytes]] = []
    outputs: list[str] = []
    try:
        for kind, text in blocks():
            for old, new in ports.items():
                text = text.replace(old, new)
            if kind == "toml":
                name = text.splitlines()[0].lstrip("# ").strip()
                (tmp_path / name).write_text(text)
            elif kind == "python":
                done = subprocess.run([sys.executable, "-c", text], cwd=tmp_path,
                                      capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stderr
                outputs.append(done.stdout)
            else:
                for line in text.splitlines():
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    words = shlex.split(line.split(" #")[0].rstrip(" &"))
                    assert words[0] == "policyloop", line
                    command = [sys.executable, "-m", "policyloop.cli", *words[1:]]
                    if line.rstrip().endswith("&"):
                        background.append(subprocess.Popen(
                            command, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL))
                        continue
                    done = subprocess.run(command, cwd=tmp_path, capture_output=True,
                                          text=True, timeout=300)
                    assert done.returncode == 0, (line, done.stderr)
                    outputs.append(done.stdout)
        for process in background:
            assert process.poll() is None, "a background command of the tutorial exited"
    finally:
        stop_all(background)
    summary = next(json.loads(o) for o in outputs if o.lstrip().startswith("{\n"))
    print(json.dumps({k: summary[k] for k in ("expected_by_fifth", "optimal_by_fifth")}))
    assert summary["decisions"] == 4000 and summary["errors"] == {}
    # what the page says the reader will see: the last fifth within about 10% of the optimum
    assert summary["expected_by_fifth"][-1] >= 0.85 * summary["optimal_by_fifth"][-1], summary
    assert summary["expected_by_fifth"][-1] > summary["expected_by_fifth"][0]
    versions = LocalVersions(tmp_path / "var" / "registry")
    assert versions.count("router") > 3


class LocalVersions:
    def __init__(self, root: Path) -> None:
        from policyloop.registry.local import LocalRegistry

        self._registry = LocalRegistry(root)

    def count(self, policy: str) -> int:
        return len(self._registry.versions(policy))
