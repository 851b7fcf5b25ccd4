"""Command-line plumbing shared by the generate scripts: checkpoint loading, seeds, one-line errors."""
from __future__ import annotations

import argparse
import sys

import torch

from models.bundle import Bundle, load_bundle


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="inference folder or Lightning .ckpt of a trained LM")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")


def load(args) -> tuple[Bundle, torch.Generator]:
    torch.manual_seed(args.seed)
    bundle = load_bundle(args.ckpt, args.device)
    return bundle, torch.Generator(device=args.device).manual_seed(args.seed)


def run_main(fn, argv=None) -> int:
    """Run a script body; user-facing errors become one line on stderr and exit code 2."""
    try:
        fn(argv)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
