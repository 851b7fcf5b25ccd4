"""What limits the video tokenizer (`make bench-video-tokenizer`): a compression ablation.

The base is the 8x-spatial tokenizer (17x64x64 -> 5x8x8 FSQ codes) that `make bench-nbp` trains and the video
recipe used until this ablation showed that it reconstructs moving digits as blobs, so that no LM trained on its
codes can draw a recognisable digit. This trains variants that change one thing each — spatial or temporal
compression, width, FSQ levels — for the same number of steps on the same batches (configs/video_tokenizer.yaml
through `train_tokenizer` below, seed 0) and reports, on held-out clips (source digits never trained on):

  digit_acc   per-frame accuracy of the independent classifier (`benchmarks.nbp.quality`) on reconstructions,
              with a 95% interval clustered by video
  psnr        reconstruction PSNR (dB)
  codes       codes per 17-frame video (what the LM must generate)
  sec_per_step  training time per step of 8 clips (compare within one run only)

Writes benchmarks/results/video_tokenizer.json. `--variants` picks a subset (results merge into the JSON).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import fit_run
from benchmarks.nbp import heldout_classifier, psnr_db, quality, reconstruct
from common.io import write_text_atomic
from train.video.data import moving_digits
from vision_tokenizers import registry
from vision_tokenizers.video import VideoTokenizerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "video_tokenizer.json"


def train_tokenizer(root: Path, cfg: VideoTokenizerConfig, steps: int, n_train: int, lr: float,
                    batch: int = 8) -> Path:
    """configs/video_tokenizer.yaml with this tokenizer shape, `steps` steps of `batch` moving-digit clips (seed 0,
    the same batches for every shape); returns the exported tokenizer file."""
    path = root / "tokenizer.safetensors"
    fit_run("configs/video_tokenizer.yaml", root, [
        "--trainer.enable_checkpointing", "false", "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--model.init_args.tokenizer", json.dumps(dataclasses.asdict(cfg)),
        "--model.init_args.lr", str(lr), "--model.init_args.export_path", str(path),
        "--data.init_args.n_train", str(n_train), "--data.init_args.batch_size", str(batch),
        "--data.init_args.frames", str(cfg.frames), "--data.init_args.image_size", str(cfg.image_size)])
    return path

# name -> VideoTokenizerConfig fields that differ from the base (8x space, 4x time: bench-nbp's tokenizer)
BASE = dict(channels=[16, 32, 64], spatial_down=[True, False], time_down=[True, True], levels=[8, 5, 5, 5])
RECIPE = "s4_t4"  # what the README recipe trains (configs/video_tokenizer.yaml)
VARIANTS: dict[str, dict] = {
    "s8_t4": {},
    "s8_t2": dict(time_down=[True, False]),
    "s8_t1": dict(time_down=[False, False]),
    "s8_t4_wide": dict(channels=[32, 64, 128]),
    "s8_t4_fsq64k": dict(levels=[8, 8, 8, 5, 5, 5]),
    "s4_t4": dict(spatial_down=[False, False]),
}


def config(name: str) -> VideoTokenizerConfig:
    return VideoTokenizerConfig(**{**BASE, **VARIANTS[name]})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    held = moving_digits(a.n_eval, "test")
    clf = heldout_classifier()
    res: dict = {}
    for name in a.variants:
        cfg = config(name)
        t0 = time.time()
        tok = registry.load(train_tokenizer(a.results.parent / "video_tokenizer_work" / name, cfg, a.steps, a.n_train,
                                            1e-3)).eval()
        secs = time.time() - t0
        recon = reconstruct(tok, held.clips)
        q = quality(recon, held.labels[:, 0], held.directions[:, 0], clf)
        t, h, w = tok.code_shape
        res[name] = {"config": {k: getattr(cfg, k) for k in BASE}, "codes": t * h * w, "code_shape": [t, h, w],
                     "steps": a.steps, "train_clips": a.n_train, "eval_clips": a.n_eval, "sec_per_step": secs / a.steps,
                     "psnr": psnr_db(recon, held.clips),
                     **{k: q[k] for k in ("digit_acc", "digit_acc_lo", "digit_acc_hi")},
                     "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
        print(f"{name}: {res[name]['codes']} codes, digit acc {q['digit_acc']:.3f} "
              f"[{q['digit_acc_lo']:.3f}, {q['digit_acc_hi']:.3f}], PSNR {res[name]['psnr']:.2f} dB, "
              f"{secs / a.steps:.2f} s/step", flush=True)
        res = {**load(a.results), name: res[name]}  # re-read: runs of other variants may have written since
        a.results.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(a.results, json.dumps(res, indent=1) + "\n")
    print(table(res))


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def table(res: dict) -> str:
    rows = ["| variant | codes / video | digit acc on reconstructions [95%] | PSNR dB | s / step | steps |",
            "|---|---|---|---|---|---|"]
    order = list(VARIANTS)
    for name, r in sorted(res.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        rows.append(f"| {name} | {r['codes']} ({'x'.join(map(str, r['code_shape']))}) | {r['digit_acc']:.3f} "
                    f"[{r['digit_acc_lo']:.3f}, {r['digit_acc_hi']:.3f}] | {r['psnr']:.2f} | "
                    f"{r['sec_per_step']:.2f} | {r['steps']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
