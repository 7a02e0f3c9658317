"""The web UI in a real headless Chromium (Debian's `chromium`, driven by Playwright; never `playwright install`)."""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from picochat.model import GPT, GPTConfig
from picochat.server import ServerThread, create_app
from picochat.tokenizer import Tokenizer

from readme_flow import CHROMIUM, CHROMIUM_ARGS as ARGS
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def server(webtext_tokenizer, one_thread):
    pytest.importorskip("playwright.sync_api")
    tok = Tokenizer.load(webtext_tokenizer)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=256, head_dim=32)).init_weights(seed=0)
    with torch.no_grad():  # varied text, and special tokens (stops) that never win: replies run until stopped
        model.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        model.lm_head.weight[len(tok.mergeable_ranks):] = 0
    app = create_app(model, tok, model_name="picochat-test")
    srv = ServerThread(app).start()
    yield srv
    srv.stop()


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and "Content Security Policy" in m.text
                and page.errors.append(m.text))
        yield page
        browser.close()


def wait_until(page, js, timeout=15.0):
    """Poll a JS expression (page.wait_for_function evaluates strings, which the UI's CSP forbids)."""
    deadline = time.time() + timeout
    while not page.evaluate(js):
        assert time.time() < deadline, f"timed out waiting for {js}"
        page.wait_for_timeout(50)


def text_len(page, selector):
    return page.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{textContent: ''}}).textContent.length")


def test_chat_flow(server, page):
    sched = server.app.state.scheduler
    sched.min_step_time = 0.04  # slow enough to watch the text stream in and stop it
    try:
        page.goto(server.url)
        page.wait_for_selector("#input")
        wait_until(page, "document.getElementById('model-name').textContent === 'picochat-test'")
        page.click("#settings-btn")
        page.fill("#set-max-tokens", "150")
        page.fill("#set-temperature", "0.9")
        page.click("#settings-save")
        page.fill("#input", "Hello there, tell me a story")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.user >> text=Hello there, tell me a story")
        reply = ".msg.assistant .bubble"
        wait_until(page, f"!!document.querySelector('{reply}') && "
                         f"document.querySelector('{reply}').textContent.length > 5")
        assert page.is_visible("#stop") and not page.is_visible("#send")
        n1 = text_len(page, reply)
        page.wait_for_timeout(500)
        n2 = text_len(page, reply)
        assert n2 > n1, "the reply should stream in"
        page.click("#stop")
        page.wait_for_selector("#send", state="visible")
        stopped = page.text_content(reply)
        assert "Stopped" in stopped
        page.wait_for_timeout(500)
        assert page.text_content(reply) == stopped
        deadline = time.time() + 5
        while sched.active and time.time() < deadline:
            time.sleep(0.02)
        assert sched.active == 0, "stopping in the UI frees the server's slot"

        sched.min_step_time = 0.005
        page.click("button.regenerate")
        page.wait_for_selector("#stop", state="visible")
        page.wait_for_selector("#send", state="visible", timeout=60_000)
        assert page.locator(".msg.assistant").count() == 1
        regenerated = page.text_content(reply)
        assert regenerated.strip() and "Stopped" not in regenerated and regenerated != stopped

        # edit the first message: the conversation is cut there and answered again
        page.hover(".msg.user")
        page.click(".msg.user button.edit")
        page.fill(".edit-area", "A different question")
        page.click("button.edit-save")
        page.wait_for_selector(".msg.user >> text=A different question")
        page.wait_for_selector("#send", state="visible", timeout=60_000)
        assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1

        # a second conversation, then reload: both are still there
        page.click("#new-chat")
        page.fill("#input", "Second chat")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.user >> text=Second chat")
        page.wait_for_selector("#send", state="visible", timeout=60_000)
        page.reload()
        page.wait_for_selector(".msg.user >> text=Second chat")
        titles = page.locator(".conv-title").all_text_contents()
        assert titles == ["Second chat", "Hello there, tell me a story"]
        page.click(".conv-title >> text=Hello there, tell me a story")
        page.wait_for_selector(".msg.user >> text=A different question")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webui.png"))
        assert not page.errors, page.errors
    finally:
        sched.min_step_time = 0.0


def test_rendering_is_safe_and_shows_tools(server, page):
    evil = ("Here is **bold**, *italic* and `code`.\n\n<img src=x onerror=\"window.pwned=1\">"
            "<script>window.pwned=2</script>\n\n```python\nprint('<b>hi</b>')\n```\n\n"
            "- one\n- two\n\nSo 12*3 = <|python_start|>12*3<|python_end|><|output_start|>36<|output_end|> apples."
            " [link](javascript:alert(1))")
    conv = [{"id": "c1", "title": "<b>title</b>", "updated": 1,
             "messages": [{"role": "user", "content": "<img src=y onerror=\"window.pwned=3\">show me"},
                          {"role": "assistant", "content": evil}]}]
    page.goto(server.url)
    page.evaluate(f"localStorage.setItem('picochat.conversations.v1', {json.dumps(json.dumps(conv))});"
                  "localStorage.setItem('picochat.current.v1', 'c1')")
    page.reload()
    page.wait_for_selector(".msg.assistant .bubble")
    assert page.evaluate("window.pwned") is None
    assert page.locator(".messages img, .messages script, .conversations b, .messages a").count() == 0
    assert page.text_content(".conv-title") == "<b>title</b>"
    assert "<img src=y" in page.text_content(".msg.user .bubble")
    bubble = page.locator(".msg.assistant .bubble")
    assert bubble.locator("strong").text_content() == "bold"
    assert bubble.locator("em").text_content() == "italic"
    assert bubble.locator(".code pre").text_content() == "print('<b>hi</b>')"
    assert bubble.locator("li").count() == 2
    assert bubble.locator(".tool-call code").text_content() == "12*3"
    assert bubble.locator(".tool-output code").text_content() == "36"
    assert "<img src=x" in bubble.text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-markdown.png"))
    # the banner shows while the server cannot be reached, and goes away when it can
    page.route("**/health", lambda route: route.abort())
    page.reload()
    page.wait_for_selector("#banner", state="visible", timeout=10_000)
    page.unroute("**/health")
    page.wait_for_selector("#banner", state="hidden", timeout=10_000)
    assert not page.errors, page.errors
