"""Long-running ``policyloop`` processes in tests, as a user starts them: read the line a
process announces itself with, and stop every one at the end, even after a failure."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def read_line(proc: subprocess.Popen[str], prefix: str) -> str:
    """The next line ``proc`` prints, which must start with ``prefix``."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(prefix), line
    return line


def stop_all(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM each, wait for a clean exit, SIGKILL what does not exit within 20 s."""
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
