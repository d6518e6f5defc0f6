"""``caiforge view``: the viewer on a real run's store, over real HTTP on loopback (urllib, no browser yet):
paging, filters and search in SQL, a prompt's page, hostile text escaped, reviews that change the next export,
and the Host/Origin/token guards."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable
from html import unescape
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from caiforge.cli import main
from conftest import run_on
from viewer_harness import Viewer, viewing

PROMPTS = [f"View prompt {i}: how would someone do a bad thing?" for i in range(57)] + [
    "Say <script>document.title='pwned'</script> and \"quotes\" & more",
    "[[policy:500]] this prompt's candidates fail",
]


@pytest.fixture
def viewed(run_cli, fake, tmp_path, constitution):
    with viewing(run_cli, fake, tmp_path, constitution, PROMPTS) as found:
        yield found


def version_on(page: str) -> str:
    found = re.search(r"name='version' value='([^']*)'", page)
    assert found is not None, "no review form on the page"
    return unescape(found.group(1))


def ids_on(page: str) -> list[str]:
    return re.findall(r"href='/prompt/([0-9a-f]+)'", page)


def test_the_table_pages_filters_and_searches_in_sql(viewed):
    viewer, _ = viewed
    status, first, headers = viewer.get("/")
    csp = headers["Content-Security-Policy"]
    assert status == 200 and len(ids_on(first)) == 50
    assert (
        "default-src 'none'" in csp
        and "script-src 'self';" in csp
        and "unsafe" not in csp.split("script-src")[1].split(";")[0]
    )
    nxt = re.search(r"id='next' href='([^']+)'", first)
    assert nxt is not None
    _, second, _ = viewer.get(nxt.group(1).replace("&amp;", "&"))
    assert len(ids_on(second)) == len(PROMPTS) - 50 and not set(ids_on(second)) & set(ids_on(first))
    _, failed, _ = viewer.get("/?status=failure")
    assert len(ids_on(failed)) == 1 and "candidates: transient error" in failed
    _, found, _ = viewer.get("/?" + urlencode({"q": "View prompt 1", "in": "prompt"}))
    assert len(ids_on(found)) == 1  # whole words: "1" is not "10"
    assert len(every_page(viewer, {"q": "vie*", "in": "prompt"})) == 57  # a prefix of 3 characters or more
    assert len(every_page(viewer, {"q": "vi*", "in": "prompt"})) == 0  # shorter: a whole word ("vi")
    _, none, _ = viewer.get("/?" + urlencode({"q": "%"}))  # a LIKE wildcard typed is a character searched
    assert ids_on(none) == []


def test_a_prompts_page_marks_chosen_and_rejected_as_the_files_do(viewed):
    viewer, result = viewed
    pairs = {p["prompt"]: p for p in result.json("cai_preference_dataset.json")}
    _, table, _ = viewer.get("/")
    pid = ids_on(table)[3]
    _, page, _ = viewer.get(f"/prompt/{pid}")
    prompt = unescape(re.search(r"<pre id='prompt'>(.*?)</pre>", page, re.S).group(1))  # type: ignore[union-attr]
    pair = pairs[prompt]
    chosen = re.search(r"class='chosen'><b>[^<]*</b><pre class='candidate'>(.*?)</pre>", page, re.S)
    rejected = re.search(r"class='rejected'><b>[^<]*</b><pre class='candidate'>(.*?)</pre>", page, re.S)
    assert chosen and rejected
    assert (unescape(chosen.group(1)), unescape(rejected.group(1))) == (pair["chosen"], pair["rejected"])


def test_hostile_text_is_shown_as_text(viewed):
    viewer, _ = viewed
    _, found, _ = viewer.get("/?" + urlencode({"q": "document.title"}))
    (pid,) = ids_on(found)
    _, page, _ = viewer.get(f"/prompt/{pid}")
    for html in (found, page):
        assert set(re.findall(r"<script[^>]*>", html)) <= {"<script src='/static/view.js' defer>"}  # ours alone
        assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in html


def test_a_review_made_in_the_page_changes_the_next_export(viewed, tmp_path, capsys):
    viewer, result = viewed
    train = [json.loads(line)["prompt_id"] for line in (result.out / "trl" / "train.jsonl").read_text().splitlines()]
    flagged = train[0]
    status, page, _ = viewer.get(f"/prompt/{flagged}")
    assert "<form method='post'" not in page  # without the printed URL's token, no review form
    cookie = f"caiforge_view_{urlsplit(viewer.base).port}={viewer.token}"  # a cookie of this port's viewer
    _, page, _ = viewer.get(f"/prompt/{flagged}", {"Cookie": cookie})
    assert "<form method='post'" in page
    form = {"token": viewer.token, "prompt_id": flagged, "action": "flag", "version": version_on(page)}
    assert viewer.post("/review", {**form, "version": "1.0"})[0] == 409  # made on another version of the pair
    assert "current: none" in viewer.get(f"/prompt/{flagged}")[1]
    status, _, _ = viewer.post("/review", form)
    assert status == 200  # after the 303 to the prompt's page
    _, page, _ = viewer.get(f"/prompt/{flagged}")
    assert "current: flag" in page
    capsys.readouterr()
    assert main(["export", str(result.out), "--format", "trl", "--output-dir", str(tmp_path / "x")]) == 0
    after = [
        json.loads(line)["prompt_id"] for line in (tmp_path / "x" / "trl" / "train.jsonl").read_text().splitlines()
    ]
    assert after == train[1:]


def test_foreign_hosts_origins_and_missing_tokens_are_refused(viewed):
    viewer, _ = viewed
    port = urlsplit(viewer.base).port
    assert viewer.get("/", {"Host": f"evil.example:{port}"})[0] == 403  # DNS rebinding
    assert viewer.get("/", {"Host": f"localhost:{port}"})[0] == 200
    _, table, _ = viewer.get("/")
    pid = ids_on(table)[0]
    assert viewer.post("/review", {"prompt_id": pid, "action": "flag"})[0] == 403  # no token
    assert viewer.post("/review", {"token": "guess", "prompt_id": pid, "action": "flag"})[0] == 403
    form = {
        "token": viewer.token,
        "prompt_id": pid,
        "action": "flag",
        "version": version_on(viewer.get(f"/prompt/{pid}?token={viewer.token}")[1]),
    }
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        assert viewer.post("/review", form, headers)[0] == 403, headers
    assert "current: none" in viewer.get(f"/prompt/{pid}")[1]  # nothing was stored
    assert viewer.get("/?after=100000000000000000000")[0] == 200  # past SQLite's integers: an empty page
    assert viewer.get("/?t=abc&pos=1.5&status=nope&in=tags&q=" + "tags%20:%20x%20{%22")[0] == 200


def test_a_revise_runs_page_shows_the_chain(run_cli, fake, tmp_path):
    from conftest import write_prompts

    path = write_prompts(tmp_path / "r.jsonl", ["Revise me: how do I do a bad thing?"])
    result = run_cli("revise", "--red-teaming-prompts-dataset-path", str(path), "--policy-url", f"{fake.url}/v1",
                     "--policy-model", "fake-policy", out=tmp_path / "rev")  # fmt: skip
    assert result.code == 0, result.stderr
    (record,) = result.json("cai_output/cai_critique_revision_samples.json")
    viewer = Viewer(result.out)
    try:
        _, table, _ = viewer.get("/?status=revision")
        (pid,) = ids_on(table)
        _, page, _ = viewer.get(f"/prompt/{pid}")
    finally:
        viewer.stop()
    assert "requests (3)" in page  # the initial answer, the critique and the revision, from the store
    assert (
        "round 1" in page
        and unescape(re.search(r"class='revision'>(.*?)</pre>", page, re.S).group(1))
        == (  # type: ignore[union-attr]
            record["revision_response"]
        )
    )


def stored(run_dir: Path) -> dict[str, dict]:
    """Each prompt's result as the store holds it (status and data), by prompt id."""
    db = sqlite3.connect(run_dir / "caiforge.db")
    try:
        return {
            pid: {"status": s, **json.loads(d)}
            for pid, s, d in db.execute("SELECT prompt_id, status, data FROM results")
        }
    finally:
        db.close()


def every_page(viewer: Viewer, query: dict[str, str]) -> list[str]:
    """Every prompt id a filtered table lists, following its next links."""
    ids, path = [], "/?" + urlencode(query)
    while True:
        _, page, _ = viewer.get(path)
        ids += ids_on(page)
        nxt = re.search(r"id='next' href='([^']+)'", page)
        if nxt is None:
            return ids
        path = unescape(nxt.group(1))


def test_each_filter_lists_exactly_the_stored_rows_it_names(viewed):
    viewer, result = viewed
    results = stored(result.out)
    pairs = {pid: r for pid, r in results.items() if r["status"] == "pair"}
    temperatures = {r["chosen_t"] for r in pairs.values()}
    assert len(temperatures) > 1
    for t in temperatures:
        expect = [pid for pid, r in pairs.items() if r["chosen_t"] == t]
        assert sorted(every_page(viewer, {"t": str(t)})) == sorted(expect)
    for pos in {r["chosen_position"] for r in pairs.values()}:
        expect = [pid for pid, r in pairs.items() if r["chosen_position"] == pos]
        assert sorted(every_page(viewer, {"pos": str(pos)})) == sorted(expect)
    t, pos = min(temperatures), 1
    both = [pid for pid, r in pairs.items() if r["chosen_t"] == t and r["chosen_position"] == pos]
    assert sorted(every_page(viewer, {"t": str(t), "pos": str(pos)})) == sorted(both)
    assert every_page(viewer, {"t": str(t), "status": "failure"}) == []  # a failure has no chosen candidate
    _, page, _ = viewer.get("/")
    (mode,) = re.findall(r"<option value='([^']+)'>[^<]+</option></select></label><label>reviewed", page)
    assert mode == "whole, 1 pass" and len(every_page(viewer, {"mode": mode})) == len(PROMPTS)
    assert every_page(viewer, {"mode": "principle, 2 passes"}) == []  # not this run's mode
    assert f"{len(pairs)} match" in viewer.get("/?status=pair")[1]  # counted from the facets


def test_a_prompts_page_lists_the_requests_the_run_made_rebuilt_from_the_store(viewed, fake):
    viewer, result = viewed
    pairs = {p["prompt"]: p for p in result.json("cai_preference_dataset.json")}
    pid = every_page(viewer, {"status": "pair"})[0]
    _, page, _ = viewer.get(f"/prompt/{pid}")
    assert "requests (5)" in page and page.count("<details class='call'>") == 5
    replies = [unescape(r) for r in re.findall(r"<h4>reply</h4><pre>(.*?)</pre>", page, re.S)]
    prompt = unescape(re.search(r"<pre id='prompt'>(.*?)</pre>", page, re.S).group(1))  # type: ignore[union-attr]
    assert pairs[prompt]["chosen"] in replies[:4] and pairs[prompt]["rejected"] in replies[:4]
    requests = [json.loads(unescape(r)) for r in re.findall(r"<h4>request</h4><pre>(.*?)</pre>", page, re.S)]
    judged = [r.body for r in fake.requests if r.body and r.body.get("model") == "fake-judge"]
    seen = [body["messages"] for body in judged if prompt in json.dumps(body["messages"])]
    assert seen == [requests[4]["messages"]]  # exactly what the server was sent for this prompt's judge pass
    assert '"chosen"' in replies[4] and '"rejected"' in replies[4]  # the judge's raw reply, as it came
    failed = every_page(viewer, {"status": "failure"})[0]
    _, page, _ = viewer.get(f"/prompt/{failed}")
    assert "(not in the store: never answered)" in page  # the replay stops where the run stopped


def test_the_report_page_shows_the_runs_plots_and_nothing_else_is_served(viewed):
    viewer, result = viewed
    _, page, _ = viewer.get("/report")
    plots = re.findall(r"<img src='/plots/([a-z_]+\.png)'", page)
    assert plots and all((result.out / "report" / name).is_file() for name in plots)
    status, _, headers = viewer.get(f"/plots/{plots[0]}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert viewer.get("/plots/..%2Fcaiforge.db")[0] == 404 and viewer.get("/plots/report.md")[0] == 404
    status, live, _ = viewer.get("/api/live")
    counts = json.loads(live)
    assert counts == {"counts": {"failure": 1, "pair": len(PROMPTS) - 1}, "running": False}


def test_the_viewer_follows_a_run_while_it_writes(run_cli, tmp_path, constitution):
    """A viewer opened on a finished run, then a rerun with more prompts whose requests the server holds: the
    viewer shows the new prompts pending while the run is held, then every pair once it is let go."""
    from caiforge.testing.fake_server import FakeConfig, FakeServer

    first = [f"Follow prompt {i}: a question" for i in range(5)]
    more = first + [f"Follow prompt {i}: a later question" for i in range(5, 12)]
    hold = threading.Event()
    hold.set()
    with FakeServer(FakeConfig(hold=hold)) as server:
        done = run_on(run_cli, server, tmp_path, constitution, prompts=first)
        assert done.code == 0, done.stderr
        viewer = Viewer(done.out)
        try:
            assert json.loads(viewer.get("/api/live")[1])["counts"] == {"pair": 5}
            hold.clear()
            outcome: list[object] = []
            runner = threading.Thread(
                target=lambda: outcome.append(run_on(run_cli, server, tmp_path, constitution, prompts=more))
            )
            runner.start()
            live = wait_for(viewer, lambda c: sum(c["counts"].values()) == len(more))
            assert live["running"] and live["counts"] == {"pair": 5, "pending": 7}
            _, page, _ = viewer.get("/?status=pending")
            assert len(ids_on(page)) == 7
            hold.set()
            runner.join(120)
            assert outcome and outcome[0].code == 0  # type: ignore[attr-defined]
            live = wait_for(viewer, lambda c: not c["running"] and c["counts"].get("pair") == len(more))
            assert live["counts"] == {"pair": len(more)}
            assert len(every_page(viewer, {"status": "pair"})) == len(more)
            assert len(every_page(viewer, {"q": "later"})) == 7  # the new pairs are searchable
        finally:
            hold.set()
            viewer.stop()


def wait_for(viewer: Viewer, done: Callable[[dict], bool], tries: int = 6000) -> dict:
    """Poll the live counts until ``done`` holds (a bound on tries, never a timed assertion)."""
    for _ in range(tries):
        status, body, _ = viewer.get("/api/live")
        assert status == 200, body
        live = json.loads(body)
        if done(live):
            return live
        time.sleep(0.05)
    raise AssertionError(f"the viewer never saw it: {live}")


def test_the_runs_warnings_head_the_table_escaped(viewed):
    viewer, result = viewed
    manifest = result.json("manifest.json")
    manifest["warnings"] = ["The judge was a <b>toy</b>: its labels are for trying the tool."]
    (result.out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    _, page, _ = viewer.get("/")
    assert "<b>Warning.</b> The judge was a &lt;b&gt;toy&lt;/b&gt;: its labels are for trying the tool." in page


def test_the_command_serves_the_printed_url_and_stops_on_ctrl_c(viewed, tmp_path):
    import signal
    import subprocess
    import sys

    _, result = viewed
    proc = subprocess.Popen(
        [sys.executable, "-m", "caiforge.cli", "view", str(result.out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell without job control starts jobs with SIGINT ignored, which Python keeps: a terminal's instead
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        url = ""
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("caiforge view: http://127.0.0.1:"):
                url = line.split()[2]
                break
        with urllib.request.urlopen(url, timeout=30) as resp:
            page = resp.read().decode()
            assert resp.status == 200 and len(ids_on(page)) == 50
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    bad = subprocess.run([sys.executable, "-m", "caiforge.cli", "view", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "not a caiforge run" in bad.stderr and "Traceback" not in bad.stderr


def test_a_fresh_run_in_the_folder_is_followed_and_old_reviews_are_refused(run_cli, fake, tmp_path, constitution):
    first = run_on(run_cli, fake, tmp_path, constitution, prompts=[f"Old prompt {i}: a question" for i in range(3)])
    assert first.code == 0, first.stderr
    viewer = Viewer(first.out)
    try:
        pid = ids_on(viewer.get("/")[1])[0]
        form = {"token": viewer.token, "prompt_id": pid, "action": "swap",
                "version": version_on(viewer.get(f"/prompt/{pid}?token={viewer.token}")[1])}  # fmt: skip
        again = run_on(run_cli, fake, tmp_path, constitution, "--fresh",
                       prompts=[f"Old prompt {i}: a question" for i in range(3)] + ["New prompt: another"])  # fmt: skip
        assert again.code == 0, again.stderr
        _, page, _ = viewer.get("/")
        assert len(ids_on(page)) == 4 and "New prompt" in page  # the new store, not the deleted file
        assert viewer.post("/review", form)[0] == 409  # a review made on the old run's pair is not applied
        assert "current: none" in viewer.get(f"/prompt/{pid}")[1]
    finally:
        viewer.stop()
