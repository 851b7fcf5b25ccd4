"""int8 CPU inference against fp32 on the demo model: speed, memory and quality in one run.

The int8 model is `models.quantize.quantize_int8` (dynamic int8 of the LM's linear layers). Both models go through
the demo's evaluation (evaluation.evaluate.evaluate on the 500 test digits: greedy captions, 20 images per digit
at the model's saved sampling settings, read by the classifier trained on the tuning digits). Each model is
evaluated `--repeats` times, alternating fp32 / int8, and the fastest run of each counts, so that a busy machine
slows both alike. Memory: the LM's serialised weights, and each model's peak RSS in its own process.

    python -m benchmarks.int8     # -> benchmarks/results/int8.json (needs results/demo/lm: make demo)
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

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
            "p.draw_captions(torch.stack(imgs),max_new_tokens=32);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="results/demo/lm")
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="evaluations of each model, alternating; the fastest counts")
    p.add_argument("--out", default=str(RESULTS / "int8.json"))
    args = p.parse_args(argv)
    if not Path(args.ckpt).exists():
        raise SystemExit(f"error: {args.ckpt}: not found; run `make demo` first")
    from evaluation.evaluate import evaluate
    from evaluation.splits import heldout_parts
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle
    from models.quantize import quantize_int8
    from train.sources import load_mnist_set

    torch.set_num_threads(1)
    models = {"fp32": load_bundle(args.ckpt)}
    models["int8"] = quantize_int8(models["fp32"])
    data = load_mnist_set()
    parts = heldout_parts(len(data))
    runs = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, b in models.items():
            runs[k].append(evaluate(Pipeline(b), data, parts, "test", args.per_digit, 500, outputs=True))
    report = {"ckpt": args.ckpt, "threads": 1, "repeats": args.repeats, "caption_images": len(parts["test"]),
              "t2i_images": runs["fp32"][0]["t2i_images"]}
    secs, caps = {}, {}
    for k, b in models.items():
        r = runs[k][0]  # the same seeds every repeat: the same figures
        caps[k] = r["outputs"]["captions"]
        secs[k] = {m: min(x[f"{m}_seconds"] for x in runs[k]) for m in ("caption", "t2i")}
        report[k] = {m: r[m] for m in ("caption_accuracy", "caption_accuracy_ci95", "t2i_accuracy",
                                       "t2i_accuracy_ci95", "cfg", "temperature")}
        report[k].update(caption_seconds=secs[k]["caption"], t2i_seconds=secs[k]["t2i"],
                         lm_weights_mb=_weights_mb(b.lm), peak_rss_mb=_peak_rss(args.ckpt, k == "int8"))
    report["speedup_caption"] = secs["fp32"]["caption"] / secs["int8"]["caption"]
    report["speedup_t2i"] = secs["fp32"]["t2i"] / secs["int8"]["t2i"]
    report["captions_that_differ"] = sum(a != b for a, b in zip(caps["fp32"], caps["int8"]))
    print(f"{'':6s} {'caption acc':>12s} {'t2i acc':>8s} {'caption s':>10s} {'t2i s':>8s} {'LM MiB':>7s} {'peak RSS':>9s}")
    for k in models:
        r = report[k]
        print(f"{k:6s} {r['caption_accuracy']:12.4f} {r['t2i_accuracy']:8.4f} {r['caption_seconds']:10.1f} "
              f"{r['t2i_seconds']:8.1f} {r['lm_weights_mb']:7.1f} {r['peak_rss_mb']:9.1f}")
    print(f"int8 speed-up: captioning {report['speedup_caption']:.2f}x, text-to-image {report['speedup_t2i']:.2f}x; "
          f"{report['captions_that_differ']} of {report['caption_images']} captions differ")
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
