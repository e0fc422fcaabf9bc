"""The playground at ``GET /`` in a real browser: Debian's headless Chromium, driven through chromedriver by
Selenium, against ``make serve``'s demo model started with an API key.

Chromium and chromium-driver are Debian packages (``make system-packages`` installs them; ``.ci/run`` calls it); the
tests skip, with one line saying so, only where they are not installed. Nothing is downloaded: Selenium gets the
driver's path, Chromium starts with every background network feature off and a fresh profile. The screenshot of
the page (a streamed answer and the state panel) is kept under pytest's temporary folder, its path printed;
``SCALELLM_PLAYGROUND_SCREENSHOT=path`` writes it there too (docs/playground.png is one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request

import pytest
from server_helpers import ServerProcess, metric, wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "playground-test-key"
pytestmark = pytest.mark.slow  # the demo server's start (~15-20 s of compiling on 2 cores) dominates

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"no browser: {CHROMIUM} and {CHROMEDRIVER} are not installed (Debian's chromium and chromium-driver; "
                "`make system-packages` installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - after the skip: only where a browser exists
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


class DemoServer(ServerProcess):
    """``python -m scalellm_jax.server`` without --model (the built-in demo, compiled at start), with an API key."""

    START_S = 180
    BASE_FLAGS = ("--api-key", API_KEY)

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/state", timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def demo():
    server = DemoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(demo, browser):
    """The playground freshly loaded, with the API key typed in and the live panel showing a first snapshot."""
    browser.get(demo.url + "/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(demo.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    wait_until(lambda: browser.find_element(By.ID, "server-status").text == "ok", timeout=20)
    return browser


def set_field(browser, element_id: str, value) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def last_answer(browser, log_id: str = "chat-log"):
    entries = browser.find_elements(By.CSS_SELECTOR, f"#{log_id} .message.assistant, #{log_id} .message.completion")
    return entries[-1] if entries else None


def record_text_updates(browser, log_id: str) -> None:
    """Count, in the page, every change of the newest answer's text (each streamed chunk is one)."""
    browser.execute_script("""
        window.__updates = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll(arguments[0]);
          const last = answers[answers.length - 1];
          if (last) window.__updates.push(last.querySelector('.content').textContent.length);
        }).observe(document.getElementById(arguments[1]), {childList: true, subtree: true, characterData: true});
    """, f"#{log_id} .message.assistant, #{log_id} .message.completion", log_id)


def outcome(browser, log_id: str = "chat-log") -> str | None:
    answer = last_answer(browser, log_id)
    return answer.get_attribute("data-outcome") if answer is not None else None


def test_the_page_loads_everything_from_the_server_itself(page, demo):
    """Offline: every resource the page loaded came from this server (the CSP forbids any other)."""
    resources = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources, "the page loaded no script or style sheet"
    assert all(url.startswith(demo.url + "/") for url in resources), resources
    assert page.find_element(By.ID, "model-name").text.startswith("mixtral-tiny-random-demo")
    assert page.execute_script("return getComputedStyle(document.querySelector('header')).display") == "flex"


def test_chat_answer_streams_in_with_its_figures(page, demo, tmp_path_factory, capsys):
    set_field(page, "max-tokens", 200)
    set_field(page, "seed", 7)
    record_text_updates(page, "chat-log")
    page.find_element(By.ID, "prompt").send_keys("Tell me about mixture-of-experts models.")
    page.find_element(By.ID, "send").click()
    wait_until(lambda: outcome(page) not in (None, ""), timeout=60)
    answer = last_answer(page)
    assert page.find_element(By.ID, "error").get_attribute("hidden") is not None, page.find_element(By.ID, "error").text
    assert answer.find_element(By.CSS_SELECTOR, ".content").text.strip()
    lengths = page.execute_script("return window.__updates")
    # streamed: the text grew piece by piece (the page draws what arrived once per frame; a whole-body
    # response would be one change)
    assert len(set(lengths)) >= 5, lengths
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    assert re.search(r"^200 tokens · prompt \d+ · TTFT \d+ ms · [\d.]+ tok/s · length$", stats), stats
    # the live panel saw the generated tokens: the server's counter, read from /state, moved past them
    wait_until(lambda: int(page.find_element(By.ID, "charts").get_attribute("data-samples")) >= 3, timeout=20)
    assert demo.state()["generation_tokens"] >= 200
    # the next turn carries the conversation: its prompt is the first one, the answer and the new message
    first_prompt = int(re.search(r"prompt (\d+)", stats).group(1))
    page.find_element(By.ID, "prompt").send_keys("And why?")
    page.find_element(By.ID, "send").click()
    wait_until(lambda: len(page.find_elements(By.CSS_SELECTOR, "#chat-log .message.assistant")) == 2
               and outcome(page) not in (None, ""), timeout=60)
    second = last_answer(page).find_element(By.CSS_SELECTOR, ".stats").text
    assert outcome(page) == "length" and int(re.search(r"prompt (\d+)", second).group(1)) > first_prompt + 100, second
    shot = tmp_path_factory.mktemp("playground") / "playground.png"
    page.save_screenshot(str(shot))
    if os.environ.get("SCALELLM_PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["SCALELLM_PLAYGROUND_SCREENSHOT"])
    with capsys.disabled():
        print(f"\nplayground screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_max_tokens_and_completion_mode_reach_the_server(page, demo):
    """A parameter changed in the page bounds the answer: the server's usage says 5 tokens, finish 'length'."""
    page.find_element(By.ID, "mode-completion").click()
    assert page.find_element(By.ID, "chat-log").get_attribute("hidden") is not None
    set_field(page, "max-tokens", 5)
    set_field(page, "temperature", 0)
    before = metric(demo.url, "scalellm_http_responses_total", code="200", route="/v1/completions")
    page.find_element(By.ID, "prompt").send_keys("The capital of France is")
    page.find_element(By.ID, "send").click()
    wait_until(lambda: outcome(page, "completion-log") not in (None, ""), timeout=60)
    answer = last_answer(page, "completion-log")
    assert answer.get_attribute("data-outcome") == "length"
    assert answer.find_element(By.CSS_SELECTOR, ".stats").text.startswith("5 tokens · prompt ")
    assert metric(demo.url, "scalellm_http_responses_total", code="200", route="/v1/completions") == before + 1


def test_a_bad_parameter_shows_the_servers_error(page):
    set_field(page, "top-p", 3)
    page.find_element(By.ID, "prompt").send_keys("hello")
    page.find_element(By.ID, "send").click()
    wait_until(lambda: page.find_element(By.ID, "error").text, timeout=30)
    assert "400" in page.find_element(By.ID, "error").text and "top_p" in page.find_element(By.ID, "error").text
    assert outcome(page) == "failed"


def test_stop_aborts_the_request_on_the_server_and_frees_its_kv_pages(page, demo):
    set_field(page, "max-tokens", 2000)
    page.find_element(By.ID, "prompt").send_keys("Write a very long story.")
    page.find_element(By.ID, "send").click()
    # generating: the server runs it and holds KV pages for it, and the page's live panel shows it running
    wait_until(lambda: (s := demo.state())["requests"]["running"] == 1 and s["kv_cache"]["pages_in_use"] > 0,
               timeout=30)
    wait_until(lambda: page.find_element(By.ID, "state-running").text.startswith("1 /"), timeout=10)
    wait_until(lambda: last_answer(page).find_element(By.CSS_SELECTOR, ".content").text, timeout=30)
    page.find_element(By.ID, "stop").click()
    wait_until(lambda: outcome(page) == "stopped", timeout=10)
    # the server aborted it: nothing runs, no KV page is held (the demo's prefix cache keeps only unheld pages)
    wait_until(lambda: (s := demo.state())["requests"]["running"] == 0 and s["kv_cache"]["pages_in_use"] == 0,
               timeout=10)
    stats = last_answer(page).find_element(By.CSS_SELECTOR, ".stats").text
    tokens = int(stats.split(" tokens")[0])
    assert 0 < tokens < 2000 and stats.endswith("stopped"), stats
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()
    wait_until(lambda: page.find_element(By.ID, "state-running").text.startswith("0 /"), timeout=10)


def test_the_page_and_state_need_no_key_but_the_api_does(demo):
    """The key protects /v1/*; the page (which holds no secret) and /state (what /metrics says) are open."""
    for path in ("/", "/state", "/playground/playground.js"):
        with urllib.request.urlopen(demo.url + path, timeout=10) as response:
            assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(demo.url + "/v1/models", timeout=10)
    assert refused.value.code == 401


def test_the_key_stays_in_the_browser(page):
    page.find_element(By.ID, "remember-key").click()
    assert page.execute_script("return localStorage.getItem('scalellm.apiKey')") == API_KEY
    page.find_element(By.ID, "remember-key").click()
    assert page.execute_script("return localStorage.getItem('scalellm.apiKey')") is None
    assert page.execute_script("return sessionStorage.getItem('scalellm.apiKey')") == API_KEY

