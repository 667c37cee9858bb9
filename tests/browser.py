"""Headless Chromium through Selenium (Debian's chromium and chromium-driver), for the browser test and
scripts/report_screenshot.py. The network is closed, so every background service is switched off
(without those flags Chromium stalls on start-up); each session gets a fresh profile."""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
from collections.abc import Iterator

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage")


def missing_browser() -> list[str]:
    """What is missing to drive a browser here (empty when everything is present)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    return missing


@contextlib.contextmanager
def chromium() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="mimicfilter-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, url: str, width: int, mobile: bool = False, height: int = 900) -> None:
    """Load ``url`` in a ``width`` CSS-pixel viewport (``mobile``: a phone, where only a viewport meta
    tag keeps the page from being laid out 980 px wide) and wait until every image has settled."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    driver.get(url)
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all([...document.images].map(image => image.decode().catch(() => null))).then(() => done(true));"
    )


def full_page_png(driver) -> bytes:
    """A screenshot of the whole page at the current viewport width."""
    width, height = driver.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "format": "png", "clip": clip})
    return base64.b64decode(shot["data"])
