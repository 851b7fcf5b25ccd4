"""Speed and quality benchmarks (`make bench-<name>` runs `benchmarks/<name>.py`)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (plots are PNGs beside the JSON; no display needed). Raises
    ImportError without matplotlib, which write_report turns into a message."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(report: dict, out: str | Path, plot: Callable[[dict, Path], None] | None = None) -> None:
    """The report as JSON (written atomically) and, when matplotlib is installed, its plot as a PNG beside it."""
    from common.io import write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    if plot is not None:
        try:
            plot(report, out.with_suffix(".png"))
        except ImportError:
            print("matplotlib not installed: no plot (pip install -e '.[bench]')")
    print(f"wrote {out}")


def last_ckpt(root: Path) -> str:
    return str(Path(root) / "checkpoints" / "last.ckpt")


def recipe_args(config: str, root: Path, extra: list[str]) -> list[str]:
    """`mmar fit` of a shipped recipe, quiet: logger, progress bar, validation and the recipe's callbacks off
    (last.ckpt kept; `extra` may turn any of them back on). Every benchmark trains through this."""
    return ["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0", *extra]


def fit_run(config: str, root: Path, extra: list[str]):
    """One in-process run of recipe_args; the LightningCLI object (its .model and .trainer)."""
    from train.cli import main as cli_main

    return cli_main(recipe_args(config, root, extra))


def fit_recipe(config: str, root: Path, extra: list[str], reuse: bool = False) -> float:
    """One run of recipe_args; its seconds. With `reuse`, a finished run with the same command line (recorded in
    root/bench_args.json, with the size and modification time of every file it names: a run started from an
    earlier stage's checkpoint is redone when that checkpoint changed) is kept as is."""
    from common.io import write_text_atomic

    cmd = recipe_args(config, root, extra)
    inputs = {a: [Path(a).stat().st_size, Path(a).stat().st_mtime_ns] for a in cmd if Path(a).is_file()}
    done = Path(root) / "bench_args.json"
    if reuse and done.exists() and Path(last_ckpt(root)).exists():
        old = json.loads(done.read_text())
        if old["cmd"] == cmd and old.get("inputs") == inputs:
            print(f"reusing {last_ckpt(root)}", flush=True)
            return old["seconds"]
    done.unlink(missing_ok=True)
    # a fresh run starts without an earlier run's checkpoints (ModelCheckpoint would write "-v1" copies beside them)
    shutil.rmtree(Path(root) / "checkpoints", ignore_errors=True)
    t = time.time()
    fit_run(config, root, extra)
    seconds = time.time() - t
    write_text_atomic(done, json.dumps({"cmd": cmd, "inputs": inputs, "seconds": seconds}))
    return seconds
