"""Lightning wiring for the multimodal LM (next-token prediction over text and image codes)."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from models.bundle import Bundle
from models.config import LMConfig
from models.transformer import Transformer
from train.schedule import adamw_cosine
from train.sequences import IMAGE, TEXT


class MultimodalLMModule(L.LightningModule):
    """Builds the LM once the data module has said what the vocabulary is (configure_model).

    `preset` picks an LMConfig preset; the optional fields override it. The vocabulary size and
    maximum length come from the data (text tokenizer + codebook, sequence max_len).
    `text_loss_weight` scales the loss of text tokens against image tokens (1 = every token counts the
    same): a caption has ~6 tokens against an image's 49, so captioning gets a small share of the gradient.
    """

    def __init__(self, preset: str = "demo", dim: int | None = None, n_layers: int | None = None,
                 n_heads: int | None = None, n_kv_heads: int | None = None, mlp_dim: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, text_loss_weight: float = 1.0, vocab_info: dict | None = None):
        super().__init__()
        if text_loss_weight <= 0:
            raise ValueError(f"text_loss_weight must be > 0, got {text_loss_weight}")
        self.text_loss_weight = text_loss_weight
        overrides = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, mlp_dim=mlp_dim)
        self.preset, self.overrides = preset, {k: v for k, v in overrides.items() if v is not None}
        LMConfig.from_preset(preset, **self.overrides)  # fail fast on a bad preset or shape
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.vocab_info = vocab_info
        self.lm: Transformer | None = None

    # ---- building ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is not None:
            return
        info = self.vocab_info
        if info is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is None or not hasattr(dm, "vocab_info"):
                raise ValueError("MultimodalLMModule needs an ImageTextDataModule (or vocab_info) to size its vocabulary")
            info = dm.vocab_info()
        self.tokenizer, self.layout = info["tokenizer"], info["layout"]
        self.max_len, self.class_names = info["max_len"], info.get("class_names", [])
        self.vision = info["vision"].eval().requires_grad_(False)
        cfg = LMConfig.from_preset(self.preset, **self.overrides, vocab_size=self.layout.size, max_len=self.max_len)
        self.lm = Transformer(cfg)

    def bundle(self) -> Bundle:
        return Bundle(self.lm, self.tokenizer, self.layout, self.vision, self.max_len)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "vision", None) is not None:
            self.vision.eval()  # frozen tokenizer stays in inference mode
        return self

    # ---- steps -------------------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, loss_flag, modality = batch["ids"], batch["loss"], batch["modality"]
        # Right padding + a causal mask: real tokens never see the padding, so SDPA's causal fast path is exact.
        logits = self.lm(ids)[:, :-1]  # [B, T-1, V]
        target, flag, mod = ids[:, 1:], loss_flag[:, 1:], modality[:, 1:]
        tok_loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        # objective: per-token weights (text tokens x text_loss_weight), normalised by their sum
        weight = flag * torch.where(mod == TEXT, self.text_loss_weight, 1.0)  # [B, T-1]
        out = {"loss": (tok_loss * weight).sum() / weight.sum().clamp(min=1e-6),
               "nll": (tok_loss * flag).sum().detach() / flag.sum().clamp(min=1)}  # plain mean, for comparisons
        for name, m in (("text", TEXT), ("image", IMAGE)):
            sel = flag & (mod == m)
            out[f"loss_{name}"] = (tok_loss * sel).sum().detach() / sel.sum().clamp(min=1)
        return out

    def training_step(self, batch, batch_idx):
        out = self._loss(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({"train/loss_text": out["loss_text"], "train/loss_image": out["loss_image"]})
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._loss(batch)
        self.log_dict({"val/loss": out["nll"], "val/loss_text": out["loss_text"],
                       "val/loss_image": out["loss_image"]}, prog_bar=True, batch_size=len(batch["ids"]))

    def configure_optimizers(self):
        opt, sched = adamw_cosine(self.lm, self.lr, self.weight_decay, self.betas, self.warmup_steps,
                                  self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": sched}

    # ---- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Make the .ckpt self-describing: generate/ scripts rebuild everything from it."""
        checkpoint["mmar"] = {**self.bundle().meta(), "tokenizer_json": self.tokenizer.to_json()}
