"""The playground as a user meets it: `gaussdiff serve` in a subprocess on the loopback address,
driven in headless Chromium (Debian's chromium and chromium-driver, through Selenium; nothing
downloads a browser). Load the page, choose a model, sampler and class, start, see the preview
appear and the result come, download the PNG: it is the grid of the images `Pipeline.sample`
draws alone with the same options.

GAUSSDIFF_SCREENSHOTS=DIR also writes the page's screenshots to DIR (the README's come from
`GAUSSDIFF_SCREENSHOTS=docs/playground python -m pytest tests/test_serve_browser.py`)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

import gaussdiff  # noqa: E402
from gaussdiff.images import make_grid  # noqa: E402
from gaussdiff.sampling.guidance import Guidance  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                reason="Debian's chromium and chromium-driver are not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gaussdiff", "serve", "models/fashion-small",
                                 "models/fashion-cond-edm", "--port", str(port), "--max-nfe", "60"],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/api/models", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=900,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name):
    where = os.environ.get("GAUSSDIFF_SCREENSHOTS")
    if where:
        os.makedirs(where, exist_ok=True)
        driver.save_screenshot(os.path.join(where, name))


def test_sample_in_the_page_and_download_the_png(server, browser):
    browser.get(server)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("fashion-cond-edm")
    Select(browser.find_element(By.ID, "sampler")).select_by_visible_text("euler")
    Select(browser.find_element(By.ID, "label")).select_by_value("7")
    for field, value in (("steps", "12"), ("seed", "5"), ("num", "4"), ("guidance", "2")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "start").click()
    # the preview appears while it samples, then the result
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    wait.until(lambda d: "done" in d.find_element(By.ID, "status").text)
    assert "12 network evaluations" in browser.find_element(By.ID, "status").text
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") > 0
    screenshot(browser, "playground.png")

    browser.find_element(By.ID, "download-png").click()
    wait.until(lambda d: any(p.suffix == ".png" for p in d.downloads.iterdir()))
    (png,) = [p for p in browser.downloads.iterdir() if p.suffix == ".png"]
    got = np.asarray(Image.open(png))
    want, _ = gaussdiff.load(os.path.join(ROOT, "models", "fashion-cond-edm"), device="cpu").sample(
        4, "euler", 12, seed=5, labels=[7] * 4, progress=False,
        guidance=Guidance(cfg_scale=2.0))
    np.testing.assert_array_equal(got, make_grid(want)[..., 0])


def test_a_bad_value_is_shown_as_the_servers_error(server, browser):
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    box = browser.find_element(By.ID, "steps")
    box.clear()
    box.send_keys("500")
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: "limit" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    screenshot(browser, "playground-error.png")

