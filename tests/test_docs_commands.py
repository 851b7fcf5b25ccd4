"""Every command line in README.md and docs/*.md names something that exists and parses as written: make targets,
`mmar` subcommands and their flags, `python -m` modules, recipe files; this catches a renamed flag, config,
target or command the moment the docs go stale. The README's usage commands that draw, caption, score and
export also run, on a tiny model; the recipes and benchmarks run in `make demo` / `make bench-*`."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    out = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    out.append((f"{doc.name}: {line}", shlex.split(line)))
    return out


COMMANDS = documented_commands()
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


ALIASES = {"generate.text_to_image": "t2i", "generate.text_to_video": "t2v", "generate.caption": "caption"}


def check(argv: list[str]) -> None:
    from mmar import commands
    from mmar.cli import COMMANDS as MMAR

    exe = argv[0].split("/")[-1]
    if exe == "make":
        assert set(argv[1:]) <= MAKE_TARGETS, f"no make target {argv[1:]}"
        return
    if exe.startswith("python"):
        assert argv[1] == "-m"
        module, argv = argv[2], argv[3:]
        assert importlib.util.find_spec(module), f"no module {module}"
        if module in ALIASES:
            argv = [ALIASES[module], *argv]
        elif module != "train":
            return
    else:
        assert exe == "mmar", exe
        argv = argv[1:]
    cmd, rest = argv[0], argv[1:]
    assert cmd in MMAR, f"mmar has no command {cmd!r}"
    if cmd in ("fit", "validate"):
        config = rest[rest.index("--config") + 1]
        assert (ROOT / config).is_file(), f"no recipe {config}"
    elif cmd == "eval":
        from evaluation.evaluate import parser

        parser().parse_args(rest)
    else:
        getattr(commands, f"{cmd}_parser")().parse_args(rest)


def test_docs_have_commands():
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[c[0][:80] for c in COMMANDS])
def test_documented_command_parses(where, argv):
    check(argv)


def test_readme_usage_commands_run_on_a_tiny_model(tiny_bundle, tiny_bundle_dir, tmp_path, capsys):
    """The README's "Using it" commands that draw, caption, score and export run as written, in order, with the
    demo's model paths pointed at a tiny model built here and `results/` at a temporary folder (fit, t2v and
    demo are parsed above: they train for minutes, need a video model, or serve a page)."""
    from mmar.cli import main
    from test_api import bundle_ckpt

    ckpt = bundle_ckpt(tiny_bundle, tmp_path / "lm.ckpt")
    usage = (ROOT / "README.md").read_text().split("## Using it")[1].split("```python")[0]
    ran = []
    for where, argv in documented_commands():
        line = where.split(": ", 1)[1]
        if line not in usage or argv[0] != "mmar" or argv[1] in ("fit", "t2v", "demo"):
            continue
        argv = [str(ckpt) if a == "results/demo/lm.ckpt" else str(tiny_bundle_dir) if a == "results/demo/lm"
                else a.replace("results/", f"{tmp_path}/results/") for a in argv[1:]]
        code = main(argv)
        assert code == 0, f"{line}: exit {code}\n{capsys.readouterr().err}"
        ran.append(argv[0])
    assert ran == ["t2i", "caption", "eval", "export"]
