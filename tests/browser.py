"""The demo app in a subprocess and headless Chromium driving it (Debian's chromium and chromium-driver, Selenium)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import REPO_ROOT


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless as root, and without the background connections that this machine's closed network refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
APP_START_SECONDS = 180
RESULT_SECONDS = 120


def browser_missing() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install selenium)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(model: Path, log: Path) -> Iterator[str]:
    """`python -m ace_lora_hf.cli.app --model MODEL` on a free port of 127.0.0.1; yields its address."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "ace_lora_hf.cli.app", "--model", str(model), "--port", str(port)]
    with log.open("w") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_served(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + APP_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer at {url} within {APP_START_SECONDS} s:\n{log.read_text()}")


@contextmanager
def chromium(window: tuple[int, int] = (1400, 1800)):
    """A headless Chromium WebDriver with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={window[0]},{window[1]}")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def classify_in_browser(driver, url: str, image: Path) -> tuple[str, dict[str, str]]:
    """Open the app, upload `image`, press Classify; the message and the probability table as shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, RESULT_SECONDS)
    upload = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#image-file input[type=file]"))
    upload.send_keys(str(image))
    wait.until(lambda page: image.stem in page.find_element(By.CSS_SELECTOR, "#image-file").text)
    driver.find_element(By.CSS_SELECTOR, "#classify").click()
    message = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#message").text)
    if "prediction" not in message:
        return message, {}
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#explanation img"))
    table = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#probabilities [role=row]"):
        cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
        if len(cells) == 2:
            table[cells[0]] = cells[1]
    return message, table
