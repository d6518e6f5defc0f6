"""``caiforge view`` in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by selenium):
paging, filters and search through the page's own form, chosen and rejected on a prompt's page, hostile model
text that stays text, reviews clicked in the page that change the next export, a foreign Host refused, and the
pages with JavaScript off. ``make test-browser`` installs the browser and runs these; ``make test`` does not
collect them.

selenium gets the path of the ``chromedriver`` on PATH: its own driver manager would try to download one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="make test-browser installs selenium")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from caiforge.cli import main  # noqa: E402
from caiforge.view import VIEW  # noqa: E402
from viewer_harness import Viewer, viewing  # noqa: E402

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='img'\">"
PROMPTS = [f"Browser prompt {i}: how would someone do a bad thing?" for i in range(57)] + [
    f"[[policy:echo]] {HOSTILE}",
    "[[policy:500]] this prompt's candidates fail",
]
SCREENSHOTS = os.environ.get("CAIFORGE_SCREENSHOTS")  # a folder: save the pages there too (README images)


def chrome(tmp: Path, javascript: bool = True) -> webdriver.Chrome:
    os.environ.setdefault("SE_OFFLINE", "true")  # never ask the network for a driver or a browser
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    assert driver_path and browser, "make test-browser installs Debian's chromium and chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp}",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--host-resolver-rules=MAP evil.test 127.0.0.1",  # a rebinding attacker's name, resolved to the viewer
    ):
        opts.add_argument(arg)
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chrome(tmp_path / "profile")
    yield driver
    driver.quit()


@pytest.fixture
def viewed(run_cli, fake, tmp_path, constitution):
    with viewing(run_cli, fake, tmp_path, constitution, PROMPTS) as found:
        yield found


def listed(driver: webdriver.Chrome) -> list[str]:
    return [a.get_attribute("href").rsplit("/", 1)[-1] for a in driver.find_elements(By.CSS_SELECTOR, "td a")]


def follow(driver: webdriver.Chrome, element: WebElement) -> None:
    """Click a link or a form's button and wait for the next page: a click returns before the page it loads."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def gone(_: object) -> bool:
        try:
            page.is_enabled()
        except WebDriverException:  # stale; or, caught mid-navigation, "node does not belong to the document"
            return True
        return False

    WebDriverWait(driver, 30).until(gone)


def shoot(driver: webdriver.Chrome, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))


def test_the_table_pages_filters_and_searches(viewed, browser):
    viewer, _ = viewed
    browser.get(viewer.url)
    first = listed(browser)
    assert len(first) == 50
    shoot(browser, "view-table.png")
    follow(browser, browser.find_element(By.ID, "next"))
    second = listed(browser)
    assert len(second) == len(PROMPTS) - 50 and not set(first) & set(second)

    browser.get(viewer.base + "/")
    Select(browser.find_element(By.NAME, "status")).select_by_value("failure")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    assert len(listed(browser)) == 1 and "transient error" in browser.find_element(By.TAG_NAME, "table").text

    browser.get(viewer.base + "/")
    options = [o.get_attribute("value") for o in Select(browser.find_element(By.NAME, "t")).options]
    options = [value for value in options if value]
    assert options, "the chosen-temperature filter offers the run's temperatures"
    Select(browser.find_element(By.NAME, "t")).select_by_value(options[0])
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    shown = browser.find_elements(By.CSS_SELECTOR, "td:nth-child(4)")
    assert shown and all(f"chosen t={options[0]}" in cell.text for cell in shown)

    browser.get(viewer.base + "/")
    search = browser.find_element(By.NAME, "q")
    search.send_keys("Browser prompt 1")
    Select(browser.find_element(By.NAME, "in")).select_by_value("prompt")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    assert len(listed(browser)) == 1  # whole words: prompt 1, not 10-19


def test_a_prompts_page_shows_the_files_chosen_and_rejected(viewed, browser):
    viewer, result = viewed
    pairs = {p["prompt"]: p for p in result.json("cai_preference_dataset.json")}
    browser.get(viewer.url)
    follow(browser, browser.find_elements(By.CSS_SELECTOR, "td a")[5])
    prompt = browser.find_element(By.ID, "prompt").text
    chosen = browser.find_element(By.CSS_SELECTOR, "td.chosen pre.candidate").text
    rejected = browser.find_element(By.CSS_SELECTOR, "td.rejected pre.candidate").text
    assert (chosen, rejected) == (pairs[prompt]["chosen"], pairs[prompt]["rejected"])
    calls = browser.find_elements(By.CSS_SELECTOR, "details.call summary")
    assert len(calls) == 5 and sum("judge" in c.text for c in calls) == 1  # four candidates and one judge pass
    shoot(browser, "view-prompt.png")


def test_a_script_in_a_candidate_does_not_run(viewed, browser):
    viewer, _ = viewed
    browser.get(viewer.url + "&" + urlencode({"q": "document title pwned", "in": "responses"}))
    links = browser.find_elements(By.CSS_SELECTOR, "td a")
    assert len(links) == 1
    follow(browser, links[0])
    candidates = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "pre.candidate")]
    assert candidates and all(HOSTILE in text for text in candidates)  # shown as the characters it is
    assert browser.title.startswith("prompt ")  # neither the script nor the onerror handler set it
    assert browser.find_elements(By.CSS_SELECTOR, "pre.candidate script, pre.candidate img") == []
    # our own script is the one that runs: it refreshed the counts on the table
    browser.get(viewer.base + "/")
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "counts").get_attribute("data-refreshed"))
    assert viewer.runner.app[VIEW].live_served >= 1  # and the server saw it ask


def review(browser: webdriver.Chrome, viewer: Viewer, pid: str, action: str, note: str) -> None:
    browser.get(f"{viewer.base}/prompt/{pid}")
    browser.find_element(By.CSS_SELECTOR, f"input[name='action'][value='{action}']").click()
    browser.find_element(By.NAME, "note").send_keys(note)
    follow(browser, browser.find_element(By.ID, "save"))
    assert browser.find_elements(By.ID, "review"), browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_element(By.ID, "review").text == f"current: {action} ({note})"


def test_a_flag_and_a_swap_made_in_the_page_change_the_next_export(viewed, browser, tmp_path, capsys):
    viewer, result = viewed
    train = [json.loads(line) for line in (result.out / "trl" / "train.jsonl").read_text().splitlines()]
    browser.get(viewer.url)  # the printed URL: its token lets this browser review
    flagged, swapped = train[0], train[1]
    review(browser, viewer, flagged["prompt_id"], "flag", "the judge picked a refusal")
    review(browser, viewer, swapped["prompt_id"], "swap", "the other one is safer")
    browser.get(viewer.base + "/?reviewed=any")
    assert sorted(listed(browser)) == sorted([flagged["prompt_id"], swapped["prompt_id"]])
    capsys.readouterr()
    assert main(["export", str(result.out), "--format", "trl", "--output-dir", str(tmp_path / "x")]) == 0
    assert "1 flagged pairs left out, 1 written swapped" in capsys.readouterr().out
    after = {
        row["prompt_id"]: row
        for row in map(json.loads, (tmp_path / "x" / "trl" / "train.jsonl").read_text().splitlines())
    }
    assert flagged["prompt_id"] not in after and len(after) == len(train) - 1
    turned = after[swapped["prompt_id"]]
    assert (turned["chosen"], turned["rejected"]) == (swapped["rejected"], swapped["chosen"])


def test_a_foreign_host_is_refused(viewed, browser):
    viewer, _ = viewed
    port = urlsplit(viewer.base).port
    browser.get(f"http://evil.test:{port}/")  # the browser sends Host: evil.test:port to our socket
    assert "forbidden: unknown Host" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(f"http://localhost:{port}/")
    assert len(listed(browser)) == 50


def test_the_pages_work_with_javascript_off(viewed, tmp_path):
    viewer, _ = viewed
    driver = chrome(tmp_path / "nojs", javascript=False)
    try:
        driver.get(viewer.url)
        counts = driver.find_element(By.ID, "counts")
        assert "pair" in counts.text  # served in the page, not filled in by a script
        Select(driver.find_element(By.NAME, "status")).select_by_value("failure")
        follow(driver, driver.find_element(By.CSS_SELECTOR, "form.filters button"))
        assert len(listed(driver)) == 1
        follow(driver, driver.find_elements(By.CSS_SELECTOR, "td a")[0])
        assert "failure" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
    # the server's record: no page asked for the live counts, as the script would have on each table page
    assert viewer.runner.app[VIEW].live_served == 0
