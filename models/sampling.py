"""Token sampling: temperature, top-k, top-p, allowed-id masks, classifier-free guidance, and the
KV-cached token loop. The objectives' sampling steps are built from these, so they live beside the model;
generate/ reaches them through the objectives. No Lightning and no training code here."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

Schedule = float | Sequence[float] | Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A model's sampling defaults, tuned with its recipe and saved with it (config.json "sampling"): every entry
    point (mmar t2i/t2v, Pipeline, mmar eval, the web page) draws with these unless a caller sets a field.
    Token objectives use cfg / temperature / top_k / top_p; flow matching (xAR) uses cfg / steps / sampler."""

    cfg: float = 3.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None
    sampler: str | None = None

    def __post_init__(self):
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise ValueError(f"sampling cfg must be a finite number >= 0, got {self.cfg}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"sampling temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if self.sampler not in (None, "euler", "em"):
            raise ValueError(f"sampling sampler must be euler or em, got {self.sampler!r}")

    def override(self, **given) -> "SamplingConfig":
        """These defaults with every field the caller set (not None) replaced, validated."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


def _at(value: Schedule | None, step: int) -> float | None:
    """Value of a constant, per-step list, or callable schedule at `step`."""
    if value is None or isinstance(value, (int, float)):
        return value
    if callable(value):
        return value(step)
    return value[min(step, len(value) - 1)]


def id_range_mask(vocab_size: int, lo: int, hi: int, extra: Sequence[int] = (), device=None) -> torch.Tensor:
    """[V] bool, True on ids in [lo, hi) and on `extra` ids."""
    m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    m[lo:hi] = True
    if extra:
        m[list(extra)] = True
    return m


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches p; the rest get -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each id
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def cfg_combine(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """[2B, V] with conditional rows first -> [B, V] guided logits u + s * (c - u)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def sample(
    logits: torch.Tensor,  # [B, V]
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed: torch.Tensor | None = None,  # [V] or [B, V] bool
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one id per row ([B] long). temperature 0 is greedy."""
    logits = logits.float()  # no copy when already fp32
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:  # x / 1 == x exactly: skip the kernel
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)  # [B, k], sorted
        if top_p is not None and top_p < 1.0:
            vals = top_p_filter(vals, top_p)
        choice = torch.multinomial(vals.softmax(-1), 1, generator=generator)  # [B, 1]
        return idx.gather(-1, choice).squeeze(-1)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ids [B, T] and a validity mask [B, T] (prompts end at the same column)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, t - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            valid[i, t - len(s):] = True
    return ids, valid


Step = Callable[..., torch.Tensor]


def make_step_fn(model, compile: bool = False, **compile_kwargs) -> Step:
    """The model call of the decode loop: (ids [B, T], cache, valid [B, T] | None) -> last logits [B, V].

    The same function serves the prompt and every later token, with or without padding, block ids or
    guidance: the KV cache keeps track of positions, validity and blocks. `compile=True` runs the
    backbone through `torch.compile` (dynamic shapes, so a growing cache does not recompile per token);
    `compile_kwargs` go to torch.compile."""
    forward = torch.compile(model, dynamic=True, **compile_kwargs) if compile else model

    def step(ids: torch.Tensor, cache, valid: torch.Tensor | None = None) -> torch.Tensor:
        if compile:  # same tensor kind on every call (a prompt made outside inference mode would recompile)
            ids, valid = ids.clone(), None if valid is None else valid.clone()
        return model.head(forward(ids, valid=valid, cache=cache)[:, -1])

    return step


@torch.inference_mode()
def generate(
    model,
    prompt: torch.Tensor,  # [B, T] (or [2B, T] with cfg_scale: conditional rows first)
    max_new_tokens: int,
    *,
    valid: torch.Tensor | None = None,  # [B, T] False on left padding
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    cfg_scale: Schedule | None = None,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    step_fn: Step | None = None,
) -> torch.Tensor:
    """KV-cached sampling; returns the new ids [B, N] (N <= max_new_tokens when stop_id ends all rows).

    With `cfg_scale` the batch holds conditional then unconditional prompts; both halves receive the
    same sampled token and the guided logits are used. `step_fn` (make_step_fn) replaces the eager
    model call, e.g. with a compiled one.
    """
    rows, t = prompt.shape
    if cfg_scale is not None and rows % 2:
        raise ValueError(f"classifier-free guidance needs conditional and unconditional rows in equal number, "
                         f"got {rows} rows")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = rows // 2 if cfg_scale is not None else rows
    step_fn = step_fn or make_step_fn(model)
    cache = model.new_cache(rows, t + max_new_tokens, device=prompt.device)
    logits = step_fn(prompt, cache, valid)  # [rows, V]
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=prompt.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device) if stop_id is not None else None
    n = 0
    for step in range(max_new_tokens):
        lg = cfg_combine(logits, _at(cfg_scale, step)) if cfg_scale is not None else logits
        allow = allowed(step) if callable(allowed) else allowed
        tok = sample(lg, temperature, top_k, top_p, allow, generator)  # [B]
        if done is not None:
            tok = tok.masked_fill(done, stop_id)
            done |= tok == stop_id
        out[:, step] = tok
        n = step + 1
        if n == max_new_tokens or (done is not None and bool(done.all())):
            break
        inp = (torch.cat([tok, tok]) if cfg_scale is not None else tok).unsqueeze(1)  # [rows, 1]
        logits = step_fn(inp, cache)
    return out[:, :n]
