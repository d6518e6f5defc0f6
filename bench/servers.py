"""What the benchmarks share: the fake server in a process of its own, and a constitution for it to judge by.

The server runs in its own process on 127.0.0.1, so its CPU is never charged to the client being measured.
"""

from __future__ import annotations

import subprocess
import sys

CONSTITUTION = 'Pick the most and least harmless response. Answer {"chosen": x, "rejected": y}.\n'


def start_server(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m caiforge.testing.fake_server --port 0 FLAGS``; returns the process and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "caiforge.testing.fake_server", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()
