"""The web chat page in a real browser: Debian's headless Chromium driven by Playwright (no
browser is downloaded), against the real server and SmolLM2. Skipped where /usr/bin/chromium is
absent. Where a test needs model output that a small model will not write on request (HTML meant
to inject, an error half-way through a stream), Playwright answers that one request itself."""

import copy
import json
import os
import re
import shutil

import pytest

from herd.engine import Engine
from herd.llm import LLM
from herd.model.lora import LoraConfig, add_adapter
from herd.serve import create_app
from serving import running

CHROMIUM = os.environ.get("HERD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HERD_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

CHAT = "**/v1/chat/completions"
DONE = ".msg.assistant[data-done='true']"
FRANCE = "Name the capital city of France."


@pytest.fixture(scope="module")
def url(smollm2_llm):
    with running(create_app(Engine(smollm2_llm, max_batch=2, ctx=512))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, width=1000) -> a page in a fresh profile (empty localStorage) with
    `page.sent`, the bodies of its chat requests. The test fails on any script error."""
    contexts, errors = [], []

    def open_page(url: str, width: int = 1000):
        context = browser.new_context(viewport={"width": width, "height": 800})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        contexts.append(context)
        page = context.new_page()
        page.sent = []
        page.on("pageerror", lambda e: errors.append(e))
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and page.sent.append(json.loads(r.post_data)))
        page.goto(url)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors


def settings(page, **values):
    if not page.is_visible("#system"):
        page.click("summary")
    for name, value in values.items():
        page.fill(f"#{name}", str(value))
        page.dispatch_event(f"#{name}", "change")


def ask(page, text: str) -> sync_api.Locator:
    """Send `text` and wait for its reply to end; the reply's bubble."""
    n = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant')[{n}]?.dataset.done === 'true'",
                           timeout=90_000)
    return page.locator(".msg.assistant").nth(n)


def stored(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('herd.chats')") or "[]")


def test_chat_streams_keeps_the_conversation_stops_and_resets(url, open_page):
    page = open_page(url, width=420)  # a narrow window: the conversations hide behind a button
    assert page.is_hidden("#model") and page.inner_text("#model-name") == "SmolLM2-135M-Instruct.Q4_1.gguf"
    settings(page, system="You are a helpful assistant.", temperature=0)
    reply = ask(page, FRANCE)
    assert "Paris" in reply.inner_text()
    assert page.locator(".msg.user").first.inner_text() == FRANCE
    body = page.sent[0]  # the defaults bound a reply and ask for the usage that tokens/s is counted from
    assert body["max_tokens"] == 1024 and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    # a second turn keeps the first; stop it while it streams
    page.fill("#input", "Tell me a very long story about a dragon.")
    page.press("#input", "Enter")
    second = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant')[1].textContent.length > 0", timeout=60_000)
    page.click("#stop")
    page.locator(DONE).nth(1).wait_for(timeout=10_000)
    assert "(stopped)" in second.inner_text()
    assert page.locator(".msg").count() == 4 and page.is_enabled("#send")
    assert page.sent[1]["messages"][1:3] == [{"role": "user", "content": FRANCE},
                                            {"role": "assistant", "content": stored(page)[0]["messages"][1]["content"]}]
    if os.environ.get("HERD_SCREENSHOT"):
        page.screenshot(path=os.environ["HERD_SCREENSHOT"])

    page.click("#chats-toggle")
    page.click("#reset")
    assert page.locator(".msg").count() == 0 and page.is_hidden("#sidebar")


def test_a_failed_turn_shows_why_and_is_left_out_so_the_next_one_works(url, open_page):
    """Issue 17.3: a message too long for the context, a bad setting or an error in the middle of a
    stream is shown with its reason, and the next message works without "New chat"."""
    page = open_page(url)
    settings(page, temperature=0, max_tokens=24)
    too_long = "word " * 600
    failed = ask(page, too_long)
    assert "the context is 512 tokens" in failed.inner_text() and "left out" in failed.inner_text()
    assert page.locator(".msg.user.failed").count() == 1
    assert page.input_value("#input") == too_long.strip()  # given back to edit, nothing lost

    assert "Paris" in ask(page, FRANCE).inner_text()
    assert page.sent[-1]["messages"] == [{"role": "user", "content": FRANCE}]

    settings(page, temperature=-1)
    assert "temperature: Input should be greater than or equal to 0" in ask(page, "And of Italy?").inner_text()
    settings(page, temperature=0)

    events = [{"choices": [{"index": 0, "delta": {"content": "Half a rep"}, "finish_reason": None}]},
              {"error": {"message": "the engine stopped", "type": "server_error", "code": None}}]
    page.route(CHAT, lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body="".join(f"data: {json.dumps(e)}\n\n" for e in events)))
    broken = ask(page, "And of Spain?")
    assert "Error: the engine stopped" in broken.inner_text() and "Half a rep" not in broken.inner_text()
    page.unroute(CHAT)

    ask(page, "And of Germany?")
    france = stored(page)[0]["messages"][:2]
    assert page.sent[-1]["messages"] == [*[{k: m[k] for k in ("role", "content")} for m in france],
                                         {"role": "user", "content": "And of Germany?"}]
    assert [m["role"] for m in stored(page)[0]["messages"]] == ["user", "assistant"] * 2


def test_a_conversation_that_outgrows_the_context_leaves_out_its_oldest_turns(url, open_page):
    page = open_page(url)
    settings(page, system="Answer in one word.", temperature=0, max_tokens=4)
    ask(page, "word " * 300 + "\nSay OK.")
    sent = len(page.sent)
    reply = ask(page, "word " * 300 + "\nSay OK again.")
    assert len(page.sent) == sent + 2  # refused once for the context, then sent without the first turn
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["system", "user"]
    assert "the 2 oldest messages no longer fit the context and were left out" in reply.inner_text()
    assert page.locator(".msg.dropped").count() == 2 and stored(page)[0]["skip"] == 2

    sent = len(page.sent)
    ask(page, "Thanks")  # the next turn starts from where the last one fitted: one request
    assert len(page.sent) == sent + 1 and len(page.sent[-1]["messages"]) == 4


HOSTILE = ("# Title\n\nSome **bold**, *italic*, `<b>code</b>`, snake_case_name and a [link](https://example.com/a?b=1).\n\n"
           '<img src=x onerror="window.pwned=1">\n<script>window.pwned=2</script>\n\n'
           '[click me](javascript:window.pwned=3), <a href="javascript:window.pwned=4">x</a>, see https://example.org/x.\n\n'
           "- one\n- two\n  - nested\n\n"
           '```html\n<script>window.pwned=5</script>\n<img src=x onerror="window.pwned=6">\n```\n\n'
           "| a | b |\n|---|---|\n| <i>1</i> | 2 |\n")
MADE = {"DIV", "SPAN", "P", "BR", "H1", "STRONG", "EM", "CODE", "A", "UL", "LI", "PRE", "BUTTON", "TABLE",
        "THEAD", "TBODY", "TR", "TH", "TD"}


def check_hostile_reply(page):
    reply = page.locator(".msg.assistant").first
    tags = set(reply.evaluate("e => [...e.querySelectorAll('*')].map(n => n.tagName)"))
    assert tags <= MADE, tags - MADE  # no IMG, SCRIPT, I, B: the model's HTML stays text
    text = reply.inner_text()
    for shown in ('<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>",
                  "[click me](javascript:window.pwned=3)", '<a href="javascript:window.pwned=4">x</a>', "snake_case_name"):
        assert shown in text
    assert reply.locator("a").evaluate_all("as => as.map(a => a.href)") == ["https://example.com/a?b=1",
                                                                            "https://example.org/x"]
    assert reply.locator("h1").inner_text() == "Title" and reply.locator("strong").inner_text() == "bold"
    assert reply.locator("em").inner_text() == "italic" and reply.locator("p code").inner_text() == "<b>code</b>"
    assert reply.locator(":scope > div > ul > li").count() == 2 and reply.locator("ul ul li").inner_text() == "nested"
    assert reply.locator("td").first.inner_text() == "<i>1</i>"
    assert reply.locator(".code .lang").inner_text() == "html"
    assert reply.locator("pre").inner_text() == '<script>window.pwned=5</script>\n<img src=x onerror="window.pwned=6">'
    page.wait_for_timeout(300)  # time for an injected handler to have fired
    assert page.evaluate("window.pwned") is None


def test_markdown_is_rendered_and_html_from_the_model_never_runs(url, open_page):
    page = open_page(url)
    pieces = [HOSTILE[i:i + 7] for i in range(0, len(HOSTILE), 7)]  # "<scr" + "ipt>": each partial render too
    events = [{"model": "m", "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    events.append({"model": "m", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": len(pieces)}})
    page.route(CHAT, lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body="".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"))
    ask(page, "Show me some HTML")
    check_hostile_reply(page)
    assert re.search(rf"{len(pieces)} tokens, [\d.]+ tokens/s", page.inner_text(DONE))

    page.click(".code button.copy")
    assert page.evaluate("navigator.clipboard.readText()") == page.inner_text("pre")
    assert page.inner_text(".code button.copy") == "Copied"
    page.reload()
    check_hostile_reply(page)  # kept as Markdown, rendered again the same way

    # behind the renderer, the page's Content-Security-Policy refuses inline handlers and scripts
    page.evaluate("""() => { const d = document.createElement('div');
        d.innerHTML = '<img src=x onerror="window.pwned=7">'; document.body.appendChild(d); }""")
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None


def test_code_from_the_model_gets_a_copy_button(url, open_page):
    page = open_page(url)
    settings(page, temperature=0, max_tokens=48)
    reply = ask(page, "Write a Python function that adds two numbers.")
    code = reply.locator(".code pre").first
    assert reply.locator(".code .lang").first.inner_text() == "python" and "def " in code.inner_text()
    reply.locator("button.copy").first.click()
    assert page.evaluate("navigator.clipboard.readText()") == code.inner_text()


def test_sampling_settings_are_sent_kept_and_the_reply_shows_tokens_per_second(url, open_page):
    page = open_page(url)
    settings(page, system="You are a pirate.", temperature=0.9, top_p=0.5, max_tokens=6, seed=7, apikey="k")
    first = ask(page, "Tell me a long story.")
    body = page.sent[-1]
    assert body["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.9, 0.5, 6, 7)
    note = first.locator(".note").inner_text()
    rate = re.fullmatch(r"6 tokens, ([\d.]+) tokens/s · stopped at the max tokens limit \(see Settings\)", note)
    assert rate and float(rate[1]) > 0, note

    page.reload()
    assert [page.input_value(f"#{k}") for k in ("system", "temperature", "top_p", "max_tokens", "seed", "apikey")] \
        == ["You are a pirate.", "0.9", "0.5", "6", "7", ""]  # the API key is never stored
    page.click("#reset")
    ask(page, "Tell me a long story.")  # the same seed: the same sampled reply
    again, before = stored(page)
    assert again["messages"][1]["content"] == before["messages"][1]["content"]


def titles(page) -> list[str]:
    return page.locator("#chats .open").all_inner_texts()


def test_conversations_are_kept_in_the_browser_switched_and_deleted(url, open_page):
    page = open_page(url)
    settings(page, temperature=0, max_tokens=24)
    ask(page, FRANCE)
    page.click("#reset")
    ask(page, "Hi")
    assert titles(page) == ["Hi", FRANCE] and page.inner_text("#chats li.current .open") == "Hi"

    page.reload()
    assert titles(page) == ["Hi", FRANCE] and page.locator(".msg").count() == 2
    assert page.locator(".msg.user").inner_text() == "Hi"
    page.click(f"#chats .open:text-is('{FRANCE}')")
    assert page.locator(".msg.user").inner_text() == FRANCE and "Paris" in page.inner_text(".msg.assistant")
    ask(page, "And of Germany?")
    assert [m["content"] for m in page.sent[-1]["messages"]][0] == FRANCE
    assert titles(page) == [FRANCE, "Hi"]

    page.click("#chats li:has(.open:text-is('Hi')) .delete")
    page.reload()
    assert titles(page) == [FRANCE] and len(stored(page)[0]["messages"]) == 4
    page.click("#chats .delete")
    assert titles(page) == [] and page.locator(".msg").count() == 0 and stored(page) == []


def test_the_model_picker_sends_the_model_chosen(smollm2_llm, open_page):
    """With several models served (here the base model and a LoRA adapter on a copy of it) the
    page offers them, sends the one picked and keeps the choice."""
    llm = LLM(copy.deepcopy(smollm2_llm.model), smollm2_llm.tokenizer, smollm2_llm.chat_format,
              smollm2_llm.eos_ids, "smollm2")
    add_adapter(llm.model, LoraConfig(r=2, targets=("q_proj",)), name="smollm2-pirate")
    llm.adapters.append("smollm2-pirate")
    with running(create_app(Engine(llm, max_batch=1, ctx=256))) as url:
        page = open_page(url)
        page.wait_for_selector("#model option", state="attached")
        assert page.is_visible("#model") and page.inner_text("#model-name") == ""
        assert page.locator("#model option").all_inner_texts() == ["smollm2", "smollm2-pirate"]
        page.select_option("#model", "smollm2-pirate")
        settings(page, max_tokens=3)
        reply = ask(page, "Hi")
        assert page.sent[-1]["model"] == "smollm2-pirate"
        assert reply.locator(".note").inner_text().startswith("smollm2-pirate · 3 tokens")
        page.reload()
        page.wait_for_selector("#model option", state="attached")
        assert page.input_value("#model") == "smollm2-pirate"
