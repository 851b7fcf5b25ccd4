"""Save and load any vision tokenizer by kind: weights in safetensors, config in its metadata.

A file holds {"kind": "vq", "config": {...}} in the safetensors metadata, so a checkpoint says which
tokenizer it is and loading never executes pickled code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from common.io import atomic_write, dataclass_from_dict
from common.weights import load_state_strict, plain_state

# kind -> (module, config class, model class); the module exports both classes
KINDS = {
    "vq": ("vision_tokenizers.vq", "VQConfig", "VQTokenizer"),
    "seed": ("vision_tokenizers.seed", "SEEDConfig", "SEEDTokenizer"),
    "video": ("vision_tokenizers.video", "VideoTokenizerConfig", "VideoTokenizer"),
    "kl": ("vision_tokenizers.kl", "KLConfig", "KLTokenizer"),
}


def _classes(kind: str) -> tuple[type, type]:
    """(config class, model class) of a kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown vision tokenizer kind {kind!r}; known: {sorted(KINDS)}")
    mod, cfg_cls, model_cls = KINDS[kind]
    m = importlib.import_module(mod)
    return getattr(m, cfg_cls), getattr(m, model_cls)


def kind_of(model: torch.nn.Module) -> str:
    for kind in KINDS:
        if type(model) is _classes(kind)[1]:
            return kind
    raise ValueError(f"unknown vision tokenizer class {type(model).__name__}")


def build(kind: str, config: dict) -> torch.nn.Module:
    cfg_type, model_type = _classes(kind)
    return model_type(dataclass_from_dict(cfg_type, config, f"{kind} tokenizer config"))


def describe(model: torch.nn.Module) -> dict:
    return {"kind": kind_of(model), "config": dataclasses.asdict(model.config)}


def save(model: torch.nn.Module, path: str | Path) -> None:
    """Weights + {"kind", "config"} metadata in one safetensors file, written atomically."""
    with atomic_write(path) as tmp:
        save_file(plain_state(model), str(tmp), {"mmar": json.dumps(describe(model))})


def load(path: str | Path) -> torch.nn.Module:
    """Load a vision tokenizer from our safetensors file (frozen, eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vision tokenizer file not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("mmar")
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta is None:
        raise ValueError(f"{path}: no 'mmar' metadata; not a vision tokenizer saved by mmar")
    desc = json.loads(meta)
    model = build(desc["kind"], desc["config"])
    load_state_strict(model, state, str(path))
    return model.eval().requires_grad_(False)


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
