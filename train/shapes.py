"""A small RGB example dataset in the JSONL format users bring their own data in (docs/own_data.md).

`python -m train.shapes --out data/shapes` draws N coloured shapes (default 600; 32 x 32 RGB, 4 shapes x 6
colours, random size, place, rotation and background) and writes

    data/shapes/images/00000.png ...
    data/shapes/shapes.jsonl          one {"image": "images/00000.png", "caption": "a red circle"} per line

which `--data.init_args.source jsonl --data.init_args.path data/shapes/shapes.jsonl` reads (configs/shapes_*.yaml).
Everything is a function of `--seed`. The folder appears whole or not at all (common.weights.atomic_dir).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 130, 30)}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a square / triangle / cross of radius r around (cx, cy), turned by `angle`."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign of arm width 0.7 r
        w = 0.35
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One RGB image: a `colour` `shape` on a plain background (random grey level, slight tint)."""
    grey = rng.randint(0, 90) if rng.random() < 0.5 else rng.randint(150, 250)
    bg = tuple(max(0, min(255, grey + rng.randint(-12, 12))) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.4, 0.4)), fill=fill)
    return img


def caption_of(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def write_shapes(out: str | Path, n: int = 600, seed: int = 0, size: int = 32) -> Path:
    """Writes the dataset (see the module docstring); returns the JSONL's path. Refuses to overwrite."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (remove it or choose another --out)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    from common.weights import atomic_dir

    rng = random.Random(seed)
    classes = [(s, c) for s in SHAPES for c in COLOURS]
    lines = []
    with atomic_dir(out) as tmp:  # removed on error: no half-written dataset
        (tmp / "images").mkdir()
        for i in range(n):
            shape, colour = classes[i % len(classes)] if i < len(classes) else rng.choice(classes)
            name = f"images/{i:05d}.png"
            draw_shape(shape, colour, rng, size).save(tmp / name)
            lines.append(json.dumps({"image": name, "caption": caption_of(shape, colour)}))
        (tmp / "shapes.jsonl").write_text("\n".join(lines) + "\n")
    return out / "shapes.jsonl"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shapes", help="folder to create (must not exist; default: %(default)s)")
    p.add_argument("--n", type=int, default=600, help="number of images (default: %(default)s)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="everything drawn follows from it (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        path = write_shapes(args.out, args.n, args.seed, args.size)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.n} images and {path}")


if __name__ == "__main__":
    main()
