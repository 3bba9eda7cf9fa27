"""The web console in Debian's headless chromium (Selenium), over a real controller, Mosquitto and agents.

One controller (open: no token file, as on a laptop) and three real agents for the module. Pages must
load without a script error, a rollout's wave counts must move on the page without a reload, and
the telemetry plots must draw lines with points. Every page is saved as a screenshot under
``tests/artifacts/console/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controller_env import ControllerFleet, controller_fleet, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
DEVICES = [{"device_id": "cam-milan-1", "tags": {"site": "milan"}},
           {"device_id": "cam-milan-2", "tags": {"site": "milan"}},
           {"device_id": "cam-rome-1", "tags": {"site": "rome"}}]
IDS = [d["device_id"] for d in DEVICES]
_CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--no-first-run")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerFleet]:
    with controller_fleet(tmp_path_factory.mktemp("console"), DEVICES) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium driven by Debian's chromedriver; Selenium Manager is never asked for anything."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in _CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.TemporaryDirectory(prefix="console-chromium-")
    options.add_argument(f"--user-data-dir={profile.name}")
    options.add_argument("--window-size=1400,1000")
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


@pytest.fixture
def screenshot(browser: Any, request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """``screenshot(name)`` saves the page as ``tests/artifacts/console/<test>-<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{name}.png"
        assert browser.save_screenshot(str(path)), path
        return path

    return save


def _open(browser: Any, url: str) -> None:
    browser.get(url)
    wait_for(lambda: browser.execute_script("return document.readyState") == "complete", f"{url} to load", 60)


def _script_errors(browser: Any) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _cells(browser: Any, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_the_device_table_filters_sorts_and_links_every_device(fleet: ControllerFleet, browser: Any,
                                                              screenshot: Callable[[str], Path]) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, fleet.url + "/")
    assert _cells(browser, "#devices tbody td:nth-child(2)") == IDS
    assert len(browser.find_elements(By.CSS_SELECTOR, "#devices .dot.online")) == 3
    screenshot("devices")
    box = browser.find_element(By.NAME, "q")
    box.send_keys("tags.site = 'milan'")
    box.submit()
    wait_for(lambda: _cells(browser, "#devices tbody td:nth-child(2)") == IDS[:2], "the filtered table")
    browser.find_element(By.LINK_TEXT, "Device").click()  # sorted by id already: a click turns it around
    wait_for(lambda: _cells(browser, "#devices tbody td:nth-child(2)") == IDS[:2][::-1], "the table sorted back")
    box = browser.find_element(By.NAME, "q")
    box.clear()
    box.send_keys("tags.site = ")
    box.submit()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "p.error").text.startswith("condition: "),
             "the condition's error")
    screenshot("bad-filter")
    assert all("status of 400" in line for line in _script_errors(browser))  # that page's own status, only
    _open(browser, fleet.url + "/")
    browser.find_element(By.LINK_TEXT, "cam-rome-1").click()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "h1").text == "cam-rome-1", "the device page")
    assert "site=milan" not in browser.page_source and "site=rome" in browser.page_source
    assert _script_errors(browser) == []


def test_chromium_dump_dom_shows_every_device(fleet: ControllerFleet, tmp_path: Path) -> None:
    result = subprocess.run([str(CHROMIUM), *_CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}", "--dump-dom",
                             fleet.url + "/"], capture_output=True, text=True, timeout=120)
    assert all(device_id in result.stdout for device_id in IDS), result.stderr[-2000:]


def _rollout_counts(browser: Any) -> tuple[int, int, int, str]:
    values = browser.execute_script(
        "const s = document.getElementById('rollout');"
        "return ['succeeded', 'failed', 'pending', 'state'].map(k => s.querySelector(`[data-field=${k}]`).textContent)")
    return int(values[0]), int(values[1]), int(values[2]), values[3]


def test_a_rollout_page_follows_the_waves_without_a_reload(fleet: ControllerFleet, browser: Any,
                                                           screenshot: Callable[[str], Path]) -> None:
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 4))
    spec = {**fleet.spec("scorer", 1), "selector": "all",
            "policy": {"canary": "1", "wave": "1", "bake": "2", "start": start}}
    status, doc = fleet.api("POST", "/api/v1/rollouts", body=spec)
    assert status == 201, doc
    _open(browser, f"{fleet.url}/rollouts/{doc['rollout_id']}")
    first = _rollout_counts(browser)
    browser.execute_script("window.stillTheSamePage = true")
    screenshot("rollout-started")
    seen = {first[0]}

    def done() -> bool:
        counts = _rollout_counts(browser)
        seen.add(counts[0])
        return counts[0] == 3

    wait_for(done, "the page to show 3 devices succeeded", 180, every=0.2)
    assert first[0] < 3 and len(seen) >= 2, seen  # the counts moved on the page...
    assert browser.execute_script("return window.stillTheSamePage") is True  # ...without a reload
    assert int(browser.execute_script("return document.getElementById('rollout').dataset.polls")) >= 2
    assert _cells(browser, "#waves td[data-field=succeeded]") == ["1", "1", "1"]
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#waves [data-bar=wave] .ok')].map(r => r.getAttribute('width'))")
    assert widths == ["100.00", "100.00", "100.00"]
    screenshot("rollout-done")
    assert _script_errors(browser) == []


def _scores(fleet: ControllerFleet, device_id: str, model: str, count: int) -> None:
    """Send ``count`` requests to the model on a device (so its telemetry has traffic)."""
    port = fleet.get(f"/api/v1/devices/{device_id}")["reported"]["http_port"]
    for _ in range(count):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/score",
                                         data=b'{"data": [[1.0, 2.0]]}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


def _drawn_points(browser: Any, metric: str) -> int:
    """Points of the longest line of one chart (0 when it has none yet)."""
    paths = browser.execute_script(
        "return [...document.querySelectorAll(`figure.chart[data-metric=${arguments[0]}] path.line`)]"
        ".map(p => p.getAttribute('d'))", metric)
    return max((len(re.findall(r"[ML]-?\d", d or "")) for d in paths), default=0)


def test_plots_draw_device_and_deployment_telemetry(fleet: ControllerFleet, browser: Any,
                                                    screenshot: Callable[[str], Path]) -> None:
    spec = {"name": "scorer-milan", **fleet.spec("scorer", 2), "target": "tags.site = 'milan'"}
    status, doc = fleet.api("POST", "/api/v1/deployments", body=spec)
    assert status == 201, doc
    wait_for(lambda: fleet.get("/api/v1/deployments/scorer-milan")["applied"] == 2, "both Milan devices on v2", 180)
    for _ in range(3):  # traffic in three telemetry periods, so latency and throughput have several points
        _scores(fleet, "cam-milan-1", "scorer", 5)
        time.sleep(1.2)

    def device_plotted() -> bool:
        _open(browser, fleet.url + "/devices/cam-milan-1")
        time.sleep(0.5)  # the script fetches the telemetry once the page is there
        return _drawn_points(browser, "cpu") >= 2 and _drawn_points(browser, "latency") >= 2

    wait_for(device_plotted, "the device's CPU and latency plots", 90, every=1.0)
    assert _drawn_points(browser, "memory") >= 2
    screenshot("device")

    def deployment_plotted() -> bool:
        _open(browser, fleet.url + "/deployments/scorer-milan")
        time.sleep(0.5)
        return _drawn_points(browser, "latency") >= 2 and _drawn_points(browser, "throughput") >= 1

    wait_for(deployment_plotted, "the deployment's latency and throughput plots", 90, every=1.0)
    assert _drawn_points(browser, "cpu") >= 2 and _drawn_points(browser, "memory") >= 2  # its devices' own
    screenshot("deployment")
    _open(browser, fleet.url + "/deployments")
    assert _cells(browser, "#deployments tbody td:first-child") == ["scorer-milan"]
    assert _cells(browser, "#deployments tbody td:nth-child(6)") == ["2"]  # targeted
    screenshot("deployments")
    _open(browser, fleet.url + "/events")
    assert "scorer-milan" in browser.page_source
    screenshot("events")
    assert _script_errors(browser) == []
    assert os.listdir(ARTIFACTS)
