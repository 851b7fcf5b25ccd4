"""SEEDConfig: the shape of a SEED tokenizer (toy defaults), and `real_size_config()`: the paper's sizes."""
from __future__ import annotations

from dataclasses import dataclass

from ..diffusion_detok import DetokenizerConfig, config_from_dict


@dataclass
class SEEDConfig:
    """Shape of a SEEDTokenizer. Defaults: the paper's 32 queries and 8192 x 32 codebook around an
    MNIST-sized encoder and Q-Former; `real_size_config()` gives the paper's full sizes."""

    in_channels: int = 1
    image_size: int = 28
    # encoder: any timm ViT; the optional fields override the named model's shape (None = keep it)
    encoder: str = "vit_tiny_patch16_224"
    encoder_weights: str | None = None  # local weights file; only training loads it (the saved file holds the weights)
    patch_size: int | None = 4
    encoder_dim: int | None = 96
    encoder_depth: int | None = 3
    encoder_heads: int | None = 4
    pixel_mean: tuple[float, ...] | None = None  # encoder input = ((x + 1) / 2 - mean) / std; None = x as is
    pixel_std: tuple[float, ...] | None = None
    # Causal Q-Former (BERT-style; the queries have their own feed-forward, the text another)
    num_queries: int = 32
    qformer_dim: int = 128
    qformer_layers: int = 4
    qformer_heads: int = 4
    qformer_mlp_ratio: float = 4.0
    cross_attention_freq: int = 2  # layers 0, f, 2f, ... cross-attend (Causal and reverse Q-Former alike)
    text_vocab_size: int = 512  # Q-Former text embedding rows (>= the caption tokenizer's vocabulary)
    max_text_len: int = 32
    contrastive_dim: int = 256
    dropout: float = 0.0
    # VQ bottleneck
    codebook_size: int = 8192
    code_dim: int = 32
    # 0.25: SEED's official code (VectorQuantizer2(..., beta=0.25)), which weights the codebook term with it and the
    # commitment term 1 (legacy=True); train.seed.stage2's beta_on picks the term
    beta: float = 0.25
    # Not in the paper (its codebook starts uniform in +-1/K): k-means init on stage 2's first batch. The uniform
    # init left ~5% of the toy codebook in use; this project's choice.
    data_init: bool = True
    restart_dead_codes: bool = False  # not in the paper; the toy configs turn it on against collapse
    # heads
    head_heads: int = 4
    recon_layers: int = 4
    gen_layers: int = 4
    reverse_qformer_layers: int = 4  # the paper's: 12 (BERT-base), see real_size_config
    gen_dim: int = 256  # generation-embedding size G (1024 = CLIP-H for unCLIP at full scale)
    # what the generation head learns to predict (stage 2): "clip" = the frozen encoder's CLIP image embedding
    # (pooled patch tokens -> encoder_proj -> L2-normalised, times sqrt(G); needs gen_dim == contrastive_dim);
    # "pooled" = the raw mean of the encoder's patch tokens (needs gen_dim == encoder width)
    gen_target: str = "clip"
    detokenizer: DetokenizerConfig | None = None  # set when a diffusion detokenizer is attached

    def __post_init__(self) -> None:
        self.detokenizer = config_from_dict(self.detokenizer)
        for name in ("pixel_mean", "pixel_std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(v)
                if len(v) != self.in_channels:
                    raise ValueError(f"{name} needs {self.in_channels} entries, got {len(v)}")
                setattr(self, name, v)
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("give both pixel_mean and pixel_std, or neither")
        if self.qformer_dim % self.qformer_heads or self.qformer_dim % self.head_heads:
            raise ValueError(f"qformer_dim {self.qformer_dim} must be divisible by qformer_heads and head_heads")
        if self.gen_target not in ("clip", "pooled"):
            raise ValueError(f"gen_target must be 'clip' or 'pooled', got {self.gen_target!r}")
        if self.gen_target == "clip" and self.gen_dim != self.contrastive_dim:
            raise ValueError(f"gen_target 'clip' needs gen_dim ({self.gen_dim}) == "
                             f"contrastive_dim ({self.contrastive_dim})")
        if self.num_queries < 1 or self.cross_attention_freq < 1 or self.reverse_qformer_layers < 1:
            raise ValueError("num_queries, cross_attention_freq and reverse_qformer_layers must be >= 1")
        if self.detokenizer is not None:
            d = self.detokenizer
            if (d.embed_dim, d.in_channels, d.image_size) != (self.gen_dim, self.in_channels, self.image_size):
                raise ValueError(f"detokenizer (embed_dim {d.embed_dim}, {d.in_channels}x{d.image_size}px) does not "
                                 f"fit this tokenizer (gen_dim {self.gen_dim}, {self.in_channels}x{self.image_size}px)")


def real_size_config() -> SEEDConfig:
    """The paper's SEED: EVA-CLIP ViT-g/14 at 224px (257 tokens), BERT-base Q-Former (12 layers, 768,
    cross-attention every 2nd layer, BERT's 30,522-token vocabulary, separate query and text feed-forwards),
    32 queries, 8192 x 32 codebook, 4-block heads, a BERT-base reverse Q-Former (12 layers, cross-attention
    every 2nd layer, query feed-forward only: the official code's `init_Qformer(1, 768)` with the word/position
    embeddings and text feed-forward removed), 1024-d generation embedding (CLIP-H, what unCLIP SD takes)."""
    return SEEDConfig(
        in_channels=3, image_size=224, encoder="eva_giant_patch14_224", patch_size=None, encoder_dim=None,
        encoder_depth=None, encoder_heads=None, pixel_mean=(0.48145466, 0.4578275, 0.40821073),
        pixel_std=(0.26862954, 0.26130258, 0.27577711), num_queries=32, qformer_dim=768, qformer_layers=12,
        qformer_heads=12, cross_attention_freq=2, text_vocab_size=30522, max_text_len=32, contrastive_dim=256,
        codebook_size=8192, code_dim=32, head_heads=12, recon_layers=4, gen_layers=4, reverse_qformer_layers=12,
        gen_dim=1024, gen_target="pooled",  # the paper regresses CLIP-H's 1024-d embedding (supplied from outside)
    )
