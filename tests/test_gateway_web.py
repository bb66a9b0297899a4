"""The gateway's web page in a real headless browser (Debian's chromium + chromedriver):
the task list, live lanes, cancel, submit, and a person's part (answer a question,
approve or reject a change, send a message), with untrusted payloads shown as text."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_pool, pool_settings
from gateway_tools import SUBMIT, InProcessGateway, auth, scripted
from scripted_agents import Approver, Questioner, Reviewing

from threadbound.agents.events import CANCELLED, FAILED, SUCCEEDED, WAITING
from threadbound.runtime import AgentPool, RuntimeConfig
from threadbound.runtime.gateway.app import GatewaySettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "gateway.png"

pytestmark = [
    pytest.mark.ray, pytest.mark.usefixtures("ray_session"),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver "
                                                         "(apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(fn, timeout_s=20.0):
    """``fn()`` once truthy, checked every 0.1s; an element missing or re-rendered
    meanwhile counts as "not yet"."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(None, timeout_s, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda _: fn(), f"not within {timeout_s}s: {fn.__doc__ or fn}")


def click_row(browser, task_id: str) -> bool:
    """Click a task's row of the live list, which re-renders as statuses change: a row
    found just before a re-render is stale by the click, so look it up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        rows = browser.find_elements(By.CSS_SELECTOR, f'tr[data-task-id="{task_id}"]')
        if rows:
            rows[0].click()
            return True
    except StaleElementReferenceException:
        pass
    return False


@pytest.mark.timeout(120)
def test_the_web_page_submits_a_task_streams_its_tokens_in_lanes_and_cancels_another(browser):
    from selenium.webdriver.common.by import By

    pool = make_pool(f"gwweb{time.monotonic_ns() % 100000}")
    try:
        with InProcessGateway(pool) as gw:
            # Given: a long task already running, submitted by another client
            long_id = httpx.post(f"{gw.url}/v1/tasks", json=scripted(tokens=400, pace_s=0.05),
                                 headers=auth()).json()["task_id"]
            # When: the page is opened and given the token
            browser.get(gw.url + "/")
            browser.find_element(By.ID, "token").send_keys(SUBMIT)
            browser.find_element(By.ID, "save-token").click()
            assert browser.execute_script("return sessionStorage.getItem('threadbound-token')") == SUBMIT
            # and a scripted task of two parallel agents is submitted from the form
            browser.find_element(By.ID, "goal").send_keys("show two lanes")
            browser.find_element(By.ID, "agents").send_keys("a,b")
            inputs = browser.find_element(By.ID, "inputs")
            inputs.clear()
            inputs.send_keys(json.dumps({"*": {"tokens": 12, "token_sleep_s": 0.1}}))
            # an `after` that is not JSON is refused before anything is sent ...
            browser.find_element(By.ID, "after").send_keys('{"b": [a]}')
            browser.find_element(By.ID, "submit").click()
            wait_for(lambda: browser.find_element(By.ID, "submit-result").text.startswith("after: not JSON"))
            assert not browser.find_element(By.ID, "task-view").is_displayed()
            # ... and one that is makes both agents start at once
            browser.find_element(By.ID, "after").clear()
            browser.find_element(By.ID, "after").send_keys(json.dumps({"a": [], "b": []}))
            browser.find_element(By.ID, "submit").click()

            def lane_text(agent):
                found = browser.find_elements(By.CSS_SELECTOR, f'.lane[data-agent="{agent}"] .tokens')
                return found[0].text if found else ""

            # Then: tokens appear while the task runs, one lane per agent
            wait_for(lambda: lane_text("a").startswith("a0 a1") and lane_text("b").startswith("b0"))
            assert browser.find_element(By.ID, "view-status").text != SUCCEEDED  # seen live, not at the end
            wait_for(lambda: browser.find_element(By.ID, "view-status").text == SUCCEEDED)
            assert lane_text("a").strip() == " ".join(f"a{i}" for i in range(12))
            assert lane_text("b").strip() == " ".join(f"b{i}" for i in range(12))
            new_id = browser.find_element(By.ID, "view-id").text
            assert httpx.get(f"{gw.url}/v1/tasks/{new_id}", headers=auth()).json()["status"] == SUCCEEDED
            # When: the long task is picked in the list and cancelled
            wait_for(lambda: click_row(browser, long_id))
            wait_for(lambda: lane_text("a").startswith("a0"))
            browser.find_element(By.ID, "cancel").click()
            # Then: its stream ends with cancelled, on the page and in the pool
            wait_for(lambda: browser.find_element(By.ID, "view-status").text == CANCELLED)
            assert httpx.get(f"{gw.url}/v1/tasks/{long_id}", headers=auth()).json()["status"] == CANCELLED
            # and an ended task offers neither a cancel nor a message
            wait_for(lambda: not browser.find_element(By.ID, "cancel").is_displayed())
            assert not browser.find_element(By.ID, "message-form").is_displayed()
            # the screenshot the README shows: the cancelled task's lane and the task list
            wait_for(lambda: click_row(browser, new_id))
            wait_for(lambda: browser.find_element(By.ID, "view-status").text == SUCCEEDED)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        pool.shutdown(grace_s=1)


# -- a person in the loop -------------------------------------------------------------

@pytest.fixture(scope="module")
def person_pool(ray_session):
    p = AgentPool(RuntimeConfig.from_mapping(pool_settings(f"gwwebp{time.monotonic_ns() % 100000}")),
                  agents={"q": Questioner, "ok": Approver, "rv": Reviewing})
    yield p
    p.shutdown(grace_s=1)


@pytest.fixture(scope="module")
def person_gw(person_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    with InProcessGateway(person_pool, GatewaySettings(workspace_roots=(str(root),))) as g:
        g.root = root
        yield g


def submit(gw, body: dict) -> str:
    resp = httpx.post(f"{gw.url}/v1/tasks", json=body, headers=auth(), timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()["task_id"]


def result(gw, task_id: str) -> dict:
    resp = httpx.get(f"{gw.url}/v1/tasks/{task_id}", params={"wait": 30}, headers=auth(), timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def follow_on_page(browser, gw, task_id: str) -> None:
    """Open the page with the submit token and follow ``task_id``."""
    from selenium.webdriver.common.by import By

    browser.get(gw.url + "/")
    browser.find_element(By.ID, "token").send_keys(SUBMIT)
    browser.find_element(By.ID, "save-token").click()
    wait_for(lambda: click_row(browser, task_id))
    wait_for(lambda: browser.find_element(By.ID, "view-id").text == task_id)


def shown(browser, element_id: str) -> str:
    """The element's text if it is displayed, else ''."""
    from selenium.webdriver.common.by import By

    found = browser.find_element(By.ID, element_id)
    return found.text if found.is_displayed() else ""


def request_block(browser, request: int):
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, f'#input-panel .request[data-request="{request}"]')
    return found[0] if found and found[0].is_displayed() else None


def row_status(browser, task_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, f'tr[data-task-id="{task_id}"] td.status')
    return found[0].text if found else ""


def event_lines(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#task-events li")]


@pytest.mark.timeout(120)
def test_a_question_waits_in_a_panel_and_the_answer_typed_on_the_page_ends_the_task(browser, person_gw):
    from selenium.webdriver.common.by import By

    # Given: a task whose agent asks a person which database to use
    question = {"question": "which database?", "choices": ["postgres", "sqlite"]}
    task_id = submit(person_gw, {"goal": "ask", "agents": ["q"], "inputs": {"q": {"questions": [question]}}})
    # When: the page follows it
    follow_on_page(browser, person_gw, task_id)
    # Then: it shows as waiting in the header, the task list and the asking agent's lane,
    wait_for(lambda: shown(browser, "view-status") == WAITING, 30)
    wait_for(lambda: row_status(browser, task_id) == WAITING)
    lane = browser.find_element(By.CSS_SELECTOR, '.lane[data-agent="q"]')
    assert lane.find_element(By.CSS_SELECTOR, ".lane-status").text == WAITING
    # and the panel shows the question with its payload as JSON
    block = wait_for(lambda: request_block(browser, 1))
    assert "which database?" in block.text and '"sqlite"' in block.text
    assert "parses as JSON" in block.find_element(By.CSS_SELECTOR, ".hint").text

    # When: an answer the server refuses (over 64 KiB) is sent
    answer = block.find_element(By.CSS_SELECTOR, ".answer")
    browser.execute_script("arguments[0].value = arguments[1]", answer, "x" * 70_000)
    block.find_element(By.CSS_SELECTOR, ".respond").click()
    # Then: the server's message shows next to the panel, which stays
    wait_for(lambda: "at most 65536" in shown(browser, "input-error"))
    assert request_block(browser, 1) is not None

    # When: a message is sent from the page while the task waits
    browser.find_element(By.ID, "message").send_keys("keep the old table names")
    browser.find_element(By.ID, "send-message").click()
    # Then: it comes back in the stream as a message_received line
    wait_for(lambda: any("message_received" in t and "keep the old table names" in t for t in event_lines(browser)))
    assert shown(browser, "message-result") == "sent"

    # When: the question is answered in words
    answer.clear()
    answer.send_keys("postgres")
    wait_for(lambda: block.find_element(By.CSS_SELECTOR, ".respond").is_enabled())
    block.find_element(By.CSS_SELECTOR, ".respond").click()
    # Then: the panel goes once the answer is in the stream, and the task succeeds with it
    wait_for(lambda: not browser.find_element(By.ID, "input-panel").is_displayed(), 30)
    assert lane.find_element(By.CSS_SELECTOR, ".lane-status").text == ""
    wait_for(lambda: shown(browser, "view-status") == SUCCEEDED, 30)
    done = result(person_gw, task_id)
    assert done["status"] == SUCCEEDED and done["outputs"]["q"]["answers"] == ["postgres"]
    # and an ended task offers neither a cancel nor a message
    wait_for(lambda: not browser.find_element(By.ID, "cancel").is_displayed())
    assert not browser.find_element(By.ID, "message-form").is_displayed()


@pytest.mark.timeout(120)
def test_a_change_waiting_for_approval_is_approved_or_rejected_on_the_page(browser, person_gw):
    from selenium.webdriver.common.by import By

    # Given: two tasks in workspaces the gateway serves, each waiting to apply a change
    ids = {}
    for name in ("yes", "no"):
        (person_gw.root / name).mkdir()
        (person_gw.root / name / "f.txt").write_text("old\n")
        ids[name] = submit(person_gw, {"goal": "change f.txt", "agents": ["ok"], "workspace": name,
                                       "inputs": {"approve": True, "apply": True, "proposal": {"f.txt": "new\n"}}})
    # When: the page follows the first
    follow_on_page(browser, person_gw, ids["yes"])
    # Then: the panel shows the question, the files and the diff, with the three answers
    block = wait_for(lambda: request_block(browser, 1), 30)
    assert "approve this change?" in block.find_element(By.CSS_SELECTOR, "h4").text
    assert block.find_element(By.CSS_SELECTOR, ".files").text == "Files: f.txt"
    assert block.find_element(By.CSS_SELECTOR, "pre.diff").is_displayed()
    for button in (".approve", ".reject", ".send-back"):
        assert block.find_element(By.CSS_SELECTOR, button).is_displayed()
    # When: the change is approved
    block.find_element(By.CSS_SELECTOR, ".approve").click()
    # Then: the panel goes, the task succeeds and the change is in the workspace
    wait_for(lambda: not browser.find_element(By.ID, "input-panel").is_displayed(), 30)
    wait_for(lambda: shown(browser, "view-status") == SUCCEEDED, 30)
    yes = result(person_gw, ids["yes"])
    assert yes["status"] == SUCCEEDED and yes["applied"] == ["f.txt"]
    assert (person_gw.root / "yes" / "f.txt").read_text() == "new\n"

    # When: the second is followed and rejected with a reason
    wait_for(lambda: click_row(browser, ids["no"]))
    block = wait_for(lambda: request_block(browser, 1), 30)
    block.find_element(By.CSS_SELECTOR, ".reason").send_keys("keep the old text")
    block.find_element(By.CSS_SELECTOR, ".reject").click()
    # Then: it fails as rejected, with the reason, and the workspace is untouched
    wait_for(lambda: shown(browser, "view-status") == FAILED, 30)
    no = result(person_gw, ids["no"])
    assert no["reason"] == "rejected" and "keep the old text" in no["error"]
    assert (person_gw.root / "no" / "f.txt").read_text() == "old\n"


@pytest.mark.timeout(120)
def test_a_hostile_question_is_shown_as_text_and_runs_no_script(browser, person_gw):
    from selenium.webdriver.common.by import By

    # Given: an agent (or the model behind it) asks with markup meant to run in the page
    img = '<img src=x onerror="window.pwned = 1">'
    script = "<script>window.pwned = 2</script><b>bold</b>"
    task_id = submit(person_gw, {"goal": f"hostile {img}", "agents": ["q"],
                                 "inputs": {"q": {"questions": [{"question": img, "more": script}]}}})
    # When: the page follows it
    follow_on_page(browser, person_gw, task_id)
    block = wait_for(lambda: request_block(browser, 1), 30)
    # Then: the markup is text, no element came of it, and no script ran. The page's CSP
    # would block inline handlers anyway: the element count is what catches innerHTML.
    assert img in block.find_element(By.CSS_SELECTOR, "h4").text
    assert "<script>window.pwned = 2</script>" in block.find_element(By.CSS_SELECTOR, "pre.payload").text
    assert browser.execute_script("return document.querySelectorAll('#app img, #app script, #app b').length") == 0
    assert browser.execute_script("return window.pwned") is None
    # When: it is cancelled from the page
    browser.find_element(By.ID, "cancel").click()
    # Then: it ends cancelled, the panel and the cancel button go, still without a script run
    wait_for(lambda: shown(browser, "view-status") == CANCELLED, 30)
    wait_for(lambda: not browser.find_element(By.ID, "input-panel").is_displayed())
    assert not browser.find_element(By.ID, "cancel").is_displayed()
    assert browser.execute_script("return window.pwned") is None


TROJAN = 'if access != "user\u202e \u2066# admin only\u2069 \u2066":\n'


@pytest.mark.timeout(150)
def test_the_page_shows_rounds_apart_test_results_bidi_controls_marked_and_the_final_reason(browser, person_gw):
    from selenium.webdriver.common.by import By

    # Given: a task whose agent runs two rounds, reports tests, and asks to approve a Trojan Source diff
    diff = "--- a/auth.py\n+++ b/auth.py\n@@ -1 +1 @@\n-pass\n+" + TROJAN
    task_id = submit(person_gw, {"goal": "g\u202e\u0007", "agents": ["rv"],
                                 "inputs": {"approve": True, "diff": diff, "proposal": {}}})
    follow_on_page(browser, person_gw, task_id)
    wait_for(lambda: request_block(browser, 1) is not None)
    block = request_block(browser, 1)
    # Then: the diff marks the bidi controls the way the terminal does, and hides none
    shown_diff = block.find_element(By.CSS_SELECTOR, "pre.diff").text
    assert "<U+202E>" in shown_diff and "<U+2066>" in shown_diff and "<U+2069>" in shown_diff, shown_diff
    assert "\u202e" not in shown_diff and "\u2066" not in shown_diff
    # the approval panel shows the latest test results as results
    tests = block.find_element(By.CSS_SELECTOR, ".approval-tests").text
    assert "3 passed · 0 failed · 0 errors" in tests and "PASS" in tests, tests
    # the agent's rounds are apart, each with its own text and its test counts
    steps = browser.find_elements(By.CSS_SELECTOR, '.lane[data-agent="rv"] .step')
    assert len(steps) == 2, [s.text for s in steps]
    assert steps[0].find_element(By.CSS_SELECTOR, ".tokens").text == "VERDICT: REQUEST_CHANGES"
    assert steps[1].find_element(By.CSS_SELECTOR, ".tokens").text == "The change is small"
    assert "round 1" in steps[0].text and "round 2" in steps[1].text
    assert "2 passed · 1 failed" in steps[0].find_element(By.CSS_SELECTOR, ".test-result").text
    assert "FAIL" in steps[0].find_element(By.CSS_SELECTOR, ".test-result").text
    # the goal in the list is marked too
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-task-id="{task_id}"]').text
    assert "<U+202E>" in row and "<U+0007>" in row, row
    # When: the person rejects with a reason; Then: the final status and reason are shown
    block.find_element(By.CSS_SELECTOR, "input.reason").send_keys("hidden admin check")
    block.find_element(By.CSS_SELECTOR, "button.reject").click()
    wait_for(lambda: shown(browser, "final").startswith("Final: failed"))
    final = shown(browser, "final")
    assert "reason: rejected" in final and "hidden admin check" in final, final


@pytest.mark.timeout(60)
def test_a_wrong_token_shows_the_login_form_saying_so_not_the_app(browser, person_gw):
    from selenium.webdriver.common.by import By

    browser.get(person_gw.url + "/")
    browser.find_element(By.ID, "token").send_keys("not-a-token-this-gateway-knows")
    browser.find_element(By.ID, "save-token").click()
    wait_for(lambda: "refused" in shown(browser, "login-error"))
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "app").is_displayed()
    # and the right token gets in
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys(SUBMIT)
    browser.find_element(By.ID, "save-token").click()
    wait_for(lambda: browser.find_element(By.ID, "app").is_displayed())
    assert shown(browser, "login-error") == ""
