"""Lightning wiring for the continuous KL tokenizer (vision_tokenizers/kl.py): reconstruction + a small KL.

After training, the latent scale factor is measured on training images (1 / std of the posterior means) and
stored in the tokenizer's config before the export, so the flow-matching LM sees roughly unit-variance latents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio

from train.tokenizer_module import TokenizerTrainingModule
from vision_tokenizers.kl import KLConfig, KLTokenizer


class KLTokenizerModule(TokenizerTrainingModule):
    """loss = MSE(recon, x) + kl_weight * KL / (latent elements per image). `scale_images`: how many
    training images the stored scale factor is measured on."""

    def __init__(self, tokenizer: KLConfig = KLConfig(), lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 50, kl_weight: float = 1e-3, scale_images: int = 1024,
                 export_path: str | None = None):
        super().__init__(lr, weight_decay, warmup_steps, export_path)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.tokenizer = KLTokenizer(tokenizer)
        self.kl_weight, self.scale_images = kl_weight, scale_images
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)

    def _losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon, kl = self.tokenizer(x)  # [B, C, H, W], [B]
        rec = F.mse_loss(recon, x)
        kl = kl.mean() / self.tokenizer.num_tokens / self.tokenizer.config.latent_channels
        return {"loss": rec + self.kl_weight * kl, "rec": rec, "kl": kl, "recon": recon}

    def training_step(self, x, batch_idx):
        out = self._losses(x)
        out.pop("recon")
        self.log_metrics("train", out, len(x))
        return out["loss"]

    def validation_step(self, x, batch_idx):
        out = self._losses(x)
        self.psnr.update((out.pop("recon").clamp(-1, 1) + 1) / 2, (x + 1) / 2)
        self.log_metrics("val", out, len(x))

    def on_validation_epoch_end(self):
        self.log("val/psnr", self.psnr.compute(), prog_bar=True)
        self.psnr.reset()

    @torch.no_grad()
    def set_scale_from_data(self) -> float:
        """Measure 1 / std of the training latents and store it in the tokenizer config (and the VAE's)."""
        was = self.tokenizer.training
        self.tokenizer.eval()
        xs, n = [], 0
        for x in self.trainer.datamodule.train_dataloader():
            xs.append(x)
            n += len(x)
            if n >= self.scale_images:
                break
        x = torch.cat(xs)[: self.scale_images].to(self.device)
        scale = self.tokenizer.measure_scale(x)
        self.tokenizer.config.scale_factor = scale
        self.tokenizer.vae.register_to_config(scaling_factor=scale)
        self.tokenizer.train(was)
        return scale

    def on_train_end(self) -> None:
        if self.trainer.datamodule is not None:
            self.set_scale_from_data()
        super().on_train_end()
