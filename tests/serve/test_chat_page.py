"""The chat page at / in headless Chromium: type a message, see the reply stream in, keep the conversation."""

from __future__ import annotations

import shutil

import pytest

from seekstack.serve.database import open_database
from seekstack.serve.keys import KeyStore
from tests.adapters.support import write_random_adapter
from tests.serve.server import install_test_packages, make_model_dir, running_server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
)  # fmt: skip


def chromium_paths() -> tuple[str, str]:
    """Chromium and its driver, installed by the test-deps script when missing; skip only if that cannot be done."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        install_test_packages()
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed and could not be installed")
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """The page of a server of the base model "model" and a LoRA adapter of it, "legal"."""
    root = tmp_path_factory.mktemp("chat-model")
    model_dir = make_model_dir(root)
    adapter = write_random_adapter(model_dir, root / "legal", seed=1)
    with running_server(model_dir, root / "serve.db", "--adapter", f"legal={adapter}") as server:
        yield server.url


@pytest.fixture(scope="module")
def keyed_page(tmp_path_factory):
    """The page of a server with an API key, and the key."""
    root = tmp_path_factory.mktemp("keyed-chat")
    key = KeyStore(open_database(root / "serve.db")).create("web")
    with running_server(make_model_dir(root), root / "serve.db") as server:
        yield server.url, key


def open_page(browser, page_url: str, stub: str | None = None) -> None:
    """The page, once it has the server's models (the base chosen); then `stub` run in it."""
    browser.get(page_url)
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "model").get_attribute("value") == "model")
    if stub:
        browser.execute_script(stub)


def send(browser, text: str) -> None:
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def replies(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")


def wait_for_reply(browser, count: int):
    """The `count`-th reply once it has finished streaming; fails at once if it turned into an error."""
    WebDriverWait(browser, 60).until(
        lambda b: len(replies(b)) == count and (replies(b)[-1].get_attribute("data-done") or "error" in
                                               replies(b)[-1].get_attribute("class"))
    )  # fmt: skip
    reply = replies(browser)[-1]
    assert "error" not in reply.get_attribute("class"), reply.text
    return reply


def wait_for_error(browser):
    """The last reply once it turned into an error."""
    WebDriverWait(browser, 60).until(lambda b: "error" in replies(b)[-1].get_attribute("class"))
    return replies(browser)[-1]


def test_typed_message_gets_a_streamed_reply_with_tokens_per_second(browser, page_url):
    open_page(browser, page_url)
    limit = browser.find_element(By.ID, "max-tokens")
    limit.clear()
    limit.send_keys("40")  # keep both turns inside the 256-token context
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")  # greedy: the random model's reply is the same every run (an early EOS cannot flake)
    send(browser, "Hello there")
    reply = wait_for_reply(browser, 1)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text == "Hello there"
    assert int(reply.get_attribute("data-chunks")) > 1  # arrived in pieces, not in one body
    assert reply.get_attribute("textContent") != ""
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and int(stats.split()[0]) > 1

    send(browser, "And again")  # the page keeps the conversation: the second request carries both turns
    wait_for_reply(browser, 2)
    turns = browser.execute_script("return messages.map(m => m.role)")
    assert turns == ["user", "assistant", "user", "assistant"]


def test_a_conversation_past_the_context_leaves_out_its_oldest_exchanges(browser, page_url):
    open_page(browser, page_url)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    # max tokens keeps its default, 512: more than the 256-token context holds, so each reply asks for half of it
    for count in range(1, 5):
        send(browser, "tell me more about def add(a, b): return a + b " * 3)
        wait_for_reply(browser, count)  # answered, where the conversation past the context failed every message
    sent = browser.execute_script("return messages.slice(firstSent).map(m => m.role)")
    assert sent[-2:] == ["user", "assistant"] and len(sent) < 8
    faded = browser.find_elements(By.CSS_SELECTOR, ".msg.left-out")
    assert len(faded) == 8 - len(sent) and faded[0].get_attribute("title") == "left out of the model's context"
    assert browser.find_elements(By.CSS_SELECTOR, ".msg")[0] == faded[0]  # the oldest went first


# The page's fetch of a chat completion answered by the stream `seekstack serve --reasoning-parser deepseek_r1` sends
# for the reply "<think> 2 + 3 is 5 </think> 5" (tests/serve/test_reasoning.py); each request's body kept in `sent`.
R1_STREAM_STUB = """
const serverFetch = window.fetch;
window.sent = [];
window.fetch = async (url, options) => {
  if (!String(url).endsWith("/v1/chat/completions")) return serverFetch(url, options);
  window.sent.push(JSON.parse(options.body));
  const deltas = [{ role: "assistant", content: "" }, { reasoning_content: "2 + 3" }, { reasoning_content: " is 5" },
                  { content: "5" }];
  const events = deltas.map((delta) => "data: " + JSON.stringify({ choices: [{ index: 0, delta }] }) + "\\n\\n");
  events.push('data: {"choices": [], "usage": {"completion_tokens": 12}}\\n\\n', "data: [DONE]\\n\\n");
  return new Response(events.join(""), { status: 200, headers: { "Content-Type": "text/event-stream" } });
};
"""


def test_a_replys_reasoning_shows_folded_above_its_answer_and_is_not_sent_back(browser, page_url):
    """The page read delta.content only: a reasoning model's reasoning (delta.reasoning_content) never showed, and a
    reply cut inside it left an empty bubble."""
    open_page(browser, page_url, R1_STREAM_STUB)
    send(browser, "2 + 3?")
    reply = wait_for_reply(browser, 1)
    reasoning = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert reasoning.get_attribute("open") is None and reasoning.is_displayed()  # folded, its summary shown
    assert reasoning.find_element(By.TAG_NAME, "div").get_attribute("textContent") == "2 + 3 is 5"
    assert reply.find_element(By.CSS_SELECTOR, ".answer").text == "5"
    send(browser, "and 2 + 4?")
    wait_for_reply(browser, 2)
    assert browser.execute_script("return window.sent[1].messages")[1] == {"role": "assistant", "content": "5"}


# The page's fetch of a chat completion answered by a stream the test writes: `say(delta)` sends a chunk with that
# delta, `finish()` ends the stream; the page aborting the request ends it as a browser's fetch does (and sets
# `aborted`). Each request's body is kept in `sent`.
HELD_STREAM_STUB = """
const serverFetch = window.fetch;
window.sent = [];
window.fetch = async (url, options) => {
  if (!String(url).endsWith("/v1/chat/completions")) return serverFetch(url, options);
  window.sent.push(JSON.parse(options.body));
  const encoder = new TextEncoder();
  const body = new ReadableStream({ start(stream) {
    const event = (data) => stream.enqueue(encoder.encode("data: " + data + "\\n\\n"));
    window.say = (delta) => event(JSON.stringify({ choices: [{ index: 0, delta }] }));
    window.finish = () => { event("[DONE]"); stream.close(); };
    options.signal?.addEventListener("abort", () => {
      window.aborted = true;
      stream.error(new DOMException("stopped", "AbortError"));
    });
  } });
  return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
};
"""


def test_enter_while_a_reply_streams_sends_nothing_and_keeps_the_text(browser, page_url):
    """Enter while a reply streamed sent the next message at once: the conversation became user, user, assistant,
    assistant, and the second request never saw the first reply."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    send(browser, "first")
    browser.find_element(By.ID, "input").send_keys("second\n")
    assert browser.execute_script("return window.sent.length") == 1
    assert browser.find_element(By.ID, "input").get_attribute("value") == "second"
    browser.execute_script("say({ role: 'assistant', content: 'one' }); finish();")
    wait_for_reply(browser, 1)
    assert browser.execute_script("return messages") == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}
    ]  # fmt: skip


def test_stop_ends_the_reply_where_it_is_and_keeps_what_came_as_the_assistants_turn(browser, page_url):
    """The page had no Stop: a long reply ran on to its max tokens, the server generating all of it, unless the page
    was left. Stop aborts the request (the server stops generating at once: test_api's client disconnect test)."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    send(browser, "count to a thousand")
    browser.execute_script("say({ role: 'assistant', content: 'one, two' });")
    WebDriverWait(browser, 20).until(lambda b: replies(b)[-1].get_attribute("data-chunks") == "1")
    browser.find_element(By.ID, "stop").click()
    reply = wait_for_reply(browser, 1)
    assert browser.execute_script("return window.aborted") is True
    assert "stopped" in reply.get_attribute("class")
    assert reply.find_element(By.CSS_SELECTOR, ".answer").text == "one, two"
    assert not browser.find_element(By.ID, "stop").is_displayed() and browser.find_element(By.ID, "send").is_enabled()
    send(browser, "go on")
    browser.execute_script("say({ role: 'assistant', content: 'three' }); finish();")
    wait_for_reply(browser, 2)
    assert browser.execute_script("return window.sent[1].messages") == [
        {"role": "user", "content": "count to a thousand"}, {"role": "assistant", "content": "one, two"},
        {"role": "user", "content": "go on"},
    ]  # fmt: skip


def test_new_chat_while_a_reply_streams_stops_it_and_starts_empty(browser, page_url):
    """New chat while a reply streamed cleared the page, but the reply went on and then became the new conversation's
    first message: the next request began with an assistant turn nobody saw."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    send(browser, "first")
    browser.execute_script("say({ role: 'assistant', content: 'one' });")
    WebDriverWait(browser, 20).until(lambda b: replies(b)[-1].get_attribute("data-chunks") == "1")
    browser.find_element(By.ID, "new").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "send").is_enabled())
    assert browser.execute_script("return window.aborted") is True
    assert browser.execute_script("return messages") == [] and replies(browser) == []
    send(browser, "second")
    browser.execute_script("say({ role: 'assistant', content: 'two' }); finish();")
    wait_for_reply(browser, 1)
    assert browser.execute_script("return window.sent[1].messages") == [{"role": "user", "content": "second"}]


def test_the_model_picker_offers_the_base_and_each_adapter_and_the_reply_uses_the_one_picked(browser, page_url):
    """The page always chatted with the first model of /v1/models: a server's LoRA adapters were out of its reach."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    picker = Select(browser.find_element(By.ID, "model"))
    assert [option.text for option in picker.options] == ["model", "legal"]
    picker.select_by_value("legal")
    send(browser, "hello")
    browser.execute_script("say({ role: 'assistant', content: 'hi' }); finish();")
    wait_for_reply(browser, 1)
    assert browser.execute_script("return window.sent[0].model") == "legal"


def test_a_reply_shows_as_text_and_markup_that_reaches_the_page_runs_no_script(browser, page_url):
    """A reply is set as text, never parsed as HTML; and should markup reach the page, its policy refuses its inline
    handler (the policy was frame-ancestors alone: the handler ran, where it could have read the page's API key)."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    browser.execute_script(
        "window.refused = [];"
        "document.addEventListener('securitypolicyviolation', (event) => refused.push(event.effectiveDirective));"
    )
    attack = '<img src="x" onerror="window.injected = 1">'
    send(browser, attack)
    browser.execute_script("say({ role: 'assistant', content: arguments[0] }); finish();", attack)
    reply = wait_for_reply(browser, 1)
    assert reply.find_element(By.CSS_SELECTOR, ".answer").text == attack
    assert browser.find_elements(By.CSS_SELECTOR, "#log img") == []
    browser.execute_script("$('log').insertAdjacentHTML('beforeend', arguments[0])", attack)
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script("return window.injected === 1 || refused.includes('script-src-attr')")
    )
    assert browser.execute_script("return window.injected") is None


def test_with_api_keys_the_page_sends_the_key_typed_and_keeps_it_for_the_tab_only(browser, keyed_page):
    """The page kept the key in localStorage: on disk with no end, left to the next user of a shared browser and
    to any page later served from the same origin (another program on the port)."""
    url, key = keyed_page
    browser.get(url)
    picker = browser.find_element(By.ID, "model")
    WebDriverWait(browser, 20).until(lambda b: "missing API key" in picker.text)
    send(browser, "hello")
    assert "missing API key" in wait_for_error(browser).text
    # the message failed: it was gone, to be typed again; it goes back to the box, its bubble faded as not sent
    assert browser.find_element(By.ID, "input").get_attribute("value") == "hello"
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").get_attribute("title") == "not sent"
    browser.find_element(By.ID, "key").send_keys(key + "\n")
    WebDriverWait(browser, 20).until(lambda b: picker.get_attribute("value") == "model")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "send").click()
    wait_for_reply(browser, 2)
    stored = "return [sessionStorage.getItem('seekstack-key'), localStorage.getItem('seekstack-key')]"
    assert browser.execute_script(stored) == [key, None]
    browser.get(url)  # a reload in the tab keeps it
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "model").get_attribute("value") == "model")


def test_enter_that_confirms_an_input_method_composition_sends_nothing(browser, page_url):
    """Enter sent the message whatever it was for: a Chinese or Japanese user's Enter confirming the input method's
    candidate (keydown with isComposing) sent the half-typed message."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    browser.execute_script(
        "const box = $('input'); box.value = 'にほん';"
        "box.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', isComposing: true, bubbles: true }));"
    )
    assert browser.execute_script("return window.sent.length") == 0
    assert browser.find_element(By.ID, "input").get_attribute("value") == "にほん"


def test_a_streaming_reply_keeps_the_log_at_its_end_unless_the_reader_scrolled_up(browser, page_url):
    """The log scrolled to a reply's first line only: a long reply streamed on below the window, out of sight."""
    open_page(browser, page_url, HELD_STREAM_STUB)
    to_end = "const log = $('log'); return log.scrollHeight - log.scrollTop - log.clientHeight"
    send(browser, "a long answer, please")
    browser.execute_script("for (let i = 0; i < 80; i++) say({ content: 'line ' + i + '\\n' });")
    WebDriverWait(browser, 20).until(lambda b: replies(b)[-1].get_attribute("data-chunks") == "80")
    assert browser.execute_script(to_end) < 2
    browser.execute_script("$('log').scrollTop = 0;")  # the reader goes back up to read: the log stays there
    browser.execute_script("say({ content: 'more\\n' }); finish();")
    wait_for_reply(browser, 1)
    assert browser.execute_script("return $('log').scrollTop") == 0
