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
from safetensors.torch import load_file, safe_open

from models.weights import atomic_save_file, load_state_strict, plain_state

# kind -> (module, config class, model class)
KINDS = {
    "vq": ("vision_tokenizers.vq", "VQConfig", "VQTokenizer"),
    "seed": ("vision_tokenizers.seed", "SEEDConfig", "SEEDTokenizer"),
}


def kind_of(model: torch.nn.Module) -> str:
    for kind, (mod, _, cls) in KINDS.items():
        if type(model).__name__ == cls and type(model).__module__ == mod:
            return kind
    raise ValueError(f"unknown vision tokenizer class {type(model).__name__}")


def build(kind: str, config: dict) -> torch.nn.Module:
    if kind not in KINDS:
        raise ValueError(f"unknown vision tokenizer kind {kind!r}; known: {sorted(KINDS)}")
    mod, cfg_cls, model_cls = KINDS[kind]
    m = importlib.import_module(mod)
    cfg_type = getattr(m, cfg_cls)
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = set(config) - fields
    if unknown:
        raise ValueError(f"{kind} tokenizer config has unknown keys {sorted(unknown)}")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return getattr(m, model_cls)(cfg_type(**config))


def describe(model: torch.nn.Module) -> dict:
    return {"kind": kind_of(model), "config": dataclasses.asdict(model.config)}


def save(model: torch.nn.Module, path: str | Path) -> None:
    atomic_save_file(plain_state(model), path, {"mmar": json.dumps(describe(model))})


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
