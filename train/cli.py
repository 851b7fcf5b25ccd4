"""`mmar fit|validate --config configs/<recipe>.yaml`: LightningCLI over every module and data module.

The configs name their classes (class_path), so one entry point trains tokenizers and LMs. A model
that needs facts about its data (vocabulary, tokenizer, vision tokenizer) declares a `data` argument,
and the CLI links it from the data module's `spec` once the data module exists.

Every run also gets, unless its config already has them: `LastCheckpoint` (`last.ckpt` written when
training ends, and on SIGTERM / SIGINT before stopping cleanly) and `NumericalGuard` (a non-finite gradient stops the run). A
ModelCheckpoint without `dirpath` keeps its files in `<default_root_dir>/checkpoints/`, the same folder
on every run, so `--ckpt_path last` finds the previous run's `last.ckpt`.
Checkpoints are written atomically (`train.resume.AtomicCheckpointIO`: serialised in memory, a temp file beside
the target, fsync, rename; a kill during the write leaves the previous file), and Lightning loads them with
`torch.load(weights_only=True)` (torch's default), so a checkpoint carrying pickled code is refused, not run.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from train.callbacks import NumericalGuard
from train.resume import AtomicCheckpointIO, LastCheckpoint


class MMARCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate only: no module here has a test or predict loop, so those are not offered."""
        full = LightningCLI.subcommands()
        return {k: full[k] for k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.init_args.data", compute_fn=_spec_of, apply_on="instantiate")

    def before_fit(self) -> None:
        prepare_trainer(self.trainer)
        # Building the data module (tokenizers, vision tokenizer) draws random numbers after `seed_everything`;
        # DDP re-seeds each process before the model is built (reset_seed). Re-seed here as well, so the
        # weights start the same on one process and on many.
        reset_seed()


# Lightning warns at every step checkpoint of a manual-optimisation module (our tokenizers) that the weights
# are the ones after the optimiser step; that is the state a resume needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def prepare_trainer(trainer) -> None:
    """Stable checkpoint folder, signal checkpointing, atomic checkpoint writes and the numerical guard for every
    run (see module doc)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
    for cls in (LastCheckpoint, NumericalGuard):
        if not any(isinstance(cb, cls) for cb in trainer.callbacks):
            trainer.callbacks.append(cls())
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's plugin
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def _spec_of(datamodule):
    return getattr(datamodule, "spec", None)


def main(args: list[str] | None = None, run: bool = True) -> MMARCLI:
    """The LightningCLI on `args` (this process's argv when None). A bad flag or config raises
    argparse.ArgumentError (mmar/cli.py prints it as one line) instead of printing the whole usage."""
    torch.set_float32_matmul_precision("high")
    argv = sys.argv
    if args is not None:  # called from Python (demo, benchmarks): only `args` count, not this process's argv
        sys.argv = sys.argv[:1]
    quiet = {"exit_on_error": False}
    try:
        return MMARCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
                       save_config_kwargs={"overwrite": True},
                       parser_kwargs={"prog": "mmar", **quiet, **{cmd: quiet for cmd in MMARCLI.subcommands()}})
    finally:
        sys.argv = argv


def _run(cmd: str, argv: list[str]) -> None:
    """The CLI on this process's argv set to `cmd argv`: Lightning's DDP launcher starts every further process
    by re-running sys.argv, so it must read as the command that was given."""
    old = sys.argv
    sys.argv = [old[0], cmd, *argv]
    try:
        main()
    finally:
        sys.argv = old


def fit(argv: list[str]) -> None:
    """`mmar fit ...` (mmar/cli.py's table)."""
    _run("fit", argv)


def validate(argv: list[str]) -> None:
    """`mmar validate ...` (mmar/cli.py's table)."""
    _run("validate", argv)
