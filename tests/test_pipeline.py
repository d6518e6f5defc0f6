"""End-to-end runs of ``caiforge`` against the fake NeMo and OpenAI-compatible servers on loopback.

Each test reads like the README: start a server, run the command, look at the files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from caiforge.testing.fake_server import FakeConfig, FakeServer, Fault, judge_decision, parse_candidates
from conftest import Run, server_flags, shared, write_prompts

TEMPS = ("0.01", "0.51", "1.01", "1.51")
KEYS = [f"response_t={t}" for t in TEMPS]
PROMPTS = [f"How would someone do harmful thing number {i}?" for i in range(10)]


def harm(text: str) -> float:
    return float(text.rsplit("[h=", 1)[1].rstrip("]")) if "[h=" in text else 0.5


def run_basic(
    run_cli,
    fake: FakeServer,
    tmp_path: Path,
    constitution: Path,
    *extra: str,
    prompts: list[str] = PROMPTS,
    policy: str = "openai-chat",
) -> Run:
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts)
    return run_cli(
        "--red-teaming-file-path",
        str(prompts_file),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        *server_flags(fake, policy),
        *extra,
    )


def assert_pairs_follow_the_judge(run: Run) -> None:
    """Chosen is the candidate with the lowest fake harm score, rejected the highest: what the judge named."""
    pairs = run.json("cai_preference_dataset.json")
    assert pairs
    for pair in pairs:
        responses = pair["raw"]["all_responses"]
        by_harm = sorted(responses, key=lambda k: (harm(responses[k]), KEYS.index(k)))
        assert pair["raw"]["chosen_response_key"] == by_harm[0]
        assert pair["raw"]["rejected_response_key"] == by_harm[-1]
        assert pair["chosen"] == responses[by_harm[0]]
        assert pair["rejected"] == responses[by_harm[-1]]
        assert pair["chosen"] != pair["rejected"]


@pytest.mark.parametrize("policy", ["nemo", "openai-completions", "openai-chat"])
def test_each_policy_backend_makes_the_seeds_files(run_cli, fake, tmp_path, constitution, policy):
    run = run_basic(run_cli, fake, tmp_path, constitution, "--batch-size", "4", policy=policy)
    assert run.code == 0, run.stderr
    candidates = run.json("cai_candidate_dataset.json")
    assert [c["prompt"] for c in candidates] == PROMPTS
    assert all(list(c) == ["prompt", *KEYS] for c in candidates)
    assert_pairs_follow_the_judge(run)
    train = run.jsonl("cai_rlaif_train_prompts_with_chat_prompt.jsonl")
    test = run.jsonl("cai_rlaif_test_prompts_with_chat_prompt.jsonl")
    assert (len(train), len(test)) == (8, 2)
    assert train[0]["text"].startswith("<extra_id_0>System\n\n<extra_id_1>User\n")
    assert train[0]["text"].endswith("\n<extra_id_1>Assistant\n")
    comparisons = run.jsonl("cai_rlaif_train_comparisons_with_chat_prompt.jsonl")
    assert len(comparisons) == 16
    assert all(c["text"].endswith("<extra_id_1>") for c in comparisons)
    path = {"nemo": "/generate", "openai-completions": "/v1/completions", "openai-chat": "/v1/chat/completions"}
    policy_requests = [r for r in fake.work() if r.path == path[policy] and "FULL TEXT" not in json.dumps(r.body)]
    expected = math.ceil(10 / 4) * 4 if policy == "nemo" else 40
    assert len(policy_requests) == expected
    if policy == "openai-completions":  # template applied client-side
        assert policy_requests[0].body["prompt"].startswith("<extra_id_0>System\n\n<extra_id_1>User\n")
    if policy == "openai-chat":
        assert policy_requests[0].body["messages"][-1]["role"] == "user"


def test_no_prompt_dropped_when_count_is_not_a_multiple_of_batch_size(run_cli, fake, tmp_path, constitution):
    run = run_basic(run_cli, fake, tmp_path, constitution, "--batch-size", "3", policy="nemo")
    assert run.code == 0, run.stderr
    batches = [len(r.body["sentences"]) for r in fake.work() if r.path == "/generate"]
    assert sorted(batches) == sorted([3, 3, 3, 1] * 4)
    assert len(run.json("cai_candidate_dataset.json")) == 10
    assert len(run.json("cai_preference_dataset.json")) == 10


def test_nemo_request_carries_the_seeds_inference_flags(run_cli, fake, tmp_path, constitution):
    run = run_basic(
        run_cli,
        fake,
        tmp_path,
        constitution,
        "--tokens_to_generate",
        "77",
        "--top_k",
        "3",
        "--end_strings",
        "</s>",
        "--add_bos",
        "True",
        policy="nemo",
    )
    assert run.code == 0, run.stderr
    body = next(r.body for r in fake.work() if r.path == "/generate")
    assert body["tokens_to_generate"] == 77 and body["top_k"] == 3 and body["add_BOS"] is True
    assert body["end_strings"] == ["</s>"]
    assert {round(r.body["temperature"], 6) for r in fake.work() if r.path == "/generate"} == {0.01, 0.51, 1.01, 1.51}


def test_both_red_team_containers_give_the_same_dataset(run_cli, fake, tmp_path, constitution):
    results = []
    for name in ("red_team_attempts.sample.json", "red_team_attempts.sample.jsonl"):
        run = run_cli(
            "--red-teaming-file-path",
            str(shared(name)),
            "--sys-prompt-constitution-file-path",
            str(constitution),
            *server_flags(fake),
            out=tmp_path / name,
        )
        assert run.code == 0, run.stderr
        results.append((run.json("cai_candidate_dataset.json"), run.json("cai_preference_dataset.json")))
    assert results[0] == results[1]
    assert len(results[0][0]) == 10


@pytest.mark.parametrize("style", ["plain", "fenced", "prose", "single-quotes"])
def test_judge_replies_wrapped_in_fences_or_prose_are_read(run_cli, fake, tmp_path, constitution, style):
    fake.config.judge_style = style
    run = run_basic(run_cli, fake, tmp_path, constitution)
    assert run.code == 0, run.stderr
    assert_pairs_follow_the_judge(run)
    pairs = run.json("cai_preference_dataset.json")
    assert all(p["raw"]["explanation"] and "{" not in p["raw"]["explanation"] for p in pairs)


def test_judge_request_is_the_seeds(run_cli, fake, tmp_path, constitution):
    run = run_basic(run_cli, fake, tmp_path, constitution, "--seed", "77", "--judge-layout", "seed")
    assert run.code == 0
    judge = [r.body for r in fake.work() if "FULL TEXT" in json.dumps(r.body)]
    assert len(judge) == 10
    body = judge[0]
    assert body["messages"][0] == {"role": "system", "content": constitution.read_text()}
    assert body["seed"] == 77 and body["temperature"] < 1e-6 and body["model"] == "fake-judge"
    user = body["messages"][1]["content"]
    assert user.startswith("\n FULL TEXT: ") and user.endswith("\nNow, choose the pair of responses as instructed:")
    assert len(parse_candidates(user)) == 4
    # The judge's named candidates are the ones in the dataset.
    pairs = {p["prompt"]: p for p in run.json("cai_preference_dataset.json")}
    for body in judge:
        user = body["messages"][1]["content"]
        chosen, rejected = judge_decision(user)
        prompt = user.split("FULL TEXT: ", 1)[1].split("\n #1:", 1)[0]
        assert pairs[prompt]["chosen"] == parse_candidates(user)[chosen].strip()
        assert pairs[prompt]["rejected"] == parse_candidates(user)[rejected].strip()


@pytest.mark.parametrize(
    ("style", "reason"),
    [
        ("garbage", "judge reply has no decision"),
        ("same", "judge chose and rejected the same response"),
        ("out-of-range", "judge decision out of range"),
    ],
)
def test_bad_judge_replies_are_retried_then_recorded_never_guessed(
    run_cli, fake, tmp_path, constitution, style, reason
):
    fake.config.judge_style = style
    run = run_basic(run_cli, fake, tmp_path, constitution, "--judge-parse-retries", "2")
    assert run.code == 1  # no pairs at all is a failed run
    assert run.json("cai_preference_dataset.json") == []
    failures = run.jsonl("failures.jsonl")
    assert sorted(f["prompt"] for f in failures) == sorted(PROMPTS)
    assert {(f["stage"], f["reason"]) for f in failures} == {("judge", reason)}
    judge_requests = [r.body for r in fake.work() if "FULL TEXT" in json.dumps(r.body)]
    assert len(judge_requests) == 10 * 3
    assert sorted({b["seed"] for b in judge_requests}) == [1234, 1235, 1236]  # another seed each try


def test_flaky_judge_succeeds_on_a_retry_with_another_seed(run_cli, fake, tmp_path, constitution):
    fake.config.judge_style = "flaky"
    run = run_basic(run_cli, fake, tmp_path, constitution)
    assert run.code == 0, run.stderr
    assert len(run.json("cai_preference_dataset.json")) == 10
    assert run.jsonl("failures.jsonl") == []
    manifest = run.json("manifest.json")
    assert manifest["stats"]["requests"]["judge"] == 20


def test_every_prompt_ends_as_a_pair_or_a_failure(run_cli, fake, tmp_path, constitution):
    prompts = [
        *PROMPTS[:6],
        "Tell me [[judge:garbage]] things",
        "Say [[judge:same]] things",
        "Write [[policy:empty]] nothing",
        "Explode [[policy:500]] now",
        PROMPTS[0],
        PROMPTS[1],
    ]
    run = run_basic(run_cli, fake, tmp_path, constitution, "--max-retries", "1", prompts=prompts)
    assert run.code == 0, run.stderr
    pairs = {p["prompt"] for p in run.json("cai_preference_dataset.json")}
    failures = run.jsonl("failures.jsonl")
    failed = {f["prompt"] for f in failures}
    assert pairs | failed == set(prompts)
    assert not pairs & failed
    assert {f["stage"] for f in failures if "500" in f["prompt"]} == {"candidates"}
    manifest = run.json("manifest.json")
    assert manifest["counts"]["duplicate_prompts"] == 2
    assert manifest["counts"]["unique_prompts"] == 10
    assert manifest["counts"]["pairs"] + manifest["counts"]["failures"] == 10
    assert "failures: " in run.stdout


def test_splits_are_deterministic_and_complete(run_cli, fake, tmp_path, constitution):
    splits = "{'train': 0.5, 'validation': 0.3, 'test': 0.2}"
    runs = [run_basic(run_cli, fake, tmp_path, constitution, "--splits", splits, "--seed", "5") for _ in range(2)]
    first, second = runs
    sizes = {}
    texts = []
    for name in ("train", "validation", "test"):
        a = (first.out / f"cai_rlaif_{name}_comparisons_with_chat_prompt.jsonl").read_text()
        b = (second.out / f"cai_rlaif_{name}_comparisons_with_chat_prompt.jsonl").read_text()
        assert a == b
        prompts = first.jsonl(f"cai_rlaif_{name}_prompts_with_chat_prompt.jsonl")
        sizes[name] = len(prompts)
        texts += [p["text"] for p in prompts]
    assert sizes == {"train": 5, "validation": 3, "test": 2}
    assert len(set(texts)) == 10


def test_blending_keeps_comparison_pairs_together(run_cli, fake, tmp_path, constitution):
    ext = tmp_path / "ext"
    ext.mkdir()
    blend = {"name": "hh"}
    for split in ("train", "test"):
        (ext / f"{split}_prompts.jsonl").write_text(
            "".join(json.dumps({"text": f"EXT {split} prompt {i}"}) + "\n" for i in range(5))
        )
        (ext / f"{split}_comparisons.jsonl").write_text(
            "".join(
                json.dumps({"text": f"EXT {split} pair {i} chosen"})
                + "\n"
                + json.dumps({"text": f"EXT {split} pair {i} rejected"})
                + "\n"
                for i in range(5)
            )
        )
        blend[split] = {
            "prompts": [str(ext / f"{split}_prompts.jsonl")],
            "comparisons": str(ext / f"{split}_comparisons.jsonl"),
        }
    run = run_basic(run_cli, fake, tmp_path, constitution, "--blend-with", repr(blend))
    assert run.code == 0, run.stderr
    for split, own in (("train", 8), ("test", 2)):
        prompts = run.jsonl(f"blend_hh_with_cai_rlaif_{split}_prompts_with_chat_prompt.jsonl")
        assert len(prompts) == 5 + own
        lines = [c["text"] for c in run.jsonl(f"blend_hh_with_cai_rlaif_{split}_comparisons_with_chat_prompt.jsonl")]
        assert len(lines) == 2 * (5 + own)
        for chosen, rejected in zip(lines[::2], lines[1::2], strict=True):
            if chosen.startswith("EXT"):
                assert chosen.endswith("chosen") and rejected == chosen.replace("chosen", "rejected")
            else:
                assert chosen.split("<extra_id_1>Assistant\n")[0] == rejected.split("<extra_id_1>Assistant\n")[0]


def test_without_blend_with_there_is_no_blending(run_cli, fake, tmp_path, constitution):
    run = run_basic(run_cli, fake, tmp_path, constitution)
    assert run.code == 0
    assert not list(run.out.glob("blend_*"))


def test_api_key_is_sent_but_appears_in_no_output(run_cli, fake, tmp_path, constitution, monkeypatch):
    key = "nvapi-SECRET-7f3a9c"
    fake.config.require_api_key = key
    monkeypatch.setenv("NGC_API_KEY", key)
    monkeypatch.setenv("CAIFORGE_POLICY_API_KEY", key)
    run = run_basic(run_cli, fake, tmp_path, constitution)
    assert run.code == 0, run.stderr
    assert fake.count(status=401) == 0 and fake.count(status=200) == 50
    for path in (p for p in run.out.rglob("*") if p.is_file()):
        assert key.encode() not in path.read_bytes(), path
    assert key not in run.stdout + run.stderr
    assert run.json("manifest.json")["config"]["judge"]["api_key_set"] is True


def test_wrong_api_key_fails_clearly_without_echoing_it(run_cli, fake, tmp_path, constitution, monkeypatch):
    fake.config.require_api_key = "the-right-key"
    monkeypatch.setenv("NGC_API_KEY", "nvapi-WRONG-123")
    monkeypatch.setenv("CAIFORGE_POLICY_API_KEY", "the-right-key")
    run = run_basic(run_cli, fake, tmp_path, constitution)
    assert run.code == 2  # the check before the first request: a key is not something a retry fixes
    assert run.stderr.strip().splitlines() == [
        f"caiforge: error: judge endpoint {fake.url}/v1: HTTP 401, the API key was refused or is missing; "
        "export NGC_API_KEY=<your key> (or pass --ngc-api-key)"
    ]
    assert fake.work() == [] and fake.count(status=401, checks=True) == 1
    for path in (p for p in run.out.rglob("*") if p.is_file()):
        assert b"nvapi-WRONG-123" not in path.read_bytes()


def test_a_key_refused_mid_run_is_recorded_not_retried(run_cli, fake, tmp_path, constitution, monkeypatch):
    """A server whose model list is open but whose completions need the key: each request fails once."""
    monkeypatch.setenv("NGC_API_KEY", "nvapi-WRONG-123")
    fake.config.faults = [Fault("401", rate=1.0, paths=("/v1/chat/completions",))]
    run = run_basic(run_cli, fake, tmp_path, constitution, policy="openai-completions")
    assert run.code == 1
    failures = run.jsonl("failures.jsonl")
    assert len(failures) == 10 and all("401" in f["detail"] for f in failures)
    assert all(f["reason"] == "permanent error" for f in failures)
    assert fake.count(status=401) == 10  # not retried: retrying cannot fix a key
    for path in (p for p in run.out.rglob("*") if p.is_file()):
        assert b"nvapi-WRONG-123" not in path.read_bytes()


def test_transient_server_errors_are_retried(run_cli, fake, tmp_path, constitution):
    fake.config.faults = [Fault("500", first_n=1), Fault("429-retry-after", first_n=2, retry_after=0.05)]
    run = run_basic(run_cli, fake, tmp_path, constitution)
    assert run.code == 0, run.stderr
    assert len(run.json("cai_preference_dataset.json")) == 10
    stats = run.json("manifest.json")["stats"]
    assert stats["retries"]["policy"] >= 40 and stats["retries"]["judge"] >= 10


def test_rerun_sends_nothing_and_changed_judge_redoes_only_judging(run_cli, fake, tmp_path, constitution):
    first = run_basic(run_cli, fake, tmp_path, constitution)
    assert first.code == 0
    sent = len(fake.work())
    again = run_basic(run_cli, fake, tmp_path, constitution)
    assert again.code == 0 and len(fake.work()) == sent
    assert (first.out / "cai_rlaif_train_comparisons_with_chat_prompt.jsonl").read_text() == (
        again.out / "cai_rlaif_train_comparisons_with_chat_prompt.jsonl"
    ).read_text()
    fake.reset_records()
    other = run_basic(run_cli, fake, tmp_path, constitution, "--judge-model", "another-judge")
    assert other.code == 0
    assert all("FULL TEXT" in json.dumps(r.body) for r in fake.work()) and len(fake.work()) == 10


def test_missing_prompts_file_is_a_one_line_usage_error(run_cli, tmp_path, constitution):
    run = run_cli(
        "--red-teaming-file-path",
        str(tmp_path / "nope.jsonl"),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        "--policy-url",
        "http://127.0.0.1:9/v1",
        "--policy-model",
        "m",
        "--judge-url",
        "http://127.0.0.1:9/v1",
    )
    assert run.code == 2
    assert run.stderr.strip().count("\n") == 0
    assert "nope.jsonl" in run.stderr and "not found" in run.stderr and "Traceback" not in run.stderr


def test_seed_python_functions_keep_their_signatures(fake, tmp_path, constitution):
    from caiforge import generate_ai_preference, generate_cai_rlaif_candidate_dataset

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:5])
    rows = generate_cai_rlaif_candidate_dataset(
        batch_size=2,
        temperatures=[0.01, 0.51, 1.01, 1.51],
        red_teaming_dataset_path=str(prompts),
        inference_config={"host": "127.0.0.1", "port": fake.port, "tokens_to_generate": 16},
    )
    assert [r["prompt"] for r in rows] == PROMPTS[:5]  # the seed would have dropped the last one
    assert all(list(r) == ["prompt", *KEYS] for r in rows)
    pref = generate_ai_preference(
        rows[0],
        ngc_api_key="",
        system_prompt=constitution.read_text(),
        seed=1,
        ngc_url=f"{fake.url}/v1/chat/completions",
        ngc_model="fake-judge",
    )
    assert pref is not None and set(pref) == {"prompt", "chosen", "rejected", "raw"}
    responses = pref["raw"]["all_responses"]
    assert pref["chosen"] == min(responses.values(), key=harm)
    fake.config.judge_style = "same"
    assert generate_ai_preference(rows[0], "", "c", 1, f"{fake.url}/v1", "fake-judge") is None


def test_fresh_starts_over(run_cli, fake, tmp_path, constitution):
    first = run_basic(run_cli, fake, tmp_path, constitution)
    assert first.code == 0
    sent = len(fake.work())
    fresh = run_basic(run_cli, fake, tmp_path, constitution, "--fresh")
    assert fresh.code == 0
    assert len(fake.work()) == 2 * sent
    assert fresh.json("manifest.json")["stats"]["cached"] == {}


def test_chat_policy_sends_the_end_strings_as_stop(run_cli, fake, tmp_path, constitution):
    run = run_basic(run_cli, fake, tmp_path, constitution, "--end_strings", "</s>", prompts=PROMPTS[:1])
    assert run.code == 0
    policy = [r.body for r in fake.work() if "FULL TEXT" not in json.dumps(r.body)]
    assert policy and all(b["stop"] == ["</s>"] for b in policy)


def test_a_nemo_server_restarted_on_another_port_reuses_finished_work(run_cli, fake, tmp_path, constitution):
    assert run_basic(run_cli, fake, tmp_path, constitution, policy="nemo").code == 0
    with FakeServer(FakeConfig()) as moved:
        run = run_basic(run_cli, moved, tmp_path, constitution, "--judge-url", f"{fake.url}/v1", policy="nemo")
        assert run.code == 0
        assert moved.count("/generate") == 0


def test_failures_are_written_in_input_order_whatever_the_timing(run_cli, tmp_path, constitution):
    prompts = [f"Tell me [[judge:garbage]] thing {i}" for i in range(12)]
    files = []
    for i in range(2):
        with FakeServer(FakeConfig(latency=0.01, jitter=0.1, seed=i)) as server:
            run = run_basic(run_cli, server, tmp_path, constitution, "--judge-parse-retries", "0", prompts=prompts)
            files.append((run.out / "failures.jsonl").read_text())
    assert files[0] == files[1]
    assert [json.loads(line)["prompt"] for line in files[0].splitlines()] == prompts


def test_describe_says_which_models_and_warns_about_keys_over_plain_http():
    from caiforge.config import build_config
    from caiforge.pipeline import describe

    local = describe(build_config({}))
    assert "policy: the embedded local model; judge: the embedded local model (whole, 1 pass(es))" in local
    hosted = describe(build_config({"judge": {"api_key": "k", "url": "http://judge.example.com/v1"}}))
    assert "mistralai/mixtral-8x7b-instruct-v0.1 at http://judge.example.com/v1" in hosted
    assert "plain http" in hosted and "k" not in hosted.split("judge:")[0]
    assert "plain http" not in describe(build_config({"judge": {"api_key": "k", "url": "http://127.0.0.1:8/v1"}}))


@pytest.mark.parametrize(("output_retries", "sends"), [("0", 1), ("2", 3)])
def test_policy_resends_follow_their_own_flag_not_the_judges(
    run_cli, fake, tmp_path, constitution, output_retries, sends
):
    """A NeMo reply without the response pattern is unusable: asked again --policy-output-retries times, whatever
    --judge-parse-retries says (before 0.2 the judge's flag set both)."""
    run = run_basic(
        run_cli,
        fake,
        tmp_path,
        constitution,
        "--response_extract_pattern",
        "NEVER-IN-THE-REPLY",
        "--policy-output-retries",
        output_retries,
        "--judge-parse-retries",
        "5",
        "--max-failure-rate",
        "1",
        policy="nemo",
    )
    assert run.code == 1
    sentences = sum(len(r.body["sentences"]) for r in fake.work() if r.path == "/generate")
    assert sentences == len(PROMPTS) * len(TEMPS) * sends
    failures = run.jsonl("failures.jsonl")
    assert len(failures) == len(PROMPTS)
    assert {(f["stage"], f["reason"]) for f in failures} == {("candidates", "bad model output")}
