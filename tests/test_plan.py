"""``caiforge plan``: exact counts, token estimates held to a real fake-server run's usage, and budget stops."""

from __future__ import annotations

import json

from caiforge.cli import main
from caiforge.testing.fake_server import FakeConfig, FakeServer
from conftest import server_flags, stored_keys, write_prompts


def plan(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def prompts_file(tmp_path, n: int, duplicates: int = 0):
    texts = [f"Plan prompt {i}: how would someone do a bad thing number {i}?" for i in range(n)]
    return write_prompts(tmp_path / "p.jsonl", texts + texts[:duplicates])


def test_plan_counts_prompts_and_requests_exactly(tmp_path, capsys, constitution):
    path = prompts_file(tmp_path, 10, duplicates=3)
    with path.open("a") as f:
        f.write("not json\n")
    common = ["--red-teaming-file-path", str(path), "--on-bad-record", "skip", "--output-dir", str(tmp_path / "o")]
    nemo = ["--host", "127.0.0.1", "--port", "9", "--batch-size", "4"]  # nothing is sent: the plan reads only
    found = plan(capsys, *common, "--sys-prompt-constitution-file-path", str(constitution), *nemo,
                 "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--judge-passes", "2")  # fmt: skip
    assert (found["input_records"], found["unique_prompts"], found["duplicate_prompts"], found["bad_records"]) == (
        13, 10, 3, 1)  # fmt: skip
    assert found["roles"]["policy"]["requests"] == 40 and found["roles"]["policy"]["calls"] == 10  # 40 / 4 a call
    assert found["roles"]["judge"]["requests"] == 20  # two passes
    revise = plan(capsys, "revise", *common, "--revisions", "2", "--policy-url", "http://127.0.0.1:9/v1",
                  "--policy-model", "m")  # fmt: skip
    assert revise["roles"]["policy"]["requests"] == 10 * 5 and revise["unique_prompts"] == 10
    assert not (tmp_path / "o").exists()  # nothing was written


def test_plan_estimates_hold_against_a_real_run(run_cli, tmp_path, capsys, constitution):
    """The same inputs planned, then run on a server that counts usage by the same rule (4 characters a token):
    requests exact, policy input within 5%, judge input within a factor of 2 (the judge prompt's framing is not
    counted, the candidates it quotes are counted at their token limit: 0.87 of the estimate here), outputs at
    most the estimate (the token limits are an upper bound)."""
    path = prompts_file(tmp_path, 12)
    with FakeServer(FakeConfig(chars_per_token=4.0)) as server:
        flags = ["--red-teaming-file-path", str(path), "--sys-prompt-constitution-file-path", str(constitution),
                 *server_flags(server), "--tokens_to_generate", "64", "--judge-max-tokens", "256"]  # fmt: skip
        found = plan(capsys, *flags, "--chars-per-token", "4", "--output-dir", str(tmp_path / "out"))
        result = run_cli(*flags)
    assert result.code == 0, result.stderr
    stats = result.json("manifest.json")["stats"]
    for role in ("policy", "judge"):
        assert stats["requests"][role] == found["roles"][role]["requests"]
        assert stats["tokens"][f"{role}_completion"] <= found["roles"][role]["tokens_out"]
    estimate = found["roles"]["policy"]["tokens_in"]
    assert abs(stats["tokens"]["policy_prompt"] - estimate) <= 0.05 * estimate
    judged = stats["tokens"]["judge_prompt"]
    assert found["roles"]["judge"]["tokens_in"] * 0.5 <= judged <= 2 * found["roles"]["judge"]["tokens_in"]
    again = plan(capsys, *flags, "--chars-per-token", "4", "--output-dir", str(result.out))
    assert again["stored_replies"] == {"policy": 48, "judge": 12}  # a folder that holds a run: its replies
    assert again["roles"]["policy"]["tokens_out_from"] == "mean of the replies stored in the output folder"


def test_a_budget_stop_then_a_rerun_finishes_without_asking_again(run_cli, tmp_path, capsys, constitution):
    path = prompts_file(tmp_path, 30)
    with FakeServer(FakeConfig()) as server:
        flags = ["--red-teaming-file-path", str(path), "--sys-prompt-constitution-file-path", str(constitution),
                 *server_flags(server), "--policy-concurrency", "2", "--judge-concurrency", "2"]  # fmt: skip
        stopped = run_cli(*flags, "--max-tokens", "300")
        durable = stored_keys(stopped.out)
        first = len([r for r in server.requests if r.body and not r.is_check])
        finished = run_cli(*flags)
        second = len([r for r in server.requests if r.body and not r.is_check]) - first
    assert stopped.code == 1 and "stopped at the budget" in stopped.stderr and "--max-tokens 300" in stopped.stderr
    assert finished.code == 0 and finished.json("manifest.json")["counts"]["pairs"] == 30
    assert 0 < len(durable) < 30 * 5
    assert second == 30 * 5 - len(durable)  # nothing stored is asked again


def test_max_cost_needs_prices(run_cli, tmp_path, constitution):
    result = run_cli("--sys-prompt-constitution-file-path", str(constitution), "--max-cost", "1")
    assert result.code == 2 and "--max-cost needs --price-in and --price-out" in result.stderr


def test_plan_duration_and_cost_follow_concurrency_rpm_latency_and_prices(tmp_path, capsys, constitution):
    path = prompts_file(tmp_path, 10)
    found = plan(capsys, "--red-teaming-file-path", str(path), "--sys-prompt-constitution-file-path",
                 str(constitution), "--policy-url", "http://127.0.0.1:9/v1", "--policy-model", "p",
                 "--policy-concurrency", "4", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j",
                 "--judge-rpm", "30", "--assume-latency", "2", "--price-in", "3", "--price-out", "15",
                 "--output-dir", str(tmp_path / "o"))  # fmt: skip
    policy, judge = found["roles"]["policy"], found["roles"]["judge"]
    # policy: 40 requests at 4 in flight of 2 s each = 20 s; judge: 10 requests at 30 a minute = 20 s
    assert found["duration_s"] == [20.0, 40.0]
    tokens_in, tokens_out = policy["tokens_in"] + judge["tokens_in"], policy["tokens_out"] + judge["tokens_out"]
    assert found["cost"] == round((tokens_in * 3 + tokens_out * 15) / 1e6, 4) and found["cost"] > 0


def test_a_cost_budget_stops_the_run_and_a_rerun_with_a_larger_one_finishes(run_cli, tmp_path, constitution):
    path = prompts_file(tmp_path, 20)
    with FakeServer(FakeConfig()) as server:
        flags = ["--red-teaming-file-path", str(path), "--sys-prompt-constitution-file-path", str(constitution),
                 *server_flags(server), "--policy-concurrency", "2", "--judge-concurrency", "2",
                 "--price-in", "1000", "--price-out", "1000"]  # fmt: skip
        stopped = run_cli(*flags, "--max-cost", "0.5")  # $1000 per million tokens: about 500 tokens
        durable = stored_keys(stopped.out)
        first = len([r for r in server.requests if r.body and not r.is_check])
        finished = run_cli(*flags, "--max-cost", "1000")
        second = len([r for r in server.requests if r.body and not r.is_check]) - first
    assert stopped.code == 1 and "stopped at the budget" in stopped.stderr
    assert finished.code == 0 and finished.json("manifest.json")["counts"]["pairs"] == 20
    assert 0 < len(durable) < 20 * 5 and second == 20 * 5 - len(durable)
