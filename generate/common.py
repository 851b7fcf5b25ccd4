"""Command-line plumbing shared by the generate scripts: checkpoint loading, seeds, one-line errors."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from models.bundle import Bundle, load_bundle


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' docstring layout and shows every option's default in --help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="inference folder or Lightning .ckpt of a trained LM")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (0 = greedy; default: the model's saved setting)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; off when unset")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--int8", action="store_true",
                   help="int8 dynamic quantisation of the LM's linear layers (CPU only; see models/quantize.py)")


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.temperature is not None and (not math.isfinite(args.temperature) or args.temperature < 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")


def add_drawing_args(p: argparse.ArgumentParser, n: int, what: str) -> None:
    """Flags shared by the text-to-image and text-to-video scripts (prompts, count, guidance, top-k)."""
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line (UTF-8)")
    p.add_argument("--n", type=int, default=n, help=f"{what} per prompt")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1 = off; default: the model's saved setting)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens; off when unset")


def check_drawing_args(p: argparse.ArgumentParser, args) -> None:
    """Validate add_common's and add_drawing_args' flags; read the prompts file into args.prompt."""
    check_args(p, args)
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


def load(args) -> tuple[Bundle, torch.Generator]:
    torch.manual_seed(args.seed)
    bundle = load_bundle(args.ckpt, args.device)
    if getattr(args, "int8", False):
        from models.quantize import quantize_int8
        bundle = quantize_int8(bundle)
    return bundle, torch.Generator(device=args.device).manual_seed(args.seed)


def run_main(fn, argv=None) -> int:
    """Run a script body; user-facing errors become one line on stderr and exit code 2."""
    try:
        fn(argv)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
