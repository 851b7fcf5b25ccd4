"""What the demo page does when a button is pressed, as plain functions of a Pipeline (no Gradio here).

Every handler returns its result and a status message; bad input (an empty prompt, a number out of range, a
file that is not an image) becomes a one-line message for the page, never an exception or a stack trace.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image

from mmar.pipeline import Pipeline

log = logging.getLogger("mmar.demo")

MAX_IMAGES = 16  # per press of the button: keeps one request short on a CPU
MAX_PROMPTS = 8

Progress = Callable[[int, int], None]


def _failure(e: Exception) -> str:
    if isinstance(e, (ValueError, OSError)):
        return f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    log.exception("demo handler failed")  # the traceback goes to the server's log, not to the page
    return f"error: internal error ({type(e).__name__}); see the server log"


def _as_int(name: str, value, low: int, high: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if f != f or f != int(f) or not low <= f <= high:
        raise ValueError(f"{name} must be a whole number in {low}..{high}, got {value!r}")
    return int(f)


def _prompts(text) -> list[str]:
    prompts = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("type a prompt (one per line for several)")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
    return prompts


def draw_images(pipe: Pipeline, prompt, n, cfg, temperature, seed,
                progress: Progress | None = None) -> tuple[list[tuple[Image.Image, str]], str]:
    """Text-to-image: ([(image, its prompt)], status). Several prompts: one per line."""
    try:
        prompts = _prompts(prompt)
        n = _as_int("number of images", n, 1, MAX_IMAGES)
        if len(prompts) * n > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} images at once ({len(prompts)} prompts x {n})")
        seed = _as_int("seed", seed, 0, 2**31 - 1)
        if getattr(getattr(getattr(pipe, "bundle", None), "objective", None), "continuous", False):
            temperature = None  # flow matching (xAR) has no temperature: the page's slider does not apply
        images = pipe.text_to_image(prompts, n=n, cfg=cfg, temperature=temperature, seed=seed, progress=progress)
    except Exception as e:  # noqa: BLE001 - everything becomes a message on the page
        return [], _failure(e)
    labels = [f"{p} (seed {seed + j})" for p in prompts for j in range(n)]
    return list(zip(images, labels)), f"drew {len(images)} image{'s' if len(images) > 1 else ''}"


def caption_image(pipe: Pipeline, image) -> tuple[str, str]:
    """Captioning: (caption, status). `image` is a PIL image or a file path (what the page uploaded)."""
    try:
        if image is None:
            raise ValueError("upload an image first")
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise ValueError(f"{image}: no such file")
        [text] = pipe.caption([image])
    except Exception as e:  # noqa: BLE001
        return "", _failure(e)
    return text, "captioned" if text else "the model wrote an empty caption"


def model_view(pipe: Pipeline, image) -> Image.Image:
    """The image as the model reads it: converted to its channels and resized to its size."""
    from vision_tokenizers.image_io import load_image, pil_to_tensor, tensor_to_pil

    c, s = pipe.image_channels, pipe.image_size
    x = pil_to_tensor(image, c, s) if isinstance(image, Image.Image) else load_image(image, c, s)
    return tensor_to_pil(x)


def draw_videos(pipe: Pipeline, prompt, n, cfg, temperature, seed, fps=8,
                progress: Progress | None = None, out_dir: str | Path | None = None) -> tuple[list[tuple[str, str]], str]:
    """Text-to-video: ([(path of an animated GIF, its prompt)], status)."""
    try:
        prompts = _prompts(prompt)
        n = _as_int("number of videos", n, 1, 4)
        seed = _as_int("seed", seed, 0, 2**31 - 1)
        fps = _as_int("frames per second", fps, 1, 60)
        videos = pipe.text_to_video(prompts, n=n, cfg=cfg, temperature=temperature, seed=seed, progress=progress)
        out = Path(out_dir or tempfile.mkdtemp(prefix="mmar_demo_"))
        out.mkdir(parents=True, exist_ok=True)
        items = []
        for k, frames in enumerate(videos):
            path = out / f"video_{k:02d}.gif"
            big = [f.resize((f.width * 4, f.height * 4), Image.NEAREST) for f in frames]
            big[0].save(path, save_all=True, append_images=big[1:], duration=int(1000 / fps), loop=0)
            items.append((str(path), f"{prompts[k // n]} (seed {seed + k % n})"))
    except Exception as e:  # noqa: BLE001
        return [], _failure(e)
    return items, f"drew {len(items)} video{'s' if len(items) > 1 else ''}"
