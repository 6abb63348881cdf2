"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium; nothing is downloaded) opens ``/fabric/`` on a live
fabric, finds the usage bars and the names, filters them by prefix, opens a 2-D variable
and sees its image.  ``DATAFABRIC_SCREENSHOTS=DIR`` keeps the screenshots there."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.http_helpers import http_port

pytest_plugins = ("tests.http_helpers",)

INSTALL = "install a browser with `apt-get install -y chromium chromium-driver` and `pip install selenium`"


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed: {INSTALL}")
    if chromium is None or driver is None:
        pytest.skip(f"no chromium or chromedriver on PATH: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    with webdriver.Chrome(options=options, service=Service(executable_path=driver)) as browser:
        yield browser


def wait(browser, predicate, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: predicate(b))


def shot(browser, tmp_path, name):
    path = tmp_path / name
    browser.save_screenshot(str(path))
    keep = os.environ.get("DATAFABRIC_SCREENSHOTS")
    if keep:
        shutil.copy(path, os.path.join(keep, name))


def test_the_page_shows_blocks_names_and_an_image(browser, hcluster, hfabric, tmp_path):
    from selenium.webdriver.common.by import By

    y, x = np.mgrid[0:300, 0:400]
    field = np.sin(x / 30.0) * np.cos(y / 20.0)
    hfabric.insert("run1/field", "a 2-D field", np.float64, field)
    hfabric.insert("run1/temps", "2 m air temperature", np.float32, np.linspace(250, 300, 1000, dtype=np.float32))
    hfabric.insert("run2/<b>bold</b>", "a name that is not markup", np.int8, np.arange(4, dtype=np.int8))
    browser.get(f"http://127.0.0.1:{http_port(hcluster)}/fabric/")

    bars = wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".bar"))
    assert len(bars) == len(hfabric.status())
    rows = wait(
        browser,
        lambda b: (
            len(b.find_elements(By.CSS_SELECTOR, "#names tr")) == 3 and b.find_elements(By.CSS_SELECTOR, "#names tr")
        ),
    )
    assert [r.find_element(By.TAG_NAME, "a").text for r in rows] == ["run1/field", "run1/temps", "run2/<b>bold</b>"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#names b")  # a name is text, never markup
    shot(browser, tmp_path, "page.png")

    browser.find_element(By.ID, "prefix").send_keys("run2/")
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#names tr")) == 1)

    browser.find_element(By.ID, "prefix").clear()
    browser.get(browser.current_url.split("?")[0] + "?name=run1%2Ffield")
    image = wait(
        browser,
        lambda b: b.execute_script(
            "const i = document.getElementById('image'); return i.complete && i.naturalWidth && i;"
        ),
    )
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [400, 300]
    wait(browser, lambda b: b.find_element(By.ID, "values").text.startswith("shape [8,8]"))
    rows = browser.find_element(By.ID, "values").text.split("\n")[1:]
    assert [json.loads(row) for row in rows] == field[:8, :8].tolist()
    shot(browser, tmp_path, "variable.png")


def test_the_page_lists_a_dataset_and_shows_its_image(browser, hcluster, hfabric, tmp_path):
    from selenium.webdriver.common.by import By

    y, x = np.mgrid[0:200, 0:300]
    field = np.cos(x / 25.0) * np.sin(y / 15.0)
    with hfabric.create_dataset("ds/field", shape=field.shape, dtype=np.float64, chunks=(64, 64), doc="chunked") as ds:
        ds[:, :150] = field[:, :150]  # the right half is never written: the fill value
    truth = field.copy()
    truth[:, 150:] = 0.0
    browser.get(f"http://127.0.0.1:{http_port(hcluster)}/fabric/")
    rows = wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#names tr"))
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == ["ds/field", "dataset", "chunked"] and cells[5] == "chunks [64,64]"
    assert not any(".dfab/" in r.text for r in rows)  # its chunks are not listed

    browser.get(browser.current_url.split("?")[0] + "?name=ds%2Ffield")
    image = wait(
        browser,
        lambda b: b.execute_script(
            "const i = document.getElementById('image'); return i.complete && i.naturalWidth && i;"
        ),
    )
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [300, 200]
    wait(browser, lambda b: b.find_element(By.ID, "values").text.startswith("shape [8,8]"))
    values = browser.find_element(By.ID, "values").text.split("\n")[1:]
    assert [json.loads(row) for row in values] == truth[:8, :8].tolist()
    assert "20 of 20 chunks" not in browser.find_element(By.ID, "vinfo").text
    assert "12 of 20 chunks" in browser.find_element(By.ID, "vinfo").text  # 4 rows of chunks, 3 of 5 columns
    shot(browser, tmp_path, "dataset.png")
