"""The MNIST demo (`make demo`): tokenizer -> language model -> text-to-image and captioning -> report.

1. trains the VQ tokenizer (configs/mnist_vq.yaml) on the 3,500 training digits;
2. trains the multimodal LM (configs/mnist_lm.yaml) on codes + template captions, both orders;
3. draws 10 images per digit from "a handwritten <d>" and reads them with an independent classifier
   (an SVM on deskewed pixels, trained on 1,000 real held-out digits the generator never saw, plus their
   one-pixel shifts; see train/evaluation.py);
4. captions 500 other held-out digits and checks that each caption names the right digit;
5. prints the report and writes results/demo.json (t2i_accuracy, caption_accuracy, tokenizer_psnr, seconds).
Everything it makes stays under results/demo/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from generate.pipeline import caption, text_to_image
from models.bundle import load_bundle
from train.cli import main as cli_main
from train.evaluation import HeldOutClassifier, caption_correct, psnr
from train.sources import load_mnist_set, split_indices
from vision_tokenizers import registry
from vision_tokenizers.image_io import grid, save_png

HOLDOUT, SEED = 1500, 0
N_CAPTION_TEST = 500


def run(out: Path, vq_args: list[str], lm_args: list[str], per_digit: int, cfg: float,
        temperature: float) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    trainer_flags = ["--trainer.enable_model_summary", "false"]
    vq_file = str(out / "vq.safetensors")
    vq_args = ["--trainer.default_root_dir", str(out / "vq"), "--trainer.logger.init_args.save_dir", str(out / "vq"),
               "--model.init_args.export_path", vq_file, *vq_args]
    lm_args = ["--trainer.default_root_dir", str(out / "lm_run"), "--trainer.logger.init_args.save_dir",
               str(out / "lm_run"), "--data.init_args.vision_tokenizer", vq_file,
               "--data.init_args.cache_dir", str(out / "cache"), *lm_args]

    print("== 1/4 VQ tokenizer ==", flush=True)
    cli_main(["fit", "--config", "configs/mnist_vq.yaml", *trainer_flags, *vq_args])
    vq = registry.load(vq_file)

    print("== 2/4 language model ==", flush=True)
    lm_cli = cli_main(["fit", "--config", "configs/mnist_lm.yaml", *trainer_flags, *lm_args])
    trainer = lm_cli.trainer
    ckpt = Path(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path)
    shutil.copyfile(ckpt, out / "lm.ckpt")
    lm_cli.model.bundle().save(out / "lm")
    bundle = load_bundle(out / "lm")  # evaluate exactly what was exported
    train_seconds = time.time() - t0

    print("== 3/4 evaluation ==", flush=True)
    data = load_mnist_set()
    _, held = split_indices(len(data), HOLDOUT, SEED)
    cap_idx, clf_idx = held[:N_CAPTION_TEST], held[N_CAPTION_TEST:]
    real = lambda idx: torch.stack([data.image(int(i), 1, 28) for i in idx])  # noqa: E731
    cap_images, clf_images = real(cap_idx), real(clf_idx)

    clf = HeldOutClassifier(clf_images, data.labels[clf_idx], deskew=True)
    clf_acc = clf.accuracy(cap_images, data.labels[cap_idx])

    with torch.inference_mode():
        recon = vq.decode(vq.encode(cap_images))
    tok_psnr = psnr(recon, cap_images)

    g = torch.Generator().manual_seed(SEED)
    prompts = [f"a handwritten {d}" for d in range(10)]
    gen = text_to_image(bundle, prompts, per_digit, cfg=cfg, temperature=temperature, generator=g)
    want = np.repeat(np.arange(10), per_digit)
    t2i_acc = clf.accuracy(gen, want)
    save_png(grid(gen, nrow=per_digit), out / "t2i_grid.png")

    caps = []
    for i in range(0, len(cap_images), 100):
        caps += caption(bundle, cap_images[i:i + 100], max_new_tokens=32, generator=g)
    correct = [caption_correct(c, int(y)) for c, y in zip(caps, data.labels[cap_idx])]
    cap_acc = float(np.mean(correct))
    (out / "captions.tsv").write_text("".join(f"{int(y)}\t{c}\n" for c, y in zip(caps, data.labels[cap_idx])))

    report = {
        "t2i_accuracy": t2i_acc,
        "caption_accuracy": cap_acc,
        "tokenizer_psnr": tok_psnr,
        "seconds": time.time() - t0,
        "train_seconds": train_seconds,
        "classifier_accuracy_on_real": clf_acc,
        "images_per_digit": per_digit,
        "cfg": cfg,
        "temperature": temperature,
        "captions_evaluated": len(caps),
        "lm_parameters": bundle.lm.num_params(),
        "tokens_per_image": bundle.vision.num_tokens,
    }
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--per-digit", type=int, default=10)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale for text-to-image")
    p.add_argument("--temperature", type=float, default=0.8, help="text-to-image sampling temperature")
    p.add_argument("--vq-arg", action="append", default=[], help="extra LightningCLI flag for the tokenizer stage")
    p.add_argument("--lm-arg", action="append", default=[], help="extra LightningCLI flag for the LM stage")
    args = p.parse_args(argv)
    torch.manual_seed(SEED)
    report = run(Path(args.out), args.vq_arg, args.lm_arg, args.per_digit, args.cfg, args.temperature)
    print("== 4/4 report ==")
    width = max(map(len, report))
    for k, v in report.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    path = Path(args.out).parent / "demo.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
