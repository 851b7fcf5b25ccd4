"""Image files <-> tensors in [-1, 1], with one-line errors naming the file, and atomic PNG writes."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.io import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# Decompression-bomb guard: PIL refuses files that declare more pixels than this (a 10,000 x 10,000 image is
# still read and resized; a small file claiming billions of pixels is refused before it is decoded).
MAX_PIXELS = 10_000 * 10_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # PIL warns above this and raises above twice this


def _to_8bit(img: Image.Image) -> Image.Image:
    """Modes PIL cannot convert to L/RGB faithfully, made 8-bit first: 16/32-bit integer greyscale is
    scaled by its range (not clipped at 255), float greyscale by [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img


def pil_to_tensor(img: Image.Image, channels: int, size: int) -> torch.Tensor:
    """PIL image (any mode: palette, RGBA, CMYK, 16-bit, ...) -> [C, size, size] float in [-1, 1],
    converted to L or RGB and resized as trained."""
    img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [H, W] or [H, W, 3]
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)


def load_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """Read PNG/JPEG/... from disk; raise ValueError('<path>: ...') for a missing, unreadable, corrupt or
    animated file, or one declaring more than MAX_PIXELS pixels."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if getattr(img, "n_frames", 1) > 1:
                raise ValueError(f"{path}: animated image with {img.n_frames} frames; give a still image")
            img.load()
            return pil_to_tensor(img, channels, size)
    except PermissionError:
        raise ValueError(f"{path}: cannot read image (permission denied)") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: image too large (more than {MAX_PIXELS:,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from None


def array_to_tensor(arr: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """uint8-range array [H, W] or [H, W, 3] -> [C, size, size] in [-1, 1]."""
    return pil_to_tensor(Image.fromarray(np.asarray(arr, dtype=np.uint8)), channels, size)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] -> PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def save_png(x: torch.Tensor | Image.Image, path: str | Path) -> None:
    """Write a PNG atomically (temp file + rename): a crash never leaves a truncated image."""
    img = x if isinstance(x, Image.Image) else tensor_to_pil(x)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> one [C, H', W'] grid image in [-1, 1]."""
    from torchvision.utils import make_grid

    return make_grid(images.float().clamp(-1, 1), nrow=nrow, padding=2, pad_value=-1.0)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
