"""Memory of the JSONL and WebDataset sources as the dataset grows (issue: data at scale).

For each source format and size (default 1,000 / 10,000 / 100,000 tiny 16x16 RGB images with captions), a
fresh process builds the LM data module on it (index the source, train the caption BPE, encode every image
with a small VQ tokenizer into the code cache, check every sample), trains on nothing but iterates one whole
epoch of the training loader (sequences built, batches collated), then resumes the loader half-way and times
its first batch. Peak RSS is the process's high-water mark (`ru_maxrss`), so it includes Python, torch and
everything the run touched; what should stay flat is its growth with the number of samples. The part that
does grow on purpose is the code cache (one int32 per code: 256 bytes per 8x8-code image here), which the
report separates out.

    python -m benchmarks.streaming            # -> benchmarks/results/streaming.json + streaming.png
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import pyplot, write_report

RESULTS = Path("benchmarks/results")
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "grey"]
SHAPES = ["square", "stripe", "dot", "frame"]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sample(i: int) -> tuple[bytes, str]:
    """Tiny image i (a PNG of 16x16 RGB) and its caption, deterministic from i."""
    rng = np.random.default_rng(i)
    colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    img = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "purple": (150, 40, 180), "orange": (240, 140, 20), "white": (240, 240, 240), "grey": (128, 128, 128)}
    if shape == "square":
        img[4:12, 4:12] = rgb[colour]
    elif shape == "stripe":
        img[6:10, :] = rgb[colour]
    elif shape == "dot":
        img[6:10, 6:10] = rgb[colour]
    else:
        img[2:14, 2:14] = rgb[colour]
        img[4:12, 4:12] = 0
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), f"a {colour} {shape} number {i}"


def make_jsonl(folder: Path, n: int) -> Path:
    """n images as files (1,000 per sub-folder) listed in data.jsonl; reused when already complete."""
    path = folder / "data.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "data.jsonl.tmp"
    with open(tmp, "w") as fh:
        for i in range(n):
            png, cap = _sample(i)
            rel = Path(f"{i // 1000:03d}") / f"{i}.png"
            (folder / rel).parent.mkdir(exist_ok=True)
            (folder / rel).write_bytes(png)
            fh.write(json.dumps({"image": str(rel), "caption": cap}) + "\n")
    tmp.rename(path)
    return path


def make_wds(folder: Path, n: int, per_shard: int = 10_000) -> str:
    """n samples in WebDataset tar shards of `per_shard` samples; reused when already complete."""
    done = folder / "done"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(0, n, per_shard):
            with tarfile.open(folder / f"shard-{s // per_shard:05d}.tar", "w") as tar:
                for i in range(s, min(s + per_shard, n)):
                    png, cap = _sample(i)
                    for name, data in ((f"{i:07d}.png", png), (f"{i:07d}.txt", cap.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        done.write_text("ok")
    return str(folder / "shard-*.tar")


def child(source: str, path: str, vq: str, cache: str, batch_size: int) -> dict:
    """One measurement, in its own process (so ru_maxrss is this run's)."""
    import torch

    from train.datamodules import ImageTextDataModule

    torch.set_num_threads(1)
    out = {"rss_start_mb": _rss_mb()}
    t0 = time.perf_counter()
    dm = ImageTextDataModule(vq, source=source, path=path, holdout=0.01, batch_size=batch_size, max_len=96,
                             cache_dir=cache, bpe_vocab_size=300)
    dm.prepare_data()
    dm.setup()
    out["setup_s"] = time.perf_counter() - t0  # index + BPE + encode + check every sample
    out["rss_after_setup_mb"] = _rss_mb()
    out["code_cache_mb"] = dm.train_set.codes.numel() * dm.train_set.codes.element_size() / 2**20
    loader = dm.train_dataloader()
    t0, batches, rss = time.perf_counter(), 0, []
    for batch in loader:
        batches += 1
        if batches % 50 == 0:
            rss.append(_rss_mb())
    out["epoch_s"], out["batches"] = time.perf_counter() - t0, batches
    out["rss_during_epoch_mb"] = [round(r, 1) for r in rss]
    loader.load_state_dict({"epoch": 0, "batches": batches // 2, "batch_size": batch_size})
    t0 = time.perf_counter()
    next(iter(loader))
    out["resume_first_batch_s"] = time.perf_counter() - t0  # skips half the epoch: no replay
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["train_samples"] = len(dm.train_set)
    return out


def tiny_vq(path: Path) -> str:
    import torch

    from vision_tokenizers import registry
    from vision_tokenizers.vq import VQConfig, VQTokenizer

    if not path.is_file():
        torch.manual_seed(0)
        registry.save(VQTokenizer(VQConfig(in_channels=3, image_size=16, channels=[16, 16], latent_dim=8,
                                           codebook_size=64)).eval(), path)
    return str(path)


def plot(report: dict, png: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for source in ("jsonl", "wds"):
        rows = [r for r in report["runs"] if r["source"] == source]
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["peak_rss_mb"] for r in rows], "o-", label=f"{source}: peak RSS")
        ax.plot(ns, [r["peak_rss_mb"] - r["code_cache_mb"] for r in rows], "x--", label=f"{source}: minus code cache")
    ax.set_xscale("log")
    ax.set_xlabel("samples in the source")
    ax.set_ylabel("MiB")
    ax.set_title("LM data module over a JSONL / WebDataset source: one epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="dataset sizes")
    p.add_argument("--sources", nargs="+", default=["jsonl", "wds"], choices=["jsonl", "wds"])
    p.add_argument("--work", default="results/bench_streaming", help="where the generated datasets and caches go")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS / "streaming.json"))
    p.add_argument("--child", nargs=4, metavar=("SOURCE", "PATH", "VQ", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.batch_size)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vq = tiny_vq(work / "vq.safetensors")
    runs = []
    for source in args.sources:
        for n in args.sizes:
            t0 = time.perf_counter()
            folder = work / f"{source}-{n}"
            path = str(make_jsonl(folder, n)) if source == "jsonl" else make_wds(folder, n)
            made = time.perf_counter() - t0
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
            res = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--batch-size", str(args.batch_size),
                                  "--child", source, path, vq, str(folder / "cache")],
                                 capture_output=True, text=True, env=env)
            if res.returncode:
                sys.exit(f"{source} n={n} failed: {res.stderr.strip().splitlines()[-1]}")
            row = {"source": source, "n": n, "make_s": round(made, 1), **json.loads(res.stdout.splitlines()[-1])}
            runs.append(row)
            print(f"{source:5s} n={n:>7,}  peak RSS {row['peak_rss_mb']:7.1f} MiB (code cache {row['code_cache_mb']:5.1f})"
                  f"  setup {row['setup_s']:6.1f} s  epoch {row['epoch_s']:6.1f} s ({row['batches']} batches)"
                  f"  resume->first batch {row['resume_first_batch_s']:.3f} s", flush=True)
    report = {"what": "one process per row: index + BPE + encode + check, one epoch, resume half-way",
              "image": "16x16 RGB PNG, 8x8 codes", "batch_size": args.batch_size, "threads": 1, "runs": runs}
    for source in args.sources:
        rows = sorted((r for r in runs if r["source"] == source), key=lambda r: r["n"])
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            per = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (b["n"] - a["n"])
            rest = ((b["peak_rss_mb"] - b["code_cache_mb"]) - (a["peak_rss_mb"] - a["code_cache_mb"])) * 2**20 / (b["n"] - a["n"])
            report[f"{source}_bytes_per_sample"] = round(per, 1)
            report[f"{source}_bytes_per_sample_without_codes"] = round(rest, 1)
            print(f"{source}: peak RSS grows {per:.0f} bytes per sample ({rest:.0f} without the code cache)")
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
