"""Codebook quantizers for image tokenizers.

Two flavours share one output structure and one code-lookup API:

* `VectorQuantizer`: the classic VQ-VAE quantizer (nearest code in squared L2, straight-through
  gradient, codebook + commitment loss, `beta` on either term), with optional l2-normalised lookup, a codebook initialised from
  the data (k-means on the first training batch) and dead-code restarts.
* `IndexPropagationQuantizer` (IBQ): picks the code with the largest logit z.e, but builds z_q as a
  straight-through one-hot times the whole codebook, so every code row receives gradient each step
  (this is what keeps large codebooks alive without restarts).

Both accept channel-first maps [B, C, H, W] or token sequences [B, N, C]; codes come back as
[B, H, W] or [B, N], and `embed(codes)` returns vectors in the same layout as the input had.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """What a quantizer's forward returns."""

    z_q: Tensor  # same shape as the input z; carries gradient back to the encoder
    codes: Tensor  # long, [B, H, W] or [B, N]
    loss: Tensor  # scalar: codebook + beta * commitment, or (VQ beta_on="codebook") beta * codebook + commitment
    #               (+ entropy penalty for IBQ)
    perplexity: Tensor  # scalar: exp(entropy of the batch's code histogram); K when uniform
    usage: Tensor  # scalar: share of the codebook hit at least once in this batch


def _flatten(z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """[B, C, H, W] or [B, N, C] -> ([M, C], grid) where grid is (B, H, W) or (B, N)."""
    if z.dim() == 4:
        b, c, h, w = z.shape
        return z.permute(0, 2, 3, 1).reshape(-1, c), (b, h, w)
    if z.dim() == 3:
        b, n, c = z.shape
        return z.reshape(-1, c), (b, n)
    raise ValueError(f"expected z of shape [B, C, H, W] or [B, N, C], got {tuple(z.shape)}")


def _unflatten(v: Tensor, grid: tuple[int, ...]) -> Tensor:
    """[M, C] -> [B, C, H, W] when grid is (B, H, W), or [B, N, C] when grid is (B, N)."""
    c = v.shape[-1]
    if len(grid) == 3:
        b, h, w = grid
        return v.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    return v.reshape(*grid, c)


def _nearest(z_flat: Tensor, codebook: Tensor) -> Tensor:
    """Index [M] of the nearest row of codebook [K, C] to each row of z_flat [M, C], in squared L2 (fp32)."""
    z32, e32 = z_flat.float(), codebook.float()
    dist2 = z32.pow(2).sum(1, keepdim=True) - 2.0 * z32 @ e32.t() + e32.pow(2).sum(1)[None]  # [M, K]
    return dist2.argmin(dim=1)


def _code_stats(codes: Tensor, codebook_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Histogram [K] (float), perplexity and usage of a flat code tensor."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()  # [K]
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
    usage = (counts > 0).float().mean()
    return counts, perplexity, usage


class _CodebookQuantizer(nn.Module):
    """Shared pieces: the codebook, optional l2 normalisation, layout handling and code lookup."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, l2_norm: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        # Small uniform init (as in VQ-VAE / taming); VQ's data_init replaces it at the first training batch,
        # IBQ's dense gradient spreads it out.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> Tensor:
        """The code vectors as used for lookup, [K, C] (l2-normalised when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def _prep(self, z_flat: Tensor) -> Tensor:
        return F.normalize(z_flat, dim=-1) if self.l2_norm else z_flat

    def embed(self, codes: Tensor) -> Tensor:
        """codes [B, H, W] -> [B, C, H, W]; codes [B, N] -> [B, N, C] (same layout as forward's z_q)."""
        codes = codes.long()
        vectors = F.embedding(codes.reshape(-1), self.codebook())  # [M, C]
        return _unflatten(vectors, tuple(codes.shape))

    def decode(self, codes: Tensor) -> Tensor:
        """Alias of `embed`: the quantized vectors for the given codes."""
        return self.embed(codes)

    def encode(self, z: Tensor) -> Tensor:
        """z [B, C, H, W] or [B, N, C] -> codes [B, H, W] or [B, N] (long)."""
        z_flat, grid = _flatten(z)
        return self._lookup(self._prep(z_flat)).reshape(grid)

    def _lookup(self, z_flat: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class VectorQuantizer(_CodebookQuantizer):
    """Nearest-neighbour VQ with straight-through gradients.

    loss = MSE(q, sg[z]) + beta * MSE(z, sg[q]) (`beta_on="commitment"`, the default: VQ-VAE's and LlamaGen's
    order, the codebook term weighted 1, the encoder's commitment beta), or MSE(z, sg[q]) + beta * MSE(q, sg[z])
    (`beta_on="codebook"`: taming's VectorQuantizer2 with legacy=True, which SEED's official tokenizer uses; the
    commitment term weighted 1, the codebook beta, so the encoder is pulled 1/beta times harder). The two have the
    same value; only the gradients differ.

    `data_init`: the codebook starts from the data instead of the uniform +-1/K init: at the first training
    forward it is set by k-means on that batch's inputs (`kmeans_init`). A +-1/K codebook sits at the origin,
    far from the encoder's outputs, so only the few codes nearest the origin ever win and the rest never move.

    `restart_dead_codes`: codes that no batch has used for `dead_code_patience` consecutive training steps are
    re-initialised to distinct random inputs of the current batch (a cheap fix for codebook collapse). The rows
    restarted since the last `pop_restarted()` are returned by it, so a trainer can reset their optimiser state
    (a restarted row must not keep the Adam moments of the dead code it replaced).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        l2_norm: bool = False,
        restart_dead_codes: bool = False,
        dead_code_patience: int = 25,
        data_init: bool = False,
        beta_on: str = "commitment",
    ):
        super().__init__(codebook_size, dim, beta, l2_norm)
        if beta_on not in ("commitment", "codebook"):
            raise ValueError(f"beta_on must be 'commitment' or 'codebook', got {beta_on!r}")
        self.beta_on = beta_on  # which loss term beta weights (the other weighs 1); a training choice, not saved
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_patience = dead_code_patience
        self.data_init = data_init
        # Consecutive training steps each code went unused; persistent so resumed runs keep it.
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        if data_init:  # persistent: a loaded or resumed codebook is not re-initialised
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # rows restarted since the last pop_restarted() (not saved: a trainer consumes it every step)
        self.register_buffer("restarted", torch.zeros(codebook_size, dtype=torch.bool), persistent=False)

    @torch.no_grad()
    def _lookup(self, z_flat: Tensor) -> Tensor:
        """Index of the nearest code in squared L2: ||z||^2 - 2 z.e + ||e||^2 (one matmul, no cdist)."""
        return _nearest(z_flat, self.codebook())

    def forward(self, z: Tensor) -> QuantizerOutput:
        z_flat, grid = _flatten(z)  # [M, C]
        z_flat = self._prep(z_flat)
        if self.training and self.data_init and not bool(self.initialized):
            self.kmeans_init(z_flat.detach())
        codes = self._lookup(z_flat)  # [M]
        q = F.embedding(codes, self.codebook())  # [M, C]
        codebook, commitment = F.mse_loss(q, z_flat.detach()), F.mse_loss(z_flat, q.detach())
        if self.beta_on == "commitment":
            loss = codebook + self.beta * commitment
        else:
            loss = self.beta * codebook + commitment
        z_q = z_flat + (q - z_flat).detach()  # straight-through: forward value q, gradient to z
        counts, perplexity, usage = _code_stats(codes, self.codebook_size)
        if self.training and self.restart_dead_codes:
            self._restart(counts, z_flat.detach())
        return QuantizerOutput(_unflatten(z_q, grid), codes.reshape(grid), loss, perplexity, usage)

    @torch.no_grad()
    def kmeans_init(self, z_flat: Tensor, iters: int = 10) -> None:
        """Set the codebook from inputs z_flat [M, C]: k-means (`iters` Lloyd steps) from K distinct inputs.

        With fewer inputs than codes (M < K) every input becomes a code and the remaining codes are inputs plus
        small noise (1% of the inputs' spread), so no two codes coincide. Under DDP rank 0's codebook is broadcast.
        """
        k, m = self.codebook_size, z_flat.shape[0]
        z32 = z_flat.float()
        perm = torch.randperm(m, device=z32.device)
        if m >= k:
            centres = z32[perm[:k]].clone()  # [K, C]
            for _ in range(iters):
                assign = _nearest(z32, centres)  # [M]
                sums = torch.zeros_like(centres).index_add_(0, assign, z32)
                counts = torch.bincount(assign, minlength=k)
                filled = counts > 0
                centres[filled] = sums[filled] / counts[filled, None]  # an empty cluster keeps its centre
        else:
            extra = z32[torch.randint(0, m, (k - m,), device=z32.device)]
            extra = extra + 0.01 * z32.std(0) * torch.randn_like(extra)
            centres = torch.cat([z32[perm], extra])
        weight = self.embedding.weight
        weight.copy_(centres.to(weight.dtype))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(weight.data, src=0)
        self.initialized.fill_(True)

    def pop_restarted(self) -> Tensor:
        """Indices [R] (long, sorted) of the codebook rows restarted since the last call; clears the record."""
        rows = self.restarted.nonzero().flatten()
        self.restarted.zero_()
        return rows

    @torch.no_grad()
    def _restart(self, counts: Tensor, z_flat: Tensor) -> None:
        """Reset codes unused for `dead_code_patience` steps to distinct random rows of z_flat [M, C].

        Inputs are drawn without replacement, so no two restarted codes coincide; when more codes are dead than
        the batch has inputs, the first M dead codes are restarted now and the rest on later steps. Runs after
        this batch's lookup, so it only affects later steps. Under DDP the usage counts are summed over ranks,
        the restarted rows are the same on every rank and their new values are broadcast from rank 0.
        """
        distributed = dist.is_available() and dist.is_initialized()
        m = torch.tensor(z_flat.shape[0], device=z_flat.device)
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(m, op=dist.ReduceOp.MIN)
        used = counts > 0
        self.steps_unused.add_(1).masked_fill_(used, 0)
        rows = (self.steps_unused >= self.dead_code_patience).nonzero().flatten()[: int(m)]  # [R]
        if len(rows) == 0:
            return
        pick = torch.randperm(z_flat.shape[0], device=z_flat.device)[: len(rows)]  # without replacement
        weight = self.embedding.weight.data
        weight[rows] = z_flat[pick].to(weight.dtype)
        if distributed:
            dist.broadcast(weight, src=0)
        self.steps_unused[rows] = 0
        self.restarted[rows] = True


class IndexPropagationQuantizer(_CodebookQuantizer):
    """Index Backpropagation Quantization (IBQ).

    logits = z . e over the codebook; the code is argmax(logits); z_q = hard_onehot @ codebook where
    hard_onehot = one_hot + softmax - sg[softmax]. The forward value is exactly the chosen code, but
    the softmax gradient reaches z and *every* codebook row. Same codebook + beta * commitment loss
    (on the hard quantized vector), plus an optional entropy penalty
    entropy_weight * (mean per-sample entropy - entropy of the batch-mean distribution),
    which favours confident per-token choices that are diverse across the batch.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        l2_norm: bool = False,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ):
        super().__init__(codebook_size, dim, beta, l2_norm)
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature

    @torch.no_grad()
    def _lookup(self, z_flat: Tensor) -> Tensor:
        return (z_flat.float() @ self.codebook().float().t()).argmax(dim=1)  # [M]

    def forward(self, z: Tensor) -> QuantizerOutput:
        z_flat, grid = _flatten(z)  # [M, C]
        z_flat = self._prep(z_flat)
        e = self.codebook()  # [K, C]
        logits = z_flat @ e.t()  # [M, K]
        soft = logits.float().softmax(dim=-1)
        codes = soft.argmax(dim=-1)  # [M]
        hard = F.one_hot(codes, self.codebook_size).to(soft.dtype) + soft - soft.detach()  # [M, K]
        z_q = hard.to(e.dtype) @ e  # [M, C]; value == e[codes]
        loss = F.mse_loss(z_q, z_flat.detach()) + self.beta * F.mse_loss(z_flat, z_q.detach())
        if self.entropy_weight > 0:
            loss = loss + self.entropy_weight * self._entropy_penalty(logits)
        _, perplexity, usage = _code_stats(codes, self.codebook_size)
        return QuantizerOutput(_unflatten(z_q, grid), codes.reshape(grid), loss, perplexity, usage)

    def _entropy_penalty(self, logits: Tensor) -> Tensor:
        """mean_i H(p_i) - H(mean_i p_i) with p = softmax(logits / temperature); logits [M, K]."""
        logp = (logits.float() / self.entropy_temperature).log_softmax(dim=-1)
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).mean()
        avg = p.mean(0)
        batch = -(avg * torch.log(avg.clamp_min(1e-10))).sum()
        return per_sample - batch


def build_quantizer(
    kind: str,
    codebook_size: int,
    dim: int,
    beta: float = 0.25,
    l2_norm: bool = False,
    restart_dead_codes: bool = False,
    entropy_weight: float = 0.0,
    data_init: bool = False,
) -> _CodebookQuantizer:
    """'vq' -> VectorQuantizer, 'ibq' -> IndexPropagationQuantizer (restart_dead_codes and data_init: VQ only)."""
    if kind == "vq":
        return VectorQuantizer(codebook_size, dim, beta, l2_norm, restart_dead_codes, data_init=data_init)
    if kind == "ibq":
        return IndexPropagationQuantizer(codebook_size, dim, beta, l2_norm, entropy_weight)
    raise ValueError(f"unknown quantizer {kind!r}; choose 'vq' or 'ibq'")
