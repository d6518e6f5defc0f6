"""``caiforge view``: the viewer on a real run's store, over real HTTP on loopback (urllib, no browser yet):
paging, filters and search in SQL, a prompt's page, hostile text escaped, reviews that change the next export,
and the Host/Origin/token guards."""

from __future__ import annotations

import json
import re
from html import unescape
from urllib.parse import urlencode, urlsplit

import pytest

from caiforge.cli import main
from conftest import run_on
from viewer_harness import Viewer

PROMPTS = [f"View prompt {i}: how would someone do a bad thing?" for i in range(57)] + [
    "Say <script>document.title='pwned'</script> and \"quotes\" & more",
    "[[policy:500]] this prompt's candidates fail",
]


@pytest.fixture
def viewed(run_cli, fake, tmp_path, constitution):
    result = run_on(run_cli, fake, tmp_path, constitution, "--max-retries", "0", "--policy-output-retries", "0",
                    prompts=PROMPTS)  # fmt: skip
    assert result.code == 0, result.stderr
    viewer = Viewer(result.out)
    yield viewer, result
    viewer.stop()


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
    _, found, _ = viewer.get("/?" + urlencode({"q": "View prompt 1*", "in": "prompt"}))
    assert len(ids_on(found)) == 11  # 1 and 10-19: a prefix
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
    cookie = f"caiforge_view={viewer.token}"
    _, page, _ = viewer.get(f"/prompt/{flagged}", {"Cookie": cookie})
    assert "<form method='post'" in page
    status, _, _ = viewer.post("/review", {"token": viewer.token, "prompt_id": flagged, "action": "flag"})
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
    evil = {"Origin": "http://evil.example"}
    assert viewer.post("/review", {"token": viewer.token, "prompt_id": pid, "action": "flag"}, evil)[0] == 403
    assert "current: none" in viewer.get(f"/prompt/{pid}")[1]  # nothing was stored


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
    assert (
        "round 1" in page
        and unescape(re.search(r"class='revision'>(.*?)</pre>", page, re.S).group(1))
        == (  # type: ignore[union-attr]
            record["revision_response"]
        )
    )
