"""int8 CPU inference against fp32 on the demo model: speed, memory and quality in one run.

The int8 model is `models.quantize.quantize_int8` (dynamic int8 of the LM's linear layers). Both models caption
the demo's 500 final-test digits (greedy) and draw 20 images per digit (cfg 3, temperature 0.8, read by the
demo's held-out classifier); timings alternate fp32 / int8 chunk by chunk so that a busy machine slows both
alike. Memory: the LM's serialised weights, and each model's peak RSS in its own process.

    python -m benchmarks.int8     # -> benchmarks/results/int8.json (needs results/demo/lm: make demo)
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import pyplot, write_report

RESULTS = Path("benchmarks/results")


def _weights_mb(lm: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(lm.state_dict(), buf)
    return buf.tell() / 2**20


def _peak_rss(ckpt: str, int8: bool) -> float:
    """Peak RSS (MiB) of a fresh process that loads the model and captions 100 digits."""
    code = ("import resource,torch;from mmar import Pipeline;from train.sources import load_mnist_set;"
            f"p=Pipeline.from_pretrained({ckpt!r},int8={int8});d=load_mnist_set();"
            "imgs=[d.image(i,1,28) for i in range(100)];"
            "from mmar.pipeline import Pipeline;caption(p.bundle,torch.stack(imgs),max_new_tokens=32);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="results/demo/lm")
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "int8.json"))
    args = p.parse_args(argv)
    if not Path(args.ckpt).exists():
        raise SystemExit(f"error: {args.ckpt}: not found; run `make demo` first")
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle
    from models.quantize import quantize_int8
    from train.demo import HOLDOUT, SEED, heldout_splits
    from evaluation.judges import HeldOutClassifier, caption_correct, wilson_interval
    from train.sources import load_mnist_set, split_indices

    torch.set_num_threads(1)
    models = {"fp32": load_bundle(args.ckpt)}
    models["int8"] = quantize_int8(models["fp32"])
    data = load_mnist_set()
    _, held = split_indices(len(data), HOLDOUT, SEED)
    parts = heldout_splits(held)
    test, tune = parts["test"], parts["tuning"]
    images = torch.stack([data.image(int(i), 1, 28) for i in test])
    clf = HeldOutClassifier(torch.stack([data.image(int(i), 1, 28) for i in tune]), data.labels[tune], deskew=True)
    caps = {k: [] for k in models}
    secs = {k: {"caption": 0.0, "t2i": 0.0} for k in models}
    for i in range(0, len(images), 100):
        for k, b in models.items():
            t = time.perf_counter()
            caps[k] += Pipeline(b).draw_captions(images[i:i + 100], max_new_tokens=32)
            secs[k]["caption"] += time.perf_counter() - t
    gen = {}
    want = np.repeat(np.arange(10), args.per_digit)
    for k, b in models.items():
        gen[k] = []
    for d in range(10):
        for k, b in models.items():
            g = torch.Generator().manual_seed(SEED + d)
            t = time.perf_counter()
            gen[k].append(Pipeline(b).draw_images([f"a handwritten {d}"], args.per_digit, cfg=3.0, temperature=0.8,
                                        generator=g))
            secs[k]["t2i"] += time.perf_counter() - t
    report = {"ckpt": args.ckpt, "threads": 1, "caption_images": len(images), "t2i_images": len(want)}
    for k, b in models.items():
        ok = [caption_correct(c, int(y)) for c, y in zip(caps[k], data.labels[test])]
        t2i_acc = clf.accuracy(torch.cat(gen[k]), want)
        report[k] = {
            "caption_accuracy": float(np.mean(ok)), "caption_accuracy_ci95": wilson_interval(sum(ok), len(ok)),
            "t2i_accuracy": t2i_acc, "t2i_accuracy_ci95": wilson_interval(round(t2i_acc * len(want)), len(want)),
            "caption_seconds": secs[k]["caption"], "t2i_seconds": secs[k]["t2i"],
            "lm_weights_mb": _weights_mb(b.lm), "peak_rss_mb": _peak_rss(args.ckpt, k == "int8")}
    report["speedup_caption"] = secs["fp32"]["caption"] / secs["int8"]["caption"]
    report["speedup_t2i"] = secs["fp32"]["t2i"] / secs["int8"]["t2i"]
    report["captions_that_differ"] = sum(a != b for a, b in zip(caps["fp32"], caps["int8"]))
    print(f"{'':6s} {'caption acc':>12s} {'t2i acc':>8s} {'caption s':>10s} {'t2i s':>8s} {'LM MiB':>7s} {'peak RSS':>9s}")
    for k in models:
        r = report[k]
        print(f"{k:6s} {r['caption_accuracy']:12.4f} {r['t2i_accuracy']:8.4f} {r['caption_seconds']:10.1f} "
              f"{r['t2i_seconds']:8.1f} {r['lm_weights_mb']:7.1f} {r['peak_rss_mb']:9.1f}")
    print(f"int8 speed-up: captioning {report['speedup_caption']:.2f}x, text-to-image {report['speedup_t2i']:.2f}x; "
          f"{report['captions_that_differ']} of {len(images)} captions differ")
    write_report(report, args.out, plot)


def plot(report: dict, png: Path) -> None:
    """Speed-ups and accuracies (95% intervals) of int8 against fp32."""
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.bar(["captioning", "text-to-image"], [report["speedup_caption"], report["speedup_t2i"]], color="#69c")
    a1.axhline(1.0, color="k", lw=0.8)
    a1.set_title(f"int8 speed-up over fp32 ({report['threads']} thread)")
    for j, k in enumerate(("fp32", "int8")):
        r = report[k]
        for i, m in enumerate(("caption_accuracy", "t2i_accuracy")):
            lo, hi = r[m + "_ci95"]
            a2.errorbar(i + (j - 0.5) * 0.2, r[m], yerr=[[r[m] - lo], [hi - r[m]]], fmt="o", capsize=4,
                        color=["#999", "#c63"][j], label=k if i == 0 else None)
    a2.set_xticks([0, 1], [f"caption ({report['caption_images']})", f"t2i ({report['t2i_images']})"])
    a2.set_title("accuracy (95% Wilson)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
