"""The MNIST demo (`make demo`): tokenizer -> language model -> text-to-image and captioning -> report.

1. trains the VQ tokenizer (configs/mnist_vq.yaml) on the 3,500 training digits;
2. trains PRIOR's text-only reference LM on the training captions (configs/mnist_prior_ref.yaml, ~10 s), then
   the multimodal LM (configs/mnist_prior.yaml: configs/mnist_lm.yaml with caption tokens weighted by PRIOR)
   on codes + template captions, both orders;
3. draws 20 images per digit from captions of the test digits (the model's saved sampling: CFG 3, temperature
   0.6) and reads them with an independent classifier (an SVM on deskewed pixels, trained on the 750 real
   tuning digits the generator never saw, plus their one-pixel shifts; see evaluation/judges.py);
4. captions the 500 test digits and checks that each caption names the right digit;
5. prints the report and writes results/demo.json (figures with 95% Wilson intervals, seconds).
Steps 3-4 are evaluation.evaluate.evaluate, the same code as `mmar eval`. Everything it makes stays under
results/demo/. The 1,500 held-out digits are cut validation 250 / tuning 750 / test 500 (evaluation/splits.py):
recipe and sampling choices were made on tuning (`--split tuning`), the reported figures are test's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from common.io import write_text_atomic
from evaluation.evaluate import evaluate
from evaluation.splits import MNIST_HOLDOUT, SPLIT_SEED, heldout_parts
from mmar.pipeline import Pipeline
from models.bundle import load_bundle
from train.cli import main as cli_main
from train.sources import load_mnist_set


def train_models(out: Path, vq_args: list[str], lm_args: list[str]) -> Path:
    """Stages 1-2: the tokenizer and the LM; returns the exported inference folder (`out/lm`)."""
    out.mkdir(parents=True, exist_ok=True)
    trainer_flags = ["--trainer.enable_model_summary", "false"]
    vq_file = str(out / "vq.safetensors")
    vq_args = ["--trainer.default_root_dir", str(out / "vq"), "--trainer.logger.init_args.save_dir", str(out / "vq"),
               "--model.init_args.export_path", vq_file, *vq_args]
    lm_args = ["--trainer.default_root_dir", str(out / "lm_run"), "--trainer.logger.init_args.save_dir",
               str(out / "lm_run"), "--data.init_args.vision_tokenizer", vq_file,
               "--data.init_args.cache_dir", str(out / "cache"), "--data.init_args.val_size", str(MNIST_HOLDOUT // 6),
               *lm_args]

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--per-digit", type=int, default=20, help="images drawn per digit for text-to-image")
    p.add_argument("--split", choices=("test", "tuning"), default="test",
                   help="held-out part scored: tune recipes and sampling on 'tuning', report 'test'")
    p.add_argument("--seed", type=int, default=None,
                   help="generator seed of the drawing (default: 0 on test, 1 on tuning)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale for text-to-image (default: the model's saved one)")
    p.add_argument("--temperature", type=float, default=None,
                   help="text-to-image sampling temperature (default: the model's saved one)")
    p.add_argument("--vq-arg", action="append", default=[], help="extra LightningCLI flag for the tokenizer stage")
    p.add_argument("--lm-arg", action="append", default=[], help="extra LightningCLI flag for the LM stage")
    p.add_argument("--ckpt", help="score this trained model (inference folder or .ckpt) instead of training one; "
                   "the report goes to <out>/report_<split>.json")
    args = p.parse_args(argv)
    torch.manual_seed(SPLIT_SEED)
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
    data = load_mnist_set()
    report = evaluate(Pipeline(bundle), data, heldout_parts(len(data)), args.split, args.per_digit, 500, args.cfg,
                      args.temperature, args.seed, psnr=True, out=out)
    report.update(lm_parameters=bundle.lm.num_params(), tokens_per_image=bundle.vision.num_tokens)
    report["seconds"] = time.time() - t0
    if train_seconds is not None:
        report["train_seconds"] = train_seconds
    print("== 4/4 report ==")
    width = max(map(len, report))
    for k, v in report.items():
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, float) for x in v):
            v = f"[{v[0]:.4f}, {v[1]:.4f}]"
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
