"""Small shared plumbing: atomic file writes and dataclass configs read from dicts.

Every file this project writes (weights, checkpoints, PNGs, reports) goes through `atomic_write`, so a
crash never leaves a truncated file that looks whole; every config read from disk or YAML goes through
`dataclass_from_dict`, so an unknown key is one clear error that names where it came from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yield a temp path beside `path`; on success it is fsynced and renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def dataclass_from_dict(cls: type[T], d: dict, source: str | None = None) -> T:
    """`cls(**d)` that names unknown keys (and where they came from) instead of a TypeError.

    Lists become tuples where the field is annotated as a tuple (JSON has no tuples)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}unknown {cls.__name__} keys {unknown}; known: {sorted(fields)}")
    out = {}
    for k, v in d.items():
        out[k] = tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
    return cls(**out)
