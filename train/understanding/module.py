"""Lightning wiring for image understanding with continuous visual inputs: backbone + objective + a visual input
(vision_tokenizers/projectors.py) + optionally the image tokenizer, each trained or frozen per stage.

`inputs` says how the LM reads an image:
    codes     the tokenizer's code ids (no projector): the discrete baseline
    codebook  ETT: the tokenizer's codebook embeddings through the GELU MLP projector
    vit_pool  TokenFLEX: a timm ViT's patch grid pooled to n x n + the SwiGLU projector (n per batch from the data)

Stages are flags (one YAML each, configs/scenes_ett_stage*.yaml): `train_lm`, `train_projector`, `train_encoder`
(the TokenFLEX ViT), `train_tokenizer` (ETT stage 2: the loss becomes `L_cap + vq_weight * L_vq`, L_vq being the
tokenizer's own loss, L2 reconstruction + codebook/commitment, on the batch's images). Frozen parts get no
gradient, are not in the optimiser and stay in eval mode. `init_from` starts from an earlier stage's .ckpt
(every part it holds, strictly); `init_lm_from` starts only the LM from another model (any .ckpt or inference folder
read with the same text tokenizer, e.g. a text-only LM trained on the captions: the "pretrained" stand-in of
configs/cells_text_lm.yaml), its text rows copied when the vocabularies differ past them; `init_encoder_from` starts
only the TokenFLEX ViT from another vit_pool .ckpt (a "pretrained" vision encoder; the projector starts fresh, as
TokenFLEX's does on SigLIP). Text->image samples (the batch's non-caption rows) are always trained on the
tokenizer's current code ids, so a tuned tokenizer still draws images for text-to-image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.weights import load_state_strict
from models.bundle import Bundle
from models.objectives import Objective
from models.sequence import SequenceConfig, SequenceFormat, is_i2t
from models.transformer import Transformer
from train.datamodules import DataSpec
from train.lm_module import ObjectiveSteps
from train.schedule import adamw_cosine
from vision_tokenizers.projectors import (CodebookInput, CodebookInputConfig, ViTPoolInput, ViTPoolInputConfig,
                                          WithEmbeds)

INPUTS = ("codes", "codebook", "vit_pool")


def _ckpt_state(path: str) -> dict[str, torch.Tensor]:
    """A Lightning .ckpt's state_dict, loaded without running pickled code; a clear error for a missing file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except (KeyError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a Lightning checkpoint ({type(e).__name__}: {e})") from None


class UnderstandingLMModule(ObjectiveSteps):
    """See the module docstring. `vit` overrides ViTPoolInputConfig fields (vit_dim, vit_depth, vit_heads,
    patch_size, counts, default_tokens); `projector_hidden` is the projector's hidden width. `vq_images` (stage 2):
    the tokenizer's reconstruction loss on only the batch's first k images (the decoder is the costly part on a
    CPU; the quantisation loss and the caption gradient still cover every image); unset: all."""

    def __init__(self, data: DataSpec | None = None, objective: Objective | None = None, preset: str = "demo",
                 dim: int | None = None, n_layers: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, mlp_dim: int | None = None, inputs: str = "codebook", projector_hidden: int = 512,
                 vit: dict | None = None, train_lm: bool = True, train_projector: bool = True,
                 train_encoder: bool = True, train_tokenizer: bool = False, vq_weight: float = 0.25,
                 vq_images: int | None = None,
                 init_from: str | None = None, init_lm_from: str | None = None,
                 init_encoder_from: str | None = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, export_path: str | None = None):
        super().__init__()
        if data is None:
            raise ValueError("UnderstandingLMModule needs `data` (the data module's spec; the CLI links it)")
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        if inputs != "vit_pool" and data.vision is None:
            raise ValueError(f"inputs {inputs!r} need the data's vision_tokenizer")
        if train_tokenizer and inputs != "codebook":
            raise ValueError("train_tokenizer (ETT stage 2) needs inputs: codebook")
        self.inputs, self.export_path = inputs, export_path
        self.format = SequenceFormat(data.tokenizer, data.layout, SequenceConfig(max_len=data.max_len))
        self._setup(data, objective, preset, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                    mlp_dim=mlp_dim)
        self.lm = Transformer(self.cfg)
        self.vision = data.vision
        if inputs == "codebook":
            self.visual = CodebookInput(CodebookInputConfig(data.vision.config.latent_dim, self.cfg.dim, projector_hidden))
        elif inputs == "vit_pool":
            self.visual = ViTPoolInput(ViTPoolInputConfig(**(vit or {}), lm_dim=self.cfg.dim, hidden=projector_hidden))
        else:
            self.visual = None
        self.flags = dict(lm=train_lm, projector=train_projector, encoder=train_encoder, tokenizer=train_tokenizer)
        self.vq_weight, self.vq_images = vq_weight, vq_images
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        if init_from and init_lm_from:
            raise ValueError("set init_from (an earlier stage: every part) or init_lm_from (the LM only), not both")
        if init_from:
            self.load_stage(init_from)
        if init_lm_from:
            self.load_lm(init_lm_from)
        if init_encoder_from:
            if init_from:
                raise ValueError("set init_from (an earlier stage: every part) or init_encoder_from, not both")
            self.load_encoder(init_encoder_from)
        self._freeze()

    # ---- parts and stages ---------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module | None]:
        v = self.visual
        return {"lm": nn.ModuleList([self.lm, self.objective]),
                "projector": v.projector if v is not None else None,
                "encoder": v.encoder if isinstance(v, ViTPoolInput) else None,
                "tokenizer": self.vision}

    def _freeze(self) -> None:
        for name, part in self.parts().items():
            if part is not None:
                part.requires_grad_(self.flags[name])
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError("every part is frozen: nothing to train")

    def train(self, mode: bool = True):
        super().train(mode)
        for name, part in self.parts().items():
            if part is not None and not self.flags[name]:
                part.eval()  # frozen parts: no codebook restarts, no dropout
        return self

    def on_fit_start(self) -> None:
        self.train()  # a tokenizer loaded from a file arrives in eval mode

    def load_stage(self, path: str) -> None:
        """Weights of an earlier stage's .ckpt (or any UnderstandingLMModule .ckpt): every part it holds."""
        state = _ckpt_state(path)
        for prefix, module in (("lm.", self.lm), ("objective.", self.objective), ("visual.", self.visual),
                               ("vision.", self.vision)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if module is not None:
                load_state_strict(module, part, path)

    def load_encoder(self, path: str) -> None:
        """The TokenFLEX ViT's weights (`visual.encoder.*`) from another vit_pool .ckpt of the same ViT shape."""
        if not isinstance(self.visual, ViTPoolInput):
            raise ValueError(f"init_encoder_from needs inputs: vit_pool, got {self.inputs!r}")
        state = _ckpt_state(path)
        part = {k[len("visual.encoder."):]: v for k, v in state.items() if k.startswith("visual.encoder.")}
        if not part:
            raise ValueError(f"{path}: holds no TokenFLEX ViT (no visual.encoder.* weights)")
        load_state_strict(self.visual.encoder, part, path)

    def load_lm(self, path: str) -> None:
        """The LM's weights (backbone and head) from another model read with the same text tokenizer."""
        from common.weights import load_text_part
        from models.bundle import load_bundle

        src = load_bundle(path)
        if src.tokenizer.to_json() != self.data.tokenizer.to_json():
            raise ValueError(f"{path}: init_lm_from model reads text with another tokenizer; train both on the same "
                             f"tokenizer.json (data.text_tokenizer)")
        load_text_part(self.lm, src.lm.state_dict(), path, self.data.layout.text_size)

    def bundle(self) -> Bundle:
        d = self.data
        return Bundle(self.lm, d.tokenizer, d.layout, self.vision, d.max_len, self.objective, self.visual)

    # ---- one batch ----------------------------------------------------------------------------
    def _run(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, images = batch["ids"].clone(), batch["images"]
        slots = self.format.image_slots(ids)  # [B, T]
        i2t = is_i2t(ids, self.format.tok)  # [B]
        codes = embeds = l_vq = None
        figures = {}
        if self.inputs == "codebook":
            tuning = self.flags["tokenizer"] and torch.is_grad_enabled()
            vec, q, z = self.visual.quantize(self.vision, images)  # frozen tokenizer: no graph through it
            codes = q.codes.flatten(1)  # [B, N]
            if i2t.any():
                embeds = self.visual.project(vec[i2t])  # [R, N, D]
            if tuning:  # ETT stage 2: the tokenizer's own loss on the same images (the first vq_images of them)
                k = self.vq_images or len(images)
                recon = self.vision.decode_latent(q.z_q[:k], size=tuple(images.shape[-2:]))
                rec = F.mse_loss(recon, images[:k])
                l_vq = rec + q.loss
                figures = {"vq_rec": rec.detach(), "vq_quant": q.loss.detach(), "vq_usage": q.usage}
        elif self.inputs == "vit_pool":
            if i2t.any():
                n = int(slots[i2t][0].sum())
                embeds = self.visual(images[i2t], tokens=n)
        elif self.vision is not None:
            with torch.no_grad():
                codes = self.vision.encode(images).flatten(1)
        if codes is not None:  # code ids: targets of text->image rows, and the inputs of `codes` models
            rows = torch.ones_like(i2t) if self.inputs == "codes" else ~i2t
            ids[slots & rows[:, None]] = (codes[rows] + self.data.layout.image_offset).flatten()
        mask = slots & i2t[:, None] if embeds is not None else None
        lm = WithEmbeds(self.lm, embeds.flatten(0, 1) if embeds is not None else None, mask)
        out = self.objective.loss(lm, {**batch, "ids": ids})
        if l_vq is not None:
            out["cap_loss"] = out["loss"].detach()
            out["loss"] = out["loss"] + self.vq_weight * l_vq
        return {**out, **figures}

    def configure_optimizers(self):
        params = nn.ModuleList([m for m in self.parts().values() if m is not None])
        opt, sched = adamw_cosine(params, self.lr, self.weight_decay, self.betas, self.warmup_steps,
                                  self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.flags["tokenizer"]:
            from train.tokenizer_module import reset_restarted_codes

            reset_restarted_codes(self, optimizer)

    # ---- export (the .ckpt describes itself: ObjectiveSteps.on_save_checkpoint, visual input included) --------
    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            self.bundle().save(self.export_path)
