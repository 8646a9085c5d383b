"""The playground page (issue 20) in a real browser: Debian's headless Chromium driven by Selenium.

One `gpt2-onnx serve` subprocess on a free port over the tiny export, one browser for the module.
The reference for everything the page shows is the server's own API, called with httpx: the
greedy text, the top-N log-probabilities of a step, the continuation after a forced token (a
token-id prompt). The page must also load nothing from another host and log no console error.

Needs `chromium`, `chromium-driver` (apt) and `selenium` (the test extra): skipped with a reason
without them, an error when `CI` is set (`.ci/run` installs them).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

pytest.importorskip("fastapi")  # the serve extra, as in test_serve.py
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    WHY = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):  # CI installs them (.ci/run): missing there is an error, not a skip
        pytest.fail(WHY, pytrace=False)
    pytest.skip(WHY, allow_module_level=True)
if os.environ.get("CI"):
    import selenium.webdriver as webdriver
else:
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="needs selenium (the test extra: pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_harness import running_server  # noqa: E402

TOP_N = 5  # the page's default "candidates shown"
MAX_TOKENS = 12
PROMPT = "The quick brown fox"
WAIT_S = 60  # generous: the machine is shared


@pytest.fixture(scope="module")
def server(tiny_fused_dir: Path) -> Iterator[str]:
    with running_server(tiny_fused_dir) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium that reaches nothing but loopback (flags from the machine notes)."""
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1100,900"):
        opts.add_argument(flag)
    profile = tempfile.TemporaryDirectory()
    opts.add_argument(f"--user-data-dir={profile.name}")
    # browser: console messages; performance: the DevTools network log (every request made).
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


# ------------------------------------------------------------------------------ helpers
def api(base: str, **body) -> dict:
    """A non-streamed completion from the API (the reference for what the page shows)."""
    r = httpx.post(base + "/v1/completions", json=body, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def open_page(driver, base: str) -> None:
    driver.get_log("browser")  # drop earlier pages' messages: this page's own load counts
    driver.get(base + "/")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "model-name").text not in ("", "…"))


def set_value(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def generate(driver, prompt: str, max_tokens: int = MAX_TOKENS) -> None:
    set_value(driver, "prompt", prompt)
    set_value(driver, "max_tokens", str(max_tokens))
    assert driver.find_element(By.ID, "greedy").is_selected()  # greedy is the default
    driver.find_element(By.ID, "run").click()
    wait_finished(driver)


def wait_finished(driver) -> str:
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "finish").text in ("length", "stop"))
    return driver.find_element(By.ID, "finish").text


def page_tokens(driver) -> tuple[list[int], list[str]]:
    """Token ids and texts of the completion as shown (from the DOM)."""
    return driver.execute_script(
        "const t = [...document.querySelectorAll('#completion .tok')];"
        "return [t.map(b => Number(b.dataset.id)), t.map(b => b.textContent)];")


def candidates(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#cand-list .cand')].map(b => ({"
        "id: Number(b.dataset.id), prob: Number(b.dataset.prob),"
        "piece: b.querySelector('.piece').textContent, pct: b.querySelector('.pct').textContent,"
        "width: b.querySelector('.bar').style.width, chosen: b.classList.contains('chosen')}));")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def shown(piece: str) -> str:
    """The page shows a piece with JSON escapes (a newline as \\n)."""
    return json.dumps(piece, ensure_ascii=False)[1:-1]


# ------------------------------------------------------------------------------ tests
def test_page_loads_offline_with_model_facts_and_no_console_error(server: str, browser) -> None:
    card = httpx.get(server + "/v1/models", timeout=10).json()["data"][0]
    open_page(browser, server)
    assert browser.title == "gpt2-onnx playground"
    assert browser.find_element(By.ID, "model-name").text == card["id"]
    assert browser.find_element(By.ID, "model-variant").text == card["precision"]
    assert browser.find_element(By.ID, "model-device").text == card["device"]
    assert console_errors(browser) == []
    # the served page is one file: every link, source and fetch stays on this server
    html = httpx.get(server + "/", timeout=10).text
    refs = re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)""", html)
    refs += re.findall(r"""(?:fetch|url)\(\s*["'`]([^"'`]*)""", html)
    assert refs and all(r.startswith("data:") or (r.startswith("/") and not r.startswith("//"))
                        for r in refs), refs
    assert "http://" not in html and "https://" not in html


def test_greedy_completion_equals_api_text_and_timings_shown(server: str, browser) -> None:
    want = api(server, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
               return_token_ids=True)
    open_page(browser, server)
    generate(browser, PROMPT)
    ids, texts = page_tokens(browser)
    assert ids == want["token_ids"]
    assert "".join(texts) == want["text"]
    assert browser.execute_script(
        "return document.getElementById('completion').textContent") == want["text"]
    assert browser.find_element(By.ID, "prompt-text").text == PROMPT
    assert browser.find_element(By.ID, "ntok").text == str(len(want["token_ids"]))
    assert browser.find_element(By.ID, "finish").text == want["finish_reason"]
    # the timings are the server's (its last stream chunk), not the page's own guess
    assert browser.find_element(By.ID, "timing-source").text == "(reported by the server)"
    ttft = browser.find_element(By.ID, "ttft").text
    tps = browser.find_element(By.ID, "tps").text
    assert ttft.endswith(" ms") and float(ttft[:-3]) > 0
    assert tps.endswith(" tok/s") and float(tps[:-6]) > 0
    assert console_errors(browser) == []


def _distinct_step(choice: dict) -> int:
    """A step whose top candidates have distinct strings (OpenAI's dict keeps them all)."""
    for k, top in enumerate(choice["logprobs"]["top_logprobs"]):
        if k > 0 and len(top) == TOP_N:
            return k
    pytest.fail("no step with TOP_N distinct candidate strings")


def test_token_opens_candidate_bars_matching_api_logprobs(server: str, browser) -> None:
    want = api(server, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP_N,
               return_token_ids=True)
    k = _distinct_step(want)
    top = want["logprobs"]["top_logprobs"][k]
    open_page(browser, server)
    generate(browser, PROMPT)
    tok = browser.find_elements(By.CSS_SELECTOR, "#completion .tok")[k]
    tok.click()
    assert browser.find_element(By.ID, "candidates").is_displayed()
    assert tok.get_attribute("aria-expanded") == "true"
    cands = candidates(browser)
    assert len(cands) == TOP_N
    assert {c["piece"] for c in cands} == {shown(p) for p in top}
    by_piece = {shown(p): lp for p, lp in top.items()}
    for c in cands:
        p = math.exp(by_piece[c["piece"]])
        assert c["prob"] == pytest.approx(p, rel=1e-6)
        assert c["pct"] == (f"{100 * p:.1f}%" if p >= 0.1 else f"{100 * p:.2f}%")
        assert float(c["width"].rstrip("%")) == pytest.approx(100 * p, abs=0.01)
    probs = [c["prob"] for c in cands]
    assert probs == sorted(probs, reverse=True)
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["id"] == want["token_ids"][k]
    assert chosen[0]["piece"] == shown(want["logprobs"]["tokens"][k])
    assert console_errors(browser) == []


def test_choosing_another_candidate_reruns_from_that_step(server: str, browser) -> None:
    """Keyboard only: Tab to the tokens, arrows to step k, Enter, down to the second candidate,
    Enter. The page's new path equals the API's greedy continuation of the forced prefix."""
    open_page(browser, server)
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    set_value(browser, "max_tokens", str(MAX_TOKENS))
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_finished(browser)
    before, _ = page_tokens(browser)
    prompt_ids = httpx.post(server + "/tokenize", json={"prompt": PROMPT},
                            timeout=10).json()["tokens"]
    k = 3
    first_tok = browser.find_element(By.CSS_SELECTOR, "#completion .tok")
    assert first_tok.get_attribute("tabindex") == "0"  # the tokens are one tab stop
    first_tok.send_keys(Keys.ENTER)  # a focused token opens with Enter ...
    active = browser.switch_to.active_element
    for _ in range(k):
        active.send_keys(Keys.ARROW_RIGHT)  # ... and the arrows walk the steps
        active = browser.switch_to.active_element
    assert active.get_attribute("data-step") == str(k)
    active.send_keys(Keys.ARROW_DOWN)  # into the candidates: the first (chosen) one
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    pick = browser.switch_to.active_element
    forced = int(pick.get_attribute("data-id"))
    assert forced != before[k] and "chosen" not in pick.get_attribute("class")
    pick.send_keys(Keys.ENTER)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.ID, "finish").text in ("length", "stop")
        and len(page_tokens(d)[0]) > k + 1)
    after, texts = page_tokens(browser)
    assert after[:k] == before[:k]
    assert after[k] == forced
    assert after != before
    want = api(server, prompt=prompt_ids + after[:k + 1], max_tokens=MAX_TOKENS - k - 1,
               temperature=0, return_token_ids=True)
    assert after[k + 1:] == want["token_ids"]
    assert "".join(texts[k + 1:]) == want["text"]
    assert len(after) == MAX_TOKENS
    # the forced step keeps its candidates, now with the forced token marked as chosen
    tok = browser.find_elements(By.CSS_SELECTOR, "#completion .tok")[k]
    assert "forced" in tok.get_attribute("class")
    chosen = [c for c in candidates(browser) if c["chosen"]]
    assert [c["id"] for c in chosen] == [forced]
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "candidates").is_displayed()
    assert console_errors(browser) == []


def test_narrow_screen_has_no_horizontal_scroll(server: str, browser) -> None:
    browser.set_window_size(360, 800)
    try:
        open_page(browser, server)
        generate(browser, PROMPT)
        browser.find_elements(By.CSS_SELECTOR, "#completion .tok")[1].click()
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
    finally:
        browser.set_window_size(1100, 900)


def test_page_requests_only_its_own_server(server: str, browser) -> None:
    browser.get_log("performance")  # drop what earlier tests logged
    open_page(browser, server)
    generate(browser, PROMPT)
    browser.find_elements(By.CSS_SELECTOR, "#completion .tok")[0].click()
    origin = urlsplit(server)
    # DevTools network log: every request the browser sent for the page
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    # and the page's own Resource Timing entries
    urls += browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith("/v1/completions") for u in urls)  # the log did see the traffic
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme == "data":
            continue
        assert (parts.scheme, parts.hostname, parts.port) == (
            origin.scheme, origin.hostname, origin.port), u
    assert console_errors(browser) == []  # a blocked outside load shows here (the CSP)


def test_page_asks_for_the_api_key_when_the_server_wants_one(tiny_fused_dir: Path,
                                                              browser) -> None:
    key = "page-key-42"
    with running_server(tiny_fused_dir, "--api-key", key) as base:
        browser.get(base + "/")  # the page itself is public; its API calls are not
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_element(By.ID, "key-row").is_displayed())
        assert "401" in browser.find_element(By.ID, "error").text
        assert browser.switch_to.active_element.get_attribute("id") == "api-key"
        browser.switch_to.active_element.send_keys(key, Keys.TAB)  # change -> models again
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_element(By.ID, "model-name").text == "random-tiny-seed0")
        assert browser.find_element(By.ID, "error").text == ""
        browser.get_log("browser")  # the 401 above is logged as a failed resource load
        generate(browser, PROMPT, max_tokens=4)
        want = httpx.post(base + "/v1/completions", timeout=WAIT_S,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
        assert browser.execute_script(
            "return document.getElementById('completion').textContent") \
            == want["choices"][0]["text"]
        assert console_errors(browser) == []


def test_an_error_marks_the_input_its_param_names(server: str, browser) -> None:
    """The server's error.param (the runtime's ParameterError data) marks the form's input of
    that request field; the next run clears the mark."""
    open_page(browser, server)
    set_value(browser, "prompt", PROMPT)
    set_value(browser, "max_tokens", "100000")  # past the context: 413, param max_tokens
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "413" in d.find_element(By.ID, "error").text)
    marked = browser.find_element(By.ID, "max_tokens")
    assert marked.get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element.get_attribute("id") == "max_tokens"
    browser.get_log("browser")  # the 413 is logged as a failed resource load
    generate(browser, PROMPT, max_tokens=3)
    assert marked.get_attribute("aria-invalid") is None
    assert browser.find_element(By.ID, "error").text == ""
