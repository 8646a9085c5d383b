"""Take docs/playground.png: the playground page of a running `gpt2-onnx serve`, one token forced.

    gpt2-onnx serve MODEL_DIR --port 8000 &      # the README's shot: random-init tiny (fp32-fused)
    python docs/playground_screenshot.py http://127.0.0.1:8000 docs/playground.png

Needs Debian's chromium and chromium-driver, selenium, and Pillow (the PNG is cut to the page
and reduced to 128 colours, ~30 kB).
"""

from __future__ import annotations

import argparse
import tempfile

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the server's base URL")
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument("--prompt", default="The quick brown fox")
    ap.add_argument("--step", type=int, default=4, help="the step whose candidate is forced")
    ap.add_argument("--candidate", type=int, default=2, help="which candidate (0 = most likely)")
    args = ap.parse_args()

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = tempfile.TemporaryDirectory()
    opts.add_argument(f"--user-data-dir={profile.name}")
    opts.add_argument("--window-size=900,980")
    driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(args.url.rstrip("/") + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-name").text not in ("", "…"))
        for field, value in (("prompt", args.prompt), ("max_tokens", "24")):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        driver.find_element(By.ID, "run").click()

        def finished(d: webdriver.Chrome) -> bool:
            return d.find_element(By.ID, "finish").text in ("length", "stop")

        wait.until(finished)
        driver.find_elements(By.CSS_SELECTOR, "#completion .tok")[args.step].click()
        driver.find_elements(By.CSS_SELECTOR, "#cand-list .cand")[args.candidate].click()
        wait.until(lambda d: finished(d) and len(
            d.find_elements(By.CSS_SELECTOR, "#completion .tok")) > args.step + 1)
        driver.execute_script("document.activeElement.blur()")
        height = driver.execute_script(
            "return document.querySelector('main').getBoundingClientRect().bottom")
        with tempfile.NamedTemporaryFile(suffix=".png") as raw:
            driver.save_screenshot(raw.name)
            image = Image.open(raw.name).convert("RGB")
            image = image.crop((0, 0, image.width, min(image.height, int(height) + 8)))
            image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
                args.out, optimize=True)
    finally:
        driver.quit()
        profile.cleanup()


if __name__ == "__main__":
    main()
