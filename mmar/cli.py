"""`mmar`: one command for training, generation, evaluation, export and the web demo.

`COMMANDS` is the whole command: name -> (one-line summary, examples, "module:function"). Every function
takes the argument list; `python -m train` and `python -m generate.*` are aliases of rows of this table.
`run` is the one place where an error becomes one line on stderr and an exit code, never a traceback
(MMAR_DEBUG=1 shows it): 2 for bad input (a bad flag, a missing or corrupt file, a value out of range),
1 for a run stopped by the numerical guard.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import textwrap

COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("train a tokenizer or an LM (LightningCLI)", """\
        mmar fit --config configs/mnist_vq.yaml
        mmar fit --config configs/mnist_lm.yaml --trainer.max_epochs 4
        mmar fit --config configs/mnist_lm.yaml --ckpt_path last     # resume
        mmar fit --config configs/mnist_lm.yaml --print_config       # the full resolved recipe""",
            "train.cli:fit"),
    "validate": ("run the validation loop on a checkpoint (LightningCLI)", """\
        mmar validate --config configs/mnist_lm.yaml --ckpt_path results/demo/lm.ckpt""", "train.cli:validate"),
    "t2i": ("text -> image: PNGs + grid.png", """\
        mmar t2i --ckpt results/demo/lm --prompt "a handwritten 7" --n 8 --out results/t2i
        mmar t2i --ckpt results/demo/lm.ckpt --prompts-file prompts.txt --cfg 3 --temperature 0.8 --seed 1""",
            "mmar.commands:t2i_main"),
    "t2v": ("text -> video: mp4 + GIF + frame strip", """\
        mmar t2v --ckpt results/video/lm --prompt "a 3 moving up" --n 2 --out results/t2v""",
            "mmar.commands:t2v_main"),
    "caption": ("image -> text: prints path<TAB>caption", """\
        mmar caption --ckpt results/demo/lm results/t2i/000_00.png
        mmar caption --ckpt results/demo/lm some_folder/ --batch-size 32""", "mmar.commands:caption_main"),
    "eval": ("metrics of a checkpoint on a data source: t2i classifier accuracy, caption accuracy, FID", """\
        mmar eval --ckpt results/demo/lm --source mnist                       # the demo's held-out split
        mmar eval --ckpt results/demo/lm --source mnist --per-class 5 --captions 100 --out eval.json
        mmar eval --ckpt my_lm.ckpt --source jsonl --path data/train.jsonl --holdout 100""",
             "evaluation.evaluate:main"),
    "export": ("a Lightning .ckpt of the LM -> an inference folder (written atomically)", """\
        mmar export results/demo/lm.ckpt results/demo/lm_export
        mmar export lightning_logs/lm/checkpoints/last.ckpt my_model --overwrite
        mmar export results/demo/lm.ckpt results/demo/lm_hf --hf llama   # the LM as a Hugging Face checkpoint""",
               "mmar.commands:export_main"),
    "demo": ("serve the web demo (text-to-image, captioning, text-to-video) on a local port", """\
        mmar demo --ckpt results/demo/lm                  # then open http://127.0.0.1:7860
        mmar demo --ckpt results/demo/lm.ckpt --port 8080 --int8""", "mmar.commands:demo_main"),
}


def _examples(cmd: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(COMMANDS[cmd][1]), "  ") + "\n"


def top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (summary, _, _) in COMMANDS.items()]
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
        "Python: from mmar import Pipeline (docs/api.md). `python -m train <fit|validate>` and\n"
        "`python -m generate.<text_to_image|text_to_video|caption>` are aliases of fit/validate, t2i, t2v, caption.\n"
    )


def _exit_code(e: BaseException) -> int | None:
    """The exit code of an error we report in one line, or None for a bug (which keeps its traceback)."""
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e, KeyboardInterrupt):
        return 130
    if hasattr(e, "exit_code"):  # e.g. train.callbacks.NonFiniteError
        return e.exit_code
    return 2 if isinstance(e, (argparse.ArgumentError, ValueError, OSError, ImportError)) else None


def _one_line(message: str) -> str:
    """The first line of an error; jsonargparse's "Parser key "x":" heading gets its "Given value" line too."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    given = [ln for ln in lines[1:] if ln.startswith("Given value:")]
    return f"{lines[0]} {given[0]}" if lines[0].endswith(":") and given else lines[0]


def run(cmd: str, argv: list[str]) -> int:
    """Run command `cmd` of the table on `argv` (see `call`)."""
    module, name = COMMANDS[cmd][2].split(":")
    return call(getattr(importlib.import_module(module), name), argv, f"mmar {cmd}", _examples(cmd))


def call(fn, argv: list[str], prog: str, examples: str = "") -> int:
    """fn(argv)'s exit code, with any user-facing error printed as one line; `examples` follow its --help.
    (The parsers name themselves: sys.argv is left alone, as Lightning's DDP launcher re-runs it.)"""
    help_out = io.StringIO() if examples and any(a in ("-h", "--help") for a in argv) else None
    try:
        with contextlib.redirect_stdout(help_out) if help_out else contextlib.nullcontext():
            fn(argv)
        code = 0
    except BaseException as e:
        code = _exit_code(e)
        if code is None or (os.environ.get("MMAR_DEBUG") and not isinstance(e, SystemExit)):
            raise
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            msg = _one_line(str(e)) or type(e).__name__
            hint = f" (see {prog} --help)" if isinstance(e, argparse.ArgumentError) else ""
            print(f"error: {msg}{hint}", file=sys.stderr)
    if help_out is not None:  # the command's own help, then our examples
        sys.stdout.write(help_out.getvalue().rstrip("\n") + "\n\n" + examples)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(top_help())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} (mmar --help)", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:])


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
