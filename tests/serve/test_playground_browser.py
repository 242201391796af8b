"""The playground page in headless Chromium against a live server (tiny base + the quickstart adapter, the real
quickstart eval report): base and adapter answering side by side as they stream, an uploaded image, the key form,
model output shown as text, the runs' loss curve, the eval report's tables, the keyboard, a phone-width layout, and a
page that loads nothing from another origin. Selectors are the page's data-testid attributes only."""

from __future__ import annotations

import json

import browser
import pytest
from browser import Browser, answers, read_jsonl

browser.browser_paths()  # skip this module (fail it in CI) without chromium, chromedriver and selenium

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402

chrome, eval_report = browser.chrome, browser.eval_report  # fixtures

KEY = "pg-browser-key"
JAPAN = "Which city is the capital of Japan?"  # eval.jsonl's held-out phrasing; the adapter answers "Tokyo"
SQUARE = "What color is the square?"  # the phrasing the adapter was trained on for images
# State changes of every pane, recorded in the page as they happen (a poll could miss a short "streaming")
WATCH_STATES = """
window.__states = [];
const panes = [...document.querySelectorAll('[data-testid="pane"]')];
new MutationObserver((changes) => {
  for (const c of changes) window.__states.push([panes.indexOf(c.target), c.target.dataset.state]);
}).observe(document.getElementById("panes"), {subtree: true, attributes: true, attributeFilter: ["data-state"]});
"""


@pytest.fixture(scope="module")
def server(make_server, eval_report):
    return make_server(eval_dir=str(eval_report.parent))


@pytest.fixture(scope="module")
def secured(make_server, eval_report):
    return make_server(api_key=KEY, eval_dir=str(eval_report.parent))


@pytest.fixture(scope="module")
def chromium(chrome) -> Browser:
    return chrome()


@pytest.fixture
def page(chromium, server) -> Browser:
    """The playground freshly loaded (nothing kept from an earlier test), its two default panes filled."""
    chromium.driver.set_window_size(1280, 800)
    chromium.driver.get(server.url + "/playground")
    wait_for_models(chromium, [server.state.served_name, "quickstart"])
    return chromium


def wait_for_models(b: Browser, models: list[str]) -> None:
    def filled(_):
        selects = b.all("model-select")
        return len(selects) == 2 and all(options(s) == models for s in selects)

    b.wait(filled, message=f"two panes offering {models}")


def options(select) -> list[str]:
    return [o.get_attribute("value") for o in select.find_elements(By.TAG_NAME, "option")]


def fill(b: Browser, testid: str, text: str, within=None) -> None:
    field = b.one(testid, within)
    if not field.is_displayed():  # in a closed <details>: open it as a user would
        field.find_element(By.XPATH, "ancestor::details[1]/summary").click()
    field.clear()
    field.send_keys(text)


def choose(b: Browser, testid: str, value: str, within=None) -> None:
    Select(b.one(testid, within)).select_by_value(value)


def wait_panes(b: Browser, states=("done",), timeout: float = 30) -> list:
    panes = b.all("pane")
    b.wait(
        lambda _: all(p.get_attribute("data-state") in states for p in panes),
        timeout,
        f"every pane in {states} (now {[p.get_attribute('data-state') for p in panes]})",
    )
    return panes


def test_base_and_adapter_stream_answers_side_by_side(page, server):
    b, base = page, server.state.served_name
    assert not b.one("auth").is_displayed() and not b.one("api-key").is_displayed()  # no key on this server
    first, second = b.all("pane")
    # the default panes: the base, then the first adapter
    assert [Select(b.one("model-select", p)).first_selected_option.text for p in (first, second)] == [
        base,
        "quickstart",
    ]
    assert [p.get_attribute("data-state") for p in (first, second)] == ["idle", "idle"]
    choose(b, "model-select", base, first)
    choose(b, "model-select", "quickstart", second)
    fill(b, "max-tokens", "12")
    b.driver.execute_script(WATCH_STATES)
    fill(b, "prompt", JAPAN)
    b.one("send").click()
    wait_panes(b)
    assert "Tokyo" in b.one("answer", second).text
    assert b.one("pane-model", first).text == base and b.one("pane-model", second).text == "quickstart"
    states = b.driver.execute_script("return window.__states")
    for i in (0, 1):  # each pane went idle -> streaming -> done
        assert [s for pane, s in states if pane == i] == ["streaming", "done"], states
    for pane in (first, second):
        messages = b.all("message", pane)
        assert [m.get_attribute("data-role") for m in messages] == ["user", "assistant"]
        assert JAPAN in messages[0].text
        assert b.one("pane-error", pane).text == ""
    stats = b.one("pane-stats", second).text
    assert "stop" in stats and "tokens" in stats, stats
    assert b.one("prompt").get_attribute("value") == ""  # sent: the prompt box is emptied


def test_an_uploaded_red_square_is_answered_red(page, images):
    b = page
    second = b.all("pane")[1]
    fill(b, "max-tokens", "8")
    b.one("image-input").send_keys(str(images["red"]))
    thumbs = b.wait(lambda _: b.all("attachment"), message="the attachment's thumbnail")
    assert len(thumbs) == 1 and thumbs[0].find_element(By.TAG_NAME, "img").get_attribute("src").startswith(
        "data:image/png"
    )
    fill(b, "prompt", SQUARE)
    b.one("send").click()
    wait_panes(b)
    assert "red" in b.one("answer", second).text.lower()
    shown = b.all("message-image", second)  # the user's message shows the image it sent
    assert len(shown) == 1 and shown[0].get_attribute("src").startswith("data:image/png;base64,")
    assert b.driver.execute_script("return arguments[0].naturalWidth", shown[0]) == 64
    assert b.all("attachment") == []  # sent: the attachments are cleared


def test_a_key_protected_server_asks_for_the_key(chromium, secured):
    b = chromium
    b.driver.get(secured.url + "/playground")
    b.wait(lambda _: b.one("api-key").is_displayed(), message="the API key form")
    assert b.all("model-select") == []
    fill(b, "api-key", "not-the-key")
    b.one("api-key-submit").click()
    b.wait(lambda _: b.one("auth-error").text.strip(), message="the wrong key's error")
    assert b.all("model-select") == [] and b.one("api-key").is_displayed()
    fill(b, "api-key", KEY)
    b.one("api-key-submit").click()
    wait_for_models(b, [secured.state.served_name, "quickstart"])
    assert not b.one("auth").is_displayed()
    b.one("tab-runs").click()  # the playground's own API gets the key too
    b.wait(lambda _: "quickstart" in options(b.one("run-select")), message="the runs, listed with the key")


def test_model_output_and_the_prompt_show_as_text(page):
    """The tiny models cannot be made to write HTML, so the request the page sends is given vLLM's `guided_choice`
    (the page's own fetch, wrapped): the server then streams exactly that answer, and the page must show it as
    characters. The prompt holds HTML too (the user's message is rendered like an answer)."""
    b = page
    forced = '<img src=x onerror="window.__xss=1"><b>bold</b><script>window.__xss=2</script>'
    prompt = '<img src=y onerror="window.__xss=3"> & <i>hi</i>'
    b.driver.execute_script(
        """
        const forced = arguments[0], original = window.fetch;
        window.fetch = (url, init) => {
          if (String(url).endsWith("/v1/chat/completions") && init && init.body) {
            init = {...init, body: JSON.stringify({...JSON.parse(init.body), guided_choice: [forced]})};
          }
          return original.call(window, url, init);
        };
        """,
        forced,
    )
    fill(b, "max-tokens", "200")
    fill(b, "prompt", prompt)
    b.one("send").click()
    panes = wait_panes(b)
    for pane in panes:
        answer = b.one("answer", pane)
        assert answer.text == forced
        # streamed: the answer arrived in several pieces, each put in the page as a text node
        kinds = b.driver.execute_script("return [...arguments[0].childNodes].map((n) => n.nodeType)", answer)
        assert len(kinds) > 1 and set(kinds) == {3}, kinds
        assert b.one("message", pane).text.endswith(prompt)
        transcript = b.one("transcript", pane)
        assert transcript.find_elements(By.CSS_SELECTOR, "img, b, i, script") == []
    assert b.driver.execute_script("return window.__xss") is None


def test_the_runs_view_draws_the_loss_curve(page, trained):
    b = page
    b.one("tab-runs").click()
    b.wait(lambda _: b.one("runs").is_displayed() and not b.one("compare").is_displayed(), message="the runs view")
    b.wait(lambda _: "quickstart" in options(b.one("run-select")), message="the quickstart run listed")
    choose(b, "run-select", "quickstart")
    chart = b.one("loss-chart")
    b.wait(lambda _: int(chart.get_attribute("data-points") or 0) > 1, message="loss points drawn")
    rows = read_jsonl(trained.adapter_dir / "metrics.jsonl")
    assert int(chart.get_attribute("data-points")) == sum("loss" in r for r in rows)
    assert chart.tag_name == "svg" and chart.find_elements(By.CSS_SELECTOR, "path, polyline")
    assert b.one("lr-chart").find_elements(By.CSS_SELECTOR, "path, polyline")
    assert "quickstart" in b.one("run-card").text


def test_the_eval_view_shows_the_report(page, eval_report):
    b = page
    lines = answers(eval_report)
    rows = list(dict.fromkeys(line["row"] for line in lines))
    by = {(line["model"], line["row"]): line for line in lines}
    b.one("tab-evals").click()
    b.wait(lambda _: "quickstart" in options(b.one("eval-select")), message="the report listed")
    choose(b, "eval-select", "quickstart")
    b.wait(lambda _: "exact_match" in b.one("eval-metrics").text, message="the metrics table")
    assert not b.one("eval-empty").is_displayed()
    b.wait(lambda _: len(b.all("answer-row")) == len(rows), message=f"{len(rows)} answer rows")
    table = b.one("eval-answers")
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    shown = b.all("answer-row")
    assert [r.get_attribute("data-row") for r in shown] == rows
    for tr in shown:
        cells = [c.text for c in tr.find_elements(By.CSS_SELECTOR, "th, td")]
        line = by[("quickstart", tr.get_attribute("data-row"))]
        assert line["prompt"] and cells[header.index("prompt")].startswith(line["prompt"])  # the question asked
        for model in ("base", "quickstart"):
            assert cells[header.index(model)] == by[(model, tr.get_attribute("data-row"))]["answer"]
    b.wait(lambda _: b.one("eval-chart").get_attribute("src").startswith("blob:"), message="the chart")
    assert b.driver.execute_script("return arguments[0].naturalWidth", b.one("eval-chart")) > 100

    choose(b, "wrong-model", "quickstart")
    b.one("wrong-only").click()
    wrong = [r for r in rows if by[("quickstart", r)]["exact_match"] < 1]
    assert 0 < len(wrong) < len(rows)
    b.wait(lambda _: len(b.all("answer-row")) == len(wrong), message=f"{len(wrong)} rows the adapter got wrong")
    assert [r.get_attribute("data-row") for r in b.all("answer-row")] == wrong
    choose(b, "wrong-model", "base")
    base_wrong = [r for r in rows if by[("base", r)]["exact_match"] < 1]
    b.wait(lambda _: len(b.all("answer-row")) == len(base_wrong), message=f"{len(base_wrong)} rows the base got wrong")


def test_ctrl_enter_sends_and_panes_stack_on_a_phone(page):
    b = page
    fill(b, "max-tokens", "4")
    fill(b, "prompt", JAPAN)
    b.one("prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_panes(b)
    assert "Tokyo" in b.one("answer", b.all("pane")[1]).text

    def boxes():
        return b.driver.execute_script(
            "return arguments[0].map((p) => p.getBoundingClientRect().toJSON())", b.all("pane")
        )

    first, second = boxes()
    assert second["top"] < first["bottom"] and second["left"] >= first["right"]  # side by side at 1280 px
    b.driver.set_window_size(390, 844)
    b.wait(lambda _: b.driver.execute_script("return innerWidth") <= 400, message="a 390 px wide window")
    first, second = boxes()
    assert second["top"] >= first["bottom"], (first, second)  # stacked
    assert first["right"] <= 390 and second["right"] <= 390
    overflow = b.driver.execute_script("return document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen"


def test_the_page_loads_nothing_from_another_origin(page, server, secured):
    """Everything this browser asked for (this test's own page, and every test's before it), from both servers'
    pages: only their own origin, or the page's own data:/blob: URLs."""
    b = page
    fill(b, "max-tokens", "4")
    fill(b, "prompt", JAPAN)
    b.one("send").click()
    wait_panes(b)
    b.one("tab-runs").click()
    b.wait(lambda _: int(b.one("loss-chart").get_attribute("data-points") or 0) > 1, message="the loss curve")
    b.one("tab-evals").click()
    b.wait(lambda _: b.all("answer-row"), message="the eval report's answers")
    b.wait(lambda _: b.one("eval-chart").get_attribute("src").startswith("blob:"), message="the eval chart")
    resources = b.driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert all(url.startswith(server.url + "/") for url in resources), resources
    for origin in (server.url, secured.url):
        requested = b.requested(origin)
        others = [u for u in requested if not u.startswith((origin + "/", "data:", "blob:"))]
        assert others == [], others
    requested = b.requested(server.url)
    for path in ("/playground", "/playground/static/playground.js", "/v1/models", "/v1/chat/completions"):
        assert server.url + path in requested, path
    assert any(u.startswith(server.url + "/playground/api/") for u in requested)
    assert b.errors() == []


def test_stop_then_more_turns_regenerate_overrides_and_clear(page, server):
    """Esc stops a long answer; the pane goes on (the stopped turn left out, no refused request); Regenerate
    replaces the last answer; a pane's own settings reach its request only; Clear empties the pane."""
    from selenium.webdriver.common.action_chains import ActionChains

    b, base = page, server.state.served_name
    first, second = b.all("pane")
    fill(b, "max-tokens", "12")
    fill(b, "pane-max-tokens", "3500", first)  # the random base rambles: seconds of tokens, time to stop it
    fill(b, "prompt", JAPAN)
    b.one("send").click()
    b.wait(lambda _: b.one("answer", second).text == "Tokyo", message="the adapter's answer")
    assert first.get_attribute("data-state") == "streaming"
    ActionChains(b.driver).send_keys(Keys.ESCAPE).perform()
    wait_panes(b, ("done", "stopped"))
    assert first.get_attribute("data-state") == "stopped"
    assert "stopped" in b.one("pane-stats", first).text

    fill(b, "prompt", "Which city is the capital of Italy?")
    b.one("send").click()
    wait_panes(b)
    assert [b.one("pane-error", p).text for p in (first, second)] == ["", ""]
    assert b.one("answer", second).text == "Rome"
    assert b.one("pane-model", first).text == base

    fill(b, "pane-seed", "7", second)
    fill(b, "pane-temperature", "0.5", second)
    b.one("regenerate", second).click()
    wait_panes(b)
    roles = [m.get_attribute("data-role") for m in b.all("message", second)]
    assert roles == ["user", "assistant", "user", "assistant"]  # the last answer replaced, not added
    b.one("copy-curl", second).click()
    sent = json.loads(b.one("request-code", second).text.split("<<'JSON'\n")[1].rsplit("\nJSON", 1)[0])
    assert (sent["model"], sent["seed"], sent["temperature"], sent["max_tokens"]) == ("quickstart", 7, 0.5, 12)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == "Tokyo"
    b.one("copy-python", first).click()
    code = b.one("request-code", first).text
    assert "seed=" not in code and "temperature=0," in code and "max_tokens=3500," in code
    assert code.count('"role": "user"') == 1  # the stopped turn (no text) is not part of the conversation

    b.one("clear", second).click()
    assert b.all("message", second) == [] and second.get_attribute("data-state") == "idle"
    assert b.one("pane-model", second).text == "–"
