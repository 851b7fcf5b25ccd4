"""`python -m train fit --config configs/<recipe>.yaml`: LightningCLI over every module and data module.

The configs name their classes (class_path), so one entry point trains tokenizers and LMs.
Checkpoints are written atomically (temp file + rename) unless another CheckpointIO is given.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file beside the target, then os.replace: never a half-written .ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class MMARCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs):
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer(config, extra)


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
