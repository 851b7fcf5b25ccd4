"""Text->image and image->text on a loaded Bundle; the scripts and the training callback call these."""
from __future__ import annotations

import torch

from generate.sampling import generate, id_range_mask, left_pad
from models.bundle import Bundle


def _t2i_prompt(b: Bundle, caption: str | None) -> list[int]:
    tok = b.tokenizer
    text = [] if caption is None else tok.encode(caption)
    return [tok.bos_id, *text, tok.boi_id]


@torch.inference_mode()
def text_to_image(
    b: Bundle,
    prompts: list[str],
    n: int = 1,
    cfg: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images [len(prompts) * n, C, H, W] in [-1, 1], prompt-major order.

    Only image codes are sampled inside the image span; with cfg != 1 the batch is doubled with
    the unconditional prompt `<bos> <boi>` (the caption-dropped form seen in training).
    """
    for p in prompts:
        if not p.strip():
            raise ValueError("empty prompt: give a non-empty --prompt")
    rows = [_t2i_prompt(b, p) for p in prompts for _ in range(n)]
    guided = cfg != 1.0
    if guided:
        rows = rows + [_t2i_prompt(b, None)] * len(rows)
    ids, valid = left_pad(rows, b.tokenizer.pad_id)
    n_codes = b.vision.num_tokens
    if ids.shape[1] + n_codes > b.max_len:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + {n_codes} image codes exceeds max_len {b.max_len}")
    lo = b.layout.image_offset
    allowed = id_range_mask(b.lm.cfg.vocab_size, lo, lo + b.layout.image_codes, device=ids.device)
    dev = b.lm.tok_emb.weight.device
    codes = generate(
        b.lm, ids.to(dev), n_codes, valid=valid.to(dev), temperature=temperature, top_k=top_k, top_p=top_p,
        allowed=allowed.to(dev), cfg_scale=cfg if guided else None, generator=generator,
    ) - lo  # [B, N]
    return b.vision.decode(codes.view(len(codes), *b.vision.code_shape))


@torch.inference_mode()
def caption(
    b: Bundle,
    images: torch.Tensor,  # [B, C, H, W] in [-1, 1], already at the trained size
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Captions for a batch of images: prompt `<bos> <boi> codes <eoi>`, sample text until <eos>."""
    tok = b.tokenizer
    dev = b.lm.tok_emb.weight.device
    codes = b.vision.encode(images.to(dev)).flatten(1)  # [B, N]
    prefix = torch.tensor([tok.bos_id, tok.boi_id], device=dev).expand(len(codes), 2)
    eoi = torch.full((len(codes), 1), tok.eoi_id, device=dev)
    ids = torch.cat([prefix, b.layout.image_to_ids(codes), eoi], 1)  # [B, N + 3]
    max_new_tokens = min(max_new_tokens, b.max_len - ids.shape[1])
    # text ids only (no specials but <eos>, no image codes)
    allowed = id_range_mask(b.lm.cfg.vocab_size, 0, b.layout.text_size, device=dev)
    allowed[tok.special_ids] = False
    allowed[tok.eos_id] = True
    out = generate(b.lm, ids, max_new_tokens, temperature=temperature, top_p=top_p, allowed=allowed,
                   stop_id=tok.eos_id, generator=generator)
    return [tok.decode(t for t in row.tolist() if t != tok.eos_id) for row in out]
