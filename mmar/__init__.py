"""mmar's user-facing layer: the `mmar` command (mmar/cli.py), the Python API (`from mmar import Pipeline`)
and the web demo (mmar/demo/). The training and generation code lives in models/, train/ and generate/."""
from __future__ import annotations

__all__ = ["Pipeline"]


def __getattr__(name):  # lazy: `mmar --help` must not pay for importing torch
    if name == "Pipeline":
        from mmar.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'mmar' has no attribute {name!r}")
