"""The viewer's index (``view.db``) against a store written directly: statuses, facets, search syntax, and
following results that are replaced, reviews made and cleared, prompts rewritten and a re-keyed run."""

from __future__ import annotations

from pathlib import Path

import pytest

from caiforge.store import Store
from caiforge.view_index import Filters, ViewIndex, fts_query, indexed

KEY = "run-key"


def pair(pid: str, chosen_t: float, position: int, words: str = "") -> dict:
    return {
        "prompt_id": pid,
        "responses": [[0.01, f"calm answer {words}"], [1.01, "wild answer"]],
        "chosen_t": chosen_t,
        "rejected_t": 1.01 if chosen_t == 0.01 else 0.01,
        "chosen_position": position,
        "explanation": "the calm one refuses",
    }


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "caiforge.db")
    store.begin_attempt({})
    store.set_descriptor(KEY, {})
    store.set_prompts([(f"p{i}", f"prompt number {i} about bridges") for i in range(6)])
    yield store
    store.close()


def positions(index: ViewIndex, f: Filters) -> list[int]:
    return [pos for pos, _ in index.page(f)]


def test_statuses_come_from_the_stored_records():
    assert indexed(None, None).status == "pending"
    assert indexed("pair", pair("a", 0.01, 2)).chosen_pos == 2
    inconsistent = {"stage": "judge", "reason": "judge passes disagree", "detail": "", "responses": None}
    assert indexed("failure", inconsistent).status == "inconsistent"
    assert indexed("failure", {**inconsistent, "reason": "transient error"}).status == "failure"


@pytest.mark.parametrize("typed", ['"', "a OR", "NEAR(", "-x", "col:word", "(", "*", "a AND NOT b", "'; DROP"])
def test_no_search_is_a_syntax_error(tmp_path, store, typed):
    index = ViewIndex(tmp_path, KEY)
    index.sync()
    assert isinstance(positions(index, Filters(search=typed)), list)
    assert fts_query("bridges*") == '{prompt responses explanation} : ("bridges"*)' and fts_query("%%") is None
    assert fts_query("br*", "prompt") == '{prompt} : ("br")'  # too short a prefix: a whole word


def test_the_index_follows_replaced_results_reviews_and_new_prompts(tmp_path, store):
    index = ViewIndex(tmp_path, KEY)
    assert index.sync() == 6 and index.facets()["status"] == {"pending": 6}
    store.put_result("p0", KEY, "failure", {"stage": "judge", "reason": "transient error", "detail": ""})
    store.put_result("p1", KEY, "pair", pair("p1", 0.01, 1, "kestrel"))
    store.put_result("p2", KEY, "pair", pair("p2", 1.01, 2))
    assert index.sync() == 3
    assert index.facets()["status"] == {"pending": 3, "failure": 1, "pair": 2}
    assert positions(index, Filters(chosen_t=0.01)) == [1] and positions(index, Filters(chosen_pos=2)) == [2]
    # a retried failure becomes a pair: its old search text stops matching
    store.put_result("p0", KEY, "pair", pair("p0", 0.01, 2, "osprey"))
    index.sync()
    assert index.facets()["status"] == {"pending": 3, "pair": 3}
    assert positions(index, Filters(search="transient")) == [] and positions(index, Filters(search="osprey")) == [0]
    assert positions(index, Filters(search="osprey", status="pair", chosen_pos=2)) == [0]
    assert index.count(Filters(search="answer")) == (3, False)
    # reviews are followed, cleared ones too
    store.set_review(KEY, "p1", "swap")
    store.set_review(KEY, "p2", "flag")
    index.sync()
    assert positions(index, Filters(reviewed="any")) == [1, 2] and positions(index, Filters(reviewed="flag")) == [2]
    assert sorted(positions(index, Filters(search="answer", reviewed="any"))) == [1, 2]  # a review re-tags the row
    assert positions(index, Filters(search="kestrel", reviewed="swap", chosen_t=0.01)) == [1]
    store.set_review(KEY, "p2", None)
    index.sync()
    assert positions(index, Filters(reviewed="any")) == [1] and index.facets()["reviewed"] == {"swap": 1}
    assert positions(index, Filters(search="answer", reviewed="flag")) == []  # its old document is stale
    assert sorted(positions(index, Filters(search="answer"))) == [0, 1, 2]  # in the order they were indexed
    # an attempt that rewrites the prompts rebuilds the index, keeping what the store has
    store.set_prompts([(f"p{i}", f"prompt number {i} about bridges") for i in range(8)])
    index.sync()
    assert sum(index.facets()["status"].values()) == 8 and index.facets()["status"]["pair"] == 3
    assert positions(index, Filters(search="kestrel")) == [1]
    # another run key (settings changed): nothing of the old key is this run's
    index.run_key = "another"
    index.sync()
    assert index.facets()["status"] == {"pending": 8}


def test_a_damaged_index_is_rebuilt_from_the_store(tmp_path, store):
    store.put_result("p3", KEY, "pair", pair("p3", 1.01, 1))
    (tmp_path / "view.db").write_bytes(b"not a database at all" * 100)
    index = ViewIndex(tmp_path, KEY)
    index.sync()
    assert index.facets()["status"] == {"pending": 5, "pair": 1}


def test_an_edited_input_of_the_same_size_is_reindexed_and_a_resume_is_not_rebuilt(tmp_path, store):
    index = ViewIndex(tmp_path, KEY)
    index.sync()
    store.put_result("p1", KEY, "pair", pair("p1", 0.01, 1))
    index.sync()
    rebuilt: list[int] = []
    real = index.rebuild
    index.rebuild = lambda: rebuilt.append(1) or real()  # type: ignore[method-assign]
    # a resumed attempt writes the same prompts again: compared, not rebuilt
    store.begin_attempt({})
    index.sync()  # between the new attempt and its prompts: nothing to do yet
    store.set_prompts([(f"p{i}", f"prompt number {i} about bridges") for i in range(6)])
    index.sync()
    assert rebuilt == [] and index.facets()["status"] == {"pending": 5, "pair": 1}
    # an edited input with as many prompts: the index follows it
    store.begin_attempt({})
    index.sync()
    store.set_prompts([(f"q{i}", f"another prompt {i} about tunnels") for i in range(6)])
    index.sync()
    assert rebuilt == [1] and index.facets()["status"] == {"pending": 6}
    assert (
        positions(index, Filters(search="tunnels")) == list(range(6))
        and positions(index, Filters(search="bridges")) == []
    )


def test_a_review_of_a_prompt_the_attempt_lacks_counts_nothing(tmp_path, store):
    store.set_review(KEY, "gone", "flag")
    index = ViewIndex(tmp_path, KEY)
    for _ in range(3):
        store.put_result("p0", KEY, "pair", pair("p0", 0.01, 1))  # any write: the store's data_version moves
        index.sync()
    assert "reviewed" not in index.facets() and positions(index, Filters(reviewed="any")) == []


def test_a_failed_sync_leaves_no_transaction_open(tmp_path, store, monkeypatch):
    import caiforge.view_index as view_index

    index = ViewIndex(tmp_path, KEY)
    index.sync()
    store.put_result("p0", KEY, "pair", pair("p0", 0.01, 1))
    real = view_index.indexed
    monkeypatch.setattr(view_index, "indexed", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        index.sync()
    monkeypatch.setattr(view_index, "indexed", real)
    assert index.sync() == 1 and index.facets()["status"]["pair"] == 1
