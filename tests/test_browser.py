"""The web demo in a real headless browser: Debian's Chromium driven by Playwright (`make test-browser`).

Starts `python -m mmar demo` on a free local port with a tiny model, then, like a person: loads the page,
types a prompt, presses Draw and waits for images; uploads a PNG, presses Caption and waits for the text;
checks that bad input (an empty prompt) shows a message on the page, not a stack trace; and, with a tiny
video checkpoint, that only the text-to-video tab is shown and it draws an animated GIF.
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


class Server:
    """`python -m mmar demo --ckpt <model>` on a free local port, stopped on exit."""

    def __init__(self, ckpt, log):
        self.port, self.log = _free_port(), log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "mmar", "demo", "--ckpt", str(ckpt),
                                          "--port", str(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}/"

    def wait(self, seconds=120):
        deadline = time.time() + seconds
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"demo server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"demo server did not answer within {seconds} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (make test-browser installs Debian's package)")
    pytest.importorskip("gradio", reason="make test-browser installs gradio")
    sync_api = pytest.importorskip("playwright.sync_api", reason="make test-browser installs playwright")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser, tiny_bundle_dir, tmp_path_factory):
    srv = Server(tiny_bundle_dir, tmp_path_factory.mktemp("demo") / "server.log")
    try:
        yield srv.wait()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def page(browser, server):
    pg = browser.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(server)
    yield pg
    pg.close()


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


def _upload(page, path):
    page.get_by_role("tab", name="Caption an image").click()
    clear = page.locator("#caption-file button[aria-label='Clear']")
    if clear.count():  # a file from an earlier test is still there: remove it as a person would
        clear.first.click()
    page.locator("#caption-file input[type=file]").set_input_files(str(path))
    page.wait_for_function(f"document.querySelector('#caption-file')?.innerText.includes('{path.name}')")


def test_upload_an_image_get_a_caption(page, tmp_path):
    png = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((56, 40)) * 255).astype(np.uint8)).save(png)
    _upload(page, png)
    page.click("#caption-go")
    # the status line also holds Gradio's "processing" tracker while the request runs: wait for our words
    page.wait_for_function("/captioned|empty caption|error/.test(document.querySelector('#caption-status')?.innerText)")
    status = page.inner_text("#caption-status")
    assert status.startswith("captioned"), status
    assert page.input_value("#caption-text textarea").strip()
    page.locator("#caption-seen img").wait_for()  # the 8x8 view the model read, enlarged
    page.screenshot(path=str(tmp_path / "caption.png"))


def test_upload_a_file_that_is_not_an_image_shows_a_message(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a PNG")
    _upload(page, bad)
    page.click("#caption-go")
    page.wait_for_function("/error/.test(document.querySelector('#caption-status')?.innerText)")
    status = page.inner_text("#caption-status")
    assert status.startswith("error: notes.png: cannot read image"), status
    assert "Traceback" not in page.content() and "/tmp/" not in status  # no server paths on the page
    assert page.input_value("#caption-text textarea") == ""


def test_video_checkpoint_shows_the_video_tab_and_draws(browser, caption_tokenizer, tmp_path):
    import torch

    from models.bundle import Bundle
    from models.config import LMConfig
    from models.objectives import NextTokenPrediction
    from models.transformer import Transformer
    from models.vocab import VocabLayout
    from vision_tokenizers.video import VideoTokenizer, VideoTokenizerConfig

    torch.manual_seed(0)
    vision = VideoTokenizer(VideoTokenizerConfig(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16],
                                                 spatial_down=[True], time_down=[True], levels=[5, 4]))
    layout = VocabLayout(caption_tokenizer.vocab_size, 20)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=72))
    Bundle(lm, caption_tokenizer, layout, vision, 72, NextTokenPrediction()).save(tmp_path / "video")
    srv = Server(tmp_path / "video", tmp_path / "server.log")
    try:
        pg = browser.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(srv.wait())
        pg.wait_for_selector("#t2v-prompt textarea")
        assert pg.get_by_role("tab", name="Text to image").count() == 0
        pg.fill("#t2v-prompt textarea", "a 3 moving up")
        pg.click("#t2v-draw")
        pg.wait_for_function("document.querySelector('#t2v-status')?.innerText.includes('drew')")
        assert "drew 1 video" in pg.inner_text("#t2v-status")
        pg.locator("#t2v-gallery img").first.wait_for()
        assert pg.locator("#t2v-gallery img").first.get_attribute("src")
        pg.close()
    finally:
        srv.stop()
