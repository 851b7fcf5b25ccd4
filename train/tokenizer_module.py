"""Lightning wiring for vision tokenizers: one base module for "train a tokenizer and export it", and the VQ
tokenizer's module (reconstruction + VQ losses, optional PatchGAN and perceptual losses, PSNR / SSIM /
codebook-usage logging).

`TokenizerTrainingModule` holds what every tokenizer stage shares (the VQ tokenizer here, the SEED stages and
the SEED detokenizer in train/seed/): AdamW with warmup + cosine over the trained parameters, frozen parts kept
in eval mode, the optimiser state of restarted codebook rows reset, the tokenizer's kind + config in every
checkpoint, and the export to a safetensors file (registry.save) when training ends.
"""
from __future__ import annotations

import abc
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from train.resume import ResumableModule
from train.schedule import adamw_cosine
from vision_tokenizers import registry
from vision_tokenizers.losses import NLayerDiscriminator, PerceptualLoss, hinge_d_loss, hinge_g_loss
from vision_tokenizers.quantizers import VectorQuantizer
from vision_tokenizers.vq import VQConfig, VQTokenizer


def reset_restarted_codes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Zero the optimiser state rows (Adam's exp_avg / exp_avg_sq, ...) of the codebook rows that a
    VectorQuantizer in `module` restarted since the last call; returns how many rows were reset.

    A restarted code is a new vector: without this, Adam's moments of the dead code it replaces keep pushing
    it (m / sqrt(v) does not shrink while a row gets no gradient). Only quantizers whose codebook this
    optimiser trains are consumed, so a second optimiser (a discriminator) leaves the record alone.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    n = 0
    for q in module.modules():
        if not isinstance(q, VectorQuantizer) or id(q.embedding.weight) not in owned:
            continue
        rows = q.pop_restarted()
        state = optimizer.state.get(q.embedding.weight, {})
        if len(rows) == 0 or not state:
            continue
        for v in state.values():
            if torch.is_tensor(v) and v.shape == q.embedding.weight.shape:
                v[rows] = 0
        n += len(rows)
    return n


class TokenizerTrainingModule(ResumableModule):
    """Base for modules that train (part of) a vision tokenizer and export it.

    Subclasses set `self.tokenizer` (or override `exported_tokenizer`) and may override `trained_module`
    (whose trainable parameters the optimiser gets), `frozen_modules` (kept in eval mode while training) and
    `export_extras` (more files written beside the export).
    """

    betas: tuple[float, float] = (0.9, 0.99)  # this project's choice for the tokenizers (stage 1 overrides)

    def __init__(self, lr: float, weight_decay: float, warmup_steps: int, export_path: str | None):
        super().__init__()
        self.lr, self.weight_decay, self.warmup_steps, self.export_path = lr, weight_decay, warmup_steps, export_path

    # ---- what subclasses choose --------------------------------------------------------------
    def trained_module(self) -> nn.Module:
        return self.tokenizer

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def exported_tokenizer(self) -> nn.Module:
        return self.tokenizer

    def export_description(self) -> dict:
        """What a checkpoint records about the tokenizer (kind + config)."""
        return registry.describe(self.exported_tokenizer())

    def export_extras(self, path: Path) -> None:
        """Write files that go with the exported tokenizer at `path` (nothing by default)."""

    # ---- shared behaviour --------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning keeps each module's mode at fit start, and registry.load returns tokenizers in eval mode:
        # without this a stage that starts from a file would train in eval mode (no codebook init or restarts)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()  # frozen parts: no dropout, no codebook restarts
        return self

    def log_metrics(self, prefix: str, out: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log out["loss"] as <prefix>/loss on the progress bar and the rest as <prefix>/<name>."""
        self.log(f"{prefix}/loss", out["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict({f"{prefix}/{k}": v.detach() for k, v in out.items() if k != "loss"}, batch_size=batch_size,
                      prog_bar=prefix == "val")

    def make_optimizer(self, module: nn.Module, weight_decay: float | None = None,
                       betas: tuple[float, float] | None = None):
        """(AdamW, step-wise warmup + cosine scheduler config) over `module`'s trainable parameters."""
        return adamw_cosine(module, self.lr, self.weight_decay if weight_decay is None else weight_decay,
                            betas or self.betas, self.warmup_steps, self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        opt, sched = self.make_optimizer(self.trained_module())
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_before_optimizer_step(self, optimizer) -> None:
        reset_restarted_codes(self, optimizer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # RNG states (exact resume)
        checkpoint["mmar"] = {"vision": self.export_description()}

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            registry.save(self.exported_tokenizer(), self.export_path)
            self.export_extras(Path(self.export_path))


def timm_feature_net(name: str, weights: str | None) -> torch.nn.Module:
    """A timm feature pyramid for the perceptual loss; `weights` is a local file (nothing is downloaded)."""
    import timm

    kwargs = {"pretrained": weights is not None}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": weights}
    return timm.create_model(name, features_only=True, **kwargs)


class ReconstructionTokenizerModule(TokenizerTrainingModule, abc.ABC):
    """Base for tokenizers trained to reconstruct their input (the VQ image tokenizer, the video tokenizer):
    L1 or L2 reconstruction + the tokenizer's own loss + optional perceptual and PatchGAN terms (manual
    optimisation: a generator step, then a discriminator step), PSNR / SSIM on validation.

    Subclasses build `self.tokenizer` and define `reconstruct(x) -> (recon, extra loss, figures to log)`; inputs
    that are not image batches define `frames(x)`, the image batch the 2D perceptual net, the discriminator and
    the metrics see.
    """

    def __init__(self, in_channels: int, lr: float, weight_decay: float, warmup_steps: int, recon_loss: str,
                 gan_weight: float, gan_start_step: int, perceptual_weight: float, perceptual_net: str | None,
                 perceptual_weights: str | None, grad_clip: float, export_path: str | None):
        super().__init__(lr, weight_decay, warmup_steps, export_path)
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        if perceptual_weight > 0 and not perceptual_net:
            raise ValueError("perceptual_weight > 0 needs perceptual_net (a timm model name) and its weights file")
        self.automatic_optimization = False  # generator and (optional) discriminator steps
        self.recon_loss, self.grad_clip = recon_loss, grad_clip
        self.gan_weight, self.gan_start_step, self.perceptual_weight = gan_weight, gan_start_step, perceptual_weight
        self.disc = NLayerDiscriminator(in_channels) if gan_weight > 0 else None
        net = timm_feature_net(perceptual_net, perceptual_weights) if perceptual_weight > 0 else None
        self.perceptual = PerceptualLoss(net, (lambda x: x.expand(-1, 3, -1, -1)) if in_channels == 1 else None)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    @abc.abstractmethod
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(reconstruction like x, the tokenizer's own loss, figures to log) for a batch x."""

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        return x  # image batches are their own frames

    def _recon(self, recon, x):
        return F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)

    def training_step(self, x, batch_idx):
        opts = self.optimizers()
        opt_g, opt_d = (opts if isinstance(opts, list) else [opts, None])
        scheds = self.lr_schedulers()
        recon, extra, figures = self.reconstruct(x)
        rec = self._recon(recon, x)
        loss = rec + extra
        if self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self.perceptual(self.frames(recon), self.frames(x))
        gan_on = self.disc is not None and self.global_step >= self.gan_start_step
        if gan_on:
            loss = loss + self.gan_weight * hinge_g_loss(self.disc(self.frames(recon)))
        opt_g.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        if gan_on:
            d_loss = hinge_d_loss(self.disc(self.frames(x)), self.disc(self.frames(recon.detach())))
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss)
        for s in (scheds if isinstance(scheds, list) else [scheds]):
            s.step()
        self.log_dict({"train/loss": loss, "train/rec": rec, **{f"train/{k}": v for k, v in figures.items()}},
                      prog_bar=True)

    def validation_step(self, x, batch_idx):
        recon, _, figures = self.reconstruct(x)
        recon01, x01 = self.frames((recon.clamp(-1, 1) + 1) / 2), self.frames((x + 1) / 2)
        self.psnr.update(recon01, x01)
        self.ssim.update(recon01, x01)
        self.log_dict({"val/rec": self._recon(recon, x), **{f"val/{k}": v for k, v in figures.items()}},
                      batch_size=len(x))
        if batch_idx == 0:
            self.save_reconstructions(self.frames(x), self.frames(recon))

    def save_reconstructions(self, x: torch.Tensor, recon: torch.Tensor, n: int = 8) -> Path | None:
        """At each validation: the first n validation images (top row) over their reconstructions (bottom) as
        `<log dir>/reconstructions/step_<global step>.png`, to look at while the tokenizer trains."""
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return None
        from vision_tokenizers.image_io import grid, save_png

        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = root / "reconstructions" / f"step_{self.global_step:06d}.png"
        k = min(n, len(x))
        save_png(grid(torch.cat([x[:k], recon[:k].clamp(-1, 1)]).detach().float().cpu(), k), path)
        return path

    def on_validation_epoch_end(self):
        self.log_dict({"val/psnr": self.psnr.compute(), "val/ssim": self.ssim.compute()}, prog_bar=True)
        self.psnr.reset()
        self.ssim.reset()

    def configure_optimizers(self):
        if self.disc is None:
            return super().configure_optimizers()
        opt, sched = self.make_optimizer(self.tokenizer)
        opt_d, sched_d = self.make_optimizer(self.disc, weight_decay=0.0, betas=(0.5, 0.9))  # VQGAN's disc. betas
        return [opt, opt_d], [sched, sched_d]


class VQTokenizerModule(ReconstructionTokenizerModule):
    """Trains a VQ / IBQ image tokenizer (vision_tokenizers/vq.py) to reconstruct its images.

    Args:
        tokenizer: the tokenizer's shape (VQConfig: in_channels, image_size, channels, codebook_size, ...).
        lr: peak learning rate (AdamW; linear warm-up, cosine decay).
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warm-up.
        recon_loss: l1 | l2 reconstruction loss.
        vq_weight: weight of the quantiser's codebook + commitment loss.
        gan_weight: weight of the PatchGAN generator loss (0: no discriminator).
        gan_start_step: step at which the GAN loss starts.
        perceptual_weight: weight of the perceptual loss (needs perceptual_net and a local weights file).
        perceptual_net: timm model name of the perceptual feature net.
        perceptual_weights: local weights file of that net (nothing is downloaded).
        grad_clip: gradient-norm clipping of the tokenizer's step.
        export_path: where the trained tokenizer is written (.safetensors + config) at the end of fit.
    """

    def __init__(self, tokenizer: VQConfig = VQConfig(), lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 50, recon_loss: str = "l2",
                 vq_weight: float = 1.0,  # VQ-VAE's sum of reconstruction and VQ losses
                 gan_weight: float = 0.0,  # off by default (this project's); ETT's tokenizer uses 0.1 (DESIGN §5)
                 gan_start_step: int = 0,
                 perceptual_weight: float = 0.0,  # off by default: needs a local feature-net weights file
                 perceptual_net: str | None = None, perceptual_weights: str | None = None,
                 grad_clip: float = 1.0, export_path: str | None = None):
        super().__init__(tokenizer.in_channels, lr, weight_decay, warmup_steps, recon_loss, gan_weight,
                         gan_start_step, perceptual_weight, perceptual_net, perceptual_weights, grad_clip, export_path)
        self.tokenizer = VQTokenizer(tokenizer)
        self.vq_weight = vq_weight

    def reconstruct(self, x):
        recon, q = self.tokenizer(x)
        return recon, self.vq_weight * q.loss, {"vq": q.loss.detach(), "usage": q.usage, "perplexity": q.perplexity}
