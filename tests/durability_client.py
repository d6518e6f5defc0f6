"""``caiforge`` with its store's reply writes and commits logged, for the kill -9 test.

Each event is one ``write(2)`` to a file opened with O_APPEND, so the log survives the kill -9 that the store's
open transaction does not: the test compares what the process had finished, what it had committed, and what
the database kept.

    CAIFORGE_EVENT_LOG=events.log python tests/durability_client.py run ARGS...
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from caiforge.cli import main
from caiforge.store import Store

LOG = os.open(os.environ["CAIFORGE_EVENT_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
real_put, real_commit = Store.put_reply, Store.commit


def put_reply(self: Store, key: str, role: str, reply: Any) -> None:
    real_put(self, key, role, reply)
    os.write(LOG, f"put {key} {time.monotonic()}\n".encode())


def commit(self: Store) -> None:
    pending = self._began is not None
    real_commit(self)
    if pending:
        os.write(LOG, f"commit - {time.monotonic()}\n".encode())


Store.put_reply = put_reply  # type: ignore[method-assign]
Store.commit = commit  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
