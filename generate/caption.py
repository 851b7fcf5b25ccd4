"""Caption images: `python -m generate.caption --ckpt results/demo/lm a.png b.jpg some_folder/`.

Prints one `path<TAB>caption` line per image. Images of any size are resized as in training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from generate.common import HelpFormatter, add_common, check_args, load, run_main
from generate.pipeline import caption
from vision_tokenizers.image_io import list_images, load_image


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common(p)
    p.set_defaults(temperature=0.0)
    p.add_argument("images", nargs="*", help="image files or folders")
    p.add_argument("--image", action="append", default=[], help="repeatable, same as a positional path")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest caption, in tokens")
    p.add_argument("--batch-size", type=int, default=64, help="images captioned per model call")
    p.add_argument("--tokens", type=int, default=None,
                   help="visual tokens per image for a TokenFLEX model (a square: 16, 36, 64, ...); unset: the model's")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.tokens is not None and args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    args.images = args.images + args.image
    if not args.images:
        p.error("give at least one image path or folder")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    paths: list[Path] = []
    for item in map(Path, args.images):
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise ValueError(f"{item}: no images in this folder")
            paths.extend(found)
        else:
            paths.append(item)
    bundle, gen = load(args)
    c, s = bundle.image_channels, bundle.image_size
    images = [load_image(p, c, s) for p in paths]  # every file is checked before any output
    for i in tqdm(range(0, len(paths), args.batch_size), desc="captioning", unit="batch", disable=None, leave=False):
        batch = torch.stack(images[i:i + args.batch_size])
        caps = caption(bundle, batch, args.max_new_tokens, args.temperature, args.top_p, gen, tokens=args.tokens)
        for path, cap in zip(paths[i:i + args.batch_size], caps):
            print(f"{path}\t{cap}")


if __name__ == "__main__":
    sys.exit(run_main(main))
