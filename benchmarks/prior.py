"""PRIOR vs plain next-token prediction on the same model, data and steps (discrete image codes).

1. trains PRIOR's text-only reference LM on the training captions (configs/mnist_prior_ref.yaml);
2. trains the demo's multimodal LM twice from the same seed, NTP (configs/mnist_lm.yaml) and PRIOR
   (configs/mnist_prior.yaml), keeping checkpoints at several points of training;
3. captions the test images (held-out digits 250-1499 of the demo's split: never trained or tuned on)
   with every checkpoint and scores slot accuracy (the right digit named, nothing else) and exact match
   (the caption is one of the digit's caption templates), with 95% Wilson intervals, and the relative
   improvement of PRIOR over NTP with a paired bootstrap 95% interval over the test images.

    python -m benchmarks.prior        # -> benchmarks/results/prior.json + prior.png (needs results/demo/vq.safetensors)

Only the discrete setting runs here: the continuous-input setting needs the projector path of the
"Understanding" issue, and the scenes data that issue builds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_report

RESULTS = Path("benchmarks/results")
VAL = 250  # held[:VAL] is the data modules' validation set; the rest is the test set here


def _fit(config: str, root: Path, extra: list[str]) -> None:
    from train.cli import main as cli_main

    cli_main(["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.callbacks", "[]", *extra])


def _score(ckpt: Path, images: torch.Tensor, labels: np.ndarray) -> dict:
    from generate.pipeline import caption
    from models.bundle import load_bundle
    from train.evaluation import caption_correct
    from train.sources import digit_captions

    b = load_bundle(ckpt)
    caps = []
    for i in range(0, len(images), 125):
        caps += caption(b, images[i:i + 125], max_new_tokens=32)  # greedy
    slot = np.array([caption_correct(c, int(y)) for c, y in zip(caps, labels)])
    exact = np.array([c.strip() in digit_captions(int(y)) for c, y in zip(caps, labels)])
    return {"slot": slot, "exact": exact, "examples": caps[:5]}


def _relative(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, list[float]]:
    """(b.mean() / a.mean() - 1, paired bootstrap 95% interval over the same test images)."""
    idx = rng.integers(0, len(a), (n, len(a)))
    ra, rb = a[idx].mean(1), b[idx].mean(1)
    rel = rb / np.maximum(ra, 1e-9) - 1
    return float(b.mean() / max(a.mean(), 1e-9) - 1), [float(np.quantile(rel, 0.025)), float(np.quantile(rel, 0.975))]


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("slot_accuracy", "exact_match")):
        for variant in ("ntp", "prior"):
            pts = report["curves"][variant]
            ax.errorbar([p["step"] for p in pts], [p[metric] for p in pts],
                        yerr=np.array([[p[metric] - p[metric + "_ci95"][0], p[metric + "_ci95"][1] - p[metric]]
                                       for p in pts]).T, marker="o", capsize=3, label=variant.upper())
        ax.set_xlabel("training step")
        ax.set_title(f"{metric.replace('_', ' ')} ({report['test_images']} test digits)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vq", default="results/demo/vq.safetensors", help="the demo's VQ tokenizer (make demo)")
    p.add_argument("--work", default="results/bench_prior")
    p.add_argument("--points", type=int, default=4, help="checkpoints evaluated along training (656 steps / points)")
    p.add_argument("--out", default=str(RESULTS / "prior.json"))
    args = p.parse_args(argv)
    if not Path(args.vq).is_file():
        raise SystemExit(f"error: {args.vq}: not found; run `make demo` first (it trains the VQ tokenizer)")
    from train.demo import HOLDOUT, SEED
    from train.evaluation import wilson_interval
    from train.sources import load_mnist_set, split_indices

    t0, work = time.time(), Path(args.work)
    data = load_mnist_set()
    _, held = split_indices(len(data), HOLDOUT, SEED)
    test = held[VAL:]
    images = torch.stack([data.image(int(i), 1, 28) for i in test])
    labels = data.labels[test]
    common = ["--data.init_args.vision_tokenizer", args.vq]
    print("== reference LM ==", flush=True)
    _fit("configs/mnist_prior_ref.yaml", work / "ref", common)
    ref = work / "ref" / "checkpoints" / "last.ckpt"
    steps = 656  # configs/mnist_lm.yaml: 2 epochs of 3,500 digits x 6 copies at batch 64
    every = steps // args.points
    curves, raw, seconds = {}, {}, {}
    for variant, config in (("ntp", "configs/mnist_lm.yaml"), ("prior", "configs/mnist_prior.yaml")):
        print(f"== {variant} ==", flush=True)
        root = work / variant
        extra = [*common, "--data.init_args.cache_dir", str(work / "cache"), "--data.init_args.val_size", str(VAL),
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps", str(every), "--trainer.callbacks.save_top_k", "-1",
                 "--trainer.callbacks.filename", "{step}"]
        if variant == "prior":
            extra += ["--model.init_args.objective.init_args.prior.init_args.reference", str(ref)]
        t = time.time()
        torch.manual_seed(SEED)
        _fit(config, root, extra)
        seconds[variant] = time.time() - t
        ckpts = sorted((root / "checkpoints").glob("step=*.ckpt"), key=lambda c: int(c.stem.split("=")[1]))
        curves[variant], raw[variant] = [], {}
        for c in ckpts:
            step = int(c.stem.split("=")[1])
            s = _score(c, images, labels)
            raw[variant][step] = s
            curves[variant].append({
                "step": step,
                "slot_accuracy": float(s["slot"].mean()),
                "slot_accuracy_ci95": list(wilson_interval(int(s["slot"].sum()), len(s["slot"]))),
                "exact_match": float(s["exact"].mean()),
                "exact_match_ci95": list(wilson_interval(int(s["exact"].sum()), len(s["exact"]))),
                "examples": s["examples"]})
            print(f"{variant:5s} step {step:4d}: slot {s['slot'].mean():.4f}  exact {s['exact'].mean():.4f}", flush=True)
    rng = np.random.default_rng(0)
    last = {v: raw[v][max(raw[v])] for v in raw}
    report = {"setting": "discrete VQ codes (MNIST digits, the demo's VQ tokenizer and LM recipe)",
              "test_images": len(test), "steps": steps, "train_seconds": seconds, "curves": curves,
              "paper_relative_improvement": {"without_visual_encoder": 0.08, "with_visual_encoder": 0.19}}
    for metric in ("slot", "exact"):
        rel, ci = _relative(last["ntp"][metric].astype(float), last["prior"][metric].astype(float), rng)
        report[f"relative_improvement_{metric}"] = rel
        report[f"relative_improvement_{metric}_ci95"] = ci
        print(f"PRIOR vs NTP ({metric}): {rel:+.4f} relative, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]")
    report["seconds"] = time.time() - t0
    report["torch"] = torch.__version__
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
