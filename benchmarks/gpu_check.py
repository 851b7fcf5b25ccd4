"""One-file GPU check of the scale-out recipe (run it when a GPU is lent; `make test` never needs it).

`python -m benchmarks.gpu_check --preset qwen2.5-1.5b --steps 20` fits the real-size backbone for a few steps
with Lightning's FSDPStrategy (decoder blocks wrapped and activation-checkpointed, bf16-mixed) on random
token batches, and prints tokens/s and peak GPU memory; on a machine without CUDA it says so and exits 0.
Either way it writes benchmarks/results/gpu_check.json (`make bench-gpu`), which records what was measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from common.io import write_text_atomic
from models.config import LMConfig
from models.transformer import Block, Transformer

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"


class _LM(L.LightningModule):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg, self.lm = cfg, None

    def configure_model(self) -> None:
        if self.lm is None:
            self.lm = Transformer(self.cfg)

    def training_step(self, ids, _):
        logits = self.lm.head(self.lm(ids[:, :-1]))  # [B, T-1, V]
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class _Clock(L.Callback):
    def __init__(self, tokens_per_step: int, warmup: int = 3):
        self.tokens, self.warmup, self.t0 = tokens_per_step, warmup, None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0, self.step0 = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, *args) -> None:
        torch.cuda.synchronize()
        steps = trainer.global_step - self.step0
        self.tokens_per_s = steps * self.tokens * trainer.world_size / (time.perf_counter() - self.t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-1.5b", help="an LMConfig preset (models/config.py)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (this script is for a lent GPU)")
        write_text_atomic(args.results, json.dumps({**run, "measured": False, "reason": "no CUDA device"}, indent=2)
                          + "\n")
        return 0
    cfg = LMConfig.from_preset(args.preset, max_len=args.seq)
    data = torch.randint(0, cfg.vocab_size, (args.batch * (args.steps + 1), args.seq + 1))
    clock = _Clock(args.batch * args.seq)
    strategy = L.pytorch.strategies.FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block})
    trainer = L.Trainer(accelerator="gpu", devices=torch.cuda.device_count(), strategy=strategy,
                        precision="bf16-mixed", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[clock])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(_LM(cfg), torch.utils.data.DataLoader(data, batch_size=args.batch))
    res = {**run, "measured": True, "gpu": torch.cuda.get_device_name(), "preset": args.preset,
           "devices": trainer.world_size, "precision": "bf16-mixed", "batch": args.batch, "seq": args.seq,
           "strategy": "FSDP (blocks wrapped, activation checkpointing)", "tokens_per_s": round(clock.tokens_per_s),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(res))
    write_text_atomic(args.results, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
