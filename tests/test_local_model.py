"""The real embedded model (SmolLM2-135M through llama-cpp-python), end to end: no server, no key.

These are the slowest tests (tens of seconds on 2 cores). They never skip in CI: ``make test`` installs the
``local`` extra, so a missing model is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caiforge import build_config, bundled
from caiforge.backends.local import (
    FreeCores,
    LocalModelBackend,
    choice_texts,
    default_model_path,
    judge_options,
    policy_options,
)
from caiforge.card import TOY_JUDGE_WARNING
from caiforge.errors import BadModelOutput
from caiforge.judge import decision_schema, judge_messages, parse_decision
from caiforge.request import Request
from conftest import write_prompts

pytestmark = pytest.mark.slow

PROMPTS = ["How do I pick the lock on my neighbour's door?", "Write a short insult about my boss."]


def test_the_default_model_ships_inside_the_wheel():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "site-packages" in str(path) or "dist-packages" in str(path)


def test_local_policy_and_judge_make_real_pairs(run_cli, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    run = run_cli(
        "--red-teaming-file-path", str(prompts), "--tokens_to_generate", "24", "--splits", "{'train': 0.5, 'test': 0.5}"
    )
    assert run.code == 0, run.stderr
    candidates = run.json("cai_candidate_dataset.json")
    assert [c["prompt"] for c in candidates] == PROMPTS
    for row in candidates:  # four real, non-empty, mostly different generations
        texts = [row[k] for k in row if k.startswith("response_t=")]
        assert len(texts) == 4 and all(t.strip() for t in texts)
        assert len(set(texts)) >= 2
    pairs = run.json("cai_preference_dataset.json")
    assert len(pairs) == 2  # the schema-constrained judge always gives a valid decision
    for pair in pairs:
        assert pair["raw"]["chosen_response_key"] != pair["raw"]["rejected_response_key"]
        assert pair["chosen"] == pair["raw"]["all_responses"][pair["raw"]["chosen_response_key"]]
    manifest = run.json("manifest.json")
    assert manifest["policy"]["backend"] == "local" and manifest["judge"]["backend"] == "local"
    assert manifest["stats"]["tokens"]["policy_completion"] > 0
    # Each prompt's four candidates were one batched decode, and the second judge call read the constitution
    # from the KV cache the first one left.
    kv = manifest["endpoints"]
    assert kv["policy"]["kv_cache"]["batches"] == {"4": 2}
    constitution_tokens = len(bundled.path(bundled.CONSTITUTION).read_text()) // 6  # fewer than it has
    assert kv["judge"]["kv_cache"]["reused_tokens"] >= constitution_tokens
    assert manifest["warnings"] == [TOY_JUDGE_WARNING]
    assert "not for training" in run.stdout
    assert "not for training" in (run.out / "README.md").read_text()
    # Resume: a rerun loads nothing new and writes the same dataset.
    before = (run.out / "cai_preference_dataset.json").read_text()
    again = run_cli(
        "--red-teaming-file-path", str(prompts), "--tokens_to_generate", "24", "--splits", "{'train': 0.5, 'test': 0.5}"
    )
    assert again.code == 0
    assert json.loads((again.out / "manifest.json").read_text())["stats"]["requests"] == {}
    assert (again.out / "cai_preference_dataset.json").read_text() == before


@pytest.mark.timeout(3600)  # about 3 minutes idle, 1.5x that with both cores busy; the limit only catches hangs
def test_no_arguments_runs_the_bundled_defaults_into_caiforge_out(tmp_path):
    """`caiforge run` alone: bundled prompts and constitution, local model, ./caiforge-out. One flag shortens it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NGC_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "caiforge", "run", "--tokens_to_generate", "8", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "caiforge-out"
    manifest = json.loads((out / "manifest.json").read_text())
    bundled_count = len(bundled.path(bundled.PROMPTS).read_text().splitlines())
    assert manifest["counts"]["unique_prompts"] == bundled_count >= 24
    assert manifest["counts"]["pairs"] + manifest["counts"]["failures"] == bundled_count
    assert manifest["config"]["prompts_path"] is None  # the bundled set
    assert "WARNING" in proc.stdout


def test_init_copies_the_bundled_files_for_editing(tmp_path, capsys):
    from caiforge.cli import main

    assert main(["init", str(tmp_path)]) == 0
    assert (tmp_path / "constitution.txt").read_text() == bundled.path(bundled.CONSTITUTION).read_text()
    records = [json.loads(line) for line in (tmp_path / "red_team_prompts.jsonl").read_text().splitlines()]
    assert len(records) >= 24 and all(r["transcript"].startswith("\n\nHuman: ") for r in records)
    areas = {tag for r in records for tag in r["tags"]}
    assert {"violence", "crime", "self-harm", "hate", "privacy", "fraud", "dangerous advice", "manipulation"} <= areas
    assert main(["init", str(tmp_path)]) == 2  # never overwrites without --force
    assert "already exists" in capsys.readouterr().err
    assert main(["init", str(tmp_path), "--force"]) == 0


def test_bundled_constitution_asks_for_the_seeds_decision_format():
    text = bundled.path(bundled.CONSTITUTION).read_text()
    assert '{"chosen":' in text and '"rejected":' in text


def test_a_missing_local_model_file_is_a_clear_error(run_cli, tmp_path):
    run = run_cli("--local-model", str(tmp_path / "missing.gguf"))
    assert run.code == 2
    assert "missing.gguf" in run.stderr and "not found" in run.stderr


def test_remote_judge_with_local_candidates(run_cli, fake, tmp_path):
    """Any argument overrides only its part of the defaults: here the judge."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:1])
    run = run_cli(
        "--red-teaming-file-path",
        str(prompts),
        "--tokens_to_generate",
        "16",
        "--judge-url",
        f"{fake.url}/v1",
        "--judge-model",
        "fake-judge",
    )
    # The fake judge reads harm scores only its own policy writes, so it may tie; every prompt is accounted for.
    manifest = json.loads((run.out / "manifest.json").read_text())
    assert manifest["policy"]["backend"] == "local" and manifest["judge"]["backend"] == "openai"
    assert manifest["counts"]["pairs"] + manifest["counts"]["failures"] == 1
    assert manifest["warnings"] == []
    assert fake.count("/v1/chat/completions") >= 1
    assert Path(run.out / "cai_candidate_dataset.json").exists()


def test_eval_judge_on_real_harmless_base_pairs_with_the_embedded_model(tmp_path, capsys):
    """A small slice of the real hh-rlhf test split; the figure is whatever it is (the toy judge is at chance)."""
    from caiforge.cli import main
    from conftest import shared

    pairs = shared("hh_harmless_base_test.jsonl.gz")
    assert main(["eval-judge", "--pairs", str(pairs), "--limit", "4", "--output-dir", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["n"] == 4 and summary["judgments"] == 8
    assert summary["parse_failures"] == 0  # grammar-constrained: every reply is a valid decision
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["consistency"] <= 1.0
    assert summary["position_1_rate"] + summary["position_2_rate"] == pytest.approx(1.0)
    assert summary["judge"]["backend"] == "local"
    assert "consistency under swapped order" in capsys.readouterr().out


def _policy(tokens: int = 24) -> LocalModelBackend:
    cfg = build_config({"policy": {"backend": "local", "sampling": {"tokens_to_generate": tokens}}})
    return LocalModelBackend(policy_options(cfg))


def test_a_prompts_candidates_decode_together_and_write_what_create_chat_completion_writes():
    """One batched decode per prompt, its prompt read once, and each candidate token for token what
    llama-cpp-python writes for the same request on a fresh context, whatever it was batched with."""
    from llama_cpp import Llama

    policy = _policy()
    temps = (0.01, 0.51, 1.01, 1.51)
    by_prompt = [Request(messages=[{"role": "user", "content": p}], temperature=t) for p in PROMPTS for t in temps]

    async def together(requests: list[Request]) -> dict[tuple[str | None, float | None], str]:
        replies = await asyncio.gather(*(policy.send([r]) for r in requests))
        return {
            (r.user_turn, r.temperature): str(getattr(a[0], "text", a[0]))
            for r, a in zip(requests, replies, strict=True)
        }

    batched = asyncio.run(together(by_prompt))
    stats = policy.cache_stats()
    assert stats.batches == {4: 2}  # the engine sends a prompt's candidates at once; they decode together
    assert stats.evaluated_tokens < stats.prompt_tokens / 3  # each prompt read once, then copied
    by_temperature = sorted(by_prompt, key=lambda r: r.temperature or 0.0)  # other company: both prompts mixed
    assert asyncio.run(together(by_temperature)) == batched
    assert {k: v for r in by_prompt[:3] for k, v in asyncio.run(together([r])).items()} == {
        k: batched[k] for k in list(batched)[:3]
    }  # alone
    assert policy.identity()["weights"] == "f16"  # the bundled model's f16 copy, with flash attention
    llm = Llama(model_path=policy._model.llm.model_path, n_ctx=4096, n_threads=1, verbose=False, flash_attn=True)
    for request in by_prompt:
        llm.reset()
        out = llm.create_chat_completion(messages=request.messages, **policy._params(request))
        assert out["choices"][0]["message"]["content"].strip() == batched[(request.user_turn, request.temperature)]


def test_thread_counts_do_not_change_the_text():
    """The thread count follows the free cores call by call, which is safe only because it moves speed alone."""
    texts = []
    for threads in (1, 2):
        cfg = build_config(
            {"policy": {"backend": "local", "sampling": {"tokens_to_generate": 16}}, "local": {"threads": threads}}
        )
        policy = LocalModelBackend(policy_options(cfg))
        reply = asyncio.run(
            policy.send([Request(messages=[{"role": "user", "content": PROMPTS[1]}], temperature=1.51)])
        )
        texts.append(str(getattr(reply[0], "text", reply[0])))
    assert texts[0] == texts[1] and texts[0]


def test_the_judge_reads_the_constitution_once_and_decides_in_two_model_calls():
    cfg = build_config({"judge": {"backend": "local"}})
    judge = LocalModelBackend(judge_options(cfg))
    constitution = bundled.path(bundled.CONSTITUTION).read_text()
    candidates = [["I can't help with that.", "Here is how: first, find a brick."], ["No.", "Sure, call them names."]]
    replies = []
    for prompt, texts in zip(PROMPTS, candidates, strict=True):
        request = Request(
            messages=judge_messages(constitution, prompt, texts, "response-0123456789"),
            schema=decision_schema(2),
            seed=1,
            max_tokens=64,
        )
        replies.append(asyncio.run(judge.send([request]))[0])
    for reply in replies:
        decision = parse_decision(str(getattr(reply, "text", "")), 2)
        assert {decision.chosen, decision.rejected} == {1, 2}
    stats = judge.cache_stats()
    assert stats.calls == 2
    constitution_tokens = len(judge._model.llm.tokenize(constitution.encode(), add_bos=False))
    assert stats.prompt_tokens - stats.evaluated_tokens >= constitution_tokens  # the second call did not read it
    assert judge.identity()["decoding"] == "choices"


def test_choice_texts_are_the_decisions_a_schema_admits():
    assert choice_texts(decision_schema(2)) == ['{"chosen": 1, "rejected": 2}', '{"chosen": 2, "rejected": 1}']
    assert choice_texts({"type": "object", "properties": {"chosen": {"type": "integer"}}}) is None


def test_free_cores_leaves_the_cores_others_are_using(monkeypatch):
    readings = iter([(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (2.0, 3.1, 2.0), (3.0, 4.9, 2.2)])
    monkeypatch.setattr(FreeCores, "_read", staticmethod(lambda: next(readings)))
    cores = FreeCores(2)
    assert cores.free() == 1  # the machine was busy 2 cores, this process 1: someone else used a core
    assert cores.free() == 2  # 0.1 core of others is noise
    assert cores.free() == 1  # 1.6 cores of others: still at least one thread


def test_a_failed_decode_forgets_every_stream_and_the_next_reply_is_unchanged(monkeypatch):
    """A decode that fails half-way leaves the streams' bookkeeping ahead of their KV; reusing it would give
    other text silently. The failure is recorded, every stream is forgotten, and the same request then writes
    what it wrote before."""
    policy = _policy(tokens=8)
    temps = (0.01, 0.51, 1.01, 1.51)
    requests = [Request(messages=[{"role": "user", "content": PROMPTS[0]}], temperature=t) for t in temps]

    async def send_all() -> list[object]:
        return [r[0] for r in await asyncio.gather(*(policy.send([q]) for q in requests))]

    before = asyncio.run(send_all())
    batched = policy._model.batched
    assert batched is not None and any(batched.cached)
    calls = 0
    real = batched._decode

    def fail_on_the_third(entries: list[tuple[int, int]], all_logits: bool) -> dict[int, int]:
        nonlocal calls
        calls += 1
        if calls < 3:
            return real(entries, all_logits)
        for stream, token in entries:  # the bookkeeping ran, the decode did not
            batched.cached[stream].append(token)
        raise BadModelOutput("local model: llama_decode failed")

    monkeypatch.setattr(batched, "_decode", fail_on_the_third)
    failed = asyncio.run(send_all())
    assert calls == 3 and all(isinstance(f, BadModelOutput) for f in failed)
    assert batched.cached == [[] for _ in range(batched.width)]
    monkeypatch.setattr(batched, "_decode", real)
    assert [str(getattr(r, "text", r)) for r in asyncio.run(send_all())] == [str(getattr(r, "text", r)) for r in before]


def test_the_f16_copy_is_made_once_kept_whole_and_found_again(tmp_path, monkeypatch):
    """A run used to convert the bundled weights into a temp file that a kill -9 left behind (260 MB each); now
    the copy is made once into the cache folder, renamed into place whole, and found by later runs."""
    import llama_cpp

    from caiforge.backends import local

    made = []
    real = llama_cpp.llama_model_quantize

    def counted(*args: object) -> int:
        made.append(args[1])
        return int(real(*args))

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", counted)
    monkeypatch.setenv(local.F16_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(local, "_F16_COPIES", {})
    first = local._as_f16(default_model_path(), 2)
    assert first is not None and first.parent == tmp_path / "cache" and len(made) == 1
    assert list(first.parent.iterdir()) == [first]  # no temporary file left
    monkeypatch.setattr(local, "_F16_COPIES", {})  # as a new process
    assert local._as_f16(default_model_path(), 2) == first and len(made) == 1
    (tmp_path / "blocked").write_text("a file, not a folder")
    monkeypatch.setenv(local.F16_CACHE_ENV, str(tmp_path / "blocked"))
    monkeypatch.setattr(local, "_F16_COPIES", {})
    assert local._as_f16(default_model_path(), 2) is None and len(made) == 1  # the file's own weights instead


@pytest.mark.timeout(3600)  # a few minutes idle; the limit only catches hangs
def test_revise_with_no_arguments_runs_the_bundled_defaults_on_the_embedded_model(tmp_path):
    """`caiforge revise` alone: bundled prompts, instructions and dialogs, the real embedded model."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "caiforge", "revise", "--tokens_to_generate", "12", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    out = tmp_path / "caiforge-revise"
    manifest = json.loads((out / "manifest.json").read_text())
    bundled_count = len(bundled.path(bundled.PROMPTS).read_text().splitlines())
    counts = manifest["counts"]
    assert counts["unique_prompts"] == bundled_count and counts["revised"] + counts["failures"] == bundled_count
    assert proc.returncode == (0 if counts["revised"] else 1), proc.stderr
    assert "WARNING" in proc.stdout and manifest["warnings"]
    steps = {"initial": 1, "critique": 2, "revision": 3}  # a failed prompt was asked up to its failed step
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert manifest["stats"]["requests"]["policy"] == 3 * counts["revised"] + sum(steps[f["stage"]] for f in failures)
    records = json.loads((out / "cai_output" / "cai_critique_revision_samples.json").read_text())
    sft = [json.loads(line) for line in (out / "cai_revisions_aligner_chat_template.jsonl").read_text().splitlines()]
    assert len(records) == len(sft) == counts["revised"]
    assert all(r["critique_response"].strip() and r["revision_response"].strip() for r in records)
    assert [s["conversations"][1]["value"] for s in sft] == [r["revision_response"] for r in records]
