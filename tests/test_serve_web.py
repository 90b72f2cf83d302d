"""The web chat page in a real browser: Debian's headless Chromium driven by Playwright (no
browser is downloaded). Skipped where /usr/bin/chromium is absent."""

import os
import shutil

import pytest

from herd.engine import Engine
from herd.serve import create_app
from serving import running

CHROMIUM = os.environ.get("HERD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HERD_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def page(smollm2_llm):
    engine = Engine(smollm2_llm, max_batch=2, ctx=512)
    with running(create_app(engine)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 420, "height": 800})  # a narrow window
        page.goto(url)
        yield page
        browser.close()


def test_chat_streams_keeps_the_conversation_stops_and_resets(page):
    page.click("summary")  # the settings panel
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#temperature", "0")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    reply = page.locator(".msg.assistant").first
    page.locator(".msg.assistant[data-done='true']").first.wait_for(timeout=60_000)
    assert "Paris" in reply.inner_text()
    assert page.locator(".msg.user").first.inner_text() == "What is the capital of France?"

    # a second turn keeps the first; stop it while it streams
    page.fill("#input", "Tell me a very long story about a dragon.")
    page.press("#input", "Enter")
    second = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 0", timeout=60_000)
    page.click("#stop")
    page.locator(".msg.assistant[data-done='true']").nth(1).wait_for(timeout=10_000)
    assert "(stopped)" in second.inner_text()
    assert page.locator(".msg").count() == 4 and page.is_enabled("#send")
    if os.environ.get("HERD_SCREENSHOT"):
        page.screenshot(path=os.environ["HERD_SCREENSHOT"])

    page.click("#reset")
    assert page.locator(".msg").count() == 0
