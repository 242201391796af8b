"""Screenshot of the playground's compare view (docs/playground.png) from a running `make playground`.

Drives Debian's headless chromium with Selenium: the base and the quickstart adapter answer a text question and an
image question (a red square drawn here), then the page is saved at 1280 px wide.

    make playground &            # in another terminal
    make playground-screenshot   # -> docs/playground.png

Other models and questions (docs/playground-270m.png, a server on the real 270M base with three adapters):

    python examples/playground_screenshot.py --url http://127.0.0.1:8012 --models real-base,sft-270m,dpo-270m \
        --ask "What city serves as the capital of Italy?" --ask "And of Spain? Answer in the same way." \
        --no-image --max-tokens 48 --out docs/playground-270m.png
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
    parser.add_argument("--models", default="", help="comma-separated model per pane (default: base, quickstart)")
    parser.add_argument("--ask", action="append", help="a text question (repeatable)")
    parser.add_argument("--no-image", action="store_true", help="skip the red-square question")
    parser.add_argument("--max-tokens", type=int, default=24)
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
        models = args.models.split(",") if args.models else []
        while len(testid(driver, "pane")) < len(models):
            testid(driver, "add-pane")[0].click()
        for pane, model in zip(testid(driver, "pane"), models or [None, "quickstart"], strict=False):
            if model:
                Select(testid(driver, "model-select", pane)[0]).select_by_value(model)
        # inside the closed settings panel: set it as the page would see typing (the random base rambles otherwise)
        driver.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
            testid(driver, "max-tokens")[0],
            str(args.max_tokens),
        )
        for question in args.ask or ["Which city is the capital of Japan?"]:
            ask(driver, question)
        if not args.no_image:
            with tempfile.TemporaryDirectory() as tmp:
                ask(driver, "What color is the square?", make_square_image(Path(tmp) / "red.png", color="red"))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
