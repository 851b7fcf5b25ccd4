"""Image files <-> tensors in [-1, 1], with one-line errors naming the file, and atomic PNG writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.io import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def pil_to_tensor(img: Image.Image, channels: int, size: int) -> torch.Tensor:
    """PIL image -> [C, size, size] float in [-1, 1] (converted to L or RGB, resized as trained)."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [H, W] or [H, W, 3]
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)


def load_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """Read PNG/JPEG/... from disk; raise ValueError('<path>: ...') for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img, channels, size)
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
