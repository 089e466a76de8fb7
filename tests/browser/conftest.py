"""Browser tests: Debian's headless Chromium driven through its ChromeDriver with selenium.

`browser` is a fresh Chromium (its own profile directory) per test; `stack` is the integration
tests' tiny-model stack (real redis-server, `tgq api`, `tgq worker`), shared by a module.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# the integration tests' fixtures: `stack` (module-scoped) and the `tiny_model_dir` it needs
from tests.integration.conftest import MODEL_ID, make_stack, stack, tiny_model_dir  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO_ROOT = Path(__file__).resolve().parents[2]
# screenshots are copied here too (git-ignored), so the latest one is easy to find after a run
OUTPUT_DIR = REPO_ROOT / "test-output"

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh profile; its console log is printed when the test ends."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} is missing (scripts/setup.sh installs Debian's chromium and chromium-driver)"
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        try:
            for entry in driver.get_log("browser"):
                print("browser console:", entry.get("level"), entry.get("message"))
        except WebDriverException as exc:  # the browser may already be gone
            print("browser console unavailable:", exc)
        driver.quit()


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save a PNG into the test's tmp_path and copy it to test-output/ under the repository root."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the screenshot could not be taken"
    OUTPUT_DIR.mkdir(exist_ok=True)
    stable = OUTPUT_DIR / name
    shutil.copyfile(path, stable)
    print(f"screenshot: {path} (copied to {stable})")
    return stable
