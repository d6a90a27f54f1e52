"""The chat UI in a real browser (Debian chromium driven by Playwright) against a real uvicorn: a message is
typed, the reply streams in token by token, multi-turn, regenerate and clear work, and the page fits a phone.
Screenshots go to tests/artifacts/chat_web.png and chat_web_phone.png."""

import os
import time

import pytest
import torch

from nanochat.engine import Engine
from scripts.chat_web import Worker, create_app
from tests.helpers_tiny import load_tiny, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")

# records the assistant bubble's text length at every DOM change, to see the reply grow
OBSERVE = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('.msg.assistant');
    if (bubbles.length) window.__lengths.push(bubbles[bubbles.length - 1].textContent.length);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


class SlowModel(torch.nn.Module):
    """The tiny model, slowed to ~25 ms per forward so streaming is visible at browser timescales."""

    def __init__(self, model, delay=0.025):
        super().__init__()
        self.inner, self.config, self.delay = model, model.config, delay

    def get_device(self):
        return self.inner.get_device()

    def forward(self, idx, kv_cache=None):
        time.sleep(self.delay)
        return self.inner(idx, kv_cache=kv_cache)


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page, n_assistant):
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {n_assistant} && "
                           "!document.querySelector('.msg.assistant.pending')", timeout=30_000)


def test_chat_ui_streams_in_chromium(base_dir):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install -y chromium` (as root)")
    from playwright.sync_api import sync_playwright

    torch.set_num_threads(1)
    model, tokenizer, _ = load_tiny(base_dir)
    engine = Engine(model, tokenizer)

    def greedy(*turns):  # the reply the page must show, exactly (the server's default temperature is 0)
        messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        (ids,), _ = engine.generate_batch(tokenizer.render_for_completion({"messages": messages}), temperature=0.0)
        return tokenizer.decode(ids)

    OWL = greedy("tell me about the owl")
    HELLO = greedy("tell me about the owl", OWL, "hello")
    app = create_app([Worker(gpu_id=0, engine=Engine(SlowModel(model), tokenizer))], temperature=0.0, top_k=50)
    os.makedirs(ARTIFACTS, exist_ok=True)
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url)
            assert page.input_value("#temperature") == "0"  # the server's defaults reach the page
            page.evaluate(OBSERVE)

            send(page, "tell me about the owl")
            page.wait_for_selector(".msg.assistant")
            seen = []  # polled from here while the reply streams
            while page.query_selector(".msg.assistant.pending"):
                seen.append(len(page.inner_text(".msg.assistant")))
                time.sleep(0.05)
            wait_idle(page, 1)
            assert page.inner_text(".msg.assistant") == OWL  # greedy: exactly the engine's answer
            lengths = page.evaluate("window.__lengths")
            partial = sorted({n for n in lengths + seen if 0 < n < len(OWL)})
            assert len(partial) >= 2, f"reply did not stream: lengths seen {lengths}, polled {seen}"
            assert lengths == sorted(lengths), "the reply only ever grows"

            send(page, "hello")  # second turn: the whole conversation goes to the server
            wait_idle(page, 2)
            assert page.locator(".msg.assistant").nth(1).inner_text() == HELLO
            assert page.locator(".msg.user").all_inner_texts() == ["tell me about the owl", "hello"]
            page.screenshot(path=os.path.join(ARTIFACTS, "chat_web.png"))

            page.click("#regenerate")  # replaces the last answer (greedy: the same one again)
            wait_idle(page, 2)
            assert page.locator(".msg.assistant").all_inner_texts() == [OWL, HELLO]

            page.click("#clear")
            assert page.locator(".msg").count() == 0 and page.is_visible("#empty")

            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
            phone.goto(url)
            send(phone, "tell me about the owl")
            wait_idle(phone, 1)
            assert phone.inner_text(".msg.assistant") == OWL
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390, "page overflows a phone screen"
            assert phone.is_visible("#send") and phone.is_visible("#clear")
            phone.screenshot(path=os.path.join(ARTIFACTS, "chat_web_phone.png"))
        finally:
            browser.close()
    assert os.path.getsize(os.path.join(ARTIFACTS, "chat_web.png")) > 10_000
