"""`python -m train fit --config configs/<recipe>.yaml`: LightningCLI over every module and data module.

The configs name their classes (class_path), so one entry point trains tokenizers and LMs. A model
that needs facts about its data (vocabulary, tokenizer, vision tokenizer) declares a `data` argument,
and the CLI links it from the data module's `spec` once the data module exists.
Lightning writes checkpoints atomically itself (torch.save into a buffer, then an fsspec transaction:
a temp file moved onto the target), so no checkpoint plugin of ours is needed.
"""
from __future__ import annotations

import sys

import torch
from lightning.pytorch.cli import LightningCLI


class MMARCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.init_args.data", compute_fn=_spec_of, apply_on="instantiate")


def _spec_of(datamodule):
    return getattr(datamodule, "spec", None)


def main(args: list[str] | None = None, run: bool = True) -> MMARCLI:
    torch.set_float32_matmul_precision("high")
    argv = sys.argv
    if args is not None:  # called from Python (demo, benchmarks): only `args` count, not this process's argv
        sys.argv = sys.argv[:1]
    try:
        return MMARCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
                       save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = argv
