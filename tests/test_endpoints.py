"""Endpoints as they really are: checked before the first request, and adapted to when they refuse a field.

Every assertion reads what the server recorded (bodies, statuses) or what the run wrote; nothing is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from caiforge.backends.http import refused_fields
from caiforge.testing.fake_server import FakeConfig, FakeServer, Fault
from conftest import run_on, write_prompts

PROMPTS = [f"Endpoint prompt {i}: how do I do a bad thing?" for i in range(6)]


def run(run_cli, server, tmp_path, constitution, *extra, policy="openai-chat", name="out", prompts=PROMPTS):
    return run_on(run_cli, server, tmp_path, constitution, *extra, prompts=prompts, policy=policy, name=name)


def judge_requests(server):
    return [r for r in server.requests if r.body and "FULL TEXT" in json.dumps(r.body)]


def policy_requests(server):
    return [r for r in server.requests if r.body and "FULL TEXT" not in json.dumps(r.body) and "model" in r.body]


# ---- what counts as a refusal ----------------------------------------------------------------------------
LLAMA_CPP_PYTHON_500 = (
    "{\"error\":{\"message\":\"[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \\\"Input should be 'text' or 'json_object'\\\", 'input': 'json_schema'}]\","
    '"type":"internal_server_error","param":null,"code":null}}'
)


@pytest.mark.parametrize(
    ("status", "body", "payload", "expected"),
    [
        (500, LLAMA_CPP_PYTHON_500, {"response_format": {}, "seed": 1}, {"response_format"}),
        (400, '{"error": "Unrecognized request argument supplied: top_k"}', {"top_k": 5}, {"top_k"}),
        (
            422,
            "Failed to deserialize the JSON body: unknown field `repetition_penalty`",
            {"repetition_penalty": 1},
            {"repetition_penalty"},
        ),
        (400, '{"detail": [{"loc": ["body", "seed"], "msg": "extra fields not permitted"}]}', {"seed": 1}, {"seed"}),
        (400, "guided_json is not supported by this backend", {"response_format": {}}, {"response_format"}),
        (500, "CUDA out of memory while handling top_k", {"top_k": 5}, set()),  # a crash, not a validation error
        (500, "internal error", {"response_format": {}}, set()),
        (503, "top_k is not supported", {"temperature": 1}, set()),  # names nothing we sent
        (404, "seed not supported", {"seed": 1}, set()),  # 404 is a wrong URL, not a refused field
        (400, "messages: Input should be a valid list", {"messages": "x"}, set()),  # never drop the content
    ],
)
def test_a_refusal_is_a_validation_error_naming_a_field_we_sent(status, body, payload, expected):
    assert refused_fields(status, body, payload) == expected


# ---- the structured-output ladder ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("takes", "status", "expected_forms"),
    [
        ("json_schema", 400, ["json_schema"]),  # vLLM, NIM: nothing to step down
        ("json_object", 500, ["json_schema", "json_object"]),  # llama-cpp-python
        ("json_object", 400, ["json_schema", "json_object"]),
        ("none", 422, ["json_schema", "json_object", None]),  # a server without structured output
    ],
)
def test_structured_output_steps_down_the_ladder_and_remembers(
    run_cli, tmp_path, constitution, takes, status, expected_forms
):
    config = FakeConfig(structured=takes, refusal_status=status)
    with FakeServer(config) as server:
        result = run(run_cli, server, tmp_path, constitution, "--judge-concurrency", "1")
        assert result.code == 0, result.stderr
        requests = judge_requests(server)
    assert len(result.json("cai_preference_dataset.json")) == len(PROMPTS)
    forms = [(r.body.get("response_format") or {}).get("type") for r in requests]
    # One judge request at a time: each form the server refuses is sent exactly once, then never again.
    assert forms == expected_forms[:-1] + [expected_forms[-1]] * len(PROMPTS)
    assert [r.status for r in requests] == [status] * (len(expected_forms) - 1) + [200] * len(PROMPTS)
    manifest = result.json("manifest.json")
    assert manifest["endpoints"]["judge"]["structured_output"] == (expected_forms[-1] or "text")
    assert manifest["stats"]["retries"].get("judge", 0) == 0  # a refusal is adapted to, never retried
    if len(expected_forms) > 1:
        assert "refused response_format json_schema" in result.stdout
    object_form = [r.body["response_format"] for r in requests if forms[requests.index(r)] == "json_object"]
    assert all(set(f) == {"type", "schema"} and f["schema"]["anyOf"] for f in object_form)


def test_concurrent_refusals_step_down_once(run_cli, tmp_path, constitution):
    """Requests already in flight when the first refusal lands are refused too; the ladder moves one step."""
    with FakeServer(FakeConfig(structured="json_object", refusal_status=500)) as server:
        result = run(run_cli, server, tmp_path, constitution, "--judge-concurrency", "4")
        assert result.code == 0, result.stderr
        requests = judge_requests(server)
    refused = [r for r in requests if r.status == 500]
    assert 1 <= len(refused) <= 4  # at most what the limiter let out before the first answer (it starts at 4)
    assert all(r.body["response_format"]["type"] == "json_schema" for r in refused)
    assert len(requests) == len(PROMPTS) + len(refused)
    assert result.stdout.count("refused response_format json_schema") == 1
    assert result.json("manifest.json")["endpoints"]["judge"]["structured_output"] == "json_object"


@pytest.mark.parametrize("policy", ["openai-chat", "openai-completions"])
def test_sampling_fields_a_strict_server_refuses_are_dropped_once(run_cli, tmp_path, constitution, policy):
    config = FakeConfig(strict_fields=("top_k", "repetition_penalty", "seed"), refusal_status=400)
    with FakeServer(config) as server:
        result = run(
            run_cli,
            server,
            tmp_path,
            constitution,
            "--policy-concurrency",
            "1",
            "--judge-concurrency",
            "1",
            policy=policy,
        )
        assert result.code == 0, result.stderr
        refused = [r for r in server.requests if r.status == 400]
        accepted = [r for r in server.requests if r.status == 200 and r.body]
    assert len(result.json("cai_preference_dataset.json")) == len(PROMPTS)
    # The policy sends top_k and repetition_penalty, the judge seed: each refused once, as its own request.
    assert sorted(tuple(sorted({"top_k", "repetition_penalty", "seed"} & set(r.body))) for r in refused) == sorted(
        [("repetition_penalty", "top_k"), ("repetition_penalty",), ("seed",)]
    )
    assert not any({"top_k", "repetition_penalty", "seed"} & set(r.body) for r in accepted)
    manifest = result.json("manifest.json")
    assert manifest["endpoints"]["policy"]["dropped_fields"] == ["repetition_penalty", "top_k"]
    assert manifest["endpoints"]["judge"]["dropped_fields"] == ["seed"]
    assert sum(manifest["stats"]["retries"].values()) == 0
    assert "refused top_k" in result.stdout and "refused seed" in result.stdout


def test_a_refusal_of_a_field_we_cannot_drop_is_recorded_not_retried(run_cli, tmp_path, constitution):
    with FakeServer(FakeConfig(strict_fields=("max_tokens",), refusal_status=500)) as server:
        result = run(run_cli, server, tmp_path, constitution, "--max-failure-rate", "1", prompts=PROMPTS[:3])
        sent = len([r for r in server.requests if r.body])
    assert result.code == 1
    failures = result.jsonl("failures.jsonl")
    assert [(f["stage"], f["reason"]) for f in failures] == [("candidates", "request refused")] * 3
    assert "max_tokens" in failures[0]["detail"]
    assert sent == 3 * 4  # one request per candidate, none repeated


# ---- checks before the first request --------------------------------------------------------------------
def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "caiforge", "run", "--quiet", *args], capture_output=True, text=True, timeout=timeout
    )


def test_nothing_listening_stops_at_once_with_the_url_and_the_fix(tmp_path, constitution):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    proc = cli(
        "--red-teaming-file-path",
        str(prompts),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        "--policy-url",
        "http://127.0.0.1:9/v1",
        "--policy-model",
        "x",
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "caiforge: error: policy endpoint http://127.0.0.1:9/v1: connection refused; start the server there, "
        "or fix --policy-url",
        "caiforge: error: judge endpoint http://127.0.0.1:9/v1: connection refused; start the server there, "
        "or fix --judge-url",
    ]
    assert not (out / "caiforge.db").exists()  # no request, no database


def test_nemo_nothing_listening(tmp_path, constitution):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    with FakeServer() as judge:
        proc = cli(
            "--red-teaming-file-path",
            str(prompts),
            "--sys-prompt-constitution-file-path",
            str(constitution),
            "--host",
            "127.0.0.1",
            "--port",
            "9",
            "--judge-url",
            f"{judge.url}/v1",
            "--output-dir",
            str(tmp_path / "out"),
        )
        assert judge.count("/v1/chat/completions") == 0
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "caiforge: error: policy endpoint http://127.0.0.1:9/generate: connection refused; start the NeMo server, "
        "or fix --host/--port"
    )


def test_a_refused_key_stops_with_what_to_export(run_cli, tmp_path, constitution):
    with FakeServer(FakeConfig(require_api_key="right", models=("fake-judge", "fake-policy"))) as server:
        result = run(run_cli, server, tmp_path, constitution, "--ngc-api-key", "wrong")
        assert [r.path for r in server.requests] == ["/v1/models", "/v1/models"]  # the checks, nothing else
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("caiforge: error: ") for line in lines)
    assert "policy endpoint" in lines[0] and "HTTP 401" in lines[0] and "CAIFORGE_POLICY_API_KEY" in lines[0]
    assert "judge endpoint" in lines[1] and "export NGC_API_KEY=<your key>" in lines[1]
    assert "wrong" not in result.stderr


def test_an_unknown_model_stops_and_names_what_is_served(run_cli, tmp_path, constitution):
    with FakeServer(FakeConfig(models=("fake-policy", "served-judge"))) as server:
        result = run(run_cli, server, tmp_path, constitution)
        generated = [r for r in server.requests if r.body and r.body.get("max_tokens") != 1]
    assert result.code == 2
    assert result.stderr.strip() == (
        f"caiforge: error: judge endpoint {server.url}/v1: model 'fake-judge' is not served there "
        "(it serves: fake-policy, served-judge); use --judge-model fake-policy"
    )
    assert generated == []


def test_a_server_that_answers_any_model_name_is_not_refused(run_cli, tmp_path, constitution):
    """llama.cpp lists the file it loaded and answers whatever name it is sent: one probe each, then the run."""
    with FakeServer(FakeConfig(models=("/models/SmolLM2.gguf",), enforce_models=False)) as server:
        result = run(run_cli, server, tmp_path, constitution)
        probes = [r for r in server.requests if r.body and r.body.get("max_tokens") == 1]
    assert result.code == 0, result.stderr
    assert len(probes) == 2
    assert "model 'fake-judge' is not in its list (/models/SmolLM2.gguf, ...), but it answers" in result.stdout


def test_a_run_stopped_by_the_failure_rate_quotes_the_detail_and_writes_failures(run_cli, tmp_path, constitution):
    with FakeServer(FakeConfig(faults=[Fault("500", rate=1.0, paths=("/v1/chat/completions",))])) as server:
        many = [f"Failing prompt {i}" for i in range(60)]
        # Two requests a role in flight: the run holds at most 2 x 4 prompts at once (window = 2 x capacity), so
        # the stop at the 20th failure can leave at most 20 + 8 + 1 recorded, however fast the server answers.
        result = run(
            run_cli,
            server,
            tmp_path,
            constitution,
            "--max-retries",
            "0",
            "--policy-concurrency",
            "2",
            "--judge-concurrency",
            "2",
            policy="openai-completions",
            prompts=many,
        )
        refused = [r for r in server.requests if r.status == 500 and r.body and r.body.get("max_tokens") != 1]
    assert result.code == 1
    assert "most common detail" in result.stderr and f"POST {server.url}/v1/chat/completions: HTTP 500" in result.stderr
    failures = result.jsonl("failures.jsonl")
    assert 20 <= len(failures) <= 29 and {f["reason"] for f in failures} == {"transient error"}
    # One line a failed prompt, each for a judge request the server refused (a request cancelled by the stop
    # after the server answered is refused but not a failure, so this is a bound, not an equality).
    assert len({f["prompt"] for f in failures}) == len(failures) <= len(refused)
