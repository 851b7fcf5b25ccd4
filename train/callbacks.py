"""Validation-time samples: a grid of generated images and a few captions, saved and logged."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from generate.pipeline import caption, text_to_image
from models.io import write_text_atomic
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
        images = text_to_image(bundle, prompts, self.per_prompt, cfg=self.cfg, top_k=self.top_k, generator=g)
        val = dm.val_images
        n = min(self.n_captions, len(val))
        c, s = bundle.image_channels, bundle.image_size
        real = torch.stack([val.image(i, c, s) for i in range(n)]).to(pl_module.device)
        caps = caption(bundle, real, generator=g)
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
