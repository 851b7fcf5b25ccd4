"""One-file GPU check of the scale-out recipe (run it when a GPU is lent; `make test` never needs it).

`python -m benchmarks.gpu_check --preset qwen2.5-1.5b --steps 20` fits the real-size backbone for a few steps
with Lightning's FSDPStrategy (decoder blocks wrapped and activation-checkpointed, bf16-mixed) on random
token batches, and prints tokens/s and peak GPU memory; before that (`--decode-preset`, default demo) it times
KV-cached sampling in bf16, eager against the static-cache step compiled with mode="reduce-overhead" (CUDA
graphs), plain and guided/left-padded. On a machine without CUDA it says so and exits 0.
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


def decode_rows(preset: str, batch: int = 8, prompt_len: int = 16, new_tokens: int = 256, repeats: int = 3) -> dict:
    """KV-cached sampling tokens/s on the GPU in bf16 (CUDA only): eager, and the static-cache step compiled with
    mode="reduce-overhead" (CUDA graphs), plain (top-k 100) and the product path (guided, left-padded, image ids
    only); same generator, so the tokens are compared too. Median of `repeats` after a warmup (which compiles)."""
    from models.sampling import generate, id_range_mask, left_pad, make_step_fn

    cfg = LMConfig.from_preset(preset, max_len=max(prompt_len + new_tokens, 512))
    torch.manual_seed(0)
    lm = Transformer(cfg).to("cuda", torch.bfloat16).eval()
    v = cfg.vocab_size
    plain = torch.randint(3, v, (batch, prompt_len), device="cuda")
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, v // 2, (n,), generator=g).tolist() for n in range(prompt_len // 2, prompt_len)][:batch // 2]
    ids, valid = left_pad(rows + [[1, 4, 5]] * len(rows), pad_id=0)
    ids, valid, allowed = ids.cuda(), valid.cuda(), id_range_mask(v, v // 2, v, device="cuda")
    steps = {"eager": None, "static_cuda_graphs": make_step_fn(lm, static=True, compile=True, mode="reduce-overhead")}
    paths = {"plain": lambda fn, s: generate(lm, plain, new_tokens, top_k=100, step_fn=fn,
                                             generator=torch.Generator("cuda").manual_seed(s)),
             "product": lambda fn, s: generate(lm, ids, new_tokens, valid=valid, cfg_scale=3.0, top_k=100,
                                               allowed=allowed, step_fn=fn, generator=torch.Generator("cuda").manual_seed(s))}
    out = {"preset": preset, "dtype": "bfloat16", "batch": batch, "new_tokens": new_tokens}
    for path, run in paths.items():
        tokens = {}
        for name, fn in steps.items():
            t0 = time.perf_counter()
            tokens[name] = run(fn, 0)  # warmup: compiles and records the graphs
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ts = []
            for r in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(fn, r + 1)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            rows_out = len(rows) if path == "product" else batch
            out[f"{path}_{name}_tokens_per_s"] = rows_out * new_tokens / sorted(ts)[len(ts) // 2]
            out[f"{path}_{name}_first_call_s"] = first
        out[f"{path}_same_tokens"] = bool(torch.equal(tokens["eager"], tokens["static_cuda_graphs"]))
        out[f"{path}_static_vs_eager"] = (out[f"{path}_static_cuda_graphs_tokens_per_s"]
                                          / out[f"{path}_eager_tokens_per_s"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-1.5b", help="an LMConfig preset (models/config.py)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--decode-preset", default="demo",
                   help="LMConfig preset of the decoding rows (bf16, static cache, CUDA graphs); empty: skip them")
    p.add_argument("--skip-train", action="store_true", help="only the decoding rows")
    args = p.parse_args(argv)
    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (this script is for a lent GPU)")
        write_text_atomic(args.results, json.dumps({**run, "measured": False, "reason": "no CUDA device"}, indent=2)
                          + "\n")
        return 0
    res = dict(run, measured=True, gpu=torch.cuda.get_device_name())
    if args.decode_preset:
        res["decode"] = decode_rows(args.decode_preset)
        print(json.dumps(res["decode"]))
        write_text_atomic(args.results, json.dumps(res, indent=2) + "\n")  # kept if training fails
    if args.skip_train:
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
    res = {**res, "preset": args.preset,
           "devices": trainer.world_size, "precision": "bf16-mixed", "batch": args.batch, "seq": args.seq,
           "strategy": "FSDP (blocks wrapped, activation checkpointing)", "tokens_per_s": round(clock.tokens_per_s),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(res))
    write_text_atomic(args.results, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
