"""The demo page's handlers, called directly (no browser, no web library): results, progress, and bad input
turned into a one-line message for the page."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmar import Pipeline
from mmar.demo import handlers


@pytest.fixture(scope="module")
def pipe(tiny_bundle_dir):
    return Pipeline.from_pretrained(tiny_bundle_dir)


def test_draw_images_matches_the_api_and_reports_progress(pipe):
    seen = []
    items, status = handlers.draw_images(pipe, "a handwritten 7\na handwritten 1", 2, 3.0, 1.0, 5,
                                         progress=lambda d, t: seen.append((d, t)))
    assert status == "drew 4 images" and len(items) == 4
    assert [label for _, label in items] == ["a handwritten 7 (seed 5)", "a handwritten 7 (seed 6)",
                                             "a handwritten 1 (seed 5)", "a handwritten 1 (seed 6)"]
    want = pipe.text_to_image(["a handwritten 7", "a handwritten 1"], n=2, cfg=3.0, temperature=1.0, seed=5)
    for (img, _), ref in zip(items, want):
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))
    assert seen and seen[-1][0] == seen[-1][1]
    items, status = handlers.draw_images(pipe, "a 3", 1.0, 1, 0, 0.0)  # numbers as the page sends them (floats)
    assert status == "drew 1 image" and len(items) == 1


@pytest.mark.parametrize("prompt,n,cfg,temperature,seed,message", [
    ("", 1, 3, 1, 0, "error: type a prompt"),
    ("   \n  ", 1, 3, 1, 0, "error: type a prompt"),
    ("x", 0, 3, 1, 0, "error: number of images must be a whole number in 1..16"),
    ("x", 2.5, 3, 1, 0, "error: number of images must be a whole number"),
    ("x", None, 3, 1, 0, "error: number of images must be a whole number"),
    ("x\ny\nz", 6, 3, 1, 0, "error: at most 16 images at once"),
    ("\n".join("p" * 9), 1, 3, 1, 0, "error: at most 8 prompts"),
    ("x", 1, float("nan"), 1, 0, "error: cfg must be a finite number"),
    ("x", 1, 3, -0.5, 0, "error: temperature must be a finite number >= 0"),
    ("x", 1, 3, 1, -1, "error: seed must be a whole number"),
    ("x", 1, "abc", 1, 0, "error: cfg must be a number"),
])
def test_bad_drawing_input_is_a_message(pipe, prompt, n, cfg, temperature, seed, message):
    items, status = handlers.draw_images(pipe, prompt, n, cfg, temperature, seed)
    assert items == [] and status.startswith(message), status
    assert "\n" not in status and "Traceback" not in status


def test_caption_image(pipe, tmp_path):
    img = Image.fromarray((np.random.default_rng(1).random((50, 50, 3)) * 255).astype(np.uint8))
    text, status = handlers.caption_image(pipe, img)
    assert text == pipe.caption([img])[0] and status in ("captioned", "the model wrote an empty caption")
    path = tmp_path / "a.png"
    img.save(path)
    assert handlers.caption_image(pipe, str(path))[0] == text


def test_bad_caption_input_is_a_message(pipe, tmp_path):
    assert handlers.caption_image(pipe, None) == ("", "error: upload an image first")
    text, status = handlers.caption_image(pipe, str(tmp_path / "gone.png"))
    assert text == "" and status.startswith("error:") and "no such file" in status
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    text, status = handlers.caption_image(pipe, str(bad))
    assert text == "" and status.startswith("error:") and "cannot read image" in status


def test_video_on_an_image_checkpoint_is_a_message(pipe, tmp_path):
    items, status = handlers.draw_videos(pipe, "a 3 moving up", 1, 3, 1, 0, out_dir=tmp_path)
    assert items == [] and status.startswith("error: this checkpoint cannot make videos")


def test_draw_videos_writes_gifs(caption_tokenizer, tmp_path):
    import torch
    from models.bundle import Bundle
    from models.config import LMConfig
    from models.objectives import NextTokenPrediction
    from models.transformer import Transformer
    from models.vocab import VocabLayout
    from vision_tokenizers.video import VideoTokenizer, VideoTokenizerConfig

    torch.manual_seed(0)
    vision = VideoTokenizer(VideoTokenizerConfig(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16],
                                                 spatial_down=[True], time_down=[True], levels=[5, 4])).eval()
    layout = VocabLayout(caption_tokenizer.vocab_size, 20)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=72)).eval()
    vp = Pipeline(Bundle(lm, caption_tokenizer, layout, vision, 72, NextTokenPrediction()))
    items, status = handlers.draw_videos(vp, "a 3 moving up", 2, 3, 1, 0, fps=8, out_dir=tmp_path)
    assert status == "drew 2 videos" and len(items) == 2
    with Image.open(items[0][0]) as gif:
        assert gif.n_frames == 5 and gif.size == (128, 128)
    assert handlers.draw_images(vp, "a 3", 1, 3, 1, 0)[1].startswith("error: this checkpoint draws videos")


class Broken:
    def text_to_image(self, *a, **k):
        raise RuntimeError("boom\nwith a second line")

    def caption(self, *a, **k):
        raise RuntimeError("boom")


def test_unexpected_failures_show_one_line_not_a_traceback(caplog):
    items, status = handlers.draw_images(Broken(), "x", 1, 3, 1, 0)
    assert items == [] and status == "error: internal error (RuntimeError); see the server log"
    assert handlers.caption_image(Broken(), Image.new("L", (8, 8)))[1].startswith("error: internal error")
    assert "Traceback" in caplog.text  # the server log keeps it


def test_the_page_has_the_tabs_of_the_checkpoint(pipe):
    from mmar.demo.app import build

    app = build(pipe)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"tab-t2i", "tab-caption", "t2i-prompt", "t2i-draw", "t2i-gallery", "caption-file", "caption-seen"} <= ids
    assert "tab-t2v" not in ids


def test_model_view_is_what_the_model_reads(pipe, tmp_path):
    img = Image.fromarray((np.random.default_rng(2).random((30, 20, 3)) * 255).astype(np.uint8))
    img.save(tmp_path / "a.png")
    for source in (img, str(tmp_path / "a.png")):
        view = handlers.model_view(pipe, source)
        assert view.size == (8, 8) and view.mode == "L"
