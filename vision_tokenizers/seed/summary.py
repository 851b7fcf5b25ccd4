"""Parameter counts of the paper-sized SEED tokenizer and SEED-LLaMA LM, built on the meta device."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import real_size_config
from .tokenizer import SEEDTokenizer


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level child and in total (works on the meta device)."""
    out = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def real_size_summary(lm_preset: str = "vicuna-7b", verbose: bool = True) -> dict[str, int]:
    """Build the paper-sized SEED tokenizer and SEED-LLaMA LM on the meta device (no memory, no weights)
    and return / print their parameter counts (the tokenizer's per top-level part, plus the Q-Former's and
    the reverse Q-Former's)."""
    from models.config import LMConfig
    from models.text_tokenizer import SPECIAL_TOKENS
    from models.transformer import Transformer
    from models.vocab import VocabLayout

    cfg = real_size_config()
    with torch.device("meta"):
        seed = SEEDTokenizer(cfg)
        base = LMConfig.from_preset(lm_preset)
        layout = VocabLayout(base.vocab_size + len(SPECIAL_TOKENS), cfg.codebook_size)
        lm = Transformer(dataclasses.replace(base, vocab_size=layout.size))
    counts = {f"seed.{k}": v for k, v in parameter_counts(seed).items()}
    counts["seed.gen_head.reverse"] = sum(p.numel() for p in seed.gen_head.reverse.parameters())
    counts["lm.vocab_size"] = layout.size
    counts["lm.total"] = sum(p.numel() for p in lm.parameters())
    if verbose:
        for k, v in counts.items():
            print(f"{k:<22} {v:>15,}")
    return counts
