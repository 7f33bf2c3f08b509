"""The page of `prodesc serve` in a real headless Chromium (Debian's, driven by Playwright; never `playwright
install`): type a title, click, watch the fine-tuned and the base descriptions stream into their columns."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import KEY, RUN_NAME, Server, make_tiny_run, start_server, stop_server  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return path
    pytest.skip("chromium not found: apt-get install -y chromium (or `make browser`)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    _chromium()  # skip before training and starting a server
    s = start_server(make_tiny_run(tmp_path_factory.getbasetemp() / "serve"))
    yield s
    stop_server(s)


@pytest.fixture
def page(server: Server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_page_streams_finetuned_and_base_side_by_side(server: Server, page) -> None:
    from playwright.sync_api import expect

    page.goto(server.url + "/")
    expect(page.locator("#status")).to_contain_text("API key")  # the server wants a key: the page says so
    page.fill("#key", KEY)
    page.locator("#key").press("Tab")  # `change` stores it and reloads the model list
    expect(page.locator("#name-ft")).to_have_text(RUN_NAME)
    expect(page.locator("#compare")).to_be_enabled()
    page.check("#compare")
    expect(page.locator("#col-base")).to_be_visible()

    page.fill("#title", "Red Mug 7")
    page.fill("#max-tokens", "32")
    page.click("#go")
    for slot in ("ft", "base"):
        expect(page.locator(f"#out-{slot}")).to_have_attribute("data-state", "done", timeout=30_000)
    tuned, base = page.inner_text("#out-ft").strip(), page.inner_text("#out-base").strip()
    assert tuned and base

    greedy = httpx.post(server.url + "/v1/describe", headers=server.auth(), timeout=30,
                        json={"titles": ["Red Mug 7"], "max_new_tokens": 32}).json()
    assert tuned == greedy["descriptions"][0]["description"]  # the page streamed the same greedy answer

    page.reload()  # the key was kept in localStorage
    expect(page.locator("#key")).to_have_value(KEY)
    expect(page.locator("#name-ft")).to_have_text(RUN_NAME)
