"""Backends against an in-process transport (a plain function behind HttpClient, as httpx's MockTransport):
what each sends, how it reads the reply, and how the registry drives kinds. Real servers are in the
end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from caiforge import backends
from caiforge.backends.nemo import NemoBackend, NemoOptions
from caiforge.backends.openai import OpenAIBackend, judge_options, policy_options
from caiforge.config import DEFAULT_JUDGE_URL, build_config
from caiforge.errors import BadModelOutput, PermanentError, TransientError
from caiforge.request import Reply, Request


class Transport:
    """Records every request and answers from ``answer(method, url, body) -> (status, json or text)``."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.seen = answer, []

    async def __call__(self, method: str, url: str, payload: Any, headers: dict[str, str]):
        self.seen.append((method, url, payload, headers))
        status, body = self.answer(method, url, payload)
        text = body if isinstance(body, str) else json.dumps(body)
        return status, {}, text.encode()


def chat_reply(content: Any, logprobs: Any = None) -> dict[str, Any]:
    return {
        "choices": [{"message": {"role": "assistant", "content": content}, "logprobs": logprobs}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }


def judge_backend(transport: Transport, **judge: Any) -> OpenAIBackend:
    cfg = build_config({"judge": {"url": "http://127.0.0.1:1/v1", "model": "m", "api_key": "sk-SECRET", **judge}})
    return OpenAIBackend(judge_options(cfg), transport)


def test_the_judge_sends_the_seeds_request_and_reads_the_reply():
    transport = Transport(lambda m, u, b: (200, chat_reply('{"chosen": 1, "rejected": 2}')))
    backend = judge_backend(transport)
    request = Request(messages=[{"role": "user", "content": "judge"}], seed=5, max_tokens=9, schema={"type": "object"})
    [reply] = asyncio.run(backend.send([request]))
    method, url, body, headers = transport.seen[0]
    assert (method, url) == ("POST", "http://127.0.0.1:1/v1/chat/completions")
    assert body["temperature"] == pytest.approx(1e-7) and body["top_p"] == pytest.approx(1e-7)
    assert (body["seed"], body["max_tokens"], body["stream"]) == (5, 9, False)
    assert body["response_format"]["type"] == "json_schema"
    assert headers["Authorization"] == "Bearer sk-SECRET"
    assert reply == Reply(text='{"chosen": 1, "rejected": 2}', prompt_tokens=7, completion_tokens=3)


def test_a_refused_schema_steps_down_and_the_key_never_shows_in_the_error():
    def answer(method: str, url: str, body: dict[str, Any]):
        if body.get("response_format", {}).get("type") == "json_schema":
            return 422, {"detail": [{"loc": ["body", "response_format", "type"], "msg": "Input should be 'text'"}]}
        return 200, chat_reply("ok")

    transport = Transport(answer)
    backend = judge_backend(transport)
    request = Request(messages=[{"role": "user", "content": "j"}], schema={"type": "object"})
    [reply] = asyncio.run(backend.send([request]))
    assert isinstance(reply, Reply) and reply.text == "ok"
    assert [b["response_format"]["type"] for _, _, b, _ in transport.seen] == ["json_schema", "json_object"]
    assert backend.adaptations()[0]["structured_output"] == "json_object"

    unauthorised = judge_backend(Transport(lambda m, u, b: (401, "bad key sk-SECRET")))
    with pytest.raises(PermanentError) as caught:
        asyncio.run(unauthorised.send([request]))
    assert "sk-SECRET" not in str(caught.value) and "***" in str(caught.value)


def test_a_reply_without_content_is_unusable_and_a_5xx_is_transient():
    [reply] = asyncio.run(judge_backend(Transport(lambda m, u, b: (200, chat_reply(None)))).send([Request(prompt="x")]))
    assert isinstance(reply, BadModelOutput)
    with pytest.raises(TransientError):
        asyncio.run(judge_backend(Transport(lambda m, u, b: (503, "busy"))).send([Request(prompt="x")]))


@pytest.mark.parametrize("chat", [True, False])
def test_the_policy_applies_the_template_on_completions_and_the_system_message_on_chat(chat):
    reply = chat_reply("Sure.<extra_id_1>junk") if chat else {"choices": [{"text": " Sure.<extra_id_1>junk"}]}
    transport = Transport(lambda m, u, b: (200, reply))
    cfg = build_config(
        {
            "policy": {"backend": "openai-chat" if chat else "openai-completions", "url": "http://h/v1", "model": "p"},
            "template": {"system_default_message": "Be kind."},
        }
    )
    backend = OpenAIBackend(policy_options(cfg, chat=chat), transport)
    [out] = asyncio.run(backend.send([Request(messages=[{"role": "user", "content": "Hi"}], temperature=0.51)]))
    _, url, body, _ = transport.seen[0]
    assert out == Reply(text="Sure.", prompt_tokens=7 if chat else None, completion_tokens=3 if chat else None)
    assert body["temperature"] == 0.51 and body["top_k"] == 50 and body["stop"] == ["<extra_id_1>"]
    if chat:
        assert url.endswith("/chat/completions")
        assert body["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    else:
        assert url.endswith("/completions")
        assert body["prompt"] == "<extra_id_0>System\nBe kind.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"


def test_nemo_sends_one_batch_and_cuts_each_response_out_of_the_echo():
    def answer(method: str, url: str, body: dict[str, Any]):
        return 200, {"sentences": [s + f"answer {i}<extra_id_1>" for i, s in enumerate(body["sentences"])]}

    transport = Transport(answer)
    backend = NemoBackend(NemoOptions(port=7777, batch_size=8), transport)
    requests = [Request(messages=[{"role": "user", "content": f"q{i}"}], temperature=0.01) for i in range(3)]
    replies = asyncio.run(backend.send(requests))
    method, url, body, _ = transport.seen[0]
    assert (method, url) == ("PUT", "http://localhost:7777/generate")
    assert len(body["sentences"]) == 3 and body["temperature"] == pytest.approx(0.01 + 1e-8)
    assert [r.text for r in replies if isinstance(r, Reply)] == ["answer 0", "answer 1", "answer 2"]
    assert backend.capabilities.batch == 8

    short = NemoBackend(NemoOptions(), Transport(lambda m, u, b: (200, {"sentences": ["one"]})))
    with pytest.raises(TransientError, match="expected 3 sentences, got 1"):
        asyncio.run(short.send(requests))


def test_the_registry_drives_choices_inference_and_defaults():
    assert set(backends.choices("policy")) == {"nemo", "openai-chat", "openai-completions", "local"}
    assert set(backends.choices("judge")) == {"openai", "local"}
    assert build_config({"policy": {"url": "http://h/v1", "model": "m"}}).policy.backend == "openai-chat"
    assert build_config({"policy": {"port": 5000}}).policy.host == "localhost"
    assert build_config({}).policy.sampling.tokens_to_generate == 40  # the local kind's default, not the seed's 1024
    judge = build_config({"judge": {"api_key": "k"}}).judge
    assert (judge.backend, judge.url) == ("openai", DEFAULT_JUDGE_URL)
    cfg = build_config({"policy": {"backend": "nemo", "port": 5000}})
    assert backends.describe(cfg, "policy") == "NeMo at localhost:5000"
    with pytest.raises(Exception, match="unknown policy backend 'vllm'"):
        build_config({"policy": {"backend": "vllm"}})


def test_keys_come_from_the_environment_in_one_place(monkeypatch):
    monkeypatch.setenv("NGC_API_KEY", "from-env")
    monkeypatch.setenv("CAIFORGE_POLICY_API_KEY", "policy-env")
    cfg = build_config({"policy": {"url": "http://h/v1", "model": "m"}})
    assert cfg.judge.api_key is not None and cfg.judge.api_key.get_secret_value() == "from-env"
    assert cfg.policy.api_key is not None and cfg.policy.api_key.get_secret_value() == "policy-env"
    assert cfg.judge.backend == "openai"  # an exported NGC key picks the hosted judge, as the seed's users expect
    given = build_config({"judge": {"api_key": "given"}})
    assert given.judge.api_key is not None and given.judge.api_key.get_secret_value() == "given"
    assert "from-env" not in json.dumps(cfg.public_dict()) and "policy-env" not in json.dumps(cfg.public_dict())
