"""The gateway's web page in a real headless browser (Debian's chromium + chromedriver)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_pool
from gateway_tools import SUBMIT, InProcessGateway, auth, scripted

from threadbound.agents.events import CANCELLED, SUCCEEDED

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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s: {fn.__doc__ or fn}")


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
            # the screenshot the README shows: the cancelled task's lane and the task list
            wait_for(lambda: click_row(browser, new_id))
            wait_for(lambda: browser.find_element(By.ID, "view-status").text == SUCCEEDED)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        pool.shutdown(grace_s=1)
