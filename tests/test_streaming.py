"""Output files are streamed from the store (#11): a bounded number of records alive at once, each file written
as its items arrive and atomically, with the bytes the in-memory writers give."""

from __future__ import annotations

import io
import json
import random
import weakref
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import caiforge.formats as formats
import caiforge.records as records_module
from caiforge.dataset import Ids, split
from caiforge.export import write_outputs
from caiforge.formats import ParquetFile, Row
from caiforge.outputs import write_streams
from caiforge.records import FailureRecord, PairRecord, RunDescriptor, prompt_id, records
from caiforge.store import Store
from caiforge.template import PromptTemplate
from caiforge.writers import WRITERS, Blend, Dataset, JsonArray, JsonLines, Options, render

TEMPS = (0.01, 0.51, 1.01)


def fill(directory: Path, n: int) -> tuple[Store, RunDescriptor]:
    """A run of ``n`` prompts: pairs, failures (some with candidates), unusable pairs, odd characters."""
    directory.mkdir(parents=True)
    store = Store.open(directory, fresh=True)
    attempt = store.begin_attempt({})
    prompts = [f"prompt {i} caf\u00e9 \u2028 \U0001f600" for i in range(n)]
    store.set_prompts((prompt_id(p), p) for p in prompts)
    store.put_failure(stage="input", reason="bad record", detail="not JSON", source="in.jsonl", line=2)
    descriptor = RunDescriptor(pipeline="rlcai", settings={}, identities={}, attempt=attempt)
    descriptor.save(store)
    for i, prompt in enumerate(prompts):
        pid, responses = prompt_id(prompt), {t: f"answer {i} at {t}" for t in TEMPS}
        if i % 7 == 3:
            failure = FailureRecord(
                prompt_id=pid, prompt=prompt, stage="judge", reason="r", responses=responses if i % 2 else None
            )
            store.put_result(pid, descriptor.key(), "failure", failure.to_json())
            continue
        if i % 11 == 5:
            responses[0.01] = "  "  # unusable: an empty chosen response
        pair = PairRecord(
            prompt_id=pid,
            prompt=prompt,
            responses=responses,
            chosen_t=0.01,
            rejected_t=1.01,
            explanation=f"why {i}",
            consistent=i % 3 == 0,
            chosen_prob=0.75,
        )
        store.put_result(pid, descriptor.key(), "pair", pair.to_json())
    return store, descriptor


def options(**extra) -> Options:
    return Options(
        template=PromptTemplate(), ratios={"train": 0.6, "test": 0.4}, shuffle=True, seed=5, prefix="x", **extra
    )


def test_a_run_streams_with_a_bounded_number_of_records_alive(tmp_path, monkeypatch):
    """Every file of every format, with the store read in passes: never more than three records or rows alive at
    once (a batch is read as JSON, and each record made as it is written), though the run has 60 prompts; the
    bytes are the in-memory writers'."""
    monkeypatch.setattr(records_module, "PAIRS_BATCH", 4)
    monkeypatch.setattr(formats, "ARROW_BATCH", 3)
    monkeypatch.setattr(formats, "ROW_GROUP", 5)
    monkeypatch.setattr(formats.ParquetFile.__init__, "__defaults__", (5,))
    alive: dict[int, weakref.ref[object]] = {}  # records are unhashable (their dicts): keyed by id
    made, most = [0], [0]
    original = PairRecord.from_json.__func__  # type: ignore[attr-defined]
    row_init = Row.__init__

    def counted(obj: object) -> None:
        key = id(obj)
        alive[key] = weakref.ref(obj, lambda _, key=key: alive.pop(key, None))
        made[0] += 1
        most[0] = max(most[0], len(alive))

    def from_json(cls, data):
        record = original(cls, data)
        counted(record)
        return record

    def init(self, **kwargs):
        row_init(self, **kwargs)
        counted(self)

    monkeypatch.setattr(PairRecord, "from_json", classmethod(from_json))
    monkeypatch.setattr(Row, "__init__", init)
    store, descriptor = fill(tmp_path / "run", 60)
    blend = Blend(
        name="b", texts={s: {"prompts": ['{"text": "e"}\n'], "comparisons": ["{}\n{}\n"]} for s in ("train", "test")}
    )
    opts = options(blend=blend)
    out = tmp_path / "out"
    written = write_outputs(store, descriptor, opts, out, seed_files=True, formats=list(formats.FORMATS), blend=True)
    assert made[0] > 3 * len(written.tally.usable)  # every pass read the pairs again
    assert most[0] <= 3, f"{most[0]} records or rows alive at once"  # a pair, its row, the row before it
    # the same records in memory give the same bytes
    monkeypatch.setattr(PairRecord, "from_json", classmethod(original))
    data = Dataset.build(
        records(store, descriptor),
        opts.template,
        **{k: getattr(opts, k) for k in ("ratios", "shuffle", "seed", "prefix", "blend")},
    )
    splits = data.assign_splits()
    assert splits == written.splits
    expected = {**WRITERS["seed"](data, splits), **WRITERS["failures"](data, splits)}
    for name, text in expected.items():
        assert (out / name).read_text(encoding="utf-8") == text, name
    pq = pytest.importorskip("pyarrow.parquet")
    train = pq.ParquetFile(out / "trl" / "train.parquet")
    assert train.metadata.num_row_groups == -(-len(splits["train"]) // 5)
    assert [r["prompt_id"] for r in train.read().to_pylist()] == list(splits["train"])
    store.close()


def test_files_are_written_as_items_arrive_and_only_whole(tmp_path):
    events: list[str] = []

    def items():
        for i in range(3):
            events.append(f"yield {i}")
            yield i

    def lines(i: int) -> list[dict[str, int]]:
        events.append(f"encode {i}")
        return [{"i": i}]

    write_streams(tmp_path, {"a.jsonl": JsonLines(lines)}, items())
    assert events == ["yield 0", "encode 0", "yield 1", "encode 1", "yield 2", "encode 2"]
    assert (tmp_path / "a.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'

    def failing():
        yield 1
        raise RuntimeError("the store went away")

    with pytest.raises(RuntimeError):
        write_streams(tmp_path, {"a.jsonl": JsonLines(lines), "sub/b.jsonl": JsonLines(lines)}, failing())
    assert (tmp_path / "a.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'  # the old file, untouched
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.jsonl"]  # no temporary left


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=5))
def test_a_json_array_streamed_an_entry_at_a_time_has_json_dumps_bytes(entries):
    streamed = render({"f": JsonArray(lambda e: e)}, entries)["f"]
    assert streamed == json.dumps(entries, indent=4) + "\n"


def test_a_parquet_file_within_one_row_group_has_write_tables_bytes():
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(0)
    rows = [
        {
            "prompt": [{"role": "user", "content": "\u00e9" * rng.randint(0, 40)}],
            "chosen": "x" * rng.randint(1, 300),
            "t": rng.random(),
            "label": i % 2 == 0,
        }
        for i in range(2500)
    ]

    def write(rows, row_group):
        f = ParquetFile(lambda r: [r], ["prompt"], row_group=row_group)
        return b"".join([*(f.add(r) for r in rows), f.end()])

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, compression="zstd")
    assert write(rows, 5000) == sink.getvalue()  # several Arrow batches, one row group: the same bytes
    empty = io.BytesIO()
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty, compression="zstd")
    assert write([], 5000) == empty.getvalue()
    grouped = pq.ParquetFile(pa.BufferReader(write(rows, 1000)))
    assert [grouped.metadata.row_group(i).num_rows for i in range(grouped.metadata.num_row_groups)] == [1000, 1000, 500]
    assert grouped.read().to_pylist() == rows


def test_ids_take_8_bytes_each_and_split_as_the_list_does():
    ids = [prompt_id(f"p{i}") for i in range(200)]
    packed = Ids(ids)
    assert list(packed) == ids and len(packed) == 200 and packed[7] == ids[7] and packed == ids
    assert packed._packed is not None and packed._packed.itemsize == 8
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    opts = Options(template=PromptTemplate(), ratios=ratios, shuffle=True, seed=9)
    assert {k: list(v) for k, v in opts.assign(packed).items()} == split(ids, ratios, True, 9)
    odd = Ids(["0123456789abcdef", "not-hex", "ABCDEF0123456789"])  # any other id: kept as it is
    assert list(odd) == ["0123456789abcdef", "not-hex", "ABCDEF0123456789"] and odd._packed is None
    assert list(odd.take([2, 0])) == ["ABCDEF0123456789", "0123456789abcdef"]
