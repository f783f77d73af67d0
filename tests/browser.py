"""A real headless browser for the playground tests: Debian's chromium driven by Playwright for Python.

Playwright cannot download its own browsers on the build machines, so it launches the system chromium
(`apt-get install chromium`); without it the browser tests skip and say why.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path(os.environ.get("CHARLSTM_TEST_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    """One chromium per test module; each test opens its own context (no shared cookies or storage)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


class Playground:
    """The page driven the way a person uses it: fill fields, press buttons, read what it shows.
    Every request the page makes is recorded, so a test can check that none leaves the server."""

    def __init__(self, browser, url: str, viewport: dict | None = None):
        self.url = url
        self.context = browser.new_context(accept_downloads=True, viewport=viewport or {"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, wait_for_model: bool = True) -> Playground:
        self.page.goto(self.url + "/")
        if wait_for_model:
            self.page.wait_for_function("() => document.getElementById('model-info').textContent.includes('@')")
        return self

    def close(self) -> None:
        self.context.close()

    # ------------------------------------------------------------ input

    def fill(self, **fields) -> None:
        """fill(prompt="KING:", seed=3, max_chars=100, temperature=0.8, top_k=..., top_p=..., repetition_penalty=...)"""
        for name, value in fields.items():
            self.page.fill(f"#{name.replace('_', '-')}", "" if value is None else str(value))

    def session_mode(self) -> None:
        self.page.check("#mode-session")

    def generate(self) -> None:
        self.page.click("#generate")

    def stop(self) -> None:
        self.page.click("#stop")

    def pane(self, index: int):
        return self.page.locator("#panes .pane").nth(index)

    def pane_count(self) -> int:
        return self.page.locator("#panes .pane").count()

    # ------------------------------------------------------------ output

    def wait_for(self, predicate: str, arg=None) -> None:
        """Wait until the JavaScript `predicate(arg)` holds. If the page shows an error meanwhile, fail at
        once with the page's own message rather than after the timeout."""
        self.page.wait_for_function(
            f"(arg) => document.getElementById('status').classList.contains('error') || ({predicate})(arg)", arg=arg)
        if self.page.locator("#status.error").count():
            raise AssertionError(f"the page shows an error: {self.status()}")

    def wait_calls(self, index: int, calls: int) -> str:
        """Wait until pane `index` shows `calls` finished calls; return its finish reason."""
        self.wait_for(
            """([i, n]) => {
                 const pane = document.querySelectorAll('#panes .pane')[i];
                 return pane && !pane.classList.contains('busy')
                   && pane.querySelectorAll('.generated').length === n
                   && pane.querySelector('.finish').textContent !== '';
               }""", [index, calls])
        return self.pane(index).locator(".finish").inner_text()

    def generated(self, index: int) -> list[str]:
        """The text of each call in pane `index`, as the page shows it."""
        return self.pane(index).locator(".generated").evaluate_all("spans => spans.map(s => s.textContent)")

    def status(self) -> str:
        return self.page.inner_text("#status")

    def foreign_requests(self) -> list[str]:
        """Requests to anywhere but the page's own server (none allowed; data: URLs are not requests)."""
        own = urlsplit(self.url).netloc
        return [u for u in self.requests if not u.startswith("data:") and urlsplit(u.removeprefix("blob:")).netloc != own]


@pytest.fixture
def playground(browser, server):  # noqa: F811 - `browser` above; `server` from conftest
    """The page on the shared test server; any JavaScript error it raised fails the test."""
    pg = Playground(browser, server.url)
    yield pg
    assert pg.errors == [], f"the page raised: {pg.errors}"
    pg.close()
