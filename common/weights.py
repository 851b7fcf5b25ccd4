"""Weight files: strict loading with one-line errors, atomic safetensors files and folders."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.io import atomic_write


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` whose errors name the file and the first offending key."""
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise ValueError(f"{source}: unexpected key {k} for this config")
        if own[k].shape != v.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)} for this config")
    state = dict(state)
    by_ptr: dict[int, str] = {}
    for k, v in own.items():  # tied weights: one stored copy satisfies every alias
        first = by_ptr.setdefault(v.data_ptr(), k) if v.numel() else k
        if k not in state and first in state:
            state[k] = state[first]
        elif first not in state and k in state:
            state[first] = state[k]
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]}")
    model.load_state_dict(state, strict=True)


def load_text_part(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, text_size: int) -> None:
    """Load an LM's weights into `model` whose vocabulary may extend the source's past the shared text ids: every
    tensor must match, except vocabulary-sized ones (embedding, head) that differ in their first dimension, of
    which the first `text_size` rows (text ids and specials come first in every layout) are copied; the rest keep
    their initial values."""
    own = model.state_dict()
    merged = {}
    for k, v in state.items():
        if k in own and own[k].shape != v.shape and own[k].shape[1:] == v.shape[1:] \
                and min(len(v), len(own[k])) >= text_size:
            w = own[k].clone()
            w[:text_size] = v[:text_size]
            v = w
        merged[k] = v
    load_state_strict(model, merged, source)


def plain_state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses shared storage, so tied weights appear once)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen and v.numel():
            continue
        seen.add(v.data_ptr())
        out[prefix + k] = v.detach().contiguous().cpu()
    return out


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors `save_file`, atomically (common.io.atomic_write)."""
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # on disk before the rename makes the folder visible
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
