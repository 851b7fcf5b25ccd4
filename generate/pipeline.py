"""Text->image and image->text on a loaded Bundle; the scripts, the demo and the training callback call these.

Prompts come from the model's sequence format (models/sequence.py), the same code that built its
training samples; decoding is the model's objective's (models/objectives/).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from models.bundle import Bundle
from models.sampling import id_range_mask, left_pad


@contextmanager
def forward_progress(lm: torch.nn.Module, total: int, progress: Callable[[int, int], None] | None):
    """Calls progress(done, total) before the first and after each forward pass of `lm` (one per decoding step;
    guided prompts are one batch, so one pass), `done` capped at total. No-op when progress is None."""
    if progress is None:
        yield
        return
    done = [0]

    def hook(*_):
        done[0] = min(done[0] + 1, total)
        progress(done[0], total)

    handle = lm.register_forward_hook(hook)
    try:
        progress(0, total)
        yield
    finally:
        handle.remove()


def tqdm_progress(desc: str):
    """A progress(done, total) callback drawing a tqdm bar on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="pass", disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


def _device(b: Bundle) -> torch.device:
    return b.lm.tok_emb.weight.device


@torch.inference_mode()
def text_to_image(
    b: Bundle,
    prompts: list[str],
    n: int = 1,
    cfg: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    steps: int | None = None,
    sampler: str | None = None,
) -> torch.Tensor:
    """Images [len(prompts) * n, C, H, W] in [-1, 1], prompt-major order.

    Every option left at None takes the model's saved sampling defaults (`b.sampling`). Only image codes are
    sampled inside the image span; with cfg != 1 the batch is doubled with the unconditional prompt (the
    caption-dropped form the model was trained on). A continuous-latent objective (xAR) draws latents with
    `steps` / `sampler` instead, and refuses temperature, top-k and top-p, which do not apply to it.
    """
    s = b.sampling.override(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, steps=steps, sampler=sampler)
    continuous = getattr(b.objective, "continuous", False)
    if continuous and (temperature, top_k, top_p) != (None, None, None):
        raise ValueError("this model draws by flow matching (xAR): temperature, top-k and top-p do not apply; "
                         "use steps and sampler")
    fmt = b.format
    rows = [fmt.t2i_prompt(p) for p in prompts for _ in range(n)]
    guided = s.cfg != 1.0
    if guided:
        rows = rows + [fmt.t2i_prompt(None)] * len(rows)
    ids, valid = left_pad(rows, b.tokenizer.pad_id)
    n_codes = b.vision.num_tokens
    if ids.shape[1] + n_codes > b.max_len:
        what = "latents" if continuous else "image codes"
        raise ValueError(f"prompt of {ids.shape[1]} tokens + {n_codes} {what} exceeds max_len {b.max_len}")
    dev, cfg_scale = _device(b), s.cfg if guided else None
    if continuous:
        latents = b.objective.generate(b.lm, ids.to(dev), valid=valid.to(dev), cfg_scale=cfg_scale, steps=s.steps,
                                       sampler=s.sampler, generator=generator)  # [B, c, h, w]
        return b.vision.decode(latents)
    lo = b.layout.image_offset
    allowed = id_range_mask(b.lm.cfg.vocab_size, lo, lo + b.layout.image_codes, device=dev)
    codes = b.objective.generate(
        b.lm, ids.to(dev), n_codes, valid=valid.to(dev), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        allowed=allowed, cfg_scale=cfg_scale, generator=generator,
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
    tokens: int | None = None,
) -> list[str]:
    """Captions for a batch of images: the captioning prompt, then text until <eos>.

    A model with continuous image inputs (`b.visual`: ETT codebook embeddings, TokenFLEX pooled features) reads
    each image as `tokens` vectors in embedding slots (TokenFLEX: any square count; default: the model's)."""
    if getattr(b.objective, "continuous", False):
        raise ValueError("this checkpoint draws continuous latents (xAR); it does not caption images")
    tok, fmt, dev = b.tokenizer, b.format, _device(b)
    lm = b.lm
    if b.visual is not None:
        from vision_tokenizers.projectors import WithEmbeds

        embeds = b.visual(images.to(dev), b.vision, tokens)  # [B, N, D]
        ids = torch.tensor([fmt.caption_prompt_slots(embeds.shape[1])] * len(images), device=dev)  # [B, T]
        lm = WithEmbeds(b.lm, embeds.flatten(0, 1), fmt.image_slots(ids))
    elif tokens is not None and tokens != b.vision.num_tokens:
        raise ValueError(f"this model reads images as {b.vision.num_tokens} code ids; it has no token count to choose")
    else:
        codes = b.vision.encode(images.to(dev))  # [B, h, w]
        ids = torch.tensor([fmt.caption_prompt(c) for c in codes], device=dev)  # [B, T] (all the same length)
    max_new_tokens = min(max_new_tokens, b.max_len - ids.shape[1])
    allowed = id_range_mask(b.lm.cfg.vocab_size, 0, b.layout.text_size, device=dev)  # text ids and <eos> only
    allowed[tok.special_ids] = False
    allowed[tok.eos_id] = True
    out = b.objective.generate(lm, ids, max_new_tokens, temperature=temperature, top_p=top_p, allowed=allowed,
                               stop_id=tok.eos_id, generator=generator)
    return [tok.decode(t for t in row.tolist() if t != tok.eos_id) for row in out]


@torch.inference_mode()
def text_to_video(
    b: Bundle,
    prompts: list[str],
    n: int = 1,
    cfg: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Videos [len(prompts) * n, C, T, H, W] in [-1, 1], prompt-major order. The same prompt and decoding as
    text_to_image (the video codes are the visual span); the model's objective decides token- or block-wise."""
    if len(getattr(b.vision, "code_shape", ())) != 3:
        raise ValueError("this model's vision tokenizer is not a video tokenizer; use generate.text_to_image")
    return text_to_image(b, prompts, n, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator)
