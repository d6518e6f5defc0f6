"""``caiforge view`` served from a thread of the test process, on a port of its own, for urllib and browsers."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from caiforge.view import serve
from conftest import Run, run_on


class Viewer:
    def __init__(self, run_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner, self.url = self.loop.run_until_complete(serve(run_dir))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30)
        parts = urlsplit(self.url)
        self.base, self.token = f"{parts.scheme}://{parts.netloc}", parts.query.removeprefix("token=")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        return self._open(urllib.request.Request(self.base + path, headers=headers or {}))

    def post(self, path: str, form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str, dict]:
        data = urlencode(form).encode()
        return self._open(urllib.request.Request(self.base + path, data=data, headers=headers or {}, method="POST"))

    def _open(self, request: urllib.request.Request) -> tuple[int, str, dict[str, str]]:
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@contextmanager
def viewing(run_cli, server, tmp_path: Path, constitution: Path, prompts: list[str]) -> Iterator[tuple[Viewer, Run]]:
    """A run of ``prompts`` (failures not retried) and a viewer on it, stopped afterwards."""
    result = run_on(run_cli, server, tmp_path, constitution, "--max-retries", "0", "--policy-output-retries", "0",
                    prompts=prompts)  # fmt: skip
    assert result.code == 0, result.stderr
    viewer = Viewer(result.out)
    try:
        yield viewer, result
    finally:
        viewer.stop()
