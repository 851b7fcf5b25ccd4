"""Language-model configuration: one dataclass plus named presets (toy sizes and the papers' real sizes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.io import dataclass_from_dict


@dataclass
class LMConfig:
    """Shape of a Llama-style decoder. Saved next to every checkpoint as plain JSON."""

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> same as n_heads (no grouping)
    mlp_dim: int = 344
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_len: int = 2048
    adaln: bool = False  # per-position adaLN condition in every block (xAR's time conditioning)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "LMConfig":
        return dataclass_from_dict(cls, d, source)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, LMConfig] = {
    # Unit tests: a few thousand parameters.
    "tiny": LMConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128, max_len=512),
    # The MNIST demo (a few million parameters; trains in minutes on 2 CPU cores).
    "demo": LMConfig(vocab_size=1024, dim=256, n_layers=4, n_heads=8, mlp_dim=688, max_len=256),
    # Scenes understanding recipes (configs/scenes_*.yaml, docs/understanding.md): 1.05M parameters, CPU-sized.
    "scenes": LMConfig(vocab_size=1024, dim=128, n_layers=4, n_heads=4, mlp_dim=344, max_len=128),
    # SEED-LLaMA's 7B backbone (Vicuna-7B / LLaMA-7B): 6.74B parameters.
    "vicuna-7b": LMConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, mlp_dim=11008,
                          norm_eps=1e-6, max_len=4096),
    # ETT's backbone (Qwen2.5-1.5B): GQA with 2 kv heads, qkv bias, tied embeddings: 1.54B parameters.
    "qwen2.5-1.5b": LMConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                             mlp_dim=8960, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
                             tie_embeddings=True, max_len=32768),
    # An NBP-700M-sized decoder (24 layers, width 1536, 16 heads) over a 64k FSQ vocabulary + text.
    "nbp-700m": LMConfig(vocab_size=64000 + 1024, dim=1536, n_layers=24, n_heads=16, mlp_dim=4096,
                         max_len=8192),
    # xAR (DESIGN §5): the toy backbone of configs/mnist_xar.yaml (the demo's size, with adaLN time conditioning).
    "xar-demo": LMConfig(vocab_size=1024, dim=256, n_layers=4, n_heads=8, mlp_dim=688, max_len=256, adaln=True),
    # xAR-B / L / H: the official widths and depths (encoder + decoder blocks counted together), SwiGLU at
    # 8/3 x width, qkv bias, a 6 x width adaLN per block; with the objective's input/velocity layers and a small
    # text vocabulary they come to the paper's 172M / 608M / 1.1B (tests/test_xar.py checks on the meta device;
    # H's SwiGLU width is narrowed to 2880 to land within 2% of the paper's rounded 1.1B).
    "xar-b": LMConfig(vocab_size=1024, dim=768, n_layers=16, n_heads=12, mlp_dim=2048, qkv_bias=True,
                      max_len=1024, adaln=True),
    "xar-l": LMConfig(vocab_size=1024, dim=1024, n_layers=32, n_heads=16, mlp_dim=2730, qkv_bias=True,
                      max_len=1024, adaln=True),
    "xar-h": LMConfig(vocab_size=1024, dim=1280, n_layers=40, n_heads=16, mlp_dim=2880, qkv_bias=True,
                      max_len=1024, adaln=True),
}
