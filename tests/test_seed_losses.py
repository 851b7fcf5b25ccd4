"""SEED's contrastive loss under two processes (gloo on CPU): negatives gathered across ranks, with gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.seed.losses import contrastive_loss

B, K, TEMP = 4, 8, 0.07


def _pairs():
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(2 * B, K, generator=g), dim=-1), F.normalize(torch.randn(2 * B, K, generator=g), dim=-1)


def _rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        img, txt = (t[rank * B:(rank + 1) * B].clone().requires_grad_(True) for t in _pairs())
        loss, logits = contrastive_loss(img, txt, torch.tensor(TEMP))
        loss.backward()
        torch.save({"loss": loss.detach(), "logits": logits.detach(), "img": img.grad, "txt": txt.grad},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_see_every_negative_and_match_the_global_batch(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    img, txt = (t.clone().requires_grad_(True) for t in _pairs())
    full, full_logits = contrastive_loss(img, txt, torch.tensor(TEMP))  # one process, the whole 2B batch
    full.backward()
    # the global-batch loss is the mean of the per-process losses: each process's rows saw all 2B negatives
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full.detach())
    for r, res in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(res["logits"], full_logits[rows, rows].detach())  # own in-batch block
        # gradients reach the other process's features too (all_gather with grad): DDP's mean over the 2
        # processes of these gradients is the global-batch gradient
        torch.testing.assert_close(res["img"] / 2, img.grad[rows])
        torch.testing.assert_close(res["txt"] / 2, txt.grad[rows])
