"""xAR: next-X prediction with flow matching on continuous latents (DESIGN §5).

The image's latent tokens [N, c] are grouped into K equal entities (X = token, k x k cell, subsample or the
whole image) and generated entity by entity. Training (flow matching, linear path):
    x_t = (1 - t) x + t eps,  target v = eps - x,  loss = MSE(v_pred, v)
with t = sigmoid(N(mean, std)) drawn independently per entity. With `noisy_context` (xAR's noisy context
learning) the sequence is `prompt, x_t(entity 1), .., x_t(entity K)` under a block-causal mask, so each entity
is predicted from the *noisy* entities before it; with `noisy_context: false` (teacher forcing, the ablation)
it is `prompt, x(1..K), x_t(1..K)` and noisy entity k attends to the prompt, the clean entities before it and
itself. Time enters every backbone block through adaLN (the backbone needs `adaln: true`), once per entity as
the official code does (the time embedding and each block's modulation are computed for the entity's t, then
read by its positions); a zero condition for the text prompt (the official code conditions its blocks on
time + class; here the class/caption is the text prompt, dropped for guidance by the data module).
The velocity comes from the backbone's hidden state through a linear layer (`predictor: backbone`, the official
design) or from a small per-token adaLN MLP head fed (x_t, t, hidden) (`predictor: mlp`, MAR's head).

Sampling: per entity, from noise at t=1 to 0 with Euler or Euler–Maruyama (to `t_end`, then one deterministic
step), guidance ramped linearly across entities 1 + (cfg - 1) k / (K - 1) (or constant, `cfg_schedule`); the
finished entity is written clean (t=0) into the KV cache once, and each flow step runs only the current entity's
tokens on top of the cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.flow_head import FlowMLPHead, TimestepEmbedder
from models.masks import attention_mask
from models.objectives.base import Objective
from models.sampling import CFG_SCHEDULES

ENTITIES = ("token", "cell", "subsample", "image")


def entity_order(kind: str, grid: int, size: int) -> tuple[torch.Tensor, int]:
    """(order [N], K): raster indices of the grid x grid tokens listed entity by entity, and the entity count.

    token: K = N, raster order; cell: size x size squares, raster order of cells and inside each;
    subsample: the tokens (i, j) with (i % size, j % size) equal form one entity (size^2 entities, non-local);
    image: one entity."""
    idx = torch.arange(grid * grid).view(grid, grid)
    if kind == "token":
        return idx.flatten(), grid * grid
    if kind == "image":
        return idx.flatten(), 1
    if kind not in ("cell", "subsample"):
        raise ValueError(f"entity must be one of {ENTITIES}, got {kind!r}")
    if size < 1 or grid % size:
        raise ValueError(f"entity {kind!r}: size {size} must divide the latent grid side {grid}")
    if kind == "cell":
        order = rearrange(idx, "(a p) (b q) -> (a b p q)", p=size, q=size)
        return order, (grid // size) ** 2
    order = rearrange(idx, "(p a) (q b) -> (a b p q)", a=size, b=size)
    return order, size * size


def cfg_ramp(cfg: float, k: int, n_entities: int, schedule: str = "linear") -> float:
    """Guidance scale of AR step k of K. linear: 1 at the first entity, `cfg` at the last (the official code's
    ramp); constant: `cfg` at every entity. One entity (whole image) gets `cfg` either way."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or n_entities == 1:
        return cfg
    return 1.0 + (cfg - 1.0) * k / (n_entities - 1)


def flow_pair(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear path: x, eps [B, L, c], t [B, L] -> (x_t = (1 - t) x + t eps, velocity target eps - x)."""
    tt = t.unsqueeze(-1)
    return (1 - tt) * x + tt * eps, eps - x


def flow_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, steps: int,
                method: str = "euler", t_end: float = 0.04, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=1 (x = noise) down to t=0.

    euler: `steps` equal steps. em: Euler–Maruyama of the reverse SDE with diffusion 2t and the score from
    the velocity, s = (-(1 - t) v - x) / t, on `steps - 1` equal steps from 1 to `t_end`, then one
    deterministic Euler step to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method == "euler":
        ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    elif method == "em":
        ts = (torch.linspace(1.0, t_end, steps).tolist() if steps > 1 else [1.0]) + [0.0]
    else:
        raise ValueError(f"sampler must be 'euler' or 'em', got {method!r}")
    for t, tn in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        dt = tn - t  # negative
        if method == "em" and tn > 0:
            w = 2.0 * t
            score = (-(1.0 - t) * v - x) / t
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + (v - 0.5 * w * score) * dt + (w * -dt) ** 0.5 * noise
        else:
            x = x + v * dt
    return x


class XARFlowMatching(Objective):
    """xAR objective (see the module docstring). `dim` must be the backbone's width; `latent_channels` and
    `grid` the KL tokenizer's latent shape (checked on the first batch).

    Args:
        dim: the backbone's width.
        latent_channels: channels of the KL tokenizer's latents.
        grid: side of the latent grid.
        entity: token | cell | subsample | image: what is predicted at once (xAR's entity).
        entity_size: the cell side (cell) or the stride (subsample).
        noisy_context: train on noisy previous entities (xAR's noisy context) instead of clean ones.
        t_mean: mean of the logit-normal time distribution.
        t_std: standard deviation of the logit-normal time distribution.
        predictor: backbone | mlp: velocity read from the backbone, or a MAR-style MLP head on it.
        head_width: width of the MLP head.
        head_depth: residual blocks of the MLP head.
        sampler: euler | em (Euler-Maruyama): the checkpoint's default sampler.
        steps: flow steps per entity when sampling.
        t_end: time at which sampling stops (the last step jumps to the clean estimate).
    """

    @dataclass
    class Config:
        dim: int = 256
        latent_channels: int = 4
        grid: int = 8
        entity: str = "cell"
        entity_size: int = 4  # cell side (cell) or stride (subsample)
        noisy_context: bool = True
        t_mean: float = 0.0  # logit-normal t = sigmoid(N(t_mean, t_std))
        t_std: float = 1.0
        predictor: str = "backbone"  # "backbone" | "mlp"
        head_width: int = 256
        head_depth: int = 3
        sampler: str = "em"  # default sampler of this checkpoint: "euler" | "em"
        steps: int = 40
        t_end: float = 0.04

    continuous = True  # mmar.Pipeline: this objective draws latents, not token ids
    captions = False

    def __init__(self, dim: int = 256, latent_channels: int = 4, grid: int = 8, entity: str = "cell",
                 entity_size: int = 4, noisy_context: bool = True, t_mean: float = 0.0, t_std: float = 1.0,
                 predictor: str = "backbone", head_width: int = 256, head_depth: int = 3, sampler: str = "em",
                 steps: int = 40, t_end: float = 0.04):
        super().__init__()
        self.config = cfg = self.Config(dim, latent_channels, grid, entity, entity_size, noisy_context, t_mean,
                                        t_std, predictor, head_width, head_depth, sampler, steps, t_end)
        if predictor not in ("backbone", "mlp"):
            raise ValueError(f"predictor must be 'backbone' or 'mlp', got {predictor!r}")
        if sampler not in ("euler", "em"):
            raise ValueError(f"sampler must be 'euler' or 'em', got {sampler!r}")
        if steps < 1 or not 0 < t_end < 1 or t_std <= 0:
            raise ValueError("steps must be >= 1, t_end in (0, 1), t_std > 0")
        order, self.n_entities = entity_order(entity, grid, entity_size)
        self.register_buffer("order", order, persistent=False)  # [N] raster index per sequence slot
        self.n_tokens = grid * grid
        self.group = self.n_tokens // self.n_entities  # tokens per entity
        self.z_proj = nn.Linear(latent_channels, dim)
        self.pos = nn.Parameter(torch.randn(self.n_tokens, dim) * 0.02)  # learned, per raster position
        self.time = TimestepEmbedder(dim)
        if predictor == "backbone":
            self.out = nn.Linear(dim, latent_channels)
        else:
            self.head = FlowMLPHead(latent_channels, dim, head_width, head_depth)

    # ---- pieces ---------------------------------------------------------------------------------
    def _check(self, lm, latents: torch.Tensor | None = None) -> None:
        c = self.config
        if lm.cfg.dim != c.dim or not lm.cfg.adaln:
            raise ValueError(f"xAR needs a backbone of width {c.dim} with adaln: true (got width {lm.cfg.dim}, "
                             f"adaln {lm.cfg.adaln}); use an xar-* preset")
        if latents is not None and tuple(latents.shape[1:]) != (c.latent_channels, c.grid, c.grid):
            raise ValueError(f"latents of shape {tuple(latents.shape[1:])} do not match the objective's "
                             f"({c.latent_channels}, {c.grid}, {c.grid})")

    def embed(self, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """latent tokens z [B, L, c] at raster positions slots [L] -> backbone inputs [B, L, D]."""
        return self.z_proj(z) + self.pos[slots]

    def velocity(self, h: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], x_t [B, L, c], t [B, L] -> velocity [B, L, c]."""
        if self.config.predictor == "backbone":
            return self.out(h)
        return self.head(x_t, t, h)

    def sample_t(self, shape, device, generator=None) -> torch.Tensor:
        c = self.config
        return torch.sigmoid(c.t_mean + c.t_std * torch.randn(shape, device=device, generator=generator))

    def tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, c, h, w] -> [B, N, c] in entity order."""
        return rearrange(latents, "b c h w -> b (h w) c")[:, self.order]

    def untokens(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, N, c] in entity order -> [B, c, h, w]."""
        raster = torch.empty_like(seq)
        raster[:, self.order] = seq
        return rearrange(raster, "b (h w) c -> b c h w", h=self.config.grid)

    def _forward(self, lm, ids, valid, z, t, slots, blocks, attn_mask=None, rows=None):
        """Prompt ids/valid [B, P] + latent tokens z [B, L, c] at raster slots [L] with block ids blocks [L], the
        entities' times t [B, E] and each latent position's entity rows [L] (default: blocks) -> hidden states of
        the latent positions [B, L, D] (one uncached forward)."""
        b, p = ids.shape
        l = z.shape[1]
        dev = ids.device
        fill = torch.full((b, l), int(ids[0, -1]), dtype=ids.dtype, device=dev)
        all_ids = torch.cat([ids, fill], 1)
        emask = torch.cat([torch.zeros_like(valid), torch.ones(b, l, dtype=torch.bool, device=dev)], 1)
        start = valid.sum(1, keepdim=True)  # [B, 1] first latent position (after the real prompt tokens)
        pos = torch.cat([(valid.long().cumsum(1) - 1).clamp(min=0), start + slots], 1)
        blk = torch.cat([torch.arange(p, device=dev), p + blocks]).expand(b, -1)
        val = torch.cat([valid, torch.ones(b, l, dtype=torch.bool, device=dev)], 1)
        rows = blocks if rows is None else rows
        cond = torch.cat([torch.zeros(b, 1, self.config.dim, device=dev), self.time(t)], 1)  # [B, 1 + E, D]
        index = torch.cat([torch.zeros(p, dtype=torch.long, device=dev), 1 + rows])  # [T]: row 0 = the prompt's
        if attn_mask is not None:
            key_ok = val.unsqueeze(1) | torch.eye(p + l, dtype=torch.bool, device=dev)  # [B, T, T]
            attn_mask = (attn_mask & key_ok).unsqueeze(1)  # [B, 1, T, T]
        h = lm(all_ids, embeds=self.embed(z, slots).flatten(0, 1), embed_mask=emask, position_ids=pos,
               block_ids=None if attn_mask is not None else blk, valid=val, cond=cond.to(lm.norm.weight.dtype),
               cond_index=index, attn_mask=attn_mask)
        return h[:, p:]

    def teacher_forcing_mask(self, p: int, device) -> torch.Tensor:
        """[T, T] bool for `prompt (P), clean x (N), noisy x_t (N)`: prompt causal; clean entity j sees the
        prompt and clean entities <= j; noisy entity k sees the prompt, clean entities < k and itself."""
        n, ent = self.n_tokens, torch.arange(self.n_entities, device=device).repeat_interleave(self.group)
        t = p + 2 * n
        kind = torch.cat([torch.zeros(p), torch.ones(n), 2 * torch.ones(n)]).to(device)  # 0 prompt, 1 clean, 2 noisy
        blk = torch.cat([torch.arange(p, device=device), p + ent, p + ent])
        causal = blk.unsqueeze(0) <= blk.unsqueeze(1)  # [T, T] block-causal over prompt + entities
        qk, kk = kind.unsqueeze(1), kind.unsqueeze(0)
        qb, kb = blk.unsqueeze(1), blk.unsqueeze(0)
        noisy_q = (kk == 0) | ((kk == 1) & (kb < qb)) | ((kk == 2) & (kb == qb))
        m = torch.where(qk == 2, noisy_q, causal & (kk != 2))
        return m | torch.eye(t, dtype=torch.bool, device=device)

    # ---- training -------------------------------------------------------------------------------
    def loss(self, lm, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, valid, latents = batch["ids"], batch["valid"], batch["latents"].float()
        self._check(lm, latents)
        b, p = ids.shape
        x = self.tokens(latents)  # [B, N, c] entity order
        k = self.n_entities
        t_ent = self.sample_t((b, k), x.device)  # [B, K]
        t = t_ent.repeat_interleave(self.group, 1)  # [B, N]
        x_t, target = flow_pair(x, torch.randn_like(x), t)
        ent = torch.arange(k, device=x.device).repeat_interleave(self.group)  # [N]
        if self.config.noisy_context:
            h = self._forward(lm, ids, valid, x_t, t_ent, self.order, ent)
        else:  # rows 0..K-1: the clean entities (t = 0), K..2K-1: the noisy ones
            z = torch.cat([x, x_t], 1)
            tt = torch.cat([torch.zeros_like(t_ent), t_ent], 1)  # [B, 2K]
            mask = self.teacher_forcing_mask(p, x.device).expand(b, -1, -1)
            h = self._forward(lm, ids, valid, z, tt, self.order.repeat(2), ent.repeat(2), attn_mask=mask,
                              rows=torch.cat([ent, k + ent]))
            h = h[:, self.n_tokens:]
        v = self.velocity(h, x_t, t)
        mse = F.mse_loss(v.float(), target)
        return {"loss": mse, "nll": mse.detach()}

    # ---- sampling -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, lm, prompt: torch.Tensor, max_new_tokens: int | None = None, *, valid=None, temperature=None,
                 top_k=None, top_p=None, allowed=None, cfg_scale=None, stop_id=None, steps=None, sampler=None,
                 cfg_schedule=None, generator=None, use_cache: bool = True) -> torch.Tensor:
        """Latents [B, c, h, w] for prompts [B, P] (or [2B, P] with cfg_scale: conditional rows first, then the
        unconditional ones), entity by entity, guidance across entities by `cfg_schedule` (cfg_ramp; None: linear);
        token options (temperature, top-k, top-p, allowed ids, a stop id) are refused. `use_cache=False` recomputes
        prompt + context at every flow step (the reference the cached path must equal)."""
        self.refuse(temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed, stop_id=stop_id)
        if max_new_tokens is not None and max_new_tokens != self.n_tokens:
            raise ValueError(f"this xAR model draws {self.n_tokens} latent tokens, got max_new_tokens={max_new_tokens}")
        self._check(lm)
        c = self.config
        steps, sampler = steps or c.steps, sampler or c.sampler
        rows, p = prompt.shape
        dev = prompt.device
        valid = torch.ones_like(prompt, dtype=torch.bool) if valid is None else valid
        guided = cfg_scale is not None
        if guided and rows % 2:
            raise ValueError(f"classifier-free guidance needs conditional and unconditional rows in equal number, "
                             f"got {rows} rows")
        b, g, k_all = rows // 2 if guided else rows, self.group, self.n_entities
        out = torch.zeros(b, self.n_tokens, c.latent_channels, device=dev)
        dtype = lm.norm.weight.dtype
        cache = None
        if use_cache:
            cache = lm.new_cache(rows, p + self.n_tokens, device=dev)
            # prompt: causal, left padding masked; cond 0 as in training (the adaLN bias path, not the plain one)
            lm(prompt, valid=valid, cache=cache, cond=torch.zeros(rows, 1, self.config.dim, dtype=dtype, device=dev),
               cond_index=torch.zeros(p, dtype=torch.long, device=dev))
        start = valid.sum(1, keepdim=True)  # [rows, 1]
        fill = torch.full((rows, g), int(prompt[0, -1]), dtype=prompt.dtype, device=dev)
        emask = torch.ones(rows, g, dtype=torch.bool, device=dev)
        one_row = torch.zeros(g, dtype=torch.long, device=dev)  # [G]: the entity's positions share one adaLN row
        for k in range(k_all):
            scale = cfg_ramp(cfg_scale, k, k_all, cfg_schedule or "linear") if guided else None
            sl = slice(k * g, (k + 1) * g)
            slots = self.order[sl]
            ent = torch.full((g,), k, device=dev)
            ctx = torch.cat([out[:, :k * g]] * (2 if guided else 1))  # [rows, k*G, c] clean context

            def cached_h(z, t):  # [rows, G, c], the entity's time [rows, 1] -> [rows, G, D]
                return lm(fill, embeds=self.embed(z, slots).flatten(0, 1).to(dtype), embed_mask=emask,
                          position_ids=start + slots, block_ids=(p + ent).expand(rows, -1), cache=cache,
                          cond=self.time(t).to(dtype), cond_index=one_row)

            def uncached_h(z, t):
                zz = torch.cat([ctx, z], 1)
                tt = torch.cat([torch.zeros(rows, k, device=dev), t], 1)  # [rows, k + 1]: clean context, then t
                blocks = torch.arange(k + 1, device=dev).repeat_interleave(g)
                return self._forward(lm, prompt, valid, zz, tt, self.order[:(k + 1) * g], blocks)[:, k * g:]

            snap = cache.snapshot() if use_cache else None

            def vfield(x: torch.Tensor, t: float) -> torch.Tensor:
                xin = torch.cat([x, x]) if guided else x
                te = torch.full((rows, 1), t, device=dev)  # [rows, 1] the entity's time
                h = cached_h(xin, te) if use_cache else uncached_h(xin, te)
                if use_cache:
                    cache.restore(snap)
                v = self.velocity(h, xin.to(dtype), te.expand(-1, g)).float()
                if guided:
                    vc, vu = v.chunk(2)
                    v = vu + scale * (vc - vu)
                return v

            noise = torch.randn(b, g, c.latent_channels, generator=generator, device=dev)
            out[:, sl] = flow_sample(vfield, noise, steps, sampler, c.t_end, generator)
            if use_cache and k + 1 < k_all:  # write the finished entity, clean (t=0), into the cache
                z = torch.cat([out[:, sl]] * (2 if guided else 1))
                cached_h(z, torch.zeros(rows, 1, device=dev))
        return self.untokens(out)
