"""Take the README's screenshot of the Ray dashboard while a pool works.

    python scripts/dashboard_screenshot.py            # writes docs/ray-dashboard.png

Starts a local Ray with its dashboard on a free port, a pool whose scripted agents
stream slowly, and photographs the dashboard's actor list with headless Chromium
(Debian: apt-get install chromium): the supervisor, the agent actors ``agent/<n>``
and the step tasks named ``<role>/<task id>`` are what a user looks for there.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time

from local_ray import isolate

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "ray-dashboard.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token() -> str:
    """The local cluster's token (token auth is on: the dashboard asks for it)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.environ.get("RAY_AUTH_TOKEN") or open(path).read().strip()


def shoot(browser: str, url: str, auth: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,800"):
        opts.add_argument(arg)
    with tempfile.TemporaryDirectory() as profile:
        opts.add_argument(f"--user-data-dir={profile}")
        # The Debian chromedriver, named: selenium would otherwise try to download one.
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[role=dialog] input")))
            box.send_keys(auth)
            driver.find_element(By.XPATH, "//button[normalize-space()='Submit' or normalize-space()='SUBMIT']").click()
            wait.until(lambda d: "agent/" in d.page_source)
            time.sleep(2)
            driver.save_screenshot(os.path.abspath(OUT))
        finally:
            driver.quit()


def main() -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None or shutil.which("chromedriver") is None:
        print("needs Chromium and its driver: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    isolate("dashboard")
    import ray

    from threadbound.runtime import AgentPool, RuntimeConfig, Task

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_port=port, logging_level="ERROR", log_to_driver=False)
    cfg = RuntimeConfig.from_mapping({"name": "threadbound", "prewarm": True, "metrics": {"port": 0},
                                      "model": {"backend": "simulated", "tokens": 400, "latency_ms": 40}})
    pool = AgentPool(cfg)
    try:
        handles = [pool.submit(Task(goal=f"task {i}", agents=["coder", "tester", "reviewer"])) for i in range(3)]
        time.sleep(8)  # let the dashboard see the actors and the running steps
        shoot(browser, f"http://127.0.0.1:{port}/#/actors", token())
        print(f"wrote {os.path.abspath(OUT)}")
        for h in handles:
            h.cancel()
    finally:
        pool.shutdown(grace_s=0)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
