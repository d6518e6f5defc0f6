"""Screenshots of ``caiforge view`` for the README: the table and a prompt's page, in headless Chromium.

    caiforge run --output-dir /tmp/shots                     # the embedded default (about a minute)
    .venv/bin/python docs/make_screenshots.py /tmp/shots     # writes docs/img/view-table.png, view-prompt.png

Needs what ``make test-browser`` installs (Debian's chromium and chromium-driver, selenium).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from caiforge.view import serve

OUT = Path(__file__).parent / "img"


def main(run_dir: Path) -> None:
    loop = asyncio.new_event_loop()
    started: list[tuple[object, str]] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        started.append(loop.run_until_complete(serve(run_dir)))
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(600)
    url = started[0][1]
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    with tempfile.TemporaryDirectory() as profile:
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                    "--window-size=1280,1000", "--hide-scrollbars"):  # fmt: skip
            opts.add_argument(arg)
        driver = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
        try:
            OUT.mkdir(exist_ok=True)
            driver.get(url)
            driver.save_screenshot(str(OUT / "view-table.png"))
            link = driver.find_elements(By.CSS_SELECTOR, "td a")[1]
            driver.get(link.get_attribute("href"))
            driver.save_screenshot(str(OUT / "view-prompt.png"))
        finally:
            driver.quit()
    print(f"wrote {OUT / 'view-table.png'} and {OUT / 'view-prompt.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
