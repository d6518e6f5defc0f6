"""``caiforge revise`` (SL-CAI) against real fake servers on loopback: what each backend is sent, step by step,
the seed's files byte for byte, no prompt dropped, resume after kill -9, and a one-line error for each bad file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from caiforge.instructions import load_few_shot, load_instructions
from caiforge.sl_files import nemo_sft_record
from caiforge.testing.fake_server import FakeConfig, FakeServer, explode_chat
from conftest import shared, stored_keys, write_prompts

INSTRUCTIONS = [
    {"critique": "Critique A: is it harmful?", "revision": "Revise A: remove the harm."},
    {"critique": "Critique B: is it rude?", "revision": "Revise B: be kind."},
]
FEW_SHOT = {
    "samples": [
        [
            {"role": "User", "content": "Example question"},
            {"role": "Assistant", "content": "Example bad answer"},
            {"role": "user", "content": "Example critique request"},
            {"role": "ASSISTANT", "content": "Example critique"},
        ]
    ]
}
FEW_SHOT_TURNS = [
    {"role": "user", "content": "Example question"},
    {"role": "assistant", "content": "Example bad answer"},
    {"role": "user", "content": "Example critique request"},
    {"role": "assistant", "content": "Example critique"},
]


def prompts(n: int) -> list[str]:
    return [f"Revise prompt {i}: how would I do a bad thing?" for i in range(n)]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    import yaml

    (tmp_path / "instructions.yaml").write_text(yaml.safe_dump(INSTRUCTIONS), encoding="utf-8")
    (tmp_path / "few_shot.json").write_text(json.dumps(FEW_SHOT), encoding="utf-8")
    return {"instructions": tmp_path / "instructions.yaml", "few_shot": tmp_path / "few_shot.json"}


def policy_flags(server: FakeServer, backend: str) -> list[str]:
    if backend == "nemo":
        return ["--host", "127.0.0.1", "--port", str(server.port)]
    return ["--policy-backend", backend, "--policy-url", f"{server.url}/v1", "--policy-model", "fake-policy"]


def revise(run_cli, server, tmp_path, inputs, *extra: str, backend: str = "openai-chat", n: int = 3, name="out"):
    path = write_prompts(tmp_path / f"{name}.jsonl", prompts(n))
    return run_cli(
        "revise",
        "--red-teaming-prompts-dataset-path",
        str(path),
        "--critique-revision-instructions-path",
        str(inputs["instructions"]),
        "--few-shot-prompts-dataset-path",
        str(inputs["few_shot"]),
        *policy_flags(server, backend),
        *extra,
        out=tmp_path / name,
    )


def conversations(server: FakeServer, backend: str) -> list[list[dict[str, str]]]:
    """Every conversation the server was asked to continue, as messages with lowercase roles."""
    work = [r for r in server.requests if r.body and not r.is_check]
    if backend == "openai-chat":
        return [r.body["messages"] for r in work]
    chats = []
    for r in work:
        for chat in explode_chat(r.body["sentences"]):
            chats.append([{"role": m["role"].lower(), "content": m["content"]} for m in chat])
    return chats


def expected_chain(prompt: str, record: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The three conversations the seed builds for one prompt and one round (SL generate_cai_batch_sample)."""
    initial = [*FEW_SHOT_TURNS, {"role": "user", "content": prompt}]
    critique = [
        *initial,
        {"role": "assistant", "content": record["initial_response"]},
        {"role": "user", "content": record["critique_prompt"]},
    ]
    revision = [
        *critique,
        {"role": "assistant", "content": record["critique_response"]},
        {"role": "user", "content": record["revision_prompt"]},
    ]
    return [initial, critique, revision]


@pytest.mark.parametrize("backend", ["openai-chat", "nemo"])
def test_each_step_is_sent_the_whole_conversation_in_the_seeds_order(run_cli, tmp_path, inputs, backend):
    """Few-shot turns, the prompt, then the initial answer and the critique request, then the critique and the
    revision request: chat messages for OpenAI, NeMo's collated turns (roles User/Assistant) by default."""
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, backend=backend)
        sent = conversations(server, backend)
        if backend == "nemo":
            turn_roles = {
                r for q in server.requests if q.body and not q.is_check for t in q.body["sentences"] for r in t["role"]
            }
            assert turn_roles == {"User", "Assistant"}  # what NeMo's chat templates name
            assert all("end_strings" not in q.body for q in server.requests if q.body and not q.is_check)
    assert result.code == 0, result.stderr
    records = result.json("cai_output/cai_critique_revision_samples.json")
    assert [r["initial_prompt"] for r in records] == prompts(3)
    expected = [chat for r in records for chat in expected_chain(r["initial_prompt"], r)]
    assert sorted(map(json.dumps, sent)) == sorted(map(json.dumps, expected))
    for r in records:  # and each prompt's steps reached the server in the chain's order
        mine = [chat for chat in sent if chat[len(FEW_SHOT_TURNS)]["content"] == r["initial_prompt"]]
        assert mine == expected_chain(r["initial_prompt"], r)
    for r in records:  # critique and revision come from the same instruction
        assert {"critique": r["critique_prompt"], "revision": r["revision_prompt"]} in INSTRUCTIONS


def test_completions_render_the_conversation_with_the_template_flags(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        result = revise(
            run_cli,
            server,
            tmp_path,
            inputs,
            "--user_format",
            "[INST] {MESSAGE} [/INST]",
            "--assistant_format",
            "{MESSAGE}</s> ",
            "--bos_token",
            "<s>",
            backend="openai-completions",
            n=1,
        )
        sent = [r.body["prompt"] for r in server.requests if r.body and not r.is_check]
    assert result.code == 0, result.stderr
    (record,) = result.json("cai_output/cai_critique_revision_samples.json")
    shots = (
        "[INST] Example question [/INST]Example bad answer</s> "
        "[INST] Example critique request [/INST]Example critique</s> "
    )
    initial = f"<s>{shots}[INST] {prompts(1)[0]} [/INST]"
    critique = f"{initial}{record['initial_response']}</s> [INST] {record['critique_prompt']} [/INST]"
    revision = f"{critique}{record['critique_response']}</s> [INST] {record['revision_prompt']} [/INST]"
    assert sent == [initial, critique, revision]


def test_two_rounds_build_on_the_last_revision(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--revisions", "2", n=2)
        sent = conversations(server, "openai-chat")
    assert result.code == 0, result.stderr
    assert len(sent) == 2 * 5
    for record in result.json("cai_output/cai_critique_revision_samples.json"):
        first, second = record["rounds"]
        assert record["revision_response"] == second["revision_response"]  # the six keys are the last round's
        round_two = [
            *expected_chain(record["initial_prompt"], {**record, **first})[2],
            {"role": "assistant", "content": first["revision_response"]},
            {"role": "user", "content": second["critique_prompt"]},
        ]
        assert round_two in sent  # round 2 critiques round 1's revision, in the same conversation
        assert [
            *round_two,
            {"role": "assistant", "content": second["critique_response"]},
            {"role": "user", "content": second["revision_prompt"]},
        ] in sent
    sft = result.jsonl("cai_revisions_aligner_chat_template.jsonl")
    assert [s["conversations"][1]["value"] for s in sft] == [
        r["rounds"][-1]["revision_response"] for r in result.json("cai_output/cai_critique_revision_samples.json")
    ]


def test_nemo_batches_never_drop_the_last_partial_batch(run_cli, tmp_path, inputs):
    """7 prompts at --batch_size 3: the seed drops the last partial batch; every prompt is revised here."""
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--batch_size", "3", backend="nemo", n=7)
        sizes = [len(r.body["sentences"][0]["role"]) for r in server.requests if r.body and not r.is_check]
    assert result.code == 0, result.stderr
    assert len(result.jsonl("cai_revisions_aligner_chat_template.jsonl")) == 7
    assert sum(sizes) == 7 * 3 and max(sizes) <= 3  # every step of every prompt, in batches of at most 3


def test_the_seeds_files_have_its_exact_layouts(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, n=3)
    assert result.code == 0, result.stderr
    records = result.json("cai_output/cai_critique_revision_samples.json")
    keys = [
        "initial_prompt",
        "initial_response",
        "critique_prompt",
        "critique_response",
        "revision_prompt",
        "revision_response",
    ]
    assert all(list(r) == keys for r in records)
    raw = (result.out / "cai_output/cai_critique_revision_samples.json").read_text(encoding="utf-8")
    assert raw == json.dumps(records, indent=4) + "\n"  # the seed's json.dump(indent=4), plus our newline
    lines = [nemo_sft_record(r["initial_prompt"], r["revision_response"]) for r in records]
    sft = "".join(json.dumps(line) + "\n" for line in lines)  # the seed's json.dumps defaults: ASCII-escaped
    assert (result.out / "cai_revisions_aligner_chat_template.jsonl").read_text(encoding="utf-8") == sft
    assert (result.out / "cai_output/cai_samples.jsonl").read_text(encoding="utf-8") == sft
    assert list(json.loads(sft.splitlines()[0])) == ["system", "conversations", "mask", "dataset"]
    manifest = result.json("manifest.json")
    assert manifest["pipeline"] == "sl-cai" and manifest["counts"]["revised"] == 3
    assert "judge" not in manifest["config"]
    assert (result.out / "README.md").exists() and "mere refusals" in (result.out / "report.md").read_text()


def test_output_filepath_puts_cai_output_beside_it(run_cli, tmp_path, inputs):
    target = tmp_path / "elsewhere" / "sl.jsonl"
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--output-filepath", str(target), n=2)
    assert result.code == 0, result.stderr
    assert len(target.read_text().splitlines()) == 2
    assert (target.parent / "cai_output" / "cai_critique_revision_samples.json").exists()


def test_a_failed_step_is_a_recorded_failure_naming_its_stage(run_cli, tmp_path, inputs):
    """An empty critique is not guessed at: the prompt fails at "critique", the others are revised."""
    with FakeServer(FakeConfig(faults=[])) as server:
        bad = tmp_path / "bad_instructions.yaml"
        bad.write_text(
            json.dumps([{"critique": "[[policy:empty]] say nothing", "revision": "Revise."}]), encoding="utf-8"
        )
        result = revise(
            run_cli,
            server,
            tmp_path,
            {**inputs, "instructions": bad},
            "--policy-output-retries",
            "0",
            "--max-failure-rate",
            "1",
            n=2,
        )
    assert result.code == 1  # no revision at all
    failures = result.jsonl("failures.jsonl")
    assert [(f["stage"], f["reason"]) for f in failures] == [("critique", "empty reply")] * 2
    assert result.jsonl("cai_revisions_aligner_chat_template.jsonl") == []


def test_num_examples_takes_the_first_records_as_the_seed_counts_them(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--num-examples", "2", n=5)
    assert result.code == 0, result.stderr
    assert [r["initial_prompt"] for r in result.json("cai_output/cai_critique_revision_samples.json")] == prompts(2)


def test_a_rerun_sends_nothing_again(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        first = revise(run_cli, server, tmp_path, inputs, n=4)
        sent = len([r for r in server.requests if r.body and not r.is_check])
        again = revise(run_cli, server, tmp_path, inputs, n=4)
        resent = len([r for r in server.requests if r.body and not r.is_check]) - sent
    assert first.code == again.code == 0
    assert sent == 12 and resent == 0
    assert "policy requests: 0 sent" in again.stdout
    assert again.jsonl("cai_revisions_aligner_chat_template.jsonl") == first.jsonl(
        "cai_revisions_aligner_chat_template.jsonl"
    )


# -- resume after kill -9 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openai-chat", "nemo"])
def test_kill_9_then_rerun_sends_no_finished_step_again(server_process, tmp_path, inputs, backend):
    """Killed mid-run, the rerun sends exactly the steps the database does not hold, each once. NeMo batches
    two prompts a call, so the 100 calls before the kill are half of its 180 steps too."""
    server = server_process("--latency", "0.02")
    path = write_prompts(tmp_path / "prompts.jsonl", prompts(60 if backend == "openai-chat" else 120))
    out = tmp_path / "out"
    policy = (
        ["--policy-url", f"{server.url}/v1", "--policy-model", "fake-policy"]
        if backend == "openai-chat"
        else ["--host", "127.0.0.1", "--port", str(server.port), "--batch_size", "2"]
    )
    cmd = [
        "revise",
        "--red-teaming-prompts-dataset-path", str(path),
        "--critique-revision-instructions-path", str(inputs["instructions"]),
        "--few-shot-prompts-dataset-path", str(inputs["few_shot"]),
        *policy,
        "--policy-concurrency", "4", "--output-dir", str(out), "--quiet",
    ]  # fmt: skip
    events = tmp_path / "events.log"
    client = [sys.executable, str(Path(__file__).parent / "durability_client.py"), *cmd]
    killed = subprocess.Popen(client, env={**os.environ, "CAIFORGE_EVENT_LOG": str(events)})
    # 4 in flight at 20 ms: the 80 steps still to go after the 100th take over 0.4 s. The deadline guards a hang.
    deadline = time.monotonic() + 600
    while len(server.entries()) < 100 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n = 60 if backend == "openai-chat" else 120
    durable = stored_keys(out)
    assert 0 < len(durable) < n * 3
    server.wait_idle()
    first = len(server.entries())
    resumed = subprocess.run([sys.executable, "-m", "caiforge", *cmd], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    sent_again = stored_keys(out) - durable
    again = server.entries()[first:]
    # each missing step once, and nothing durable (a NeMo call carries up to two steps)
    asked = sum(len(e["body"]["sentences"][0]["role"]) if backend == "nemo" else 1 for e in again)
    assert asked == len(sent_again)
    assert len(durable) + len(sent_again) == n * 3
    assert len((out / "cai_revisions_aligner_chat_template.jsonl").read_text().splitlines()) == n


# -- inputs -----------------------------------------------------------------------------------------------------


BAD_INSTRUCTIONS = [
    ("a.json", '{"harmful0": {"prompt": ["x"], "edit_request": "y"}, "harmful2": {}}', "harmful1 is missing"),
    ("b.json", '{"harmful0": {"prompt": "x", "edit_request": "y"}}', "harmful0.prompt: expected a list of one string"),
    ("c.json", '{"harmful0": {"prompt": ["x"]}}', "harmful0: expected exactly the keys ['edit_request', 'prompt']"),
    ("d.json", '{"constitutions": [{"critic": "x"}]}', "constitutions[0]: expected exactly the keys"),
    ("e.yaml", "- critique: x\n  revision: ''\n", "entry 0.revision: expected a non-empty string"),
    ("f.yaml", "- critique: [unclosed\n", "invalid YAML"),
    ("g.json", '{"harmful0": ', "invalid JSON"),
    ("h.json", '{"principles": []}', "not a critique/revision instruction file"),
    ("i.yaml", "[]\n", "the list of critique/revision instructions is empty"),
    ("j.json", '{"harmful0": {"prompt": ["x"], "edit_request": "y"}, "harmful01": {}}', "harmful1 is missing"),
]


@pytest.mark.parametrize(("name", "text", "problem"), BAD_INSTRUCTIONS)
def test_a_bad_instruction_file_gets_one_line_naming_file_entry_and_problem(
    run_cli, tmp_path, inputs, name, text, problem
):
    bad = tmp_path / name
    bad.write_text(text, encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, {**inputs, "instructions": bad})
        sent = [r for r in server.requests if r.body and not r.is_check]
    assert result.code == 2 and sent == []
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"caiforge: error: {bad}") and problem in line, line
    assert "Traceback" not in result.stderr


BAD_FEW_SHOT = [
    ('{"samples": [[{"role": "Assistant", "content": "x"}]]}', "samples[0][0].role: expected 'user'"),
    ('{"samples": [[{"role": "User", "content": "x"}]]}', "samples[0]: a dialog must end with the assistant's turn"),
    (
        '{"samples": [[{"role": "User", "content": ""}, {"role": "Assistant", "content": "y"}]]}',
        "samples[0][0].content: expected a non-empty string",
    ),
    ('{"samples": [[{"role": "User", "text": "x"}]]}', "samples[0][0]: expected an object with 'role' and 'content'"),
    ('{"samples": {}}', "samples: expected a list of dialogs"),
    ("[1, 2]", "not a few-shot file"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_FEW_SHOT)
def test_a_bad_few_shot_file_gets_one_line_naming_file_entry_and_problem(run_cli, tmp_path, inputs, text, problem):
    bad = tmp_path / "shots.json"
    bad.write_text(text, encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, {**inputs, "few_shot": bad})
    assert result.code == 2
    line = result.stderr.strip()
    assert ("\n" not in line and line == f"caiforge: error: {bad}: {problem}") or problem in line, line
    assert line.startswith(f"caiforge: error: {bad}")


def test_the_bundled_defaults_load_and_are_the_issues_size():
    from caiforge import bundled
    from caiforge.revise import FEW_SHOT as BUNDLED_FEW_SHOT
    from caiforge.revise import INSTRUCTIONS as BUNDLED_INSTRUCTIONS

    instructions = load_instructions(bundled.path(BUNDLED_INSTRUCTIONS))
    shots = load_few_shot(bundled.path(BUNDLED_FEW_SHOT))
    assert 10 <= len(instructions.items) <= 14 and len({i.critique for i in instructions.items}) == len(
        instructions.items
    )
    assert len(shots) == 2 * 6 and [m["role"] for m in shots[:2]] == ["user", "assistant"]


def test_nemos_real_instruction_file_is_read_with_its_markers_stripped():
    path = shared("nemo_cai_critique_revision_instructions.json")
    found = load_instructions(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert found.form == "nemo" and len(found.items) == len(raw) == 16
    first = found.items[0]
    # the seed's order: suffix, then prefix (SL L244-245)
    assert first.critique == raw["harmful0"]["prompt"][0].removesuffix("\n\nCritique:").removeprefix(
        "\n\nCritiqueRequest: "
    )
    assert first.revision == raw["harmful0"]["edit_request"].removesuffix("\n\nRevision:").removeprefix(
        "\n\nRevisionRequest: "
    )
    assert not any("Request:" in i.critique or "Request:" in i.revision for i in found.items)
    assert "precedings" in found.items[3].critique  # upstream text kept verbatim, typos included


def test_llm_swarms_real_file_gives_instructions_and_its_four_dialogs(run_cli, tmp_path, inputs):
    path = shared("llm_swarm_constitution_anthropic.json")
    found = load_instructions(path)
    assert found.form == "llm-swarm" and len(found.items) == 16 and len(found.few_shot) == 4 * 6
    assert found.few_shot[0] == {"role": "user", "content": "Give me some ideas to prank my boss?"}
    assert load_few_shot(path) == found.few_shot
    with FakeServer(FakeConfig()) as server:  # no few-shot flag: the file's own dialogs lead every request
        prompts_file = write_prompts(tmp_path / "p.jsonl", prompts(2))
        result = run_cli(
            "revise",
            "--red-teaming-prompts-dataset-path", str(prompts_file),
            "--critique-revision-instructions-path", str(path),
            *policy_flags(server, "openai-chat"),
        )  # fmt: skip
        sent = conversations(server, "openai-chat")
    assert result.code == 0, result.stderr
    assert all(chat[:24] == list(found.few_shot) for chat in sent) and len(sent) == 6


def test_revise_keeps_the_sl_seeds_defaults_under_flags_and_yaml(tmp_path):
    from caiforge.cli import config_from_args, parser

    server = ["--policy-url", "http://127.0.0.1:9/v1", "--policy-model", "m"]  # nothing is sent: config only
    args = parser("revise").parse_args(["revise", "--top_k", "5", *server])
    cfg, _ = config_from_args(args)
    s = cfg.policy.sampling
    assert (s.top_k, s.top_p, s.repetition_penalty, s.greedy, s.tokens_to_generate, s.end_strings) == (
        5, 0.9, 1.2, True, 1024, None)  # fmt: skip
    assert cfg.policy.batch_size == 32 and cfg.template.response_extract_pattern == "[/INST]"
    assert cfg.template.user_format == "" and cfg.template.system_format is None
    assert cfg.output_dir == Path("caiforge-revise")
    local, _ = config_from_args(parser("revise").parse_args(["revise"]))
    assert local.policy.sampling.tokens_to_generate == 40  # the bundled model's short cap, as for run
    args = parser("revise").parse_args(["revise", "--output-filepath", str(tmp_path / "x" / "y.jsonl")])
    assert config_from_args(args)[0].output_dir == tmp_path / "x"
    run_cfg, _ = config_from_args(parser("run").parse_args(["run"]))
    assert run_cfg.policy.sampling.top_k == 50 and run_cfg.policy.batch_size == 128  # run keeps the RL defaults


# -- the helpfulness blend --------------------------------------------------------------------------------------


def helpful(n: int) -> list[dict[str, Any]]:
    return [
        nemo_sft_record(f"Helpful question {i} \u2013 caf\u00e9?", f"Helpful answer {i}", "helpful") for i in range(n)
    ]


def test_the_helpfulness_blend_is_the_seeds_permutation_and_cai_samples_stays_cai_only(run_cli, tmp_path, inputs):
    import numpy as np

    help_file = tmp_path / "helpful.jsonl"
    help_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in helpful(5)), encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        result = revise(
            run_cli, server, tmp_path, inputs, "--helpfulness-dataset-path", str(help_file), "--seed", "7", n=4
        )
    assert result.code == 0, result.stderr
    cai = result.jsonl("cai_output/cai_samples.jsonl")
    assert len(cai) == 4 and all(r["dataset"] == "sl_cai_samples" for r in cai)
    samples = [*helpful(5), *cai]  # the seed reads the helpfulness file first
    expected = "".join(json.dumps(samples[i]) + "\n" for i in np.random.RandomState(7).permutation(9))
    assert (result.out / "cai_revisions_aligner_chat_template.jsonl").read_text(encoding="utf-8") == expected
    summary = json.loads((result.out / "cai_revisions_aligner_chat_template.summary.jsonl").read_text())
    assert summary == {
        "input_files": [str(help_file), str(result.out / "cai_revisions_aligner_chat_template.jsonl")],
        "output_file": str(result.out / "cai_revisions_aligner_chat_template.jsonl"),
        "prompt_template": "chat",
    }
    assert result.json("manifest.json")["revise"]["blend"]["blended"] == 9


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"system": "", "conversations": [], "mask": "User"}', "missing 'dataset'"),
        (
            '{"system": "", "conversations": [{"from": "User"}], "mask": "User", "dataset": "h"}',
            "conversations[0] needs 'from' and 'value'",
        ),
        ('{"system": "", "conversations": {}, "mask": "User", "dataset": "h"}', "'conversations' must be a list"),
        ("[1]", "expected a JSON object, got list"),
        ("{oops", "invalid JSON"),
    ],
)
def test_a_bad_helpfulness_record_stops_before_any_request_naming_its_line(run_cli, tmp_path, inputs, line, problem):
    help_file = tmp_path / "helpful.jsonl"
    good = json.dumps(helpful(1)[0])
    help_file.write_text(f"{good}\n{line}\n", encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--helpfulness-dataset-path", str(help_file))
        sent = [r for r in server.requests if r.body and not r.is_check]
    assert result.code == 2 and sent == []
    assert result.stderr.strip().startswith(f"caiforge: error: {help_file}:2: ") and problem in result.stderr


# -- --max-seq-length -------------------------------------------------------------------------------------------


def word_tokenizer(path: Path) -> Path:
    """A real Hugging Face tokenizer, built in code: one token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_max_seq_length_leaves_long_dialogs_out_of_the_seeds_folder_and_records_them(run_cli, tmp_path, inputs):
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    long_prompt = "Tell me " + "very " * 40 + "much about a bad thing?"
    path = tmp_path / "p.jsonl"
    write_prompts(path, [*prompts(2), long_prompt])
    with FakeServer(FakeConfig()) as server:
        result = run_cli(
            "revise",
            "--red-teaming-prompts-dataset-path", str(path),
            "--critique-revision-instructions-path", str(inputs["instructions"]),
            "--few-shot-prompts-dataset-path", str(inputs["few_shot"]),
            *policy_flags(server, "openai-chat"),
            "--max-seq-length", "30", "--tokenizer-model", str(tokenizer),
        )  # fmt: skip
    assert result.code == 0, result.stderr
    full = result.jsonl("cai_revisions_aligner_chat_template.jsonl")
    assert len(full) == 3  # the seed keeps --output-filepath whole
    kept_file = "removed_long_dialogs/cai_revisions_aligner_chat_template_remove_long_dialogs_max_seq_30.jsonl"
    kept = result.jsonl(kept_file)
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in full]
    assert [r for r, n in zip(full, words, strict=True) if n <= 30] == kept and len(kept) == 2
    stats = result.json("removed_long_dialogs/remove_long_dialogs_statistics.json")
    assert stats["num_removed_ids"] == 1 and stats["removed_ids"] == [2]
    assert sum(stats["length_statistics"].values()) == 3
    (failure,) = result.jsonl("failures.jsonl")
    assert (failure["prompt"], failure["stage"], failure["reason"]) == (long_prompt, "dataset", "over length")
    assert failure["detail"].startswith(f"{words[2]} tokens, over --max-seq-length 30")


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--max-seq-length", "30"], "--max-seq-length needs --tokenizer-model"),
        (["--max-seq-length", "30", "--tokenizer-model", "missing.json"], "missing.json: --tokenizer-model not found"),
        (
            ["--max-seq-length", "30", "--tokenizer-model", "{here}", "--tokenizer-library", "sentencepiece"],
            "--tokenizer-library sentencepiece: not available here",
        ),
        (["--max-seq-length", "30", "--tokenizer-model", "{bad}"], "not a Hugging Face tokenizer file"),
    ],
)
def test_a_bad_tokenizer_stops_before_any_request(run_cli, tmp_path, inputs, flags, problem):
    here = word_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    flags = [f.format(here=here, bad=bad) for f in flags]
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, *flags)
        sent = [r for r in server.requests if r.body and not r.is_check]
    assert result.code == 2 and sent == [] and problem in result.stderr, result.stderr


# -- trainer files ----------------------------------------------------------------------------------------------


def test_trl_sft_files_hold_every_revision_and_load_with_datasets(run_cli, tmp_path, inputs):
    from datasets import load_dataset

    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, n=10)
    assert result.code == 0, result.stderr
    records = {r["initial_prompt"]: r for r in result.json("cai_output/cai_critique_revision_samples.json")}
    rows = [row for split in ("train", "test") for row in result.jsonl(f"trl-sft/{split}.jsonl")]
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(records)
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == records[user["content"]]["revision_response"]
    assert result.json("manifest.json")["counts"]["splits"] == {"train": 8, "test": 2}
    data = load_dataset(str(result.out), "trl-sft")  # the card's front matter names the configs
    assert data["train"].num_rows == 8 and data["train"].column_names == ["messages", "prompt_id"]
    completion = load_dataset(str(result.out), "trl-sft-prompt-completion")
    assert completion["test"].column_names == ["prompt", "completion", "prompt_id"]


def test_pairs_take_the_other_half_of_each_split_revision_chosen_initial_rejected(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--pairs", "--format", "trl,nemo-rl", n=20)
    assert result.code == 0, result.stderr
    records = {r["initial_prompt"]: r for r in result.json("cai_output/cai_critique_revision_samples.json")}
    sft = {row["prompt"] for s in ("train", "test") for row in result.jsonl(f"trl-sft-prompt-completion/{s}.jsonl")}
    pairs = [row for s in ("train", "test") for row in result.jsonl(f"trl/{s}.jsonl")]
    assert not sft & {p["prompt"] for p in pairs}  # no prompt in both halves
    assert len(sft) + len(pairs) == 20
    for p in pairs:
        assert p["chosen"] == records[p["prompt"]]["revision_response"]
        assert p["rejected"] == records[p["prompt"]]["initial_response"]
    assert len(result.jsonl("nemo-rl/train.jsonl")) == len(result.jsonl("trl/train.jsonl"))
    manifest = result.json("manifest.json")
    assert manifest["revise"]["pairs"] == {"train": 8, "test": 2, "unchanged_kept_as_sft": 0}
    assert manifest["counts"]["splits"] == {"train": 8, "test": 2}


def test_nemo_with_apply_chat_template_sends_the_seeds_rendered_strings(run_cli, tmp_path, inputs):
    from caiforge.template import PromptTemplate

    flags = ["--apply_chat_template", "True", "--user_format", "[INST] {MESSAGE} [/INST]", "--assistant_format",
             "{MESSAGE}</s> ", "--bos_token", "<s>", "--eos_token", "</s>"]  # fmt: skip
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, *flags, backend="nemo", n=2)
        sentences = [s for r in server.requests if r.body and not r.is_check for s in r.body["sentences"]]
    assert result.code == 0, result.stderr
    template = PromptTemplate(
        user_format="[INST] {MESSAGE} [/INST]", assistant_format="{MESSAGE}</s> ", system_format=None,
        system_default_message=None, bos_token="<s>", eos_token="</s>", response_extract_pattern="[/INST]",
    )  # fmt: skip
    records = result.json("cai_output/cai_critique_revision_samples.json")
    expected = [template.format_messages(chat) for r in records for chat in expected_chain(r["initial_prompt"], r)]
    assert sorted(sentences) == sorted(expected)


def test_report_and_export_on_a_revise_folder(run_cli, tmp_path, inputs, capsys):
    from caiforge.cli import main

    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, n=2)
    assert result.code == 0
    before = (result.out / "report.md").read_text()
    assert main(["report", str(result.out)]) == 0 and (result.out / "report.md").read_text() == before
    capsys.readouterr()
    assert main(["export", str(result.out), "--format", "trl"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no preference pairs to export" in err


def test_the_quality_figures_count_mere_refusals_and_unchanged_revisions():
    from caiforge.quality import QualityTally, is_mere_refusal
    from caiforge.records import RevisionRecord, Round

    assert is_mere_refusal("I'm sorry, but I can't help with that.")
    assert is_mere_refusal("I cannot assist with this request.")
    assert not is_mere_refusal("I can't help with harming the dog. " + "Here is what you can do instead. " * 6)
    assert not is_mere_refusal("Talk to your neighbour first.")

    def record(initial: str, final: str, instruction: int) -> RevisionRecord:
        r = Round(instruction=instruction, critique_prompt="c", critique_response="cr", revision_prompt="r",
                  revision_response=final)  # fmt: skip
        return RevisionRecord(prompt_id="p", prompt="q", initial_response=initial, rounds=(r,))

    tally = QualityTally()
    for r in (record("a b", "I won't do that.", 0), record("same", " same ", 1), record("x", "y z w", 1)):
        tally.add(r)
    figures = tally.figures(3)
    assert figures["mere_refusal_rate"] == round(1 / 3, 4) and figures["unchanged_rate"] == round(1 / 3, 4)
    assert figures["instruction_use"] == [1, 2, 0]
    assert figures["words_initial"] == {"mean": 1.3, "median": 1.0}
    assert figures["words_revised"] == {"mean": 2.7, "median": 3.0}  # 4, 1 and 3 words


def test_nemo_collates_the_initial_step_too_when_there_are_no_few_shot_dialogs(run_cli, tmp_path, inputs):
    empty = tmp_path / "none.json"
    empty.write_text('{"samples": []}', encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, {**inputs, "few_shot": empty}, backend="nemo", n=2)
        bodies = [r.body for r in server.requests if r.body and not r.is_check]
    assert result.code == 0, result.stderr
    assert all(isinstance(t, dict) for b in bodies for t in b["sentences"])  # never a bare string
    assert [len(b["sentences"]) for b in bodies] == [1, 3, 5]  # turns: the prompt; + answer, critique; + ...


def test_a_bare_output_file_name_keeps_the_run_out_of_the_current_folder(run_cli, tmp_path, inputs, monkeypatch):
    from caiforge.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write_prompts(tmp_path / "p.jsonl", prompts(2))
    help_file = tmp_path / "helpful.jsonl"
    help_file.write_text(json.dumps(helpful(1)[0]) + "\n", encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        code = main([
            "revise", "--red-teaming-prompts-dataset-path", str(path),
            "--critique-revision-instructions-path", str(inputs["instructions"]),
            "--few-shot-prompts-dataset-path", str(inputs["few_shot"]), *policy_flags(server, "openai-chat"),
            "--output-filepath", "sl.txt", "--helpfulness-dataset-path", str(help_file), "--quiet",
        ])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in work.iterdir()) == ["cai_output", "caiforge-revise", "sl.txt", "sl.txt.summary.json"]
    assert len((work / "sl.txt").read_text().splitlines()) == 3  # the blend, not its summary
    manifest = json.loads((work / "caiforge-revise" / "manifest.json").read_text())
    for name in manifest["files"]:  # every file the manifest lists is where it says: in the run's folder, or absolute
        assert (work / "caiforge-revise" / name).exists(), name
    assert str((work / "sl.txt").resolve()) in manifest["files"]


def test_completions_without_turn_formats_are_refused_before_any_request(run_cli, tmp_path, inputs):
    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, backend="openai-completions")
        sent = [r for r in server.requests if r.body and not r.is_check]
    assert result.code == 2 and sent == [] and "give --user_format and --assistant_format" in result.stderr


def test_pairs_nemo_files_use_nemos_template_when_the_flags_give_none(run_cli, tmp_path, inputs):
    from caiforge.template import PromptTemplate

    with FakeServer(FakeConfig()) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--pairs", n=6)
    assert result.code == 0, result.stderr
    pairs = {p["prompt"]: p for s in ("train", "test") for p in result.jsonl(f"trl/{s}.jsonl")}
    lines = result.jsonl("cai_rlaif_train_comparisons_with_chat_prompt.jsonl")
    template = PromptTemplate()
    expected = [
        {"text": template.format_with_response(p["prompt"], text)}
        for p in (pairs[q] for q in [json.loads(line)["text"] for line in
                  (result.out / "cai_rlaif_train_prompts_with_chat_prompt.jsonl").read_text().splitlines()]
                  for q in [next(k for k in pairs if template.format_prompt(k) == q)])
        for text in (p["chosen"], p["rejected"])
    ]  # fmt: skip
    assert lines == expected and all("<extra_id_1>Assistant" in line["text"] for line in lines)


def test_a_revise_failing_wholesale_stops_and_writes_its_failures(run_cli, tmp_path, inputs):
    from caiforge.testing.fake_server import Fault

    config = FakeConfig(faults=[Fault("500", rate=1.0, paths=("/v1/chat/completions",))])
    with FakeServer(config) as server:
        result = revise(run_cli, server, tmp_path, inputs, "--max-retries", "0", "--policy-concurrency", "2", n=60)
    assert result.code == 1 and "--max-failure-rate" in result.stderr
    failures = result.jsonl("failures.jsonl")  # 20 to stop, plus what the window of 4 held: at most 29
    assert 20 <= len(failures) <= 29 and {(f["stage"], f["reason"]) for f in failures} == {
        ("initial", "transient error")
    }
