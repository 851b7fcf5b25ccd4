"""Training callbacks: validation-time samples (a grid of generated images and a few captions, saved and
logged) and the numerical guard (a non-finite loss or gradient stops the run, or skips the step)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from common.io import write_text_atomic
from mmar.pipeline import Pipeline
from vision_tokenizers.image_io import grid, save_png


class SampleLogger(L.Callback):
    """At each validation: draw `per_prompt` images for up to `n_prompts` prompts and caption `n_captions`
    validation images; write samples/step<N>.png and .txt under the log dir, and to TensorBoard if used."""

    def __init__(self, n_prompts: int = 10, per_prompt: int = 2, n_captions: int = 4, cfg: float = 3.0,
                 top_k: int | None = None, seed: int = 0):
        self.n_prompts, self.per_prompt, self.n_captions = n_prompts, per_prompt, n_captions
        self.cfg, self.top_k, self.seed = cfg, top_k, seed

    def prompts(self, pl_module, datamodule) -> list[str]:
        data = datamodule.train_data
        seen, out = set(), []
        for caps, label in zip(data.captions, data.labels):  # one prompt per class (or per caption)
            key = int(label) if label >= 0 else caps[0]
            if key not in seen:
                seen.add(key)
                out.append(caps[0])
            if len(out) == self.n_prompts:
                break
        return sorted(out)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        # log_dir is a collective under DDP: every rank asks for it before rank 0 alone goes on.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.lm is None:
            return
        dm = trainer.datamodule
        bundle = pl_module.bundle()
        was_training = pl_module.training
        pl_module.eval()
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        prompts = self.prompts(pl_module, dm)
        images = Pipeline(bundle).draw_images(prompts, self.per_prompt, cfg=self.cfg, top_k=self.top_k, generator=g)
        val = dm.val_images
        n = min(self.n_captions, len(val))
        c, s = bundle.image_channels, bundle.image_size
        real = torch.stack([val.image(i, c, s) for i in range(n)]).to(pl_module.device)
        caps = Pipeline(bundle).draw_captions(real, generator=g)
        pl_module.train(was_training)
        out = Path(log_dir) / "samples"
        img = grid(images.cpu(), nrow=self.per_prompt * 5)
        save_png(img, out / f"step{trainer.global_step}.png")
        lines = [f"prompts: {prompts}"] + [f"{val.captions[i][0]!r} -> {caps[i]!r}" for i in range(n)]
        write_text_atomic(out / f"step{trainer.global_step}.txt", "\n".join(lines) + "\n")
        exp = getattr(trainer.logger, "experiment", None)
        if hasattr(exp, "add_image"):
            exp.add_image("samples", (img + 1) / 2, trainer.global_step)
            exp.add_text("captions", "  \n".join(lines), trainer.global_step)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run (NumericalGuard with action="stop")."""

    exit_code = 1  # mmar/cli.py: one line and exit code 1


class NumericalGuard(L.Callback):
    """Checks the gradients before every optimiser step. A non-finite one (a NaN/inf loss gives those too)
    either stops the run with a message naming the step (`action="stop"`, the default: nothing is saved
    after the bad step, so the last checkpoint is the last good one) or drops the step (`"skip"`: the
    gradients are cleared, the optimiser leaves the weights and its moments as they were; counted in
    `train/skipped_steps`). Under DDP the gradients are already reduced, so every rank decides the same."""

    def __init__(self, action: Literal["stop", "skip"] = "stop"):
        if action not in ("stop", "skip"):
            raise ValueError(f"NumericalGuard action must be 'stop' or 'skip', got {action!r}")
        self.action, self.skipped = action, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params or torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])):
            return
        if self.action == "stop":
            cb = trainer.checkpoint_callback
            kept = f"; last good checkpoint: {cb.last_model_path}" if cb is not None and cb.last_model_path else ""
            raise NonFiniteError(f"step {trainer.global_step}: non-finite loss or gradient, run stopped{kept}")
        for p in params:
            p.grad = None
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped))
