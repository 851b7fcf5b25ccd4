"""A trained multimodal model as one object: LM + objective + text tokenizer + vocabulary layout + vision
tokenizer, and the sequence format they were trained with.

Two on-disk forms, both loaded without executing pickled code:
- an inference folder: config.json, model.safetensors (LM weights, plus "objective.*" if the objective
  has any), vision_tokenizer.safetensors, tokenizer.json
- a Lightning .ckpt whose "mmar" entry holds the same config and whose state_dict has
  "lm.*", "objective.*" and "vision.*" weights (loaded with torch.load(weights_only=True)).

A model that reads images as continuous vectors (vision_tokenizers/projectors.py: ETT's codebook embeddings,
TokenFLEX's pooled ViT features) also has a `visual` module: config.json's "visual" entry and "visual.*"
weights beside the LM's. Its vision tokenizer may then be absent ("vision": null, no
vision_tokenizer.safetensors) when nothing is drawn (TokenFLEX).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.io import dataclass_from_dict
from common.weights import atomic_dir, atomic_save_file, load_state_strict, plain_state
from models import objectives
from models.config import LMConfig
from models.objectives import Objective
from models.sampling import SamplingConfig
from models.sequence import SequenceConfig, SequenceFormat
from models.text_tokenizer import TextTokenizer
from models.transformer import Transformer
from models.vocab import VocabLayout
from vision_tokenizers import projectors, registry

FORMAT = "mmar-bundle/2"


@dataclass
class Bundle:
    lm: Transformer
    tokenizer: TextTokenizer
    layout: VocabLayout
    vision: torch.nn.Module
    max_len: int
    objective: Objective
    visual: torch.nn.Module | None = None  # continuous image inputs (projectors.py); None: code ids
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the recipe's tuned drawing defaults

    @property
    def format(self) -> SequenceFormat:
        """The sequence format the model was trained with (prompts for every task)."""
        return SequenceFormat(self.tokenizer, self.layout, SequenceConfig(max_len=self.max_len))

    @property
    def image_channels(self) -> int:
        return (self.vision or self.visual).config.in_channels

    @property
    def image_size(self) -> int:
        return (self.vision or self.visual).config.image_size

    def meta(self) -> dict:
        """Everything but weights and the tokenizer JSON: what config.json holds."""
        meta = {
            "format": FORMAT,
            "lm": self.lm.cfg.to_dict(),
            "layout": self.layout.to_dict(),
            "vision": registry.describe(self.vision) if self.vision is not None else None,
            "sequence": {"max_len": self.max_len},
            "objective": objectives.describe(self.objective),
            "sampling": asdict(self.sampling),
        }
        if self.visual is not None:
            meta["visual"] = projectors.describe(self.visual)
        return meta

    def save(self, folder: str | Path) -> None:
        """Write the inference folder atomically (it appears whole or not at all)."""
        with atomic_dir(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.meta(), indent=2))
            visual = plain_state(self.visual, "visual.") if self.visual is not None else {}
            atomic_save_file({**plain_state(self.lm), **plain_state(self.objective, "objective."), **visual},
                             tmp / "model.safetensors")
            if self.vision is not None:
                registry.save(self.vision, tmp / "vision_tokenizer.safetensors")
            self.tokenizer.save(tmp / "tokenizer.json")

    def to(self, device) -> "Bundle":
        self.lm.to(device)
        self.objective.to(device)
        for m in (self.vision, self.visual):
            if m is not None:
                m.to(device)
        return self


def _from_meta(meta: dict, tokenizer: TextTokenizer, source: str):
    """(lm, objective, layout, vision, max_len, visual) built from config.json / the .ckpt's "mmar" entry."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{source}: not an mmar model (format {meta.get('format')!r}, expected {FORMAT!r})")
    layout = VocabLayout.from_dict(meta["layout"])
    cfg = LMConfig.from_dict(meta["lm"], source)
    if cfg.vocab_size < layout.size:
        raise ValueError(f"{source}: LM vocabulary {cfg.vocab_size} is smaller than the layout's {layout.size}")
    if tokenizer.vocab_size != layout.text_size:
        raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} ids, layout expects {layout.text_size}")
    vision = registry.build(meta["vision"]["kind"], meta["vision"]["config"]) if meta["vision"] is not None else None
    objective = objectives.build(meta.get("objective", {}), source)
    visual = projectors.build(meta["visual"], source) if meta.get("visual") is not None else None
    return Transformer(cfg), objective, layout, vision, meta["sequence"]["max_len"], visual


def _sampling(meta: dict, source: str) -> SamplingConfig:
    """The saved sampling defaults (models saved before they existed get SamplingConfig's)."""
    try:
        return dataclass_from_dict(SamplingConfig, meta.get("sampling") or {}, source)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load an inference folder or a Lightning .ckpt written by the LM training module."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.is_dir():
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: missing from the model folder")
        try:
            meta = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'config.json'}: invalid JSON ({e.msg})") from None
        if meta.get("vision", {}) is not None and not (path / "vision_tokenizer.safetensors").is_file():
            raise FileNotFoundError(f"{path / 'vision_tokenizer.safetensors'}: missing from the model folder")
        tok = TextTokenizer.from_file(path / "tokenizer.json")  # names the file when it is not a tokenizer
        lm, objective, layout, _, max_len, visual = _from_meta(meta, tok, str(path / "config.json"))
        source = str(path / "model.safetensors")
        try:
            weights = load_file(source)
        except Exception as e:  # safetensors' own error type for truncated or foreign files
            raise ValueError(f"{source}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        load_state_strict(objective, _split(weights, "objective."), source)
        if visual is not None:
            load_state_strict(visual, _split(weights, "visual."), source)
        load_state_strict(lm, {k: v for k, v in weights.items() if not k.startswith(("objective.", "visual."))}, source)
        vision = registry.load(path / "vision_tokenizer.safetensors") if meta.get("vision") is not None else None
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
        meta = ckpt.get("mmar") if isinstance(ckpt, dict) else None
        if meta is None or "tokenizer_json" not in meta:
            raise ValueError(f"{path}: not an mmar language-model checkpoint (no 'mmar' entry)")
        tok = TextTokenizer.from_json(meta["tokenizer_json"])
        lm, objective, layout, vision, max_len, visual = _from_meta(meta, tok, str(path))
        state = ckpt["state_dict"]
        for module, prefix in ((lm, "lm."), (objective, "objective."), (vision, "vision."), (visual, "visual.")):
            if module is not None:
                load_state_strict(module, _split(state, prefix), str(path))
    for m in (lm, objective, vision, visual):
        if m is not None:
            m.eval().requires_grad_(False)
    sampling = _sampling(meta, str(path / "config.json") if path.is_dir() else str(path))
    return Bundle(lm, tok, layout, vision, max_len, objective, visual, sampling).to(device)
