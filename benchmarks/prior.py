"""PRIOR vs plain next-token prediction on the same model, data and steps.

Part `mnist` (discrete image codes, one-word captions):
1. trains PRIOR's text-only reference LM on the training captions (configs/mnist_prior_ref.yaml);
2. trains the demo's multimodal LM twice from the same seed, NTP (configs/mnist_lm.yaml) and PRIOR
   (configs/mnist_prior.yaml), keeping checkpoints at several points of training;
3. captions the test images (held-out digits 250-1499 of the demo's split: never trained or tuned on)
   with every checkpoint and scores slot accuracy (the right digit named, nothing else) and exact match
   (the caption is one of the digit's caption templates), with 95% Wilson intervals, and the relative
   improvement of PRIOR over NTP with a paired bootstrap 95% interval over the test images.

Part `scenes` (train/scenes.py: 1-4 items named with their places, plus image-independent filler text), both of
the paper's settings: `codes` (the LM reads the frozen scenes tokenizer's code ids: no visual encoder,
configs/scenes_lm_codes.yaml) and `vit` (a ViT encoder trained with the LM, its grid pooled to 36 tokens:
configs/scenes_tokenflex.yaml at one count). One reference LM (configs/scenes_prior_ref.yaml) serves both. Scores
on `--scenes-test` held-out scenes at several points of training: slot accuracy, scene accuracy, exact match,
CIDEr-D (bootstrap / Wilson 95% intervals) and PRIOR's relative improvement with paired bootstrap intervals. It
also times the reference model per training batch: on the fly against a cache hit (PriorWeighting's in-memory
cache), beside one training step of the model.

    python -m benchmarks.prior                  # both parts -> benchmarks/results/prior_scenes.json + prior_scenes.png
    python -m benchmarks.prior --parts scenes   # one part (the JSON keeps the other part's last figures)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import fit_recipe, last_ckpt, pyplot, write_report

RESULTS = Path("benchmarks/results")


def _score(ckpt: Path, images: torch.Tensor, labels: np.ndarray) -> dict:
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle
    from evaluation.judges import caption_correct
    from train.sources import digit_captions

    b = load_bundle(ckpt)
    caps = []
    for i in range(0, len(images), 125):
        caps += Pipeline(b).draw_captions(images[i:i + 125], max_new_tokens=32)  # greedy
    slot = np.array([caption_correct(c, int(y)) for c, y in zip(caps, labels)])
    exact = np.array([c.strip() in digit_captions(int(y)) for c, y in zip(caps, labels)])
    return {"slot": slot, "exact": exact, "examples": caps[:5]}


def _relative(a: np.ndarray, b: np.ndarray) -> tuple[float, list[float]]:
    """(b.mean() / a.mean() - 1, paired percentile bootstrap 95% interval over the same test images)."""
    from evaluation.judges import bootstrap_interval

    rel, ci = bootstrap_interval(lambda i: b[i].mean() / max(a[i].mean(), 1e-9) - 1, len(a))
    return rel, list(ci)


def plot(report: dict, png: Path) -> None:
    plt = pyplot()

    panels = []  # (title, curves {variant: points}, metric)
    if "curves" in report:
        panels += [(f"MNIST codes: {m.replace('_', ' ')}", report["curves"], m) for m in ("slot_accuracy", "exact_match")]
    for name, setting in report.get("scenes", {}).get("settings", {}).items():
        panels += [(f"scenes {name}: {m.replace('_', ' ')}", setting["curves"], m) for m in ("slot_accuracy", "cider")]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(9, 3.3 * rows), squeeze=False)
    for ax, (title, curves, metric) in zip(axes.flat, panels):
        for variant in ("ntp", "prior"):
            pts = curves[variant]
            ax.errorbar([p["step"] for p in pts], [p[metric] for p in pts],
                        yerr=np.array([[p[metric] - p[metric + "_ci95"][0], p[metric + "_ci95"][1] - p[metric]]
                                       for p in pts]).T, marker="o", capsize=3, label=variant.upper())
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run_mnist(args, work: Path, report: dict) -> None:
    if not Path(args.vq).is_file():
        raise SystemExit(f"error: {args.vq}: not found; run `make demo` first (it trains the VQ tokenizer)")
    from evaluation.judges import wilson_interval
    from evaluation.splits import SPLIT_SEED, heldout_parts
    from train.sources import load_mnist_set

    data = load_mnist_set()
    parts = heldout_parts(len(data))
    val_size = len(parts["validation"])
    test = np.concatenate([parts["tuning"], parts["test"]])  # every held-out digit the LM does not validate on
    images = torch.stack([data.image(int(i), 1, 28) for i in test])
    labels = data.labels[test]
    common = ["--data.init_args.vision_tokenizer", args.vq]
    print("== reference LM ==", flush=True)
    fit_recipe("configs/mnist_prior_ref.yaml", work / "ref", common)
    ref = last_ckpt(work / "ref")
    steps = 656  # configs/mnist_lm.yaml: 2 epochs of 3,500 digits x 6 copies at batch 64
    curves, raw, seconds = {}, {}, {}
    for variant, config in (("ntp", "configs/mnist_lm.yaml"), ("prior", "configs/mnist_prior.yaml")):
        print(f"== {variant} ==", flush=True)
        root = work / variant
        extra = [*common, "--data.init_args.cache_dir", str(work / "cache"), "--data.init_args.val_size", str(val_size),
                 *_checkpoints_every(steps // args.points)]
        if variant == "prior":
            extra += ["--model.init_args.objective.init_args.prior.init_args.reference", ref]
        torch.manual_seed(SPLIT_SEED)
        seconds[variant] = fit_recipe(config, root, extra)
        curves[variant], raw[variant] = [], {}
        for step, c in _step_checkpoints(root):
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
    last = {v: raw[v][max(raw[v])] for v in raw}
    report.update({"setting": "discrete VQ codes (MNIST digits, the demo's VQ tokenizer and LM recipe)",
                   "test_images": len(test), "steps": steps, "train_seconds": seconds, "curves": curves})
    for metric in ("slot", "exact"):
        rel, ci = _relative(last["ntp"][metric].astype(float), last["prior"][metric].astype(float))
        report[f"relative_improvement_{metric}"] = rel
        report[f"relative_improvement_{metric}_ci95"] = ci
        print(f"PRIOR vs NTP ({metric}): {rel:+.4f} relative, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]")


def _checkpoints_every(steps: int) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps", str(steps), "--trainer.callbacks.save_top_k", "-1",
            "--trainer.callbacks.filename", "{step}"]


def _step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    ckpts = [(int(c.stem.split("=")[1]), c) for c in (root / "checkpoints").glob("step=*.ckpt")]
    return sorted(ckpts)


SCENES_SETTINGS = {  # name: (recipe, extra arguments, visual tokens at inference)
    "codes": ("configs/scenes_lm_codes.yaml", [], None),
    "vit": ("configs/scenes_tokenflex.yaml", ["--data.init_args.token_mix", "{36: 1.0}"], 36),
}


def run_scenes(args, work: Path, report: dict) -> None:
    from benchmarks.understanding import bootstrap_mean, captions_of, score_scene_captions
    from models.bundle import load_bundle
    from train.scenes import ItemPools, Scenes

    vq = Path(args.scenes_vq)
    seconds = {}
    if not vq.is_file():
        print("== scenes tokenizer ==", flush=True)
        seconds["tokenizer"] = fit_recipe("configs/scenes_tokenizer.yaml", work / "tokenizer",
                                          ["--trainer.max_steps", str(args.tokenizer_steps), "--data.init_args.batch_size", "32",
                                           "--data.init_args.n_train", str(args.n_train),
                                           "--model.init_args.export_path", str(vq)], reuse=args.reuse)
    test = Scenes(ItemPools.load(0), "test", args.scenes_test, seed=0)
    images = test.images()
    truths = [test.truth(i) for i in range(len(test))]
    refs = [test.captions(i) for i in range(len(test))]
    n_train = ["--data.init_args.n_train", str(args.n_train)]
    print("== scenes reference LM ==", flush=True)
    seconds["reference"] = fit_recipe("configs/scenes_prior_ref.yaml", work / "ref",
                                      [*n_train, "--data.init_args.vision_tokenizer", str(vq),
                                       "--trainer.max_steps", str(args.ref_steps)], reuse=args.reuse)
    ref = last_ckpt(work / "ref")
    prior_args = ["--model.init_args.objective.init_args.prior", "train.prior.PriorWeighting",
                  "--model.init_args.objective.init_args.prior.init_args.reference", ref]
    settings = {}
    for name, (recipe, extra, tokens) in SCENES_SETTINGS.items():
        if name == "codes":
            extra = [*extra, "--data.init_args.vision_tokenizer", str(vq)]
        curves, last = {}, {}
        for variant in ("ntp", "prior"):
            print(f"== scenes {name}: {variant} ==", flush=True)
            root = work / f"{name}_{variant}"
            seconds[f"{name}_{variant}"] = fit_recipe(
                recipe, root, [*n_train, *extra, "--trainer.max_steps", str(args.scenes_steps),
                               "--model.init_args.export_path", "null",
                               *_checkpoints_every(args.scenes_steps // args.points),
                               *(prior_args if variant == "prior" else [])], reuse=args.reuse)
            curves[variant] = []
            for step, ckpt in _step_checkpoints(root):
                s = score_scene_captions(captions_of(load_bundle(ckpt), images, tokens=tokens), truths, refs)
                last[variant] = s
                curves[variant].append({"step": step, **{k: v for k, v in s.items() if not k.startswith("_")},
                                        "exact_match_ci95": bootstrap_mean(s["_exact"].astype(float))})
                print(f"{name} {variant:5s} step {step:4d}: slot {s['slot_accuracy']:.4f}  scene "
                      f"{s['scene_accuracy']:.4f}  exact {s['exact_match']:.4f}  CIDEr {s['cider']:.3f}", flush=True)
        rel = {}
        for metric, key in (("slot_accuracy", "_slot"), ("exact_match", "_exact"), ("cider", "_cider")):
            r, ci = _relative(last["ntp"][key].astype(float), last["prior"][key].astype(float))
            rel[metric] = {"relative": r, "ci95": ci}
            print(f"scenes {name}: PRIOR vs NTP ({metric}): {r:+.4f} relative, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]")
        settings[name] = {"recipe": recipe, "tokens": tokens, "curves": curves, "prior_vs_ntp_at_end": rel}
    report["scenes"] = {"test_scenes": len(test), "steps": args.scenes_steps, "reference_steps": args.ref_steps,
                        "n_train": args.n_train, "tokenizer": str(vq), "settings": settings,
                        "reference_timing": _time_reference(ref, vq, args.n_train), "seconds": seconds}


def _time_reference(ref: str, vq: Path, n_train: int, repeats: int = 5) -> dict:
    """Seconds per training batch (32 scenes, half image->text) of PRIOR's reference on the fly and from the
    in-memory cache, beside one training step (forward + backward) of the codes model's size."""
    from models.config import LMConfig
    from models.objectives import NextTokenPrediction
    from train.prior import PriorWeighting
    from models.transformer import Transformer
    from train.understanding.data import ScenesDataModule

    dm = ScenesDataModule(str(vq), n_train=n_train, batch_size=32, max_len=112)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    prior = PriorWeighting(ref)
    ids, flag, modality = batch["ids"], batch["loss"], batch["modality"]

    def timed(fn) -> float:
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    prior.use_cache = False
    on_the_fly = timed(lambda: prior(ids, flag, modality))
    prior.use_cache = True
    prior(ids, flag, modality)  # fills the cache
    cached = timed(lambda: prior(ids, flag, modality))
    lm = Transformer(LMConfig.from_preset("scenes", vocab_size=dm.layout.size, max_len=112))
    objective = NextTokenPrediction(text_weight=2.0)
    step = timed(lambda: objective.loss(lm, batch)["loss"].backward())
    return {"batch": 32, "reference_on_the_fly_s": on_the_fly, "reference_cached_s": cached,
            "train_step_s": step, "on_the_fly_share_of_step": on_the_fly / (on_the_fly + step),
            "note": "scenes captions rarely repeat (20,000 scenes x 30 captions), so the cache hits little here"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["mnist", "scenes"], choices=["mnist", "scenes"])
    p.add_argument("--vq", default="results/demo/vq.safetensors", help="mnist: the demo's VQ tokenizer (make demo)")
    p.add_argument("--work", default="results/bench_prior")
    p.add_argument("--points", type=int, default=4, help="checkpoints evaluated along each training run")
    p.add_argument("--scenes-vq", default="results/bench_prior/scenes/vq.safetensors",
                   help="scenes: the scenes tokenizer (trained here when the file is missing)")
    p.add_argument("--tokenizer-steps", type=int, default=300, help="scenes: steps of that tokenizer when trained")
    p.add_argument("--n-train", type=int, default=20_000, help="scenes: training scenes")
    p.add_argument("--scenes-test", type=int, default=1000, help="scenes: held-out test scenes captioned")
    p.add_argument("--scenes-steps", type=int, default=400, help="scenes: steps of every model (batch 32)")
    p.add_argument("--ref-steps", type=int, default=400, help="scenes: steps of the reference LM (batch 64)")
    p.add_argument("--reuse", action="store_true", help="scenes: keep models whose run already finished in --work")
    p.add_argument("--out", default=str(RESULTS / "prior_scenes.json"))
    args = p.parse_args(argv)
    t0, work = time.time(), Path(args.work)
    report = {"paper_relative_improvement": {"without_visual_encoder": 0.08, "with_visual_encoder": 0.19}}
    out = Path(args.out)
    if "mnist" not in args.parts and out.exists():  # keep the MNIST part's last figures
        report.update({k: v for k, v in json.loads(out.read_text()).items() if k != "scenes"})
    if "scenes" not in args.parts and out.exists():
        report.update({k: v for k, v in json.loads(out.read_text()).items() if k == "scenes"})
    if "mnist" in args.parts:
        run_mnist(args, work, report)
    if "scenes" in args.parts:
        run_scenes(args, work / "scenes", report)
    report["seconds"] = time.time() - t0
    report["torch"] = torch.__version__
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
