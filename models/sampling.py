"""Token sampling: temperature, top-k, top-p, allowed-id masks, classifier-free guidance, and the
KV-cached token loop. The objectives' sampling steps are built from these, so they live beside the model;
generate/ reaches them through the objectives. No Lightning and no training code here."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from models.cache import StaticCacheView

Schedule = float | Sequence[float] | Callable[[int], float]


CFG_SCHEDULES = ("linear", "constant")  # xAR guidance across entities (models.objectives.xar.cfg_ramp)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A model's sampling defaults, tuned with its recipe and saved with it (config.json "sampling"): every entry
    point (mmar t2i/t2v, Pipeline, mmar eval, the web page) draws with these unless a caller sets a field.
    Token objectives use cfg / temperature / top_k / top_p; flow matching (xAR) uses cfg / cfg_schedule / steps /
    sampler."""

    cfg: float = 3.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None
    sampler: str | None = None
    cfg_schedule: str | None = None  # xAR: "linear" (1 at the first entity -> cfg at the last) or "constant"

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
        if self.cfg_schedule not in (None, *CFG_SCHEDULES):
            raise ValueError(f"sampling cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")

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


def _allowed_only(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits [B, V] (no copy when already fp32) with the ids not `allowed` ([V] or [B, V]) at -inf."""
    logits = logits.float()
    return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


def filter_probs(
    logits: torch.Tensor,  # [B, V]
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed: torch.Tensor | None = None,  # [V] or [B, V] bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The deterministic part of `sample` (temperature > 0): the probabilities to draw from [B, k] and the ids
    they stand for [B, k] (None: all V ids in order, k = V). No randomness, so it can run inside a compiled graph."""
    logits = _allowed_only(logits, allowed)
    if temperature != 1.0:  # x / 1 == x exactly: skip the kernel
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)  # [B, k], sorted
        if top_p is not None and top_p < 1.0:
            vals = top_p_filter(vals, top_p)
        return vals.softmax(-1), idx
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(-1), None


def greedy(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] -> the likeliest allowed id of each row [B] (temperature 0)."""
    return _allowed_only(logits, allowed).argmax(dim=-1)


def draw(probs: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row [B] from `filter_probs`' (probs [B, k], ids [B, k] | None)."""
    choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def sample(
    logits: torch.Tensor,  # [B, V]
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed: torch.Tensor | None = None,  # [V] or [B, V] bool
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one id per row ([B] long). temperature 0 is greedy."""
    if temperature == 0:
        return greedy(logits, allowed)
    return draw(*filter_probs(logits, temperature, top_k, top_p, allowed), generator)


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


def make_step_fn(model, compile: bool = False, static: bool = False, **compile_kwargs) -> "Step | StaticStep":
    """The model call of the decode loop: (ids [B, T], cache, valid [B, T] | None) -> last logits [B, V].

    The same function serves the prompt and every later token, with or without padding, block ids or
    guidance: the KV cache keeps track of positions, validity and blocks. `compile=True` runs the
    backbone through `torch.compile` (dynamic shapes, so a growing cache does not recompile per token);
    `compile_kwargs` go to torch.compile.

    `static=True` returns a `StaticStep` instead: the prompt runs eagerly as above, every later token through
    one fixed-shape step (the cache written in place, attention over all of it, the sampling filters inside;
    compiled when `compile=True`). That is the fast compiled path; the dynamic one above is kept for comparison."""
    if static:
        return StaticStep(model, compile, **compile_kwargs)
    forward = torch.compile(model, dynamic=True, **compile_kwargs) if compile else model

    def step(ids: torch.Tensor, cache, valid: torch.Tensor | None = None) -> torch.Tensor:
        if compile:  # same tensor kind on every call (a prompt made outside inference mode would recompile)
            ids, valid = ids.clone(), None if valid is None else valid.clone()
        return model.head(forward(ids, valid=valid, cache=cache)[:, -1])

    return step


def static_step(model, tok, k, v, valid, pos, position_ids, cfg_scale, allowed, temperature, top_k, top_p):
    """One decoding step over fixed shapes, what `StaticStep` compiles (gpt-fast style):

    tok [B] the ids just drawn (fed twice, conditional then unconditional rows, with `cfg_scale`); k, v
    L x [rows, K, S_max, E] a `KVCache`'s buffers, written in place at slot `pos` [1]; valid [rows, S_max];
    position_ids [rows, 1] the new slot's RoPE positions. Returns greedy ids [B] at temperature 0, else
    `filter_probs`' (probs [B, k], ids [B, k] | None): the random draw stays outside (same stream as eager)."""
    inp = (torch.cat([tok, tok]) if cfg_scale is not None else tok).unsqueeze(1)  # [rows, 1]
    view = StaticCacheView(k, v, valid, pos, position_ids)
    logits = model.head(model.forward(inp, cache=view)[:, -1])  # [rows, V]
    if cfg_scale is not None:
        logits = cfg_combine(logits, cfg_scale)  # [B, V]
    if temperature == 0:
        return greedy(logits, allowed)
    return filter_probs(logits, temperature, top_k, top_p, allowed)


_COMPILED: dict[tuple, Callable] = {}  # compile options -> torch.compile(static_step): one wrapper, no recompiles


def compiled_static_step(**compile_kwargs) -> Callable:
    """`static_step` through torch.compile with these options (e.g. mode="reduce-overhead" for CUDA graphs),
    made once per set of options: a new torch.compile wrapper would compile the same graphs again."""
    key = tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(static_step, **compile_kwargs)
    return _COMPILED[key]


class StaticStep:
    """`make_step_fn(model, static=True)`: eager prefill (`__call__`, as the plain step) and fixed-shape decoding
    steps (`next`), compiled or not. `generate` calls `next` for every token after the first.

    The first `generate` call of a batch shape compiles (seconds to a minute on a small CPU; benchmarks/lm_speed.py
    records it); later calls of that shape reuse the graphs, whatever the prompt length or number of new tokens
    only where the cache length is the same (a new length compiles once more, then shapes go dynamic)."""

    static = True

    def __init__(self, model, compile: bool = False, **compile_kwargs):
        self.model, self.compile = model, compile
        self.cuda_graphs = compile_kwargs.get("mode") in ("reduce-overhead", "max-autotune")
        self.fn = compiled_static_step(**compile_kwargs) if compile else static_step
        # the nn.Module whose forward decodes (a wrapper such as vision_tokenizers.projectors.WithEmbeds hands its
        # later calls to its backbone unchanged): what the compiled step is traced through
        self.net = model.forward.__self__

    def __call__(self, ids: torch.Tensor, cache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt, eagerly: last logits [rows, V]."""
        return self.model.head(self.model(ids, valid=valid, cache=cache)[:, -1])

    def next(self, tok: torch.Tensor, cache, pos: torch.Tensor, cfg_scale, allowed, temperature: float,
             top_k: int | None, top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
        """Feed the drawn ids tok [B] at slot `pos` [1] (cache.pos as a tensor); the next ids [B]. Moves the
        cache's bookkeeping (and `pos`) on by one slot."""
        if cache.custom_blocks:
            raise ValueError("static decoding is causal: the cache holds custom block ids")
        if self.cuda_graphs:  # the cache buffers are written in place: CUDA graphs must not copy them
            for buf in cache.k + cache.v:
                torch._dynamo.mark_static_address(buf)
        out = self.fn(self.net, tok, cache.k, cache.v, cache.valid, pos, cache.next_position, cfg_scale, allowed,
                      temperature, top_k, top_p)
        tok = out if temperature == 0 else draw(*out, generator)
        for hook in tuple(self.net._forward_hooks.values()):  # one forward per step, as eager (progress bars)
            hook(self.net, (tok,), None)
        cache.advance(1)
        cache.next_position = cache.next_position + 1
        pos += 1
        return tok


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
    model call, e.g. with a compiled one, or with `make_step_fn(model, static=True, compile=True)` the fixed-shape
    compiled decoding (same tokens as eager under the same generator).
    """
    rows, t = prompt.shape
    if cfg_scale is not None and rows % 2:
        raise ValueError(f"classifier-free guidance needs conditional and unconditional rows in equal number, "
                         f"got {rows} rows")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = rows // 2 if cfg_scale is not None else rows
    step_fn = step_fn or make_step_fn(model)
    static = getattr(step_fn, "static", False)  # a StaticStep: tokens after the first through its fixed-shape step
    cache = model.new_cache(rows, t + max_new_tokens, device=prompt.device)
    logits = step_fn(prompt, cache, valid)  # [rows, V]
    pos = torch.tensor([cache.pos], device=prompt.device) if static else None  # [1] the slot written next
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=prompt.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device) if stop_id is not None else None
    n = 0
    for step in range(max_new_tokens):
        scale = _at(cfg_scale, step)
        allow = allowed(step) if callable(allowed) else allowed
        if static and step:
            tok = step_fn.next(tok, cache, pos, scale, allow, temperature, top_k, top_p, generator)  # [B]
        else:
            lg = cfg_combine(logits, scale) if cfg_scale is not None else logits
            tok = sample(lg, temperature, top_k, top_p, allow, generator)  # [B]
        if done is not None:
            tok = tok.masked_fill(done, stop_id)
            done |= tok == stop_id
        out[:, step] = tok
        n = step + 1
        if n == max_new_tokens or (done is not None and bool(done.all())):
            break
        if not static:
            inp = (torch.cat([tok, tok]) if cfg_scale is not None else tok).unsqueeze(1)  # [rows, 1]
            logits = step_fn(inp, cache)
    return out[:, :n]
