"""Training objectives: what the backbone's hidden states are trained to predict, and how to sample.

An objective is an `nn.Module` chosen in the YAML (LightningCLI `class_path`); it owns its targets, its
loss and its sampling step. A checkpoint records `describe(objective)` so generation rebuilds the same
one. Adding an objective adds a file and a line in OBJECTIVES, not a branch in the Lightning module.
"""
from __future__ import annotations

from common.io import dataclass_from_dict
from models.objectives.base import Objective
from models.objectives.nbp import NextBlockPrediction
from models.objectives.ntp import NextTokenPrediction
from models.objectives.xar import XARFlowMatching

OBJECTIVES: dict[str, type[Objective]] = {"ntp": NextTokenPrediction, "nbp": NextBlockPrediction,
                                          "xar": XARFlowMatching}


def describe(objective: Objective) -> dict:
    """{"name": ..., "config": {...}}: what a checkpoint stores to rebuild the objective."""
    for name, cls in OBJECTIVES.items():
        if type(objective) is cls:
            return {"name": name, "config": objective.config.__dict__.copy()}
    raise ValueError(f"objective {type(objective).__name__} is not registered in models.objectives.OBJECTIVES")


def build(desc: dict, source: str = "checkpoint") -> Objective:
    name = desc.get("name")
    if name not in OBJECTIVES:
        raise ValueError(f"{source}: unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    return cls(**dataclass_from_dict(cls.Config, desc.get("config", {}), source).__dict__)


__all__ = ["OBJECTIVES", "NextBlockPrediction", "NextTokenPrediction", "Objective", "XARFlowMatching", "build",
           "describe"]
