"""The server's chat page in a real (headless) browser: streaming answers, the adapters line, multi-turn, API key.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); skipped without them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from live_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
POOL = ("qv_r8", "all7_r4", "rs_r16")
WAIT_S = 60
MAX_TOKENS = "24"  # two turns stay well inside --n-ctx 512

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="the chat page test needs Debian's chromium: apt-get install chromium chromium-driver"),
]


def _server_args(tiny: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny / "tiny-f32.gguf"), "--adapters", *(str(tiny / "gguf" / f"{n}.gguf") for n in POOL),
            "--n-ctx", "512", *extra]


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1100,800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, until, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(until, message=f"waited {WAIT_S} s for {what}")


def _open(driver, url: str) -> None:
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element("id", "models").text.startswith(("model ", "models:")), "the models line")
    driver.find_element("id", "max-tokens").clear()
    driver.find_element("id", "max-tokens").send_keys(MAX_TOKENS)


def _say(driver, text: str) -> None:
    box = driver.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def _answered(driver, n: int):
    """The n-th answer and its adapters line, once both are there (the adapters line comes with the last chunk)."""
    def done(d):
        answers, lines = d.find_elements("css selector", ".answer"), d.find_elements("css selector", ".adapters")
        if err := d.find_element("id", "error").text:
            raise AssertionError(f"the page shows an error: {err}")
        return (answers[n - 1], lines[n - 1]) if len(answers) >= n and len(lines) >= n else False

    return _wait(driver, done, f"answer {n} and its adapters line")


def _severe(driver) -> list[dict]:
    try:
        return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    except Exception:  # a driver without the log endpoint
        return []


def test_chat_page_streams_answers_with_their_adapters(tiny, browser, tmp_path, capsys):
    with live_server(*_server_args(tiny)) as url:
        _open(browser, url)
        models = browser.find_element("id", "models").text
        assert "tiny-f32" in models and all(n in models for n in POOL), models

        _say(browser, "Hello! What can you do?")
        answer, adapters = _answered(browser, 1)
        assert answer.text.strip(), "the first answer is empty"
        weighted = re.findall(r"(\w+) (\d\.\d\d)", adapters.text)
        assert any(name in POOL for name, _ in weighted), f"no pool adapter with a weight in {adapters.text!r}"
        assert all(0 <= float(w) <= 1 for _, w in weighted), adapters.text

        _say(browser, "Tell me more, please.")  # the second request carries the whole conversation
        answer2, adapters2 = _answered(browser, 2)
        assert answer2.text.strip(), "the second answer is empty"
        assert any(name in adapters2.text for name in POOL), adapters2.text
        assert len(browser.find_elements("css selector", ".turn.user")) == 2
        assert browser.find_element("id", "input").get_attribute("value") == ""

        shot = tmp_path / "chat.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
        with capsys.disabled():  # shown in the test output even when it passes
            print(f"\nchat page screenshot: {shot}")
        errors = _severe(browser)
        assert not errors, f"browser console errors: {errors}"


def test_chat_page_api_key(tiny, browser):
    with live_server(*_server_args(tiny, "--api-key", "sekret")) as url:
        _open(browser, url)
        assert "unavailable" in browser.find_element("id", "models").text  # /v1/models wants the key too

        _say(browser, "Hello?")
        error = _wait(browser, lambda d: d.find_element("id", "error").text, "the error line")
        assert "401" in error and "API key" in error, error
        assert not browser.find_elements("css selector", ".answer")
        assert browser.find_element("id", "input").get_attribute("value") == "Hello?"  # back in the box to retry

        browser.find_element("id", "apikey").send_keys("sekret")
        browser.find_element("id", "send").click()
        answer, adapters = _answered(browser, 1)
        assert answer.text.strip() and any(name in adapters.text for name in POOL), adapters.text
        assert browser.find_element("id", "error").text == ""
        assert browser.execute_script("return localStorage.getItem('logo-edge.apikey')") == "sekret"
        _wait(browser, lambda d: d.find_element("id", "models").text.startswith("model "), "the models line with a key")
