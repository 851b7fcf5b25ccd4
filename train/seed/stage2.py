"""SEED stage 2: the VQ bottleneck and the reconstruction and generation heads on a frozen stage-1 tokenizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.tokenizer_module import TokenizerTrainingModule
from vision_tokenizers import registry
from vision_tokenizers.seed import SEEDTokenizer

from .data import batch_images


class SEEDStage2Module(TokenizerTrainingModule):
    """L = vq_weight * L_vq + rec_weight * (1 - cos(recon, causal)).mean() + gen_weight * MSE(gen, target),
    target = tokenizer.generation_target: by default the frozen stage-1 encoder's pooled embedding through its
    CLIP projection (L2-normalised, times sqrt(G)); with gen_target "pooled" the raw pooled embedding.

    The weights 5 / 2 / 0.5 are SEED's official code (`loss_embed*5 + loss_distil_image*0.5 + loss_recon_s*2`
    in blip2_qformer_codebook_all_image.py). The codebook starts from k-means on the
    first batch (tokenizer.data_init) and restarted codes get fresh optimiser state (the base module).

    `beta_on` (which term of L_vq the tokenizer's beta weights; the other weighs 1): "codebook" (default) is the
    official code's order (taming's VectorQuantizer2, legacy=True: commitment weighted 1, codebook beta);
    "commitment" is VQ-VAE's / LlamaGen's order (vision_tokenizers.quantizers.VectorQuantizer), this module's
    before the change.
    """

    def __init__(self, init_from: str = "results/seed/seed_stage1.safetensors", lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 100, vq_weight: float = 5.0, rec_weight: float = 2.0,
                 gen_weight: float = 0.5, export_path: str | None = None, beta_on: str = "codebook"):
        super().__init__(lr, weight_decay, warmup_steps, export_path)
        tok = registry.load(init_from)
        if not isinstance(tok, SEEDTokenizer):
            raise ValueError(f"{init_from}: not a SEED tokenizer file")
        if tok.config.gen_target == "pooled" and tok.config.gen_dim != tok.encoder_dim:
            raise ValueError(f"gen_dim {tok.config.gen_dim} must equal the encoder width {tok.encoder_dim}: the "
                             "generation target is the encoder's pooled embedding")
        self.tokenizer = tok
        for m in (tok.quant_in, tok.quantizer, tok.quant_out, tok.recon_head, tok.gen_head):
            m.requires_grad_(True)
        if beta_on not in ("commitment", "codebook"):
            raise ValueError(f"beta_on must be 'commitment' or 'codebook', got {beta_on!r}")
        tok.quantizer.beta_on = beta_on  # official: "codebook"
        self.weights = (vq_weight, rec_weight, gen_weight)  # official code: 5, 2, 0.5

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.tokenizer.encoder, self.tokenizer.qformer, self.tokenizer.encoder_proj]  # stage-1 parts

    def _step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        with torch.no_grad():
            feats = tok.image_features(x)  # [B, prefix + P, E]
            target = tok.generation_target(feats)  # [B, G]
            causal = tok.qformer.forward_queries(feats)  # [B, N, D]
        q = tok.quantize(causal)
        recon, gen = tok.heads(q.z_q)
        rec = (1 - F.cosine_similarity(recon, causal, dim=-1)).mean()
        gen_mse = F.mse_loss(gen, target)
        wv, wr, wg = self.weights
        return {"loss": wv * q.loss + wr * rec + wg * gen_mse, "vq": q.loss, "rec": rec, "gen": gen_mse,
                "gen_cos": F.cosine_similarity(gen, target, dim=-1).mean(), "usage": q.usage,
                "perplexity": q.perplexity}

    def training_step(self, batch, batch_idx):
        x = batch_images(batch)
        out = self._step(x)
        self.log_metrics("train", out, len(x))
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        x = batch_images(batch)
        self.log_metrics("val", self._step(x), len(x))
