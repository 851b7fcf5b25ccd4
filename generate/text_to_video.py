"""Draw videos from text: `python -m generate.text_to_video --ckpt results/video/lm --prompt "a 3 moving up"`.

Writes, per video, <out>/<prompt index>_<sample>.mp4 (PyAV), .gif (animated) and _strip.png (the frames side
by side), plus <out>/prompts.txt. Whether decoding goes token by token or block by block is what the
checkpoint's objective says (next-token or next-block prediction).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.io import atomic_write, write_text_atomic
from generate.common import HelpFormatter, add_common, add_drawing_args, check_drawing_args, load, run_main
from generate.pipeline import text_to_video
from vision_tokenizers.image_io import save_png
from vision_tokenizers.video_io import frame_strip, write_gif, write_mp4


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common(p)
    add_drawing_args(p, n=1, what="videos")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the written videos")
    p.add_argument("--out", default="results/t2v", help="output folder")
    args = p.parse_args(argv)
    check_drawing_args(p, args)
    if args.fps < 1:
        p.error(f"--fps must be >= 1, got {args.fps}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    bundle, gen = load(args)
    videos = text_to_video(bundle, args.prompt, args.n, cfg=args.cfg, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, generator=gen).cpu()  # [N, C, T, H, W]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Everything is generated before the first write, and each file is written atomically.
    for i in range(len(args.prompt)):
        for j in range(args.n):
            v, stem = videos[i * args.n + j], out / f"{i:03d}_{j:02d}"
            with atomic_write(stem.with_suffix(".mp4")) as tmp:
                write_mp4(v, tmp, args.fps)
            with atomic_write(stem.with_suffix(".gif")) as tmp:
                write_gif(v, tmp, args.fps)
            save_png(frame_strip(v), out / f"{stem.name}_strip.png")
    write_text_atomic(out / "prompts.txt", "\n".join(args.prompt) + "\n")
    print(f"wrote {len(videos)} videos (.mp4, .gif, _strip.png) to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
