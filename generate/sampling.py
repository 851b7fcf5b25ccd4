"""Token sampling: temperature, top-k, top-p, allowed-id masks, classifier-free guidance, and the
KV-cached decoding loop shared by every generation script."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Schedule = float | Sequence[float] | Callable[[int], float]


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
    step_fn: Callable | None = None,
) -> torch.Tensor:
    """KV-cached sampling; returns the new ids [B, N] (N <= max_new_tokens when stop_id ends all rows).

    With `cfg_scale` the batch holds conditional then unconditional prompts; both halves receive
    the same sampled token and the guided logits are used. `step_fn(ids [rows, 1], cache) -> logits
    [rows, V]` may replace the per-token model call when there is no padding (e.g. `make_step_fn(model,
    compile=True)`); it must advance the cache by one position.
    """
    rows, t = prompt.shape
    b = rows // 2 if cfg_scale is not None else rows
    device = prompt.device
    cache = model.new_cache(rows, t + max_new_tokens, device=device)
    if valid is not None and bool(valid.all()):
        valid = None
    if valid is not None:
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [rows, T]
        logits = model(prompt, position_ids=pos, valid=valid, cache=cache)[:, -1]
        next_pos = pos[:, -1:] + 1  # [rows, 1]
    else:
        logits = model(prompt, cache=cache)[:, -1]
        next_pos = None
    step_valid = torch.ones(rows, 1, dtype=torch.bool, device=device) if valid is not None else None
    if next_pos is None and step_fn is None:
        step_fn = _eager_step(model)
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device) if stop_id is not None else None
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
        if next_pos is not None:
            logits = model(inp, position_ids=next_pos, valid=step_valid, cache=cache)[:, -1]
            next_pos = next_pos + 1
        else:
            logits = step_fn(inp, cache)
    return out[:, :n]


def _eager_step(model) -> Callable:
    def step(ids: torch.Tensor, cache) -> torch.Tensor:
        return model(ids, cache=cache)[:, -1]

    return step


def make_step_fn(model, compile: bool = False, transposed_weights: bool = False, **compile_kwargs) -> Callable:
    """A one-token decode step for `generate(step_fn=...)`: (ids [B, 1], cache) -> logits [B, V].

    Without `compile` this is the eager `model(ids, cache=cache)[:, -1]`. With `compile=True` the
    step of our models.transformer.Transformer runs through `torch.compile` (Inductor fuses each
    layer's norms, RoPE, attention and SwiGLU into a few C++ loops around the matmuls). The graph
    reads the filled part of the KV cache as inputs (the length is a dynamic dimension, so it
    compiles once or twice, not per position) and returns this position's keys/values, which are
    written into the cache outside it: writing them inside made Inductor copy the whole cache every
    step. Plain causal decoding only (no padding or block ids), which is when generate() calls it.

    `transposed_weights=True` (with compile) multiplies by [in, out] copies of the projection and
    head weights, which MKL's small-batch GEMM reads faster than nn.Linear's [out, in] layout: it
    costs one extra copy of those weights while the step function lives (refreshed whenever a weight
    changes). `compile_kwargs` go to torch.compile (e.g. mode=...).
    """
    if not compile:
        if transposed_weights:
            raise ValueError("transposed_weights needs compile=True")
        return _eager_step(model)
    graph = torch.compile(_decode_graph, fullgraph=True, **compile_kwargs)
    rope = model.rope
    weights = _TransposedWeights(model) if transposed_weights else None

    def step(ids: torch.Tensor, cache) -> torch.Tensor:
        pos = cache.pos
        if cache.has_padding or cache.uses_blocks:
            raise ValueError("the compiled decode step supports plain causal caches only")
        if pos + 1 > cache.max_len:
            raise ValueError(f"sequence of {pos + 1} positions exceeds the KV cache length {cache.max_len}")
        cos, sin = rope.table(pos, pos + 1, cache.k.dtype)  # [1, 1, E]
        ks, vs = list(cache.k[:, :, :, :pos].unbind(0)), list(cache.v[:, :, :, :pos].unbind(0))
        if pos > 1:  # one graph for every cache length (0 and 1 are always specialised)
            for t in ks + vs:
                torch._dynamo.maybe_mark_dynamic(t, 2)
        logits, k, v = graph(model, ids, cos, sin, ks, vs, weights() if weights else None)
        cache.k[:, :, :, pos:pos + 1] = k
        cache.v[:, :, :, pos:pos + 1] = v
        cache.pos = pos + 1
        return logits

    return step


class _TransposedWeights:
    """Contiguous [in, out] copies of every projection and head weight, in _decode_graph's order,
    rebuilt when a weight is replaced or modified in place (tracked by data pointer and version)."""

    def __init__(self, model):
        self.linears = [m for blk in model.blocks for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.gate_up, blk.mlp.down)]
        self.linears.append(model.head)
        self.key, self.copies = None, None

    def __call__(self) -> list[torch.Tensor]:
        key = [(m.weight.data_ptr(), m.weight._version) for m in self.linears]
        if key != self.key:
            with torch.no_grad():
                self.copies = [m.weight.t().contiguous() for m in self.linears]
            self.key = key
        return self.copies


def _decode_graph(model, ids, cos, sin, ks, vs, weights_t=None):
    """One position through the Transformer: ids [B, 1], cos/sin [1, 1, E] (half-negated sin), per
    layer cached keys/values [B, K, S, E], optionally [in, out] weight copies (_TransposedWeights).
    Returns logits [B, V] and keys/values [L, B, K, 1, E]."""
    wt = iter(weights_t or ())

    def linear(mod, x):
        if weights_t is None:
            return mod(x)
        y = x @ next(wt)
        return y if mod.bias is None else y + mod.bias

    b = ids.shape[0]
    x = model.tok_emb(ids)  # [B, 1, D]
    new_k, new_v = [], []
    for blk, k_old, v_old in zip(model.blocks, ks, vs):
        attn = blk.attn
        h, kv, e = attn.n_heads, attn.n_kv, attn.head_dim
        qkv = linear(attn.qkv, blk.attn_norm(x)).view(b, 1, h + 2 * kv, e)
        qk, v = qkv.split((h + kv, kv), dim=2)
        # RoPE as models.transformer.rotate, the half swap written as a flip of a [2, E/2] view:
        # Inductor inlines q's rotation into the per-key score loop, where a roll is a gather and
        # the flip loads whole vectors.
        swapped = qk.unflatten(-1, (2, e // 2)).flip(-2).flatten(-2)
        q, k = torch.addcmul(qk * cos, swapped, sin).split((h, kv), dim=2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, K, 1, E]
        new_k.append(k)
        new_v.append(v)
        # Single-query attention as products and sums, which Inductor fuses (query groups for GQA).
        qg = q.reshape(b, kv, h // kv, 1, e) * (e ** -0.5)  # [B, K, G, 1, E]
        s_old = (qg * k_old.unsqueeze(2)).sum(-1)  # [B, K, G, S]
        s_new = (qg * k.unsqueeze(2)).sum(-1)  # [B, K, G, 1]
        p = torch.cat([s_old, s_new], dim=-1).softmax(dim=-1)
        n_old = s_old.shape[-1]
        y = (p[..., :n_old].unsqueeze(-1) * v_old.unsqueeze(2)).sum(-2) + p[..., n_old:] * v.unsqueeze(2).squeeze(-2)
        x = x + linear(attn.proj, y.reshape(b, 1, h * e))
        gate, up = linear(blk.mlp.gate_up, blk.mlp_norm(x)).chunk(2, dim=-1)  # SwiGLU, as models.transformer
        x = x + linear(blk.mlp.down, torch.nn.functional.silu(gate) * up)
    return linear(model.head, model.norm(x))[:, -1], torch.stack(new_k), torch.stack(new_v)
