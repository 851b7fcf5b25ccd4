"""Memory of each LM preset (models/config.py): parameters, checkpoint size, peak memory to train and to infer.

    .venv/bin/python -m benchmarks.memory     # ~2 minutes; writes benchmarks/results/memory.json (+ .png)

Toy presets (tiny, demo, scenes, xar-demo) are **measured** on the CPU, fp32, each (preset, mode) in a fresh
subprocess: peak resident memory (VmHWM, reset after a warm-up) over the run minus the resident memory just before the model is
built. Before that, the same workload runs once on the tiny preset (a warm-up: torch loads kernels and thread
pools on first use, memory that is not the model's); the peak is reset after it (/proc/self/clear_refs).
- training: one full step (forward, cross-entropy, backward, AdamW step, so the optimiser's states exist) on a
  batch of 32 sequences of min(max_len, 128) tokens;
- inference: KV-cached sampling (models.sampling.generate) of batch 8, 16-token prompt, up to
  min(max_len, 128) tokens in all.
The backbone alone (xar-demo's flow head and any tokenizer come on top; they are small at these sizes).

Real-size presets are **computed** on the meta device (the parameter count is exact; nothing is allocated):
- checkpoint: bf16 weights, 2 bytes per parameter (fp32 for the toy presets, as they are saved);
- inference: bf16 weights + the bf16 KV cache of one sequence of max_len tokens
  (2 x layers x kv_heads x head_dim x max_len x 2 bytes);
- training: mixed precision with AdamW, 16 bytes per parameter (fp32 master weights 4, grads 4, two Adam
  moments 8), + activations with per-block checkpointing for one sequence of max_len tokens: each block's input
  kept (layers x max_len x dim x 2 bytes) plus one block recomputed at a time (about 16 x max_len x dim + the
  MLP's 3 x max_len x mlp_dim, bf16), + fp32 logits of max_len x vocab; per GPU, without sharding (FSDP / ZeRO
  divide the 16 bytes per parameter by the number of GPUs).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import pyplot, write_report
from models.config import PRESETS, LMConfig

TOY = ("tiny", "demo", "scenes", "xar-demo")
MIB = 2 ** 20


def _peak_rss_mib() -> float:
    """The process's peak resident memory since the last _reset_peak (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # KiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: resets VmHWM to the current RSS


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / MIB


def _workload(model, cfg: LMConfig, mode: str, t: int) -> None:
    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (32, t))
        logits = model.head(model(ids[:, :-1]))  # [B, T-1, V]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
    else:
        from models.sampling import generate

        with torch.inference_mode():
            generate(model.eval(), torch.randint(0, cfg.vocab_size, (8, 16)), t - 16, temperature=1.0)


def measure(preset: str, mode: str) -> dict:
    """Runs in a fresh process (see main): peak RSS of one training step or one sampling run, above the
    process's resident memory before the model was built."""
    from models.transformer import Transformer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg, tiny = PRESETS[preset], PRESETS["tiny"]
    t = min(cfg.max_len, 128)
    _workload(Transformer(tiny), tiny, mode, t)  # warm-up: torch's kernels and thread pools load on first use
    _reset_peak()
    base = _current_rss_mib()
    _workload(Transformer(cfg), cfg, mode, t)
    return {"peak_mib": _peak_rss_mib() - base}


def computed(cfg: LMConfig, params: int) -> dict:
    """The real-size formulas of the module docstring, in MiB."""
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.max_len * 2
    acts = (cfg.n_layers * cfg.max_len * cfg.dim * 2 + (16 * cfg.max_len * cfg.dim + 3 * cfg.max_len * cfg.mlp_dim) * 2
            + cfg.max_len * cfg.vocab_size * 4)
    return {"checkpoint_mib": params * 2 / MIB, "inference_mib": (params * 2 + kv) / MIB,
            "train_mib": (params * 16 + acts) / MIB, "kv_cache_mib": kv / MIB, "activations_mib": acts / MIB}


def count_params(cfg: LMConfig) -> int:
    from models.transformer import Transformer

    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def plot(report: dict, png: Path) -> None:
    plt = pyplot()

    rows = report["presets"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [rows[n]["train_mib"] for n in names], 0.4, label="training")
    ax.bar([i + 0.2 for i in x], [rows[n]["inference_mib"] for n in names], 0.4, label="inference")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"{n}\n({rows[n]['method']})" for n in names], fontsize=8)
    ax.set_ylabel("peak memory (MiB, log)")
    ax.set_title("LM presets: peak memory (toy: measured CPU fp32; real: computed, bf16 / mixed precision)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/memory.json")
    p.add_argument("--child", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    t0, rows = time.time(), {}
    for name, cfg in PRESETS.items():
        n = count_params(cfg)
        row = {"params": n, "dim": cfg.dim, "layers": cfg.n_layers, "max_len": cfg.max_len, "vocab": cfg.vocab_size}
        if name in TOY:
            for mode in ("train", "infer"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", name, mode],
                                     capture_output=True, text=True, check=True)
                row[{"train": "train_mib", "infer": "inference_mib"}[mode]] = json.loads(out.stdout.splitlines()[-1])["peak_mib"]
            row.update(method="measured", checkpoint_mib=n * 4 / MIB,
                       setting="CPU fp32; train: batch 32 x min(max_len,128); infer: batch 8, KV-cached sampling")
        else:
            row.update(method="computed", **computed(cfg, n),
                       setting="bf16 weights; train: AdamW mixed precision, 1 sequence of max_len, block checkpointing")
        rows[name] = row
        print(f"{name:14s} {n / 1e6:10.2f} M params  ckpt {row['checkpoint_mib']:10.1f} MiB  train "
              f"{row['train_mib']:10.1f} MiB  infer {row['inference_mib']:10.1f} MiB  ({row['method']})", flush=True)
    write_report({"presets": rows, "seconds": time.time() - t0, "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, args.out, plot)


if __name__ == "__main__":
    main()
