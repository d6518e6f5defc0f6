"""llama-cpp-python's own OpenAI-compatible server, unchanged, with a recorder in front of it.

``python tests/llama_server.py --model M.gguf --log requests.jsonl`` serves ``llama_cpp.server``'s app on a
free loopback port, prints the URL once listening, and appends one JSON line per request (method, path,
status, body) *before* the response leaves, so anything a client has seen is already in the log. The
recorder is plain ASGI: it reads what passes and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings


class Recorder:
    def __init__(self, app: Any, log_path: str) -> None:
        self.app = app
        self.log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                raw = b"".join(chunks)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                line = {"method": scope["method"], "path": scope["path"], "status": message["status"], "body": body}
                self.log.write(json.dumps(line) + "\n")
            await send(message)

        await self.app(scope, recording_receive, recording_send)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model = ModelSettings(
        model=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,  # one core: the other is the test process's
        logits_all=True,  # log-probabilities for the CAI paper's soft labels
        verbose=False,
    )
    app = create_app(server_settings=ServerSettings(host="127.0.0.1", port=0), model_settings=[model])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts: the URL is good once printed
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(Recorder(app, args.log), log_level="warning", lifespan="off"))
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
