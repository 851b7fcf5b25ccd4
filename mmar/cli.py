"""`mmar`: one command for training, generation, evaluation, export and the web demo.

Every subcommand either delegates to an existing entry point with the same flags (fit/validate ->
the LightningCLI of `python -m train`; t2i/t2v/caption -> the `generate.*` scripts) or is defined here
(eval, export, demo). Errors are one line on stderr and a non-zero exit code, never a traceback
(MMAR_DEBUG=1 shows it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import textwrap

# name -> (one-line summary, examples shown at the end of its --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("train a tokenizer or an LM (LightningCLI, same flags as `python -m train fit`)", """\
        mmar fit --config configs/mnist_vq.yaml
        mmar fit --config configs/mnist_lm.yaml --trainer.max_epochs 4
        mmar fit --config configs/mnist_lm.yaml --ckpt_path last     # resume
        mmar fit --config configs/mnist_lm.yaml --print_config       # the full resolved recipe"""),
    "validate": ("run the validation loop on a checkpoint (LightningCLI)", """\
        mmar validate --config configs/mnist_lm.yaml --ckpt_path results/demo/lm.ckpt"""),
    "t2i": ("text -> image: PNGs + grid.png (same flags as `python -m generate.text_to_image`)", """\
        mmar t2i --ckpt results/demo/lm --prompt "a handwritten 7" --n 8 --out results/t2i
        mmar t2i --ckpt results/demo/lm.ckpt --prompts-file prompts.txt --cfg 3 --temperature 0.8 --seed 1"""),
    "t2v": ("text -> video: mp4 + GIF + frame strip (same flags as `python -m generate.text_to_video`)", """\
        mmar t2v --ckpt results/video/lm --prompt "a 3 moving up" --n 2 --out results/t2v"""),
    "caption": ("image -> text: prints path<TAB>caption (same flags as `python -m generate.caption`)", """\
        mmar caption --ckpt results/demo/lm results/t2i/000_00.png
        mmar caption --ckpt results/demo/lm some_folder/ --batch-size 32"""),
    "eval": ("metrics of a checkpoint on a data source: t2i classifier accuracy, caption accuracy, FID", """\
        mmar eval --ckpt results/demo/lm --source mnist                       # the demo's held-out split
        mmar eval --ckpt results/demo/lm --source mnist --per-class 5 --captions 100 --out eval.json
        mmar eval --ckpt my_lm.ckpt --source jsonl --path data/train.jsonl --holdout 100"""),
    "export": ("a Lightning .ckpt of the LM -> an inference folder (written atomically)", """\
        mmar export results/demo/lm.ckpt results/demo/lm_export
        mmar export lightning_logs/lm/checkpoints/last.ckpt my_model --overwrite"""),
    "demo": ("serve the web demo (text-to-image, captioning, text-to-video) on a local port", """\
        mmar demo --ckpt results/demo/lm                  # then open http://127.0.0.1:7860
        mmar demo --ckpt results/demo/lm.ckpt --port 8080 --int8"""),
}


def _examples(cmd: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(COMMANDS[cmd][1]), "  ") + "\n"


def top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (summary, _) in COMMANDS.items()]
    return (
        "usage: mmar <command> [options]    (mmar <command> --help for its options and examples)\n\n"
        "Multimodal autoregressive generation: vision tokenizers + one decoder-only LM.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "examples:\n"
        "  mmar fit --config configs/mnist_lm.yaml\n"
        "  mmar t2i --ckpt results/demo/lm --prompt \"a handwritten 7\" --n 4\n"
        "  mmar caption --ckpt results/demo/lm results/t2i/000_00.png\n"
        "  mmar eval --ckpt results/demo/lm --source mnist\n"
        "  mmar demo --ckpt results/demo/lm\n\n"
        "Python: from mmar import Pipeline (docs/api.md). The `python -m train` / `python -m generate.*`\n"
        "entry points keep working with the same flags.\n"
    )


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


@contextlib.contextmanager
def _prog(name: str):
    """Make delegated argparse/jsonargparse parsers print `mmar <cmd>` as their program name."""
    old = sys.argv
    sys.argv = [name, *old[1:]]
    try:
        yield
    finally:
        sys.argv = old


def _help_with_examples(cmd: str, run) -> int:
    """Run a delegated entry point that prints its help and exits, then add our examples."""
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
    sys.stdout.write(buf.getvalue().rstrip("\n") + "\n\n" + _examples(cmd))
    return code


@contextlib.contextmanager
def _short_parse_errors(cmd: str):
    """jsonargparse answers a bad flag with the whole usage (50+ lines) and then the error; print only the
    error, on one line (MMAR_DEBUG=1 keeps jsonargparse's own behaviour)."""
    import jsonargparse

    original = jsonargparse.ArgumentParser.error

    def error(self, message, ex=None):
        if os.environ.get("MMAR_DEBUG"):
            return original(self, message, ex)
        first = str(message).strip().splitlines()[0] if str(message).strip() else "invalid arguments"
        sys.stderr.write(f"error: {first} (see mmar {cmd} --help)\n")
        sys.exit(2)

    jsonargparse.ArgumentParser.error = error
    try:
        yield
    finally:
        jsonargparse.ArgumentParser.error = original


def _lightning(cmd: str, rest: list[str]) -> int:
    from train.cli import console_main

    def run():
        old = sys.argv
        sys.argv = ["mmar", cmd, *rest]
        try:
            with _short_parse_errors(cmd):
                console_main()
        finally:
            sys.argv = old

    if _wants_help(rest):
        return _help_with_examples(cmd, run)
    try:
        run()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _generate(cmd: str, rest: list[str]) -> int:
    from generate.common import run_main

    if cmd == "t2i":
        from generate.text_to_image import main as target
    elif cmd == "t2v":
        from generate.text_to_video import main as target
    else:
        from generate.caption import main as target
    with _prog(f"mmar {cmd}"):
        if _wants_help(rest):
            return _help_with_examples(cmd, lambda: target(rest))
        try:
            return run_main(target, rest)
        except SystemExit as e:  # argparse errors: usage + one line, exit 2
            return e.code if isinstance(e.code, int) else 1


# ---- export -----------------------------------------------------------------------------------------

def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmar export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn a Lightning .ckpt of the LM module (or an inference folder) into an inference folder:\n"
                    "config.json, model.safetensors, vision_tokenizer.safetensors, tokenizer.json. The folder\n"
                    "appears whole or not at all (written beside the target, then renamed).",
        epilog=_examples("export"))
    p.add_argument("ckpt", help="Lightning .ckpt written by the LM training module (or an inference folder)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    return p


def export_main(argv: list[str]) -> None:
    from pathlib import Path

    args = export_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}: folder exists and is not empty (add --overwrite to replace it)")
    from models.bundle import load_bundle

    bundle = load_bundle(args.ckpt)
    bundle.save(out)
    print(f"wrote {out} ({bundle.lm.num_params():,} LM parameters, {bundle.vision.num_tokens} tokens per image)")


# ---- demo -------------------------------------------------------------------------------------------

def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmar demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a local web page (Gradio) with text-to-image, captioning and, for video checkpoints,\n"
                    "text-to-video. Needs gradio: run `make demo-deps` once (see docs/api.md).",
        epilog=_examples("demo"))
    p.add_argument("--ckpt", required=True, help="inference folder or Lightning .ckpt of a trained LM")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--int8", action="store_true", help="int8 dynamic quantisation of the LM's linear layers (CPU)")
    return p


def demo_main(argv: list[str]) -> None:
    args = demo_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    from mmar.demo.app import serve

    serve(args.ckpt, host=args.host, port=args.port, device=args.device, int8=args.int8)


# ---- entry ------------------------------------------------------------------------------------------

def _own(fn, argv: list[str]) -> int:
    try:
        fn(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("MMAR_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(top_help())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose from {', '.join(COMMANDS)} (mmar --help)", file=sys.stderr)
        return 2
    if cmd in ("fit", "validate"):
        return _lightning(cmd, rest)
    if cmd in ("t2i", "t2v", "caption"):
        return _generate(cmd, rest)
    if cmd == "eval":
        from evaluation.evaluate import main as eval_main

        return _own(lambda argv: eval_main(argv, epilog=_examples("eval")), rest)
    return _own(export_main if cmd == "export" else demo_main, rest)


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
