"""The web demo in a real headless browser: Debian's Chromium driven by Playwright (`make test-browser`).

Starts `python -m mmar demo` on a free local port with a tiny model, then, like a person: loads the page,
types a prompt, presses Draw and waits for images; uploads a PNG, presses Caption and waits for the text;
and checks that bad input (an empty prompt) shows a message on the page, not a stack trace.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle_dir, tmp_path_factory):
    pytest.importorskip("gradio", reason="make test-browser installs gradio")
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mmar", "demo", "--ckpt", str(tiny_bundle_dir),
                                 "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"demo server did not answer within 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (make test-browser installs Debian's package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="make test-browser installs playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        pg = browser.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(server)
        yield pg
        browser.close()


def test_page_loads_with_tabs(page):
    page.wait_for_selector("#t2i-prompt textarea")
    assert page.get_by_role("tab", name="Text to image").is_visible()
    assert page.get_by_role("tab", name="Caption an image").is_visible()
    assert page.get_by_role("tab", name="Text to video").count() == 0  # an image checkpoint


def test_type_a_prompt_get_images(page, tmp_path):
    page.get_by_role("tab", name="Text to image").click()
    page.fill("#t2i-prompt textarea", "a handwritten 7")
    page.click("#t2i-draw")
    page.wait_for_function("document.querySelector('#t2i-status')?.innerText.includes('drew')")
    assert "drew 4 images" in page.inner_text("#t2i-status")
    imgs = page.locator("#t2i-gallery img")
    imgs.first.wait_for()
    assert imgs.count() >= 4
    page.wait_for_function("[...document.querySelectorAll('#t2i-gallery img')].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "t2i.png"))


def test_bad_input_shows_a_message(page):
    page.get_by_role("tab", name="Text to image").click()
    page.fill("#t2i-prompt textarea", "   ")
    page.click("#t2i-draw")
    page.wait_for_function("document.querySelector('#t2i-status')?.innerText.includes('error')")
    text = page.inner_text("#t2i-status")
    assert "type a prompt" in text and "Traceback" not in page.content()


def test_upload_an_image_get_a_caption(page, tmp_path):
    png = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(png)
    page.get_by_role("tab", name="Caption an image").click()
    page.locator("#caption-image input[type=file]").set_input_files(str(png))
    page.wait_for_selector("#caption-image img")
    page.click("#caption-go")
    # the status line also holds Gradio's "processing" tracker while the request runs: wait for our words
    page.wait_for_function("/captioned|empty caption|error/.test(document.querySelector('#caption-status')?.innerText)")
    status = page.inner_text("#caption-status")
    assert status.startswith("captioned"), status
    assert page.input_value("#caption-text textarea").strip()
    page.screenshot(path=str(tmp_path / "caption.png"))
