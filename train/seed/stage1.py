"""SEED stage 1: the Causal Q-Former (and at toy scale the ViT) trained with image-text contrastive learning."""
from __future__ import annotations

from pathlib import Path

import torch

from train.tokenizer_module import TokenizerTrainingModule
from vision_tokenizers.seed import SEEDConfig, SEEDTokenizer

from .data import tokenizer_json_path
from .losses import contrastive_loss


class SEEDStage1Module(TokenizerTrainingModule):
    """Loss: ITC(last causal query, text [CLS]) + encoder_clip_weight * ITC(encoder's pooled embedding, text [CLS]).

    At toy scale there are no pretrained encoder weights, so the ViT trains too unless `train_encoder: false`;
    with real weights (`tokenizer.encoder_weights`) it stays frozen as in the paper. The second loss term is not
    SEED's: it gives the from-scratch toy encoder what EVA-CLIP's pretraining gave the paper's, a semantic pooled
    image embedding, which stage 2 then uses as the generation target (the role of CLIP-H's image embedding).
    With a frozen pretrained encoder it only fits encoder_proj. The export carries the caption tokenizer beside it.
    """

    betas = (0.9, 0.98)  # BLIP-2's Q-Former pretraining (AdamW, beta2 0.98, weight decay 0.05)

    def __init__(self, tokenizer: SEEDConfig = SEEDConfig(), lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 100, label_smoothing: float = 0.1, temp_min: float = 0.001,
                 temp_max: float = 0.5, train_encoder: bool | None = None, encoder_clip_weight: float = 1.0,
                 export_path: str | None = None):
        super().__init__(lr, weight_decay, warmup_steps, export_path)
        self.tokenizer = SEEDTokenizer(tokenizer, load_encoder_weights=True)
        self.train_encoder = tokenizer.encoder_weights is None if train_encoder is None else train_encoder
        self.label_smoothing = label_smoothing  # 0.1: SEED's official code (BLIP-2's ITC)
        self.temp_range = (temp_min, temp_max)  # BLIP-2 / SEED clamp the learnable temperature to [0.001, 0.5]
        self.encoder_clip_weight = encoder_clip_weight  # this project's choice (1.0: as much as the Q-Former's ITC)
        tok = self.tokenizer.requires_grad_(False)
        trained = [tok.qformer, tok.vision_proj, tok.text_proj, tok.encoder_proj]
        trained += [tok.encoder] if self.train_encoder else []
        for m in trained:
            m.requires_grad_(True)
        tok.temp.requires_grad_(True)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [] if self.train_encoder else [self.tokenizer.encoder]

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        cfg = self.tokenizer.config
        if tok is not None and tok.vocab_size > cfg.text_vocab_size:
            raise ValueError(f"caption tokenizer has {tok.vocab_size} ids but the Q-Former's text_vocab_size is "
                             f"{cfg.text_vocab_size}; raise tokenizer.text_vocab_size")
        if getattr(dm, "max_text_len", 0) > cfg.max_text_len:
            raise ValueError(f"data max_text_len {dm.max_text_len} exceeds the Q-Former's max_text_len "
                             f"{cfg.max_text_len}")

    def _step(self, batch) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        with torch.no_grad():
            tok.temp.clamp_(*self.temp_range)
        feats = tok.image_features(batch["images"])  # [B, prefix + P, E]
        img = tok.contrastive_image(tok.qformer.forward_queries(feats))  # [B, K]
        txt = tok.contrastive_text(batch["text"], batch["text_valid"])  # [B, K]
        loss, logits = contrastive_loss(img, txt, tok.temp, self.label_smoothing)
        # in-batch image->text R@1: a retrieved caption identical to the true one counts as a hit;
        # r1_class: the retrieved caption belongs to an image of the same class (labelled sources)
        best = logits.argmax(1)
        text = batch["text"].masked_fill(~batch["text_valid"], -1)
        out = {"loss": loss, "r1": (text[best] == text).all(1).float().mean()}
        labels = batch.get("labels")
        has_labels = labels is not None and bool((labels >= 0).all())
        if has_labels:
            out["r1_class"] = (labels[best] == labels).float().mean()
        if self.encoder_clip_weight > 0:  # CLIP loss on the encoder's own pooled embedding (same text side)
            clip, clip_logits = contrastive_loss(tok.clip_embedding(feats), txt, tok.temp, self.label_smoothing)
            out["loss"] = loss + self.encoder_clip_weight * clip
            out["clip_loss"] = clip.detach()
            if has_labels:
                out["clip_r1_class"] = (labels[clip_logits.argmax(1)] == labels).float().mean()
        return out

    def training_step(self, batch, batch_idx):
        out = self._step(batch)
        self.log_metrics("train", out, len(batch["images"]))
        self.log("train/temp", self.tokenizer.temp.detach())
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        self.log_metrics("val", self._step(batch), len(batch["images"]))

    def export_extras(self, path: Path) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "tokenizer", None) is not None:
            dm.tokenizer.save(tokenizer_json_path(path))
