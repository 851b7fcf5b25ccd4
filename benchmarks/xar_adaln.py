"""Training-step time of xAR with adaLN once per entity vs per token, at configs/mnist_xar.yaml's size:
`python -m benchmarks.xar_adaln` (prints the medians and their ratio; writes benchmarks/results/xar_adaln.json).

Preset xar-demo (width 256, 4 blocks), batch 64, 4 x 8 x 8 latents in 4x4 cells (K = 4 entities of 16 tokens),
a 12-token prompt, noisy context, fp32, one thread. "per token" is the objective's forward as it was before
(the time embedding and every block's adaLN linear at each of the T = P + N positions); "per entity" is today's
(1 + K rows, gathered to the positions). Steps (loss, backward, AdamW) alternate between the two, so both see
the same machine load.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from benchmarks import write_report
from models.config import LMConfig
from models.objectives import XARFlowMatching
from models.transformer import Transformer


class PerTokenXAR(XARFlowMatching):
    """The reference: adaLN and the time embedding computed at every position (the code before per-entity rows)."""

    def _forward(self, lm, ids, valid, z, t, slots, blocks, attn_mask=None, rows=None):
        rows = blocks if rows is None else rows
        b, p = ids.shape
        l, dev = z.shape[1], ids.device
        fill = torch.full((b, l), int(ids[0, -1]), dtype=ids.dtype, device=dev)
        emask = torch.cat([torch.zeros_like(valid), torch.ones(b, l, dtype=torch.bool, device=dev)], 1)
        start = valid.sum(1, keepdim=True)
        pos = torch.cat([(valid.long().cumsum(1) - 1).clamp(min=0), start + slots], 1)
        blk = torch.cat([torch.arange(p, device=dev), p + blocks]).expand(b, -1)
        val = torch.cat([valid, torch.ones(b, l, dtype=torch.bool, device=dev)], 1)
        cond = torch.cat([torch.zeros(b, p, self.config.dim, device=dev), self.time(t[:, rows])], 1)  # [B, T, D]
        h = lm(torch.cat([ids, fill], 1), embeds=self.embed(z, slots).flatten(0, 1), embed_mask=emask,
               position_ids=pos, block_ids=blk, valid=val, cond=cond)
        return h[:, p:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps each)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="benchmarks/results/xar_adaln.json")
    a = ap.parse_args(argv)
    if min(a.steps, a.batch, a.prompt, a.threads) < 1:
        ap.error("--steps, --batch, --prompt and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    kw = dict(dim=256, latent_channels=4, grid=8, entity="cell", entity_size=4)
    torch.manual_seed(0)
    lm = Transformer(LMConfig.from_preset("xar-demo", max_len=160))
    for blk in lm.blocks:  # trained-looking adaLN (the values do not change the cost)
        torch.nn.init.normal_(blk.ada.weight, std=0.02)
    variants = {"per token": PerTokenXAR(**kw), "per entity": XARFlowMatching(**kw)}
    variants["per token"].load_state_dict(variants["per entity"].state_dict())
    opt = torch.optim.AdamW([*lm.parameters(), *variants["per entity"].parameters(),
                             *variants["per token"].parameters()], lr=1e-9)  # tiny lr: the weights barely move
    g = torch.Generator().manual_seed(0)
    batch = {"ids": torch.randint(5, 500, (a.batch, a.prompt), generator=g),
             "valid": torch.ones(a.batch, a.prompt, dtype=torch.bool),
             "latents": torch.randn(a.batch, 4, 8, 8, generator=g)}
    times = {k: [] for k in variants}

    def step(obj) -> float:
        t0 = time.perf_counter()
        loss = obj.loss(lm, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for i in range(3 + a.steps):
        for name, obj in variants.items():
            dt = step(obj)
            if i >= 3:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>10}: median {v * 1000:.1f} ms/step over {a.steps} steps")
    ratio = med["per token"] / med["per entity"]
    print(f"speedup (per token / per entity, ratio of medians): {ratio:.3f}x "
          f"({a.threads} thread(s), batch {a.batch}, prompt {a.prompt}, T = {a.prompt + 64})")
    write_report({"ms_per_step_median": {k: v * 1000 for k, v in med.items()}, "speedup": ratio,
                  "steps": a.steps, "batch": a.batch, "prompt": a.prompt, "threads": a.threads,
                  "platform": platform.platform(), "torch_version": torch.__version__,
                  "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0],
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, a.results)


if __name__ == "__main__":
    main()
