"""What the playground tests share (a helper module, not collected): a real eval report made once per session, and
headless Chromium driven by Selenium, with every URL it requested and every console line it logged kept for checks.

Chromium and chromedriver come from the system (`apt-get install chromium chromium-driver`); when they are missing
the browser tests skip, or fail where TOOLKIT_REQUIRE_BROWSER=1 (CI sets it: .ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
INSTALL = "apt-get install chromium chromium-driver, and `pip install -e .[dev]` for selenium"

_eval_reports: dict[str, Path] = {}  # adapter folder -> eval report folder: one real eval per session


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        for found in (Path("/usr/bin") / name, shutil.which(name)):
            if found and os.access(found, os.X_OK):
                return str(found)
    return None


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or skip the test or module (fail it under TOOLKIT_REQUIRE_BROWSER=1) when they or
    selenium are missing."""
    chromium, driver = _which(CHROMIUM), _which(("chromedriver",))
    try:
        import selenium  # noqa: F401
    except ImportError:
        selenium = None
    found = {"chromium": chromium, "chromedriver": driver, "selenium": selenium}
    missing = ", ".join(name for name, there in found.items() if not there)
    if missing:
        message = f"the playground's browser tests need {missing}: {INSTALL}"
        if os.environ.get("TOOLKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return chromium, driver


class Browser:
    """One headless Chromium: the Selenium driver plus what it logged, drained into lists as it is read."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 800) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, chromedriver = browser_paths()
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        self.driver.set_window_size(width, height)
        self.requests: list[tuple[str, str]] = []  # (URL, the requesting document's URL): Network.requestWillBeSent
        self.console: list[dict] = []  # console and page errors: {"level", "message"}

    def drain(self) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                params = message["params"]
                self.requests.append((params["request"]["url"], params.get("documentURL", "")))
        self.console += [{"level": e["level"], "message": e["message"]} for e in self.driver.get_log("browser")]

    def requested(self, origin: str) -> list[str]:
        """The URL of every request a document from `origin` made, or a navigation to it (the browser's own
        start-up pages are left out)."""
        self.drain()
        return [url for url, document in self.requests if document.startswith(origin + "/")]

    def errors(self) -> list[str]:
        """Console errors other than a failed request's own line (a 401 the page expects is one of those)."""
        self.drain()
        return [
            e["message"]
            for e in self.console
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
        ]

    # DOM helpers: every element the tests touch has a data-testid
    def one(self, testid: str, within=None):
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def all(self, testid: str, within=None) -> list:
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def wait(self, condition, timeout: float = 30, message: str = ""):
        """Wait until condition(driver) is truthy; on timeout the message says what was awaited, with console
        errors."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition)
        except TimeoutException:
            raise AssertionError(
                f"timed out ({timeout} s) waiting for {message}; console errors: {self.errors()}"
            ) from None

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def chrome():
    """Make headless Chromium browsers (each with a fresh temporary profile), all quit at the module's end."""
    browser_paths()
    made: list[Browser] = []
    profiles: list[tempfile.TemporaryDirectory] = []

    def start(width: int = 1280, height: int = 800) -> Browser:
        profiles.append(tempfile.TemporaryDirectory(prefix="chrome-profile-"))
        made.append(Browser(Path(profiles[-1].name), width, height))
        return made[-1]

    yield start
    for b in made:
        b.quit()
    for p in profiles:
        p.cleanup()


@pytest.fixture(scope="module")
def eval_report(tiny_ct, trained, tmp_path_factory) -> Path:
    """The folder `toolkit eval recipes/quickstart.yaml` writes (report.json, answers.jsonl, chart.png, report.md)
    for the tiny base and the quickstart adapter, made once per session (it is read, never changed)."""
    key = str(trained.adapter_dir)
    if key not in _eval_reports:
        from toolkit.eval.run import run_eval
        from toolkit.recipe import load_recipe

        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"base.path={tiny_ct}"])
        out = tmp_path_factory.mktemp("eval-reports") / "quickstart"
        run_eval(recipe, adapters=[f"quickstart={trained.adapter_dir}"], out=out)
        _eval_reports[key] = out
    return _eval_reports[key]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers(report: Path) -> list[dict]:
    """An eval report's answers.jsonl: one line per row and model."""
    return read_jsonl(report / "answers.jsonl")
