"""Draw images from text: `python -m generate.text_to_image --ckpt results/demo/lm --prompt "a handwritten 7"`.

Writes <out>/<prompt index>_<sample>.png for every image and <out>/grid.png (one row per prompt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from generate.common import HelpFormatter, add_common, add_drawing_args, check_drawing_args, load, run_main
from generate.pipeline import forward_progress, text_to_image, tqdm_progress
from vision_tokenizers.image_io import grid, save_png


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common(p)
    add_drawing_args(p, n=4, what="images")
    p.add_argument("--steps", type=int, default=None,
                   help="flow steps per entity for an xAR checkpoint (default: the checkpoint's)")
    p.add_argument("--sampler", choices=["euler", "em"], default=None,
                   help="xAR flow sampler: Euler or Euler-Maruyama (default: the checkpoint's)")
    p.add_argument("--out", default="results/t2i", help="output folder (one PNG per image + grid.png)")
    args = p.parse_args(argv)
    check_drawing_args(p, args)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    bundle, gen = load(args)
    passes = bundle.vision.num_tokens + 1  # prefill + one pass per code (an upper bound)
    with forward_progress(bundle.lm, passes, tqdm_progress("drawing")):
        images = text_to_image(bundle, args.prompt, args.n, cfg=args.cfg, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, generator=gen, steps=args.steps,
                               sampler=args.sampler).cpu()
    out = Path(args.out)
    # Everything is generated before the first write, and each PNG is written atomically.
    for i in range(len(args.prompt)):
        for j in range(args.n):
            save_png(images[i * args.n + j], out / f"{i:03d}_{j:02d}.png")
    (out / "prompts.txt").write_text("\n".join(args.prompt) + "\n")
    save_png(grid(images, nrow=args.n), out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
