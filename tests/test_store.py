"""The store on its own: migrations (a 0.1 database included), the reply cache, and a run rebuilt from the
store alone as typed records."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from caiforge.records import FailureRecord, PairRecord, RunDescriptor, pending, prompt_id, records
from caiforge.request import Reply
from caiforge.store import MIGRATIONS, Store

LEGACY = Path(__file__).parent / "golden" / "v0.1" / "chat-whole.db"


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


def test_a_0_1_database_migrates_to_one_reply_table_with_every_key_kept(tmp_path):
    path = tmp_path / "caiforge.db"
    shutil.copy(LEGACY, path)
    old = sqlite3.connect(path)
    keys = {row[0] for row in old.execute("SELECT key FROM generations UNION SELECT key FROM judge_calls")}
    generations = old.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    old.close()
    assert generations > 0
    store = Store(path)
    try:
        migrated = {row[0] for row in store.db.execute("SELECT key FROM replies")}
        roles = dict(store.db.execute("SELECT role, COUNT(*) FROM replies GROUP BY role").fetchall())
        applied = [row[0] for row in store.db.execute("SELECT name FROM _migrations ORDER BY applied")]
    finally:
        store.close()
    assert migrated == keys
    assert roles["policy"] == generations
    assert applied == [m.__name__ for m in MIGRATIONS]
    assert {"generations", "judge_calls", "verdicts"}.isdisjoint(tables(path))


def test_a_new_database_gets_every_migration_once(tmp_path):
    Store(tmp_path / "a.db").close()
    store = Store(tmp_path / "a.db")  # reopening applies nothing twice
    try:
        assert store.db.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0] == len(MIGRATIONS)
    finally:
        store.close()


def test_a_reply_round_trips_with_its_log_probabilities(tmp_path):
    store = Store(tmp_path / "r.db")
    top = [[{"token": "A", "logprob": -0.1}, {"token": "B", "logprob": -2.3}]]
    store.put_reply("k", "judge", Reply(text="A", prompt_tokens=5, completion_tokens=1, top_logprobs=top))
    got = store.get_reply("k")
    store.close()
    assert got == Reply(text="A", prompt_tokens=5, completion_tokens=1, top_logprobs=top, cached=True)


def pair(text: str) -> PairRecord:
    return PairRecord(
        prompt_id=prompt_id(text),
        prompt=text,
        responses={0.01: "safe", 0.51: "unsafe"},
        chosen_t=0.01,
        rejected_t=0.51,
        explanation="why",
        order_t=(0.51, 0.01),
        chosen_position=2,
        rejected_position=1,
        consistent=True,
        chosen_prob=0.75,
        principle="be kind",
        merged={0.01: [1.01]},
    )


def test_records_rebuild_a_run_from_the_store_alone_in_input_order(tmp_path):
    store = Store(tmp_path / "run.db")
    store.attempt = store.begin_attempt({})
    prompts = ["first", "second", "third", "fourth"]
    store.set_prompts((prompt_id(p), p) for p in prompts)
    descriptor = RunDescriptor(pipeline="rl-cai", settings={"temperatures": [0.01, 0.51]}, identities={}, attempt=1)
    descriptor.save(store)
    key = descriptor.key()
    store.put_failure(stage="input", reason="bad record", detail="invalid JSON", source="p.jsonl", line=3)
    failed = FailureRecord(
        prompt_id=prompt_id("second"), prompt="second", stage="judge", reason="x", responses={0.01: "a", 0.51: "b"}
    )
    store.put_result(prompt_id("third"), key, "pair", pair("third").to_json())
    store.put_result(prompt_id("second"), key, "failure", failed.to_json())
    store.put_result(prompt_id("first"), key, "pair", pair("first").to_json())
    store.put_result(prompt_id("fourth"), "another-descriptor", "pair", pair("fourth").to_json())  # stale
    loaded = RunDescriptor.load(store)
    found = list(records(store))
    waiting = pending(store, descriptor)
    store.close()
    assert loaded == descriptor
    assert [type(r).__name__ for r in found] == ["FailureRecord", "PairRecord", "FailureRecord", "PairRecord"]
    assert found[0] == FailureRecord(
        prompt_id=None, prompt=None, stage="input", reason="bad record", detail="invalid JSON", source="p.jsonl", line=3
    )
    assert found[1] == pair("first") and found[2] == failed and found[3] == pair("third")
    assert waiting == 1  # "fourth" has only a result made under other settings


def test_prompt_ids_are_stable_and_distinct():
    assert prompt_id("a") == prompt_id("a") != prompt_id("b")
    assert len(prompt_id("a")) == 16
