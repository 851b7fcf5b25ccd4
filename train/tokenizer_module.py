"""Lightning wiring for the VQ image tokenizer: reconstruction + VQ losses, optional PatchGAN and
perceptual losses, PSNR / SSIM / codebook-usage logging, and export to a safetensors file."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from train.schedule import adamw_cosine
from vision_tokenizers import registry
from vision_tokenizers.losses import NLayerDiscriminator, PerceptualLoss, hinge_d_loss, hinge_g_loss
from vision_tokenizers.vq import VQConfig, VQTokenizer


def timm_feature_net(name: str, weights: str | None) -> torch.nn.Module:
    """A timm feature pyramid for the perceptual loss; `weights` is a local file (nothing is downloaded)."""
    import timm

    kwargs = {"pretrained": weights is not None}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": weights}
    return timm.create_model(name, features_only=True, **kwargs)


class VQTokenizerModule(L.LightningModule):
    def __init__(self, tokenizer: VQConfig = VQConfig(), lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 50, recon_loss: str = "l2", vq_weight: float = 1.0,
                 gan_weight: float = 0.0, gan_start_step: int = 0, perceptual_weight: float = 0.0,
                 perceptual_net: str | None = None, perceptual_weights: str | None = None,
                 grad_clip: float = 1.0, export_path: str | None = None):
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        if perceptual_weight > 0 and not perceptual_net:
            raise ValueError("perceptual_weight > 0 needs perceptual_net (a timm model name) and its weights file")
        self.automatic_optimization = False  # generator and (optional) discriminator steps
        self.tokenizer = VQTokenizer(tokenizer)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.recon_loss, self.vq_weight = recon_loss, vq_weight
        self.gan_weight, self.gan_start_step = gan_weight, gan_start_step
        self.perceptual_weight, self.grad_clip, self.export_path = perceptual_weight, grad_clip, export_path
        self.disc = NLayerDiscriminator(tokenizer.in_channels) if gan_weight > 0 else None
        net = timm_feature_net(perceptual_net, perceptual_weights) if perceptual_weight > 0 else None
        self.perceptual = PerceptualLoss(net, (lambda x: x.expand(-1, 3, -1, -1)) if tokenizer.in_channels == 1 else None)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def _recon(self, recon, x):
        return F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)

    def training_step(self, x, batch_idx):
        opts = self.optimizers()
        opt_g, opt_d = (opts if isinstance(opts, list) else [opts, None])
        scheds = self.lr_schedulers()
        recon, q = self.tokenizer(x)
        rec = self._recon(recon, x)
        loss = rec + self.vq_weight * q.loss
        if self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self.perceptual(recon, x)
        gan_on = self.disc is not None and self.global_step >= self.gan_start_step
        if gan_on:
            loss = loss + self.gan_weight * hinge_g_loss(self.disc(recon))
        opt_g.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        if gan_on:
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss)
        for s in (scheds if isinstance(scheds, list) else [scheds]):
            s.step()
        self.log_dict({"train/loss": loss, "train/rec": rec, "train/vq": q.loss, "train/usage": q.usage,
                       "train/perplexity": q.perplexity}, prog_bar=True)

    def validation_step(self, x, batch_idx):
        recon, q = self.tokenizer(x)
        recon01, x01 = (recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2
        self.psnr.update(recon01, x01)
        self.ssim.update(recon01, x01)
        self.log_dict({"val/rec": self._recon(recon, x), "val/usage": q.usage}, batch_size=len(x))

    def on_validation_epoch_end(self):
        self.log_dict({"val/psnr": self.psnr.compute(), "val/ssim": self.ssim.compute()}, prog_bar=True)
        self.psnr.reset()
        self.ssim.reset()

    def configure_optimizers(self):
        opt, sched = adamw_cosine(self.tokenizer, self.lr, self.weight_decay, (0.9, 0.99), self.warmup_steps,
                                  self.trainer.estimated_stepping_batches)
        if self.disc is None:
            return {"optimizer": opt, "lr_scheduler": sched}
        opt_d, sched_d = adamw_cosine(self.disc, self.lr, 0.0, (0.5, 0.9), self.warmup_steps,
                                      self.trainer.estimated_stepping_batches)
        return [opt, opt_d], [sched, sched_d]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmar"] = {"vision": registry.describe(self.tokenizer)}

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            registry.save(self.tokenizer, self.export_path)
