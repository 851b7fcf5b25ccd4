"""Next-block vs next-token prediction on the video recipe (`make bench-nbp`), and the recipe's scoring.

The speed table: the same backbone, data, steps and seed as `make video` (configs/video32_lm.yaml: 32 x 32 moving
digits, 9 frames, 3 x 8 x 8 codes) trained with three samplers -- next-token prediction (192 forwards per video),
next-block prediction with one latent row per block (the recipe's model itself, the paper's setting) and with one
latent frame per block, both with the hybrid first block (token by token). Each has its cfg and temperature chosen
on tuning prompts (tune()) and is scored on the test prompts (score()); then all three sample at batch 1 and 8,
interleaved, `--repeats` times each, timed with the tokenizer's decoding excluded and included (median, quartiles,
frames per second). Speedups are ratios of medians against NTP's. Writes benchmarks/results/nbp.json and nbp.png.

Quality (score()): `digit_acc` is the per-frame accuracy of an independent classifier (RBF SVM on deskewed
digit crops, trained on clips of the "judge" half of the held-out source digits, disjoint from the "test" half the
scored clips' captions come from) for the prompted digit, on a 28x28 crop around each frame's centre of mass, with a
95% interval over videos; `direction_acc` is the share of videos whose centre-of-mass trajectory points the
prompted way (nearest of 8; under 0.25 px/frame counts as wrong), Wilson 95%. The same figures on the tokenizer's
reconstructions of the held-out clips bound what an LM can reach.

Also: `--tune CKPT [--tuned-model FOLDER]` chooses a model's cfg and temperature on tuning prompts (the "judge"
captions, seed 1) and saves it with them; `--score CKPT...` scores checkpoints on the test prompts (`make video`
does both: benchmarks/results/video32_recipe.json); `--first-frames TOKENIZER` is the first-frame probe
(benchmarks/results/nbp_first_frames.json); `--presets` builds the paper-size tokenizer and 700M LM on the meta
device and prints their parameter counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.image import PeakSignalNoiseRatio

from benchmarks import fit_run
from common.io import atomic_write, write_text_atomic
from evaluation.judges import HeldOutClassifier, wilson_interval
from models.config import PRESETS
from models.objectives import NextTokenPrediction
from models.transformer import Transformer
from train.video.data import DIRECTIONS, DIRECTION_NAMES, moving_digits
from vision_tokenizers import registry
from vision_tokenizers.video import NBP_PAPER_TOKENIZER, VideoTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "nbp.json"
LM_DIM, LM_LAYERS = 128, 4  # the benchmark's (and the README video recipe's) LM width and depth


# ---- reading generated videos ---------------------------------------------------------------------
def centres_of_mass(video: torch.Tensor) -> np.ndarray:
    """video [B, 1, T, H, W] in [-1, 1] -> (x, y) per frame [B, T, 2] (ink = brightness above black)."""
    ink = ((video[:, 0].float() + 1) / 2).clamp(min=0)  # [B, T, H, W]
    h, w = ink.shape[-2:]
    mass = ink.sum((-1, -2)).clamp(min=1e-6)
    x = (ink.sum(-2) * torch.arange(w)).sum(-1) / mass
    y = (ink.sum(-1) * torch.arange(h)).sum(-1) / mass
    return torch.stack([x, y], -1).numpy()


def directions_of(video: torch.Tensor, min_speed: float = 0.25) -> np.ndarray:
    """[B] direction ids (DIRECTION_NAMES) from the least-squares velocity of the centre of mass; -1 if slower."""
    com = centres_of_mass(video)  # [B, T, 2]
    t = np.arange(com.shape[1]) - (com.shape[1] - 1) / 2
    v = (com * t[None, :, None]).sum(1) / (t ** 2).sum()  # [B, 2] px/frame
    dirs = np.array([DIRECTIONS[n] for n in DIRECTION_NAMES], dtype=np.float64)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    best = (v @ dirs.T).argmax(1)
    return np.where(np.linalg.norm(v, axis=1) >= min_speed, best, -1)


def digit_crops(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, H, W] -> 28x28 crops centred on each frame's centre of mass [B*T, 1, 28, 28]."""
    com = centres_of_mass(video)
    b, _, t, h, w = video.shape
    out = torch.full((b * t, 1, 28, 28), -1.0)
    for i in range(b):
        for j in range(t):
            x0 = int(np.clip(round(com[i, j, 0] - 14), 0, w - 28))
            y0 = int(np.clip(round(com[i, j, 1] - 14), 0, h - 28))
            out[i * t + j, 0] = video[i, 0, j, y0:y0 + 28, x0:x0 + 28]
    return out


@torch.no_grad()
def reconstruct(tok: VideoTokenizer, clips: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """clips [N, C, T, H, W] -> the tokenizer's round trip (encode, decode), same shape, in [-1, 1]."""
    return torch.cat([tok.decode(tok.encode(clips[i:i + batch])) for i in range(0, len(clips), batch)])


def psnr_db(recon: torch.Tensor, clips: torch.Tensor) -> float:
    """PSNR over all frames of [N, C, T, H, W] videos in [-1, 1]."""
    frames = lambda v: ((v + 1) / 2).transpose(1, 2).flatten(0, 1)  # noqa: E731
    return float(PeakSignalNoiseRatio(data_range=1.0)(frames(recon), frames(clips)))


def heldout_classifier(frames: int = 17, size: int = 64, digit_size: int = 28, start: str = "random",
                       n_clips: int = 600) -> HeldOutClassifier:
    """The independent digit classifier: trained on the "judge" half of the held-out source digits (disjoint from
    the training clips' digits and from the "test" digits of every clip it scores), seen exactly as it will read
    generated frames: the first and last frames of `n_clips` moving-digit clips shaped like the scored ones,
    cut out by `digit_crops`."""
    clips = moving_digits(n_clips, "judge", frames=frames, size=size, digit_size=digit_size, start=start)
    x = digit_crops(clips.clips[:, :, [0, frames - 1]])  # [2N, 1, 28, 28]
    return HeldOutClassifier(x, np.repeat(clips.labels[:, 0], 2), deskew=True)


def quality(videos: torch.Tensor, labels: np.ndarray, dirs: np.ndarray, clf: HeldOutClassifier, fid=None) -> dict:
    b, _, t = videos.shape[:3]
    pred = clf.predict(digit_crops(videos)).reshape(b, t)
    per_video = (pred == labels[:, None]).mean(1)
    acc = float(per_video.mean())
    half = 1.96 * float(per_video.std(ddof=1)) / math.sqrt(b) if b > 1 else float("nan")
    got = directions_of(videos)
    n_ok = int((got == dirs).sum())
    lo, hi = wilson_interval(n_ok, b)
    res = {"digit_acc": acc, "digit_acc_lo": max(0.0, acc - half), "digit_acc_hi": min(1.0, acc + half),
           "direction_acc": n_ok / b, "direction_acc_lo": lo, "direction_acc_hi": hi}
    if fid is not None:
        res["fid"] = fid(fid_frames(videos))
    return res


def fid_frames(videos: torch.Tensor) -> torch.Tensor:
    t = videos.shape[2]
    return videos[:, :, [0, t // 2, t - 1]].transpose(1, 2).flatten(0, 1)  # [B*3, 1, H, W]


# ---- training: the shipped recipes through the product's own CLI --------------------------------
def fit(config: str, root: Path, *overrides: str):
    return fit_run(config, root, ["--trainer.enable_checkpointing", "false", *overrides])


def train_lm(root: Path, tokenizer: Path, objective, steps: int, batch: int, dim: int, layers: int, n_train: int,
             max_len: int, *extra: str):
    """configs/video_lm.yaml on `tokenizer`'s codes with `objective` and this LM shape (heads of 32, SwiGLU width
    ~8/3 dim): the same initial weights and batches for every objective (seed 0). Returns (bundle, seconds)."""
    obj = {"class_path": f"models.objectives.{type(objective).__name__}", "init_args": dataclasses.asdict(
        objective.config) if hasattr(objective, "config") and dataclasses.is_dataclass(objective.config) else {}}
    t0 = time.time()
    cli = fit("configs/video_lm.yaml", root, "--trainer.max_steps", str(steps), "--trainer.val_check_interval",
              str(steps), "--model.init_args.objective", json.dumps(obj), "--model.init_args.preset", "tiny",
              "--model.init_args.dim", str(dim), "--model.init_args.n_layers", str(layers),
              "--model.init_args.n_heads", str(dim // 32), "--model.init_args.n_kv_heads", str(dim // 32),
              "--model.init_args.mlp_dim", str((dim * 8 // 3 + 7) // 8 * 8), "--model.init_args.lr", "0.002",
              "--data.init_args.vision_tokenizer", str(tokenizer), "--data.init_args.n_train", str(n_train),
              "--data.init_args.n_val", "8", "--data.init_args.batch_size", str(batch),
              "--data.init_args.max_len", str(max_len), "--data.init_args.cache_dir", str(root.parent / "cache"),
              *extra)
    return cli.model.bundle(), time.time() - t0


@torch.inference_mode()
def draw(bundle, captions: list[str], cfg: float, temperature: float, top_k: int | None,
         seed: int) -> tuple[torch.Tensor, float]:
    """(videos [B, C, T, H, W], seconds to draw them, the tokenizer's decoding included)."""
    from mmar.pipeline import Pipeline

    t0 = time.perf_counter()
    videos = Pipeline(bundle).draw_videos(captions, 1, cfg=cfg, temperature=temperature, top_k=top_k,
                                          generator=torch.Generator().manual_seed(seed))
    return videos, time.perf_counter() - t0


@torch.inference_mode()
def draw_prompts(bundle, captions: list[str], cfg: float | None, temperature: float | None, top_k: int | None,
                 seed: int, batch: int = 8) -> torch.Tensor:
    """One video per caption [N, C, T, H, W], `batch` prompts per sampler call, one generator seeded `seed`."""
    from mmar.pipeline import Pipeline

    gen, pipe = torch.Generator().manual_seed(seed), Pipeline(bundle)
    return torch.cat([pipe.draw_videos(captions[i:i + batch], 1, cfg=cfg, temperature=temperature, top_k=top_k,
                                       generator=gen) for i in range(0, len(captions), batch)])


TUNE_GRID = {"cfg": (2.0, 3.0, 5.0), "temperature": (0.4, 0.6, 0.8)}  # top_k stays the model's


def tune(ckpt: Path, n_eval: int, results: Path, digit_size: int, start: str, save: Path | None) -> dict:
    """Choose the sampling settings of a trained text->video model on the tuning prompts: captions of `n_eval`
    "judge" clips (the held-out half the classifier trains on; the scored "test" half is not touched), drawn with
    the tuning seed 1 (evaluation/evaluate.py's DEFAULT_SEEDS). Every cfg x temperature of TUNE_GRID is scored;
    the highest per-frame digit accuracy among settings with direction accuracy >= 0.9 wins (ties: the lower
    temperature's). Writes the grid to `results` under "tuning" and, with `save`, the model as an inference
    folder whose saved sampling settings are the winner's (what `mmar t2v --ckpt <save>` draws with)."""
    from models.bundle import load_bundle

    b = load_bundle(ckpt)
    vc = b.vision.config
    held = moving_digits(n_eval, "judge", frames=vc.frames, size=vc.image_size, digit_size=digit_size, start=start)
    captions, labels, dirs = [c[0] for c in held.captions], held.labels[:, 0], held.directions[:, 0]
    clf = heldout_classifier(vc.frames, vc.image_size, digit_size, start)
    rows = []
    for cfg in TUNE_GRID["cfg"]:
        for temp in TUNE_GRID["temperature"]:
            q = quality(draw_prompts(b, captions, cfg, temp, None, seed=1), labels, dirs, clf)
            rows.append({"cfg": cfg, "temperature": temp, **q})
            print(f"tuning cfg {cfg} temperature {temp}: digit acc {q['digit_acc']:.3f}, "
                  f"direction acc {q['direction_acc']:.3f}", flush=True)
    ok = [r for r in rows if r["direction_acc"] >= 0.9] or rows
    best = max(ok, key=lambda r: (r["digit_acc"], -r["temperature"]))
    b.sampling = b.sampling.override(cfg=best["cfg"], temperature=best["temperature"])
    if save is not None:
        b.save(save)
    table = json.loads(results.read_text()) if results.is_file() else {}
    table["tuning"] = {"ckpt": str(ckpt), "split": "judge captions, seed 1", "n_videos": n_eval, "grid": rows,
                       "chosen": {"cfg": best["cfg"], "temperature": best["temperature"], "top_k": b.sampling.top_k},
                       "saved_model": None if save is None else str(save)}
    write_text_atomic(results, json.dumps(table, indent=2) + "\n")
    if save is not None:  # the choice travels with the model
        write_text_atomic(save / "tuning.json", json.dumps(table["tuning"], indent=2) + "\n")
    print(f"chose cfg {best['cfg']} temperature {best['temperature']} (top_k {b.sampling.top_k})"
          + (f"; wrote {save}" if save is not None else ""))
    return table["tuning"]["chosen"]


def score(ckpt: Path, n_eval: int, cfg: float | None, temperature: float | None, top_k: int | None, results: Path,
          digit_size: int = 28, start: str = "random", key: str | None = None) -> dict:
    """Quality of one trained text->video model on `n_eval` held-out prompts (one video each, batches of 8), drawn
    the way `mmar t2v` draws them (options left at None: the model's saved sampling settings). The held-out clips
    are moving digits of the "test" half shaped like the recipe's (`digit_size`, `start`: configs/video_lm.yaml's
    28 / random, configs/video32_lm.yaml's 20 / centred). The result is stored in `results` under `key` (default: the
    checkpoint's path), beside the other checkpoints' (e.g. a learning curve)."""
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle

    b = load_bundle(ckpt)
    vc = b.vision.config
    held = moving_digits(n_eval, "test", frames=vc.frames, size=vc.image_size, digit_size=digit_size, start=start)
    t0 = time.perf_counter()
    videos = draw_prompts(b, [c[0] for c in held.captions], cfg, temperature, top_k, seed=0)
    secs = (time.perf_counter() - t0) / n_eval
    clf = heldout_classifier(vc.frames, vc.image_size, digit_size, start)
    labels, dirs = held.labels[:, 0], held.directions[:, 0]
    recon = reconstruct(b.vision, held.clips)  # what the tokenizer alone keeps: a bound for the LM
    bound = {f"tokenizer_recon_{k}": v for k, v in quality(recon, labels, dirs, clf).items()}
    s = b.sampling.override(cfg=cfg, temperature=temperature, top_k=top_k)
    obj_cfg = dataclasses.asdict(b.objective.config) if hasattr(b.objective, "config") else {}
    res = {"ckpt": str(ckpt), "objective": type(b.objective).__name__, **obj_cfg,
           "code_shape": list(b.vision.code_shape), **quality(videos, labels, dirs, clf), **bound,
           "tokenizer_psnr_heldout": psnr_db(recon, held.clips), "sec_per_video_b8": secs,
           "n_eval_videos": n_eval, "n_eval_frames": int(videos.shape[0] * videos.shape[2]),
           "digit_size": digit_size, "start": start, "cfg": s.cfg, "temperature": s.temperature, "top_k": s.top_k,
           "torch_version": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    table = json.loads(results.read_text()) if results.is_file() else {}
    if "ckpt" in table:  # a file of one earlier score: keep it as the first row
        table = {table["ckpt"]: table}
    table[key or str(ckpt)] = res
    write_text_atomic(results, json.dumps(table, indent=2) + "\n")
    print(f"{ckpt}: per-frame digit acc {res['digit_acc']:.3f} [{res['digit_acc_lo']:.3f}, {res['digit_acc_hi']:.3f}], "
          f"direction acc {res['direction_acc']:.3f} [{res['direction_acc_lo']:.3f}, {res['direction_acc_hi']:.3f}] "
          f"on {n_eval} held-out prompts ({secs:.2f} s/video); the tokenizer's reconstructions of the same clips: "
          f"digit acc {res['tokenizer_recon_digit_acc']:.3f}, PSNR {res['tokenizer_psnr_heldout']:.2f} dB; "
          f"wrote {results}")
    return res


def first_frames(tokenizer: Path, n_train: int, steps: int, batch: int, dim: int, layers: int, n_eval: int,
                 cfg: float, temperature: float, results: Path, grid: int = 1) -> dict:
    """Can the LM learn the digit's shape at all? A text->image probe on the first latent frame only (a one-frame
    video: the causal tokenizer encodes frame 0 alone), trained token by token, so neither the block scheme nor
    motion is involved; scored by the held-out classifier on the decoded frames. Results are kept per tokenizer and
    training budget. `grid` > 1 snaps the digits' positions to that many pixels (the tokenizer's patch), so a digit's
    codes no longer depend on its sub-patch offset."""
    tok = registry.load(tokenizer).eval()
    if not isinstance(tok, VideoTokenizer):
        raise ValueError(f"{tokenizer}: not a video tokenizer")
    c = dataclasses.replace(tok.config, frames=1)  # the causal tokenizer encodes frame 0 alone: one latent frame
    work = results.parent / "first_frames_work"
    one = work / "tokenizer_1frame.safetensors"
    one.parent.mkdir(parents=True, exist_ok=True)
    frame_tok = VideoTokenizer(c)
    frame_tok.load_state_dict(tok.state_dict())
    registry.save(frame_tok, one)
    held = moving_digits(n_eval, "test", frames=1, size=c.image_size, grid=grid)
    n_codes = frame_tok.num_tokens
    b, secs = train_lm(work / "lm", one, NextTokenPrediction(), steps, batch, dim, layers, n_train, n_codes + 40,
                       "--data.init_args.grid", str(grid))
    lm = b.lm
    captions = [cs[0] for cs in held.captions]
    frames = torch.cat([draw(b, captions[i:i + 16], cfg, temperature, None, i)[0] for i in range(0, n_eval, 16)])
    clf = heldout_classifier(1, c.image_size)
    correct = clf.predict(digit_crops(frames)) == held.labels[:, 0]
    recon_ok = clf.predict(digit_crops(reconstruct(tok, held.clips))) == held.labels[:, 0]
    lo, hi = wilson_interval(int(correct.sum()), n_eval)
    row = {"codebook_size": c.codebook_size, "codes_per_frame": n_codes, "lm_parameters": sum(
        p.numel() for p in lm.parameters()), "steps": steps, "batch": batch, "train_frames_seen": steps * batch,
        "train_seconds": secs, "first_frame_digit_acc": float(correct.mean()),
        "first_frame_digit_acc_ci95": [lo, hi], "tokenizer_recon_digit_acc": float(recon_ok.mean()),
        "n_eval": n_eval, "cfg": cfg, "temperature": temperature, "grid": grid, "dim": dim, "layers": layers,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    res = json.loads(results.read_text()) if results.is_file() else {}
    key = [str(tokenizer), f"{steps} x {batch}"]  # plus whatever differs from the default probe
    key += [f"dim {dim}"] * (dim != LM_DIM) + [f"{layers} layers"] * (layers != LM_LAYERS)
    key += [f"grid {grid}"] * (grid > 1)
    res[" | ".join(key)] = row
    write_text_atomic(results, json.dumps(res, indent=2) + "\n")
    print(f"{tokenizer}: first-frame digit acc {row['first_frame_digit_acc']:.3f} [{lo:.3f}, {hi:.3f}] on {n_eval} "
          f"held-out prompts after {steps} steps of {batch} frames ({secs:.0f} s); the tokenizer's reconstructions: "
          f"{row['tokenizer_recon_digit_acc']:.3f}; wrote {results}")
    return row


def presets() -> dict:
    """Paper-size tokenizer (17x128x128 -> 5x16x16, FSQ 64,000 codes) and the 700M LM, built on the meta device."""
    with torch.device("meta"):
        tok = VideoTokenizer(NBP_PAPER_TOKENIZER)
        lm = Transformer(PRESETS["nbp-700m"])
    enc = sum(p.numel() for p in tok.encoder.parameters())
    dec = sum(p.numel() for p in tok.decoder.parameters())
    res = {"paper_tokenizer_code_shape": list(tok.code_shape), "paper_tokenizer_codebook": tok.fsq.codebook_size,
           "paper_tokenizer_encoder_params": enc, "paper_tokenizer_decoder_params": dec,
           "nbp_700m_params": lm.num_params()}
    print(f"NBP tokenizer: 17x128x128 -> {tok.code_shape} codes, FSQ {NBP_PAPER_TOKENIZER.levels} = "
          f"{tok.fsq.codebook_size} codes; encoder {enc / 1e6:.1f}M + decoder {dec / 1e6:.1f}M parameters")
    print(f"nbp-700m LM: {lm.num_params() / 1e6:.1f}M parameters")
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", action="store_true", help="only print the paper-size parameter counts")
    p.add_argument("--n-train", type=int, default=2000, help="--first-frames: training clips")
    p.add_argument("--n-eval", type=int, default=120, help="held-out prompts (one video each), and tuning prompts")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per sampler and batch size (interleaved)")
    p.add_argument("--lm-steps", type=int, default=120)
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=LM_DIM)
    p.add_argument("--layers", type=int, default=LM_LAYERS)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 3; --score: the model's)")
    p.add_argument("--temperature", type=float, default=None, help="default 1; --score: the model's")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--save", type=Path, default=Path("results/video32/bench"),
                   help="the NTP and frame-block runs go to <save>/<sampler> (inference folder: .../model)")
    p.add_argument("--recipe-model", type=Path, default=Path("results/video32/model"),
                   help="the row-block model of `make video` (with its tuned sampling), the middle arm")
    p.add_argument("--fit-arg", action="append", default=[], metavar="OPTION=VALUE",
                   help="an `mmar fit` option for the NTP and frame-block runs (repeatable; they must match how the "
                        "recipe's model was trained)")
    p.add_argument("--score", type=Path, nargs="+", default=None, metavar="CKPT",
                   help="only score these trained text->video checkpoints or model folders on --n-eval held-out "
                        "prompts, at the models' saved sampling settings unless --cfg / --temperature / --top-k")
    p.add_argument("--tune", type=Path, default=None, metavar="CKPT",
                   help="choose this model's cfg and temperature on --n-eval tuning prompts (see tune()); then "
                        "--score scores with the chosen settings")
    p.add_argument("--tuned-model", type=Path, default=None, metavar="FOLDER",
                   help="--tune: also save the model here with the chosen settings (for mmar t2v --ckpt FOLDER)")
    p.add_argument("--digit-size", type=int, default=28, help="--score: digit size of the held-out clips (video32: 20)")
    p.add_argument("--start", default="random", help="--score: start mode of the held-out clips (video32: centred)")
    p.add_argument("--score-results", type=Path, default=RESULTS.with_name("video_recipe.json"))
    p.add_argument("--first-frames", type=Path, default=None, metavar="TOKENIZER",
                   help="only run the first-frame probe: a text->image LM on this video tokenizer's first latent "
                        "frames (--lm-steps steps of --lm-batch), scored on --n-eval held-out prompts")
    p.add_argument("--grid", type=int, default=1, help="first-frame probe: snap digit positions to this many pixels")
    p.add_argument("--first-frames-results", type=Path, default=RESULTS.with_name("nbp_first_frames.json"))
    a = p.parse_args(argv)
    if a.tune is not None:
        chosen = tune(a.tune, a.n_eval, a.score_results, a.digit_size, a.start, a.tuned_model)
        a.cfg, a.temperature, a.top_k = chosen["cfg"], chosen["temperature"], chosen["top_k"]
    if a.tune is not None or a.score is not None:
        for ckpt in a.score or []:
            score(ckpt, a.n_eval, a.cfg, a.temperature, a.top_k, a.score_results, a.digit_size, a.start)
        return
    a.cfg = 3.0 if a.cfg is None else a.cfg
    a.temperature = 1.0 if a.temperature is None else a.temperature
    if a.first_frames is not None:
        first_frames(a.first_frames, a.n_train, a.lm_steps, a.lm_batch, a.dim, a.layers, a.n_eval, a.cfg,
                     a.temperature, a.first_frames_results, a.grid)
        return
    if a.presets:
        presets()
        return
    speed_table(a)


RECIPE_CONFIG = "configs/video32_lm.yaml"


def arm_objectives() -> dict:
    """The samplers compared: NTP, NBP with one latent row per block (the recipe, the paper's setting) and with one
    latent frame per block, the last two with the hybrid first block (token by token)."""
    return {"ntp": {"class_path": "models.objectives.NextTokenPrediction", "init_args": {}},
            "nbp_row8": {"class_path": "models.objectives.NextBlockPrediction",
                         "init_args": {"block_size": 8, "first_block": "tokens"}},
            "nbp_frame64": {"class_path": "models.objectives.NextBlockPrediction",
                            "init_args": {"block_size": 64, "first_block": "tokens"}}}


def train_arm(name: str, objective: dict, work: Path, n_eval: int, fit_args: list[str]) -> Path:
    """configs/video32_lm.yaml with `objective` (same seed, steps, data and initial weights as the recipe; `fit_args`
    are further `mmar fit` options), sampling tuned like the recipe's (tune()); returns the inference folder. A
    finished arm with the same command is reused."""
    from benchmarks import fit_recipe, last_ckpt

    root = work / name
    secs = fit_recipe(RECIPE_CONFIG, root, ["--model.init_args.objective", json.dumps(objective),
                                            "--data.init_args.cache_dir", str(work / "cache"), *fit_args], reuse=True)
    folder, ckpt = root / "model", Path(last_ckpt(root))
    done = folder / "tuning.json"
    grid = {(c, t) for c in TUNE_GRID["cfg"] for t in TUNE_GRID["temperature"]}
    old = json.loads(done.read_text()) if done.is_file() else {}
    if not (old and done.stat().st_mtime_ns > ckpt.stat().st_mtime_ns and old.get("n_videos") == n_eval
            and {(r["cfg"], r["temperature"]) for r in old["grid"]} == grid):  # tuned after this training: keep it
        tune(ckpt, n_eval, root / "scores.json", 20, "centred", folder)
    (root / "train_seconds.txt").write_text(f"{secs:.1f}\n")
    return folder


@torch.inference_mode()
def time_arms(bundles: dict, captions: list[str], repeats: int, batches=(1, 8)) -> dict:
    """Sampling wall time per call, NTP and NBP arms interleaved (repeat r times every arm at every batch, so a slow
    minute of the machine hits all arms alike), with the model's saved sampling settings (guidance on: 2 rows per
    prompt). Each call is split into the LM's sampling and the tokenizer's decoding (timed around
    `vision.decode`). Returns name -> batch -> {"lm": [s...], "decode": [s...], "forwards": n}."""
    from mmar.pipeline import Pipeline

    out: dict = {n: {bs: {"lm": [], "decode": []} for bs in batches} for n in bundles}
    for name, b in bundles.items():  # count the backbone's forwards once; warm up every arm and batch
        calls = []
        hook = b.lm.register_forward_hook(lambda *_: calls.append(1))
        Pipeline(b).draw_videos(captions[:1], 1, generator=torch.Generator().manual_seed(0))
        hook.remove()
        for bs in batches:
            out[name][bs]["forwards"] = len(calls)
            Pipeline(b).draw_videos(captions[:bs], 1, generator=torch.Generator().manual_seed(0))
    for r in range(repeats):
        for name, b in bundles.items():
            decode, spent = b.vision.decode, []

            def timed(codes, _d=decode, _s=spent):
                t0 = time.perf_counter()
                y = _d(codes)
                _s.append(time.perf_counter() - t0)
                return y

            b.vision.decode = timed  # an instance attribute for this benchmark only
            try:
                for bs in batches:
                    spent.clear()
                    rows = [captions[(r * bs + i) % len(captions)] for i in range(bs)]
                    t0 = time.perf_counter()
                    Pipeline(b).draw_videos(rows, 1, generator=torch.Generator().manual_seed(r))
                    total = time.perf_counter() - t0
                    out[name][bs]["decode"].append(sum(spent))
                    out[name][bs]["lm"].append(total - sum(spent))
            finally:
                del b.vision.decode
    return out


def _stats(xs: list[float]) -> dict:
    q = np.percentile(xs, [0, 25, 50, 75, 100])
    return {"median": float(q[2]), "q25": float(q[1]), "q75": float(q[3]), "min": float(q[0]), "max": float(q[4])}


def speed_table(a) -> None:
    """NTP vs NBP (row blocks, the paper's setting, and frame blocks) on the recipe's model: held-out quality of
    each (tuned on tuning prompts, scored on test, like `make video`) beside its sampling speed at batch 1 and 8,
    interleaved, `--repeats` times each, with the tokenizer's decoding excluded and included."""
    from models.bundle import load_bundle

    if not (a.recipe_model / "config.json").is_file():
        raise FileNotFoundError(f"{a.recipe_model}: the recipe's model is missing; run `make video` first")
    t_start, load0 = time.time(), os.getloadavg()[0]
    work = a.save
    folders = {}
    for name, obj in arm_objectives().items():
        if name == "nbp_row8":
            folders[name] = a.recipe_model
        else:
            print(f"{name}: configs/video32_lm.yaml with {obj['class_path']}", flush=True)
            folders[name] = train_arm(name, obj, work, a.n_eval, a.fit_arg)
    res: dict = {"arms": {}, "n_eval_videos": a.n_eval, "repeats": a.repeats, "fit_args": a.fit_arg}
    for name, folder in folders.items():  # quality on the test prompts at each arm's tuned settings
        res["arms"][name] = score(folder, a.n_eval, None, None, None, work / "scores.json", 20, "centred", key=name)
        tuning = folder / "tuning.json"
        if tuning.is_file():
            res["arms"][name]["tuning"] = json.loads(tuning.read_text())
    bundles = {n: load_bundle(f) for n, f in folders.items()}
    for b in bundles.values():
        b.lm.eval()
    vc = next(iter(bundles.values())).vision.config
    held = moving_digits(a.n_eval, "test", frames=vc.frames, size=vc.image_size, digit_size=20, start="centred")
    times = time_arms(bundles, [c[0] for c in held.captions], a.repeats)
    for name, per in times.items():
        row = res["arms"][name]
        for bs, t in per.items():
            lm, full = np.array(t["lm"]), np.array(t["lm"]) + np.array(t["decode"])
            row[f"forwards_b{bs}"] = t["forwards"]
            row[f"sec_per_call_b{bs}_lm"] = _stats(lm.tolist())
            row[f"sec_per_call_b{bs}_with_decode"] = _stats(full.tolist())
            row[f"fps_b{bs}_lm"] = bs * vc.frames / float(np.median(lm))
            row[f"fps_b{bs}_with_decode"] = bs * vc.frames / float(np.median(full))
    for name, row in res["arms"].items():
        for bs in (1, 8):
            for part in ("lm", "with_decode"):
                ntp = res["arms"]["ntp"][f"sec_per_call_b{bs}_{part}"]["median"]
                row[f"speedup_b{bs}_{part}"] = ntp / row[f"sec_per_call_b{bs}_{part}"]["median"]  # ratio of medians
    res.update(code_shape=list(bundles["ntp"].vision.code_shape), frames=vc.frames,
               lm_params=bundles["ntp"].lm.num_params(), threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               platform=platform.platform(), processor=platform.processor(), torch_version=torch.__version__,
               loadavg_1min_before=load0, loadavg_1min_after=os.getloadavg()[0],
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               wall_s=time.time() - t_start, **presets())
    write_text_atomic(a.results, json.dumps(res, indent=2) + "\n")
    plot(res, a.results.with_suffix(".png"))
    print()
    print(table(res))
    print(f"wrote {a.results} and {a.results.with_suffix('.png')}")


def table(res: dict) -> str:
    """The speed table as Markdown (the README's and docs/video.md's)."""
    head = ("| sampler | forwards / video | s / video b1 (LM / +decode) | speedup b1 (LM / +decode) | "
            "frames/s b8 (LM / +decode) | speedup b8 (LM / +decode) | digit acc | direction acc |")
    lines = [head, "|" + "---|" * 8]
    for name, r in res["arms"].items():
        m = lambda k: r[k]["median"]  # noqa: E731
        spread = lambda k: f"[{r[k]['q25']:.3f}, {r[k]['q75']:.3f}]"  # noqa: E731
        lines.append(
            f"| {name} (cfg {r['cfg']}, T {r['temperature']}) | {r['forwards_b1']} | {m('sec_per_call_b1_lm'):.3f} "
            f"{spread('sec_per_call_b1_lm')} / {m('sec_per_call_b1_with_decode'):.3f} | "
            f"{r['speedup_b1_lm']:.2f}x / {r['speedup_b1_with_decode']:.2f}x | {r['fps_b8_lm']:.1f} / "
            f"{r['fps_b8_with_decode']:.1f} | {r['speedup_b8_lm']:.2f}x / {r['speedup_b8_with_decode']:.2f}x | "
            f"{r['digit_acc']:.3f} [{r['digit_acc_lo']:.3f}, {r['digit_acc_hi']:.3f}] | "
            f"{r['direction_acc']:.3f} [{r['direction_acc_lo']:.3f}, {r['direction_acc_hi']:.3f}] |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Held-out quality against sampling time at batch 1 (decoding included), one point per sampler."""
    from benchmarks import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, r in res["arms"].items():
        x = r["sec_per_call_b1_with_decode"]["median"]
        for k, key in enumerate(("digit_acc", "direction_acc")):
            y, lo, hi = r[key], r[f"{key}_lo"], r[f"{key}_hi"]
            ax[k].errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
            ax[k].annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for k, key in enumerate(("per-frame digit accuracy", "direction accuracy")):
        ax[k].set_xscale("log")
        ax[k].set_xlabel("s / video at batch 1, decoding included (CPU)")
        ax[k].set_ylabel(key)
    fig.suptitle(f"NTP vs NBP on the video recipe, {res['n_eval_videos']} held-out prompts each")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from mmar.cli import call

    raise SystemExit(call(main, sys.argv[1:], "python -m benchmarks.nbp"))  # a missing or wrong checkpoint (--score) is one line, not a traceback
