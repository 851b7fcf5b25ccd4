"""The bodies of the `mmar` commands that are not training or evaluation: t2i, t2v, caption, export, demo.

Each is a `<name>_parser()` and a `<name>_main(argv)`; mmar/cli.py is the table that names them.
Everything is drawn or checked before the first file is written, and each file is written atomically.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from models.sampling import CFG_SCHEDULES


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the descriptions' layout and shows every option's default in --help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="inference folder or Lightning .ckpt of a trained LM")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (0 = greedy; default: the model's saved setting)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; off when unset")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--int8", action="store_true",
                   help="int8 dynamic quantisation of the LM's linear layers (CPU only; see models/quantize.py)")
    p.add_argument("--compile", action="store_true",
                   help="decode through the compiled static-cache step (next-token models; same output; the first "
                        "batch shape compiles, about 20-60 s on a small CPU, so it pays off for many images)")


def _check_model_args(p: argparse.ArgumentParser, args) -> None:
    if args.temperature is not None and (not math.isfinite(args.temperature) or args.temperature < 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")


def _add_drawing_args(p: argparse.ArgumentParser, n: int, what: str) -> None:
    """Flags of t2i and t2v: prompts, count, guidance, top-k."""
    _add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line (UTF-8)")
    p.add_argument("--n", type=int, default=n, help=f"{what} per prompt")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1 = off; default: the model's saved setting)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens; off when unset")


def _check_drawing_args(p: argparse.ArgumentParser, args) -> None:
    """Validate the drawing flags; read the prompts file into args.prompt."""
    _check_model_args(p, args)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 0):
        p.error(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if args.prompts_file:
        args.prompt += read_prompts_file(p, args.prompts_file)
    if not args.prompt:
        p.error("give at least one --prompt or a --prompts-file")
    for i, text in enumerate(args.prompt):
        if not text.strip():
            p.error(f"prompt {i + 1} is empty")


def read_prompts_file(p: argparse.ArgumentParser, path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file; a parser error naming the file otherwise."""
    f = Path(path)
    if f.is_dir():
        p.error(f"--prompts-file {f}: is a folder, expected a text file")
    if not f.is_file():
        p.error(f"--prompts-file {f}: file not found")
    try:
        text = f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        p.error(f"--prompts-file {f}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")
    except OSError as e:
        p.error(f"--prompts-file {f}: cannot read ({e.strerror})")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        p.error(f"--prompts-file {f}: no prompts in the file")
    return prompts


def _load(args):
    """(Pipeline, generator seeded --seed) for the checkpoint the flags name."""
    from mmar.pipeline import Pipeline

    torch.manual_seed(args.seed)
    pipe = Pipeline.from_pretrained(args.ckpt, args.device, int8=args.int8, compile=args.compile)
    return pipe, torch.Generator(device=args.device).manual_seed(args.seed)


def tqdm_progress(desc: str):
    """A progress(done, total) callback drawing a tqdm bar on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="pass", disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


# ---- t2i ---------------------------------------------------------------------------------------------

def t2i_parser() -> argparse.ArgumentParser:
    p = _parser("mmar t2i", "Draw images from text. Writes <out>/<prompt index>_<sample>.png for every image,\n"
                            "<out>/grid.png (one row per prompt) and <out>/prompts.txt.")
    _add_drawing_args(p, n=4, what="images")
    p.add_argument("--steps", type=int, default=None,
                   help="flow steps per entity for an xAR checkpoint (default: the checkpoint's)")
    p.add_argument("--sampler", choices=["euler", "em"], default=None,
                   help="xAR flow sampler: Euler or Euler-Maruyama (default: the checkpoint's)")
    p.add_argument("--cfg-schedule", choices=list(CFG_SCHEDULES), default=None,
                   help="xAR guidance across entities: linear (1 -> cfg) or constant (default: the checkpoint's)")
    p.add_argument("--out", default="results/t2i", help="output folder (one PNG per image + grid.png)")
    return p


def t2i_main(argv: list[str]) -> None:
    from common.io import write_text_atomic
    from mmar.pipeline import forward_progress
    from vision_tokenizers.image_io import grid, save_png

    p = t2i_parser()
    args = p.parse_args(argv)
    _check_drawing_args(p, args)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    pipe, gen = _load(args)
    passes = pipe.bundle.vision.num_tokens + 1  # prefill + one pass per code (an upper bound)
    with forward_progress(pipe.bundle.lm, passes, tqdm_progress("drawing")):
        images = pipe.draw_images(args.prompt, args.n, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, generator=gen, steps=args.steps, sampler=args.sampler,
                                  cfg_schedule=args.cfg_schedule).cpu()
    out = Path(args.out)
    for i in range(len(args.prompt)):
        for j in range(args.n):
            save_png(images[i * args.n + j], out / f"{i:03d}_{j:02d}.png")
    write_text_atomic(out / "prompts.txt", "\n".join(args.prompt) + "\n")
    save_png(grid(images, nrow=args.n), out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


# ---- t2v ---------------------------------------------------------------------------------------------

def t2v_parser() -> argparse.ArgumentParser:
    p = _parser("mmar t2v", "Draw videos from text. Writes, per video, <out>/<prompt index>_<sample>.mp4 (PyAV),\n"
                            ".gif (animated) and _strip.png (the frames side by side), plus <out>/prompts.txt.\n"
                            "Token- or block-wise decoding is what the checkpoint's objective says (NTP or NBP).")
    _add_drawing_args(p, n=1, what="videos")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the written videos")
    p.add_argument("--out", default="results/t2v", help="output folder")
    return p


def t2v_main(argv: list[str]) -> None:
    from common.io import atomic_write, write_text_atomic
    from vision_tokenizers.image_io import save_png
    from vision_tokenizers.video_io import frame_strip, write_gif, write_mp4

    p = t2v_parser()
    args = p.parse_args(argv)
    _check_drawing_args(p, args)
    if args.fps < 1:
        p.error(f"--fps must be >= 1, got {args.fps}")
    pipe, gen = _load(args)
    videos = pipe.draw_videos(args.prompt, args.n, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, generator=gen).cpu()  # [N, C, T, H, W]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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


# ---- caption -----------------------------------------------------------------------------------------

def caption_parser() -> argparse.ArgumentParser:
    p = _parser("mmar caption", "Caption images: one `path<TAB>caption` line per image. Images of any size are\n"
                                "resized as in training.")
    _add_model_args(p)
    p.set_defaults(temperature=0.0)
    p.add_argument("images", nargs="*", help="image files or folders")
    p.add_argument("--image", action="append", default=[], help="repeatable, same as a positional path")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest caption, in tokens")
    p.add_argument("--batch-size", type=int, default=64, help="images captioned per model call")
    p.add_argument("--tokens", type=int, default=None,
                   help="visual tokens per image for a TokenFLEX model (a square: 16, 36, 64, ...); unset: the model's")
    return p


def caption_main(argv: list[str]) -> None:
    from tqdm import tqdm

    from vision_tokenizers.image_io import list_images, load_image

    p = caption_parser()
    args = p.parse_args(argv)
    _check_model_args(p, args)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.tokens is not None and args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    if not args.images + args.image:
        p.error("give at least one image path or folder")
    paths: list[Path] = []
    for item in map(Path, args.images + args.image):
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise ValueError(f"{item}: no images in this folder")
            paths.extend(found)
        else:
            paths.append(item)
    pipe, gen = _load(args)
    images = [load_image(f, pipe.image_channels, pipe.image_size) for f in paths]  # every file checked first
    bs = args.batch_size
    for i in tqdm(range(0, len(paths), bs), desc="captioning", unit="batch", disable=None, leave=False):
        caps = pipe.draw_captions(torch.stack(images[i:i + bs]), args.max_new_tokens, args.temperature, args.top_p,
                                  gen, tokens=args.tokens)
        for path, cap in zip(paths[i:i + bs], caps):
            print(f"{path}\t{cap}")


# ---- export ------------------------------------------------------------------------------------------

def export_parser() -> argparse.ArgumentParser:
    p = _parser("mmar export", "Turn a Lightning .ckpt of the LM module (or an inference folder) into an inference\n"
                               "folder: config.json, model.safetensors, vision_tokenizer.safetensors, tokenizer.json.\n"
                               "The folder appears whole or not at all (written beside the target, then renamed).")
    p.add_argument("ckpt", help="Lightning .ckpt written by the LM training module (or an inference folder)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.add_argument("--hf", choices=("llama", "qwen2", "mistral"), default=None,
                   help="write the LM alone as a Hugging Face checkpoint of this architecture (AutoModelForCausalLM "
                        "loads it; its vocabulary keeps the image-code ids, tokenizer.json covers the text)")
    return p


def export_main(argv: list[str]) -> None:
    from models.bundle import load_bundle

    args = export_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}: folder exists and is not empty (add --overwrite to replace it)")
    bundle = load_bundle(args.ckpt)
    if args.hf:
        import tempfile

        from models.hf import save_hf

        tok = bundle.tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            bundle.tokenizer.save(Path(tmp) / "tokenizer.json")
            save_hf(bundle.lm, out, arch=args.hf, tokenizer_json=Path(tmp) / "tokenizer.json", bos_token_id=tok.bos_id,
                    eos_token_id=tok.eos_id, overwrite=True)
        print(f"wrote {out} (a Hugging Face {args.hf} checkpoint, {bundle.lm.num_params():,} parameters)")
        return
    bundle.save(out)
    print(f"wrote {out} ({bundle.lm.num_params():,} LM parameters, {bundle.vision.num_tokens} tokens per image)")


# ---- demo --------------------------------------------------------------------------------------------

def demo_parser() -> argparse.ArgumentParser:
    p = _parser("mmar demo", "Serve a local web page (Gradio) with text-to-image, captioning and, for video\n"
                             "checkpoints, text-to-video. Needs gradio: `make demo-deps` once (see docs/api.md).")
    p.add_argument("--ckpt", required=True, help="inference folder or Lightning .ckpt of a trained LM")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--int8", action="store_true", help="int8 dynamic quantisation of the LM's linear layers (CPU)")
    return p


def demo_main(argv: list[str]) -> None:
    args = demo_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    from mmar.demo.app import serve

    serve(args.ckpt, host=args.host, port=args.port, device=args.device, int8=args.int8)
