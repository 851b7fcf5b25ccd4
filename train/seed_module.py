"""Lightning wiring for SEED (DESIGN §5): three stages, each exporting a tokenizer file for the next.

stage 1  SEEDStage1Module       image-text contrastive: last causal query vs text [CLS]  -> seed_stage1.safetensors
stage 2  SEEDStage2Module       encoder + Q-Former frozen; 5 L_vq + 2 L_rec + 0.5 L_gen  -> seed_stage2.safetensors
detok    SEEDDetokenizerModule  diffusion UNet conditioned on decode_embedding(encode(x)) -> seed.safetensors
then the SEED-LLaMA LM trains with the ordinary ImageTextDataModule + MultimodalLMModule on that file.

At toy scale there are no pretrained encoder weights, so stage 1 also trains the (from-scratch) ViT unless
`train_encoder: false`, with an extra CLIP loss on its pooled embedding; with real weights
(`tokenizer.encoder_weights`) the encoder stays frozen as in the paper. Stage 2's generation target is the
frozen stage-1 encoder's pooled image embedding (mean over its patch tokens) through that CLIP projection,
standing in for the CLIP-H image embedding unCLIP is conditioned on at full scale.
"""
from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from models.text_tokenizer import TextTokenizer
from train.datamodules import split_source
from train.schedule import adamw_cosine
from train.sources import ImageTextSet
from vision_tokenizers import registry
from vision_tokenizers.diffusion_detok import DetokenizerConfig, DiffusionDetokenizer
from vision_tokenizers.image_io import grid, save_png
from vision_tokenizers.seed import SEEDConfig, SEEDTokenizer


def tokenizer_json_path(export_path: str | Path) -> Path:
    """Where stage 1 writes the caption tokenizer it trained with: beside the tokenizer file."""
    return Path(export_path).with_suffix(".tokenizer.json")


# ---- data: (image, caption ids) pairs for the contrastive stage ---------------------------------

class ImageCaptionDataset(Dataset):
    """(image [C, S, S], caption ids [T] with [CLS] first). Training draws a caption template per visit
    (torch's RNG, so seed_everything makes it repeatable); `fixed_seed` draws once per index."""

    def __init__(self, data: ImageTextSet, tok: TextTokenizer, channels: int, size: int, max_len: int,
                 fixed_seed: int | None = None):
        self.data, self.tok, self.channels, self.size = data, tok, channels, size
        self.max_len, self.fixed_seed = max_len, fixed_seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        seed = int(torch.randint(0, 2**62, ()).item()) if self.fixed_seed is None else self.fixed_seed * 1_000_003 + i
        cap = random.Random(seed).choice(self.data.captions[i])
        ids = [self.tok.bos_id, *self.tok.encode(cap)][: self.max_len]  # <bos> serves as [CLS]
        return self.data.image(i, self.channels, self.size), torch.tensor(ids), int(self.data.labels[i])


class ImageCaptionDataModule(L.LightningDataModule):
    """Images with caption ids, split exactly like the VQ path (`holdout` images set aside by `seed`),
    so held-out images are never trained on. The caption tokenizer is a byte-level BPE trained on the
    training captions (deterministic), or `text_tokenizer` (a tokenizer.json)."""

    def __init__(self, source: str = "mnist", path: str | None = None, holdout: int = 1500, seed: int = 0,
                 channels: int = 1, image_size: int = 28, batch_size: int = 64, val_size: int = 256,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 256, max_text_len: int = 32,
                 num_workers: int = 0):
        super().__init__()
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size
        self.val_size, self.max_text_len, self.num_workers, self.seed = val_size, max_text_len, num_workers, seed
        self.train_data, self.held_data = split_source(source, path, holdout, seed)
        if text_tokenizer:
            self.tokenizer = TextTokenizer.from_file(text_tokenizer)
        else:
            corpus = [c for caps in self.train_data.captions for c in caps]
            self.tokenizer = TextTokenizer.train_bpe(corpus, bpe_vocab_size)

    def setup(self, stage: str | None = None) -> None:
        val = self.held_data.subset(range(min(self.val_size, len(self.held_data))))
        args = (self.tokenizer, self.channels, self.image_size, self.max_text_len)
        self.train_set = ImageCaptionDataset(self.train_data, *args)
        self.val_set = ImageCaptionDataset(val, *args, fixed_seed=self.seed)

    def collate(self, items) -> dict[str, torch.Tensor]:
        images = torch.stack([it[0] for it in items])  # [B, C, S, S]
        t = max(len(it[1]) for it in items)
        text = torch.full((len(items), t), self.tokenizer.pad_id, dtype=torch.long)  # [B, T]
        valid = torch.zeros((len(items), t), dtype=torch.bool)
        for i, (_, ids, _) in enumerate(items):
            text[i, : len(ids)], valid[i, : len(ids)] = ids, True
        labels = torch.tensor([it[2] for it in items])  # [B], -1 where the source has no labels
        return {"images": images, "text": text, "text_valid": valid, "labels": labels}

    def train_dataloader(self):
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.collate, num_workers=self.num_workers)


def _images(batch) -> torch.Tensor:
    return batch["images"] if isinstance(batch, dict) else batch


# ---- stage 1 ------------------------------------------------------------------------------------

def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, temp: torch.Tensor, label_smoothing: float = 0.1):
    """Symmetric InfoNCE over a batch of matching pairs; img, txt [B, K] L2-normalised -> (loss, logits [B, B])."""
    logits = img @ txt.t() / temp  # [B, B]: image i vs text j
    target = torch.arange(len(img), device=img.device)
    loss = (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)) / 2
    return loss, logits


class SEEDStage1Module(L.LightningModule):
    """Causal Q-Former (and at toy scale the ViT) trained with image-text contrastive learning.

    Loss: ITC(last causal query, text [CLS]) + encoder_clip_weight * ITC(encoder's pooled embedding, text [CLS]).
    The second term is not SEED's: it gives the from-scratch toy encoder what EVA-CLIP's pretraining gave the
    paper's, a semantic pooled image embedding, which stage 2 then uses as the generation target (the role of
    CLIP-H's image embedding). With a frozen pretrained encoder it only fits encoder_proj.
    """

    def __init__(self, tokenizer: SEEDConfig = SEEDConfig(), lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 100, label_smoothing: float = 0.1, temp_min: float = 0.001,
                 temp_max: float = 0.5, train_encoder: bool | None = None, encoder_clip_weight: float = 1.0,
                 export_path: str | None = None):
        super().__init__()
        self.tokenizer = SEEDTokenizer(tokenizer, load_encoder_weights=True)
        self.train_encoder = tokenizer.encoder_weights is None if train_encoder is None else train_encoder
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.label_smoothing, self.temp_range, self.export_path = label_smoothing, (temp_min, temp_max), export_path
        self.encoder_clip_weight = encoder_clip_weight
        tok = self.tokenizer.requires_grad_(False)
        trained = [tok.qformer, tok.vision_proj, tok.text_proj, tok.encoder_proj]
        trained += [tok.encoder] if self.train_encoder else []
        for m in trained:
            m.requires_grad_(True)
        tok.temp.requires_grad_(True)

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

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_encoder:
            self.tokenizer.encoder.eval()
        return self

    def _step(self, batch) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        with torch.no_grad():
            tok.temp.clamp_(*self.temp_range)
        feats = tok.image_features(batch["images"])  # [B, prefix + P, E]
        img = tok.contrastive_image(tok.qformer.forward_queries(feats))  # [B, K]
        txt = tok.contrastive_text(batch["text"], batch["text_valid"])  # [B, K]
        loss, logits = contrastive_loss(img, txt, tok.temp, self.label_smoothing)
        extra = {}
        if self.encoder_clip_weight > 0:  # CLIP loss on the encoder's own pooled embedding (same text side)
            clip, clip_logits = contrastive_loss(tok.clip_embedding(feats), txt, tok.temp, self.label_smoothing)
            loss = loss + self.encoder_clip_weight * clip
            extra = {"clip_loss": clip.detach(), "clip_logits": clip_logits}
        # in-batch image->text R@1: a retrieved caption identical to the true one counts as a hit;
        # r1_class: the retrieved caption belongs to an image of the same class (labelled sources)
        best = logits.argmax(1)
        text = batch["text"].masked_fill(~batch["text_valid"], -1)
        out = {"loss": loss, "r1": (text[best] == text).all(1).float().mean()}
        if extra:
            out["clip_loss"] = extra["clip_loss"]
        labels = batch.get("labels")
        if labels is not None and bool((labels >= 0).all()):
            out["r1_class"] = (labels[best] == labels).float().mean()
            if extra:
                out["clip_r1_class"] = (labels[extra["clip_logits"].argmax(1)] == labels).float().mean()
        return out

    def training_step(self, batch, batch_idx):
        out = self._step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"},
                      batch_size=len(batch["images"]))
        self.log("train/temp", self.tokenizer.temp.detach())
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._step(batch)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=len(batch["images"]))

    def configure_optimizers(self):
        opt, sched = adamw_cosine(self.tokenizer, self.lr, self.weight_decay, (0.9, 0.98), self.warmup_steps,
                                  self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmar"] = {"vision": registry.describe(self.tokenizer)}

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            registry.save(self.tokenizer, self.export_path)
            dm = getattr(self.trainer, "datamodule", None)
            if getattr(dm, "tokenizer", None) is not None:
                dm.tokenizer.save(tokenizer_json_path(self.export_path))


# ---- stage 2 ------------------------------------------------------------------------------------

class SEEDStage2Module(L.LightningModule):
    """VQ bottleneck + reconstruction and generation heads on top of a frozen stage-1 tokenizer.

    L = vq_weight * L_vq + rec_weight * (1 - cos(recon, causal)).mean() + gen_weight * MSE(gen, target),
    target = tokenizer.generation_target: by default the frozen stage-1 encoder's pooled embedding through its
    CLIP projection (L2-normalised, times sqrt(G)); with gen_target "pooled" the raw pooled embedding.
    """

    def __init__(self, init_from: str = "results/seed/seed_stage1.safetensors", lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 100, vq_weight: float = 5.0, rec_weight: float = 2.0,
                 gen_weight: float = 0.5, export_path: str | None = None):
        super().__init__()
        tok = registry.load(init_from)
        if not isinstance(tok, SEEDTokenizer):
            raise ValueError(f"{init_from}: not a SEED tokenizer file")
        if tok.config.gen_target == "pooled" and tok.config.gen_dim != tok.encoder_dim:
            raise ValueError(f"gen_dim {tok.config.gen_dim} must equal the encoder width {tok.encoder_dim}: the "
                             "generation target is the encoder's pooled embedding")
        self.tokenizer = tok
        for m in (tok.quant_in, tok.quantizer, tok.quant_out, tok.recon_head, tok.gen_head):
            m.requires_grad_(True)
        self.lr, self.weight_decay, self.warmup_steps, self.export_path = lr, weight_decay, warmup_steps, export_path
        self.weights = (vq_weight, rec_weight, gen_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.tokenizer.encoder, self.tokenizer.qformer, self.tokenizer.encoder_proj):
            m.eval()  # frozen stage-1 parts
        return self

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
        x = _images(batch)
        out = self._step(x)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, batch_size=len(x))
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        x = _images(batch)
        out = self._step(x)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=len(x))

    def configure_optimizers(self):
        opt, sched = adamw_cosine(self.tokenizer, self.lr, self.weight_decay, (0.9, 0.99), self.warmup_steps,
                                  self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmar"] = {"vision": registry.describe(self.tokenizer)}

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            registry.save(self.tokenizer, self.export_path)


# ---- diffusion detokenizer ------------------------------------------------------------------------

class SEEDDetokenizerModule(L.LightningModule):
    """Trains a DiffusionDetokenizer to draw x from decode_embedding(encode(x)) of a frozen stage-2 SEED
    tokenizer: the embeddings it learns from are the ones the LM's codes will give it at generation time.

    `detokenizer`'s in_channels, image_size and embed_dim are taken from the SEED file. The condition is
    replaced by the learned null embedding with probability `p_uncond` (classifier-free guidance). With
    `ema_decay` > 0 an EMA copy is kept and exported. The export is the SEED tokenizer with the
    detokenizer attached, so `decode(codes)` draws images.
    """

    def __init__(self, seed_path: str = "results/seed/seed_stage2.safetensors",
                 detokenizer: DetokenizerConfig = DetokenizerConfig(), lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, p_uncond: float = 0.1, ema_decay: float = 0.999, n_samples: int = 16,
                 export_path: str | None = None):
        super().__init__()
        seed = registry.load(seed_path)
        if not isinstance(seed, SEEDTokenizer):
            raise ValueError(f"{seed_path}: not a SEED tokenizer file")
        seed.detokenizer, seed.config = None, dataclasses.replace(seed.config, detokenizer=None)  # train a fresh one
        self.seed = seed
        sc = seed.config
        cfg = dataclasses.replace(detokenizer, in_channels=sc.in_channels, image_size=sc.image_size,
                                  embed_dim=sc.gen_dim)
        self.detok = DiffusionDetokenizer(cfg)
        self.ema = copy.deepcopy(self.detok).requires_grad_(False) if ema_decay > 0 else None
        self.ema_decay = ema_decay
        self.noise_schedule = self.detok.train_scheduler()
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.p_uncond, self.n_samples, self.export_path = p_uncond, n_samples, export_path

    def train(self, mode: bool = True):
        super().train(mode)
        self.seed.eval()  # frozen; its quantizer must not restart codes
        return self

    def final_detokenizer(self) -> DiffusionDetokenizer:
        return self.ema if self.ema is not None else self.detok

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
        loss = self._loss(_images(batch))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:  # EMA with warm-up: decay min(d, (1 + n) / (10 + n)) after n updates
            n = self.global_step
            decay = min(self.ema_decay, (1 + n) / (10 + n))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.detok.parameters()):
                    e.lerp_(p, 1 - decay)

    def validation_step(self, batch, batch_idx):
        x = _images(batch)
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

    def configure_optimizers(self):
        opt, sched = adamw_cosine(self.detok, self.lr, self.weight_decay, (0.9, 0.99), self.warmup_steps,
                                  self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": sched}

    def exported_tokenizer(self) -> SEEDTokenizer:
        """A copy of the SEED tokenizer with the (EMA) detokenizer attached."""
        seed = copy.deepcopy(self.seed)
        return seed.attach_detokenizer(copy.deepcopy(self.final_detokenizer()).eval())

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            registry.save(self.exported_tokenizer(), self.export_path)
