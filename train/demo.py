"""The MNIST demo (`make demo`): tokenizer -> language model -> text-to-image and captioning -> report.

1. trains the VQ tokenizer (configs/mnist_vq.yaml) on the 3,500 training digits;
2. trains PRIOR's text-only reference LM on the training captions (configs/mnist_prior_ref.yaml, ~10 s), then
   the multimodal LM (configs/mnist_prior.yaml: configs/mnist_lm.yaml with caption tokens weighted by PRIOR)
   on codes + template captions, both orders;
3. draws 20 images per digit from "a handwritten <d>" (CFG 3, temperature 0.6) and reads them with an independent classifier
   (an SVM on deskewed pixels, trained on 750 real held-out digits the generator never saw, plus their
   one-pixel shifts; see evaluation/judges.py);
4. captions the 500 final-test digits and checks that each caption names the right digit;
5. prints the report and writes results/demo.json (figures with 95% Wilson intervals, seconds).
Everything it makes stays under results/demo/.

The 1,500 held-out digits (fixed by the seed) are split three ways, disjoint:
  validation  held[:250]     the data module's val/loss and the training-time samples
  tuning      held[250:1000] recipe and sampling choices were made on these; the classifier trains on them
  test        held[1000:]    the reported caption figure and nothing else
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common.io import write_text_atomic
from evaluation.judges import HeldOutClassifier, caption_correct, psnr, wilson_interval
from mmar.pipeline import Pipeline
from models.bundle import load_bundle
from train.cli import main as cli_main
from train.sources import load_mnist_set, split_indices
from vision_tokenizers.image_io import grid, save_png

HOLDOUT, SEED = 1500, 0
VAL, TUNE = 250, 1000  # held[:VAL] validation, held[VAL:TUNE] tuning, held[TUNE:] final test


def heldout_splits(held) -> dict:
    """The three disjoint parts of the held-out indices (see the module docstring)."""
    return {"validation": held[:VAL], "tuning": held[VAL:TUNE], "test": held[TUNE:]}


def train_models(out: Path, vq_args: list[str], lm_args: list[str]) -> Path:
    """Stages 1-2: the tokenizer and the LM; returns the exported inference folder (`out/lm`)."""
    out.mkdir(parents=True, exist_ok=True)
    trainer_flags = ["--trainer.enable_model_summary", "false"]
    vq_file = str(out / "vq.safetensors")
    vq_args = ["--trainer.default_root_dir", str(out / "vq"), "--trainer.logger.init_args.save_dir", str(out / "vq"),
               "--model.init_args.export_path", vq_file, *vq_args]
    lm_args = ["--trainer.default_root_dir", str(out / "lm_run"), "--trainer.logger.init_args.save_dir",
               str(out / "lm_run"), "--data.init_args.vision_tokenizer", vq_file,
               "--data.init_args.cache_dir", str(out / "cache"), "--data.init_args.val_size", str(VAL), *lm_args]

    print("== 1/4 VQ tokenizer ==", flush=True)
    cli_main(["fit", "--config", "configs/mnist_vq.yaml", *trainer_flags, *vq_args])

    print("== 2/4 language model (PRIOR's text-only reference, then the LM) ==", flush=True)
    ref_dir = str(out / "prior_ref")
    cli_main(["fit", "--config", "configs/mnist_prior_ref.yaml", *trainer_flags, "--trainer.default_root_dir", ref_dir,
              "--trainer.logger.init_args.save_dir", ref_dir, "--data.init_args.vision_tokenizer", vq_file])
    lm_args = ["--model.init_args.objective.init_args.prior.init_args.reference",
               str(out / "prior_ref" / "checkpoints" / "last.ckpt"), *lm_args]
    lm_cli = cli_main(["fit", "--config", "configs/mnist_prior.yaml", *trainer_flags, *lm_args])
    trainer = lm_cli.trainer
    ckpt = Path(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path)
    shutil.copyfile(ckpt, out / "lm.ckpt")
    lm_cli.model.bundle().save(out / "lm")
    return out / "lm"


def evaluate(bundle, out: Path, per_digit: int, cfg: float | None, temperature: float | None, split: str) -> dict:
    """Stage 3: text-to-image and captioning figures of one model (its own tokenizer) on a held-out split."""
    out.mkdir(parents=True, exist_ok=True)
    vq = bundle.vision
    data = load_mnist_set()
    _, held = split_indices(len(data), HOLDOUT, SEED)
    parts = heldout_splits(held)
    cap_idx, clf_idx = parts[split], parts["tuning"]
    real = lambda idx: torch.stack([data.image(int(i), 1, 28) for i in idx])  # noqa: E731
    cap_images, clf_images = real(cap_idx), real(clf_idx)

    clf = HeldOutClassifier(clf_images, data.labels[clf_idx], deskew=True)
    # its ceiling on real digits; on the tuning split it would be its own training accuracy, so not reported
    clf_acc = clf.accuracy(cap_images, data.labels[cap_idx]) if split != "tuning" else None

    with torch.inference_mode():
        recon = vq.decode(vq.encode(cap_images))
    tok_psnr = psnr(recon, cap_images)

    g = torch.Generator().manual_seed(SEED)
    prompts = [f"a handwritten {d}" for d in range(10)]
    gen = Pipeline(bundle).draw_images(prompts, per_digit, cfg=cfg, temperature=temperature, generator=g)
    want = np.repeat(np.arange(10), per_digit)
    t2i_acc = clf.accuracy(gen, want)
    t2i_ok = round(t2i_acc * len(want))
    save_png(grid(gen, nrow=per_digit), out / "t2i_grid.png")

    caps = []
    for i in range(0, len(cap_images), 100):
        caps += Pipeline(bundle).draw_captions(cap_images[i:i + 100], max_new_tokens=32, generator=g)
    correct = [caption_correct(c, int(y)) for c, y in zip(caps, data.labels[cap_idx])]
    cap_acc = float(np.mean(correct))
    write_text_atomic(out / "captions.tsv", "".join(f"{int(y)}\t{c}\n" for c, y in zip(caps, data.labels[cap_idx])))

    return {
        "t2i_accuracy": t2i_acc,
        "t2i_accuracy_ci95": wilson_interval(t2i_ok, len(want)),
        "t2i_images": len(want),
        "caption_accuracy": cap_acc,
        "caption_accuracy_ci95": wilson_interval(sum(correct), len(correct)),
        "caption_split": split,
        "tokenizer_psnr": tok_psnr,
        "classifier_accuracy_on_real": clf_acc,
        "images_per_digit": per_digit,
        "cfg": bundle.sampling.cfg if cfg is None else cfg,
        "temperature": bundle.sampling.temperature if temperature is None else temperature,
        "captions_evaluated": len(caps),
        "lm_parameters": bundle.lm.num_params(),
        "tokens_per_image": bundle.vision.num_tokens,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--per-digit", type=int, default=20, help="images drawn per digit for text-to-image")
    p.add_argument("--split", choices=("test", "tuning"), default="test",
                   help="held-out part the captions are scored on: tune recipes on 'tuning', report 'test'")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale for text-to-image (default: the model's saved one)")
    p.add_argument("--temperature", type=float, default=None,
                   help="text-to-image sampling temperature (default: the model's saved one)")
    p.add_argument("--vq-arg", action="append", default=[], help="extra LightningCLI flag for the tokenizer stage")
    p.add_argument("--lm-arg", action="append", default=[], help="extra LightningCLI flag for the LM stage")
    p.add_argument("--ckpt", help="score this trained model (inference folder or .ckpt) instead of training one; "
                   "the report goes to <out>/report_<split>.json")
    args = p.parse_args(argv)
    torch.manual_seed(SEED)
    out, t0 = Path(args.out), time.time()
    if args.ckpt:
        try:
            bundle = load_bundle(args.ckpt)
        except (OSError, ValueError, KeyError) as e:  # missing, truncated or foreign file
            p.error(str(e))
        train_seconds = None
        path = out / f"report_{args.split}.json"
    else:
        bundle = load_bundle(train_models(out, args.vq_arg, args.lm_arg))  # evaluate exactly what was exported
        train_seconds = time.time() - t0
        path = out.parent / "demo.json"
    print("== 3/4 evaluation ==", flush=True)
    report = evaluate(bundle, out, args.per_digit, args.cfg, args.temperature, args.split)
    report["seconds"] = time.time() - t0
    if train_seconds is not None:
        report["train_seconds"] = train_seconds
    print("== 4/4 report ==")
    width = max(map(len, report))
    for k, v in report.items():
        if isinstance(v, tuple):
            v = f"[{v[0]:.4f}, {v[1]:.4f}]"
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
