"""Screenshot of the playground's compare view (docs/playground.png) from a running `make playground`.

Drives Debian's headless chromium with Selenium: the base and the quickstart adapter answer a text question and an
image question (a red square drawn here), then the page is saved at 1280 px wide.

    make playground &            # in another terminal
    make playground-screenshot   # -> docs/playground.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --disable-dev-shm-usage --hide-scrollbars"
).split()


def testid(driver, name: str, root=None) -> list:
    return (root or driver).find_elements(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def ask(driver, text: str, image: Path | None = None) -> None:
    if image is not None:
        testid(driver, "image-input")[0].send_keys(str(image.resolve()))
    testid(driver, "prompt")[0].send_keys(text)
    testid(driver, "send")[0].click()
    WebDriverWait(driver, 120).until(
        lambda d: all(p.get_attribute("data-state") in ("done", "error") for p in testid(d, "pane"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--adapter", default="quickstart")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    from toolkit.data.images import make_square_image

    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, "--window-size=1280,900", f"--user-data-dir={tempfile.mkdtemp()}"]:
        options.add_argument(flag)
    options.binary_location = args.chromium
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    try:
        driver.get(args.url + "/playground")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="pane"] option'))
        Select(testid(driver, "model-select", testid(driver, "pane")[1])[0]).select_by_value(args.adapter)
        max_tokens = testid(driver, "max-tokens")[0]
        # inside the closed settings panel: set it as the page would see typing (the random base rambles otherwise)
        driver.execute_script("arguments[0].value = '24'; arguments[0].dispatchEvent(new Event('input'))", max_tokens)
        ask(driver, "Which city is the capital of Japan?")
        with tempfile.TemporaryDirectory() as tmp:
            ask(driver, "What color is the square?", make_square_image(Path(tmp) / "red.png", color="red"))
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
