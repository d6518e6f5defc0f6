"""caiforge against a real third-party server: llama-cpp-python's OpenAI-compatible server with the bundled GGUF.

The server comes from the wheel the embedded model already compiles, so it adds no build. It is the server
the issue found caiforge getting 0 pairs from: it answers ``response_format: json_schema`` with HTTP 500.
What is asserted is what a user needs, read from the server's own request log and the run's files: every
prompt a pair or a recorded failure with its reason, no request repeated after a deterministic error, and
the chosen and rejected texts being candidates the policy wrote. One model call at a time (one server thread,
concurrency 1): llama.cpp collapses when two busy threads share the cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from caiforge import bundled
from caiforge.backends.local import default_model_path
from caiforge.inputs import read_prompts
from conftest import shared

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CHATML = (
    "--user_format",
    "<|im_start|>user\\n{MESSAGE}<|im_end|>\\n<|im_start|>assistant\\n",
    "--assistant_format",
    "{MESSAGE}<|im_end|>\\n",
    "--system_format",
    "<|im_start|>system\\n{MESSAGE}<|im_end|>\\n",
    "--eos_token",
    "<|im_end|>",
    "--end_strings",
    "<|im_end|>",
)


class LlamaServer:
    def __init__(self, tmp: Path) -> None:
        self.log = tmp / "llama-requests.jsonl"
        cmd = [
            sys.executable,
            str(HERE / "llama_server.py"),
            "--model",
            str(default_model_path()),
            "--log",
            str(self.log),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), "llama-cpp-python's server did not start"
        self.mark = 0

    def requests(self) -> list[dict]:
        """Requests since the last call (each test reads only its own)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        new, self.mark = lines[self.mark :], len(lines)
        return [json.loads(line) for line in new]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


def write_first_prompts(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """The first n bundled red-team prompts, in the hh-rlhf transcript format."""
    lines = bundled.path(bundled.PROMPTS).read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, _ = read_prompts(path, "error")
    return path, [r.text for r in records]


def run_against(run_cli, llama: LlamaServer, tmp_path: Path, constitution: Path, *flags: str):
    prompts_path, prompts = write_first_prompts(tmp_path, 3)
    llama.requests()  # start this test's record
    result = run_cli(
        "--red-teaming-file-path",
        str(prompts_path),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        "--judge-url",
        f"{llama.url}/v1",
        "--judge-model",
        "smollm2",
        "--policy-model",
        "smollm2",
        "--policy-url",
        f"{llama.url}/v1",
        "--temperatures",
        "0.01,1.01",
        "--tokens_to_generate",
        "24",
        "--policy-concurrency",
        "1",
        "--judge-concurrency",
        "1",
        *flags,
    )
    return result, prompts, llama.requests()


def assert_accounted_and_true_to_the_candidates(result, prompts: list[str]) -> list[dict]:
    pairs = result.json("cai_preference_dataset.json")
    failures = result.jsonl("failures.jsonl")
    assert sorted([p["prompt"] for p in pairs] + [f["prompt"] for f in failures]) == sorted(prompts)
    assert all(f["reason"] and f["detail"] for f in failures)
    candidates = {row["prompt"]: row for row in result.json("cai_candidate_dataset.json")}
    for pair in pairs:
        row = candidates[pair["prompt"]]
        assert pair["chosen"] == row[pair["raw"]["chosen_response_key"]]
        assert pair["rejected"] == row[pair["raw"]["rejected_response_key"]]
        assert pair["chosen"] != pair["rejected"]
    return pairs


def assert_no_blind_resend(requests: list[dict]) -> None:
    """A body the server refused is never sent again as it was."""
    refused = [json.dumps(r["body"], sort_keys=True) for r in requests if r["status"] >= 400]
    later = [json.dumps(r["body"], sort_keys=True) for r in requests]
    for body in refused:
        assert later.count(body) == 1, body[:200]


@pytest.mark.parametrize("policy", ["openai-chat", "openai-completions"])
def test_whole_mode_steps_down_to_the_form_the_server_takes(run_cli, llama, tmp_path, constitution, policy):
    template = CHATML if policy == "openai-completions" else ()
    result, prompts, requests = run_against(
        run_cli, llama, tmp_path, constitution, "--policy-backend", policy, *template
    )
    assert result.code == 0, result.stderr
    pairs = assert_accounted_and_true_to_the_candidates(result, prompts)
    assert pairs, "a real server and a grammar-constrained judge give pairs"
    judge = [r for r in requests if r["path"] == "/v1/chat/completions" and "response_format" in (r["body"] or {})]
    forms = [(r["body"]["response_format"]["type"], r["status"]) for r in judge]
    # The seed's failure: json_schema answered with HTTP 500. Asked once, then json_object for the rest.
    assert forms[0] == ("json_schema", 500)
    assert all(form == ("json_object", 200) for form in forms[1:]) and len(forms) >= 2
    assert_no_blind_resend(requests)
    manifest = result.json("manifest.json")
    assert manifest["endpoints"]["judge"]["structured_output"] == "json_object"
    assert sum(manifest["stats"]["retries"].values()) == 0
    assert "refused response_format json_schema (HTTP 500)" in result.stdout
    checks = [r for r in requests if r["path"] == "/v1/models"]
    assert len(checks) == 2 and all(r["status"] == 200 for r in checks)


def test_principle_mode_reads_the_servers_log_probabilities(run_cli, llama, tmp_path):
    result, prompts, requests = run_against(
        run_cli, llama, tmp_path, bundled.path(bundled.PRINCIPLES), "--judge-mode", "principle"
    )
    assert result.code == 0, result.stderr
    pairs = assert_accounted_and_true_to_the_candidates(result, prompts)
    assert pairs
    asked = [r for r in requests if (r["body"] or {}).get("logprobs")]
    assert asked and all(r["status"] == 200 and r["body"]["top_logprobs"] == 20 for r in asked)
    probs = [pair["chosen_prob"] for pair in pairs]
    assert all(0.5 <= p <= 1.0 for p in probs)
    assert any(p < 0.99 for p in probs)  # soft, from log-probabilities: a letter read from text would give 1.0
    assert_no_blind_resend(requests)


def test_eval_judge_on_real_harmless_base_pairs(llama, tmp_path, constitution, capsys):
    from caiforge.cli import main

    pairs = shared("hh_harmless_base_test.jsonl.gz")
    llama.requests()
    code = main(
        [
            "eval-judge",
            "--pairs",
            str(pairs),
            "--limit",
            "2",
            "--judge-url",
            f"{llama.url}/v1",
            "--judge-model",
            "smollm2",
            "--judge-concurrency",
            "1",
            "--sys-prompt-constitution-file-path",
            str(constitution),
            "--output-dir",
            str(tmp_path / "eval"),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    assert summary["n"] == 2 and summary["judgments"] == 4
    assert summary["parse_failures"] == 0  # json_object with the schema: every reply a valid decision
    assert summary["endpoints"]["judge"]["structured_output"] == "json_object"
    requests = llama.requests()
    judged = [r for r in requests if r["path"] == "/v1/chat/completions" and r["status"] == 200]
    assert len(judged) == 4 + 1  # the four judgments and the model-name probe
    assert_no_blind_resend(requests)


@pytest.mark.parametrize("policy", ["openai-chat", "openai-completions"])
def test_revise_chains_whole_conversations_through_the_real_server(run_cli, llama, tmp_path, policy):
    """SL-CAI on llama-cpp-python's server: each step's request holds the conversation so far (the few-shot
    dialogs, the prompt, each earlier answer), and the files hold what the server answered."""
    prompts_path, prompts = write_first_prompts(tmp_path, 2)
    template = CHATML if policy == "openai-completions" else ()
    llama.requests()
    result = run_cli(
        "revise",
        "--red-teaming-prompts-dataset-path", str(prompts_path),
        "--policy-backend", policy, "--policy-url", f"{llama.url}/v1", "--policy-model", "smollm2",
        "--tokens_to_generate", "16", "--policy-concurrency", "1", *template,
    )  # fmt: skip
    requests = [r for r in llama.requests() if r["path"] in ("/v1/chat/completions", "/v1/completions")]
    assert result.code in (0, 1), result.stderr
    records = result.json("cai_output/cai_critique_revision_samples.json")
    failures = result.jsonl("failures.jsonl")
    assert sorted([r["initial_prompt"] for r in records] + [f["prompt"] for f in failures]) == sorted(prompts)
    assert all(f["reason"] and f["detail"] for f in failures)
    work = [r for r in requests if r["status"] == 200 and (r["body"] or {}).get("max_tokens") != 1]
    texts = [json.dumps(r["body"].get("messages") or r["body"].get("prompt")) for r in work]
    for record in records:  # the revision request carries the initial answer and the critique before it
        revision_requests = [t for t in texts if json.dumps(record["critique_response"])[1:-1] in t]
        assert any(json.dumps(record["initial_response"])[1:-1] in t for t in revision_requests)
    assert len(work) == 3 * len(records) + sum(
        {"initial": 1, "critique": 2, "revision": 3}[f["stage"]] for f in failures
    )
