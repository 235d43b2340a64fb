"""A real headless Chromium for the live page's tests, driven with Selenium.

Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver;
`make browser` installs them with apt-get). Selenium is pointed at both
binaries, so its Selenium Manager never downloads anything. Chromium gets a
fresh profile, no background networking, and the flags it needs as root. When
the browser cannot be had, `unavailable()` says why, and the tests skip with
that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 800)
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # Chromium's sandbox does not run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)

ROWS_JS = """
return JSON.stringify(Array.from(document.querySelectorAll('#rows .row:not([hidden])'), (row) => {
  const size = row.querySelector('.c-size');
  const time = row.querySelector('.c-time');
  return {
    filename: row.dataset.filename,
    node: row.dataset.node,
    name_text: row.querySelector('.c-name').textContent,
    node_text: row.querySelector('.c-node').textContent,
    size_text: size.textContent,
    size: size.dataset.bytes === '' ? null : Number(size.dataset.bytes),
    modified: time.dateTime || null,
    time_text: time.textContent,
  };
}));
"""

WATCHERS_JS = """
return JSON.stringify(Array.from(document.querySelectorAll('#watchers-body tr'), (tr) => ({
  name: tr.querySelector('.w-name').textContent,
  protocol: tr.querySelector('.w-protocol').textContent,
  state: tr.querySelector('.w-state').textContent,
  files: tr.querySelector('.w-files').textContent,
  last_seen: tr.querySelector('.w-seen').textContent,
})));
"""

STATE_JS = """
return {
  state: document.getElementById('state').dataset.state,
  count: document.getElementById('count').dataset.count,
  count_text: document.getElementById('count').textContent,
  shown: document.getElementById('shown').textContent,
  first_paint_ms: document.documentElement.dataset.firstPaintMs || null,
  title: document.title,
  marker: window.__notReloaded === true,
};
"""


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401, PLC0415 (only needed here)
    except ImportError:
        return "selenium is not installed (it is in the dev extra: pip install -e '.[dev]')"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (
            f"{' and '.join(missing)} not found: `make browser` installs Debian's chromium "
            "and chromium-driver with apt-get (root or sudo needed)"
        )
    return None


@dataclass
class Browser:
    """One Chromium and its driver."""

    driver: Any

    def open(self, url: str) -> None:
        """Navigate (waits for the load event), then mark the document to detect reloads."""
        self.driver.get(url)
        self.driver.execute_script("window.__notReloaded = true;")

    def js(self, script: str, *args: Any) -> Any:
        """Run a script in the page and return its value."""
        return self.driver.execute_script(script, *args)

    def js_json(self, script: str, *args: Any) -> Any:
        """Like `js`, for a script that returns JSON.stringify(...) of its value.

        ChromeDriver's own JSON refuses lone surrogates (a name's undecodable
        bytes); JSON.stringify escapes them, and json.loads gives them back.
        """
        return json.loads(self.js(script, *args))

    def rows(self) -> list[dict[str, Any]]:
        """The file rows in the DOM (those on screen), top to bottom."""
        rows: list[dict[str, Any]] = self.js_json(ROWS_JS)
        return rows

    def watchers(self) -> list[dict[str, str]]:
        """The rows of the watchers panel."""
        rows: list[dict[str, str]] = self.js_json(WATCHERS_JS)
        return rows

    def state(self) -> dict[str, Any]:
        """Connection state, count, the filter's "shown" line, first paint, the reload marker."""
        state: dict[str, Any] = self.js(STATE_JS)
        return state

    def type_filter(self, text: str) -> None:
        """Replace the filter box's text by typing, as a person would."""
        from selenium.webdriver.common.by import By  # noqa: PLC0415
        from selenium.webdriver.common.keys import Keys  # noqa: PLC0415

        box = self.driver.find_element(By.ID, "filter")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        if text:
            box.send_keys(text)

    def screenshot(self, path: Path) -> None:
        """A PNG of the window."""
        self.driver.save_screenshot(str(path))


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium with a fresh profile; quit (and its profile removed) at exit."""
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    profile = tempfile.mkdtemp(prefix="filewatch-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(10)
        driver.set_page_load_timeout(20)
        yield Browser(driver)
    finally:
        driver.quit()  # ends chromedriver and the Chromium it started
        shutil.rmtree(profile, ignore_errors=True)
