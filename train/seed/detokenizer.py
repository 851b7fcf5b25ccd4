"""SEED's diffusion detokenizer: a DiffusionDetokenizer trained on a frozen stage-2 tokenizer's embeddings."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from train.tokenizer_module import TokenizerTrainingModule
from vision_tokenizers import registry
from vision_tokenizers.diffusion_detok import DetokenizerConfig, DiffusionDetokenizer
from vision_tokenizers.image_io import grid, save_png
from vision_tokenizers.seed import SEEDTokenizer

from .data import batch_images


class SEEDDetokenizerModule(TokenizerTrainingModule):
    """Trains a DiffusionDetokenizer to draw x from decode_embedding(encode(x)) of a frozen stage-2 SEED
    tokenizer: the embeddings it learns from are the ones the LM's codes will give it at generation time.

    `detokenizer`'s in_channels, image_size and embed_dim are taken from the SEED file. The condition is
    replaced by the learned null embedding with probability `p_uncond` (classifier-free guidance). With
    `ema_decay` > 0 an EMA of the weights is kept (diffusers' EMAModel: decay min(ema_decay, (1 + n) / (10 + n))
    after n updates) and exported. The export is the SEED tokenizer with the detokenizer attached, so
    `decode(codes)` draws images.
    """

    def __init__(self, seed_path: str = "results/seed/seed_stage2.safetensors",
                 detokenizer: DetokenizerConfig = DetokenizerConfig(), lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, p_uncond: float = 0.1, ema_decay: float = 0.999, n_samples: int = 16,
                 export_path: str | None = None):
        super().__init__(lr, weight_decay, warmup_steps, export_path)
        seed = registry.load(seed_path)
        if not isinstance(seed, SEEDTokenizer):
            raise ValueError(f"{seed_path}: not a SEED tokenizer file")
        seed.detokenizer, seed.config = None, dataclasses.replace(seed.config, detokenizer=None)  # train a fresh one
        self.seed = seed
        sc = seed.config
        cfg = dataclasses.replace(detokenizer, in_channels=sc.in_channels, image_size=sc.image_size,
                                  embed_dim=sc.gen_dim)
        self.detok = DiffusionDetokenizer(cfg)
        self.ema = EMAModel(self.detok.parameters(), decay=ema_decay) if ema_decay > 0 else None
        self.noise_schedule = self.detok.train_scheduler()
        self.p_uncond, self.n_samples = p_uncond, n_samples  # p_uncond 0.1: the usual CFG drop rate (our choice)

    # ---- what the base module trains and exports -----------------------------------------------
    def trained_module(self) -> torch.nn.Module:
        return self.detok

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.seed]  # frozen; its quantizer must not restart codes

    def final_detokenizer(self) -> DiffusionDetokenizer:
        """The detokenizer to draw with: a copy holding the EMA weights, or the trained one without EMA."""
        if self.ema is None:
            return self.detok
        detok = copy.deepcopy(self.detok)
        self.ema.copy_to(detok.parameters())
        return detok

    def exported_tokenizer(self) -> SEEDTokenizer:
        """A copy of the SEED tokenizer with the (EMA) detokenizer attached."""
        return copy.deepcopy(self.seed).attach_detokenizer(copy.deepcopy(self.final_detokenizer()).eval())

    def export_description(self) -> dict:
        cfg = dataclasses.replace(self.seed.config, detokenizer=self.detok.config)
        return {"kind": registry.kind_of(self.seed), "config": dataclasses.asdict(cfg)}

    # ---- EMA state follows the module -----------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.ema is not None:
            self.ema.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: a checkpoint written at a batch end (the callbacks' hooks run before
        # the module's) then holds the EMA of the weights it holds, so a resume continues it exactly
        if self.ema is not None:
            self.ema.step(self.detok.parameters())

    # ---- training -------------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            emb = self.seed.decode_embedding(self.seed.encode(x))  # [B, G]
        x0 = self.detok.pad(x)  # [B, C, S', S']
        noise = torch.randn_like(x0)
        sched = self.noise_schedule
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), device=x0.device)
        x_t = sched.add_noise(x0, noise, t)
        drop = torch.rand(len(x0), device=x0.device) < self.p_uncond if self.training else None
        pred = self.detok(x_t, t, self.detok.condition(emb, drop))
        kind = sched.config.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            target = sched.get_velocity(x0, noise, t)
        return F.mse_loss(pred, target)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch_images(batch))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch_images(batch)
        self.log("val/loss", self._loss(x), prog_bar=True, batch_size=len(x))
        if batch_idx == 0:
            self._val_images = x[: self.n_samples]

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        """Save real | redrawn-from-codes pairs to <log dir>/samples/detok_step<N>.png."""
        x = getattr(self, "_val_images", None)
        if x is None or self.trainer.sanity_checking or not self.trainer.is_global_zero or self.n_samples <= 0:
            return
        emb = self.seed.decode_embedding(self.seed.encode(x))
        g = torch.Generator(device=x.device).manual_seed(0)
        drawn = self.final_detokenizer().sample(emb, generator=g)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        save_png(grid(torch.cat([x, drawn]).cpu(), nrow=len(x)), out / f"detok_step{self.trainer.global_step}.png")
