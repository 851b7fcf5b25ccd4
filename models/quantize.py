"""int8 CPU inference: dynamic quantisation of the LM's linear layers.

`quantize_int8(bundle)` returns a new Bundle whose LM has every `nn.Linear` (attention qkv/proj, MLP,
AdaLN, output head) replaced by `torch.ao.nn.quantized.dynamic.Linear`: weights stored as int8 with one
scale per tensor, activations quantised on the fly per batch, matmuls in int8 (fbgemm/qnnpack kernels).
Embeddings, norms, the objective's own layers and the vision tokenizer stay fp32. The input bundle is
not modified (the LM is copied).

torch 2.14 marks `torch.ao.quantization.quantize_dynamic` deprecated (in favour of torchao, which is not
a dependency here) but it still runs and speeds up linear layers on CPU; the deprecation warnings are
silenced inside this function only. CPU only: quantised dynamic Linear has no CUDA kernels.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import nn

from models.bundle import Bundle


def quantize_int8(bundle: Bundle) -> Bundle:
    """A copy of `bundle` whose LM's nn.Linear layers are int8 dynamically quantised (CPU inference)."""
    dev = next(bundle.lm.parameters()).device
    if dev.type != "cpu":
        raise ValueError(f"int8 inference runs on the CPU only (the model is on {dev}); use --device cpu")
    engines = torch.backends.quantized.supported_engines
    if torch.backends.quantized.engine not in ("fbgemm", "x86", "qnnpack"):
        for e in ("x86", "fbgemm", "qnnpack"):
            if e in engines:
                torch.backends.quantized.engine = e
                break
    lm = copy.deepcopy(bundle.lm).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = torch.ao.quantization.quantize_dynamic(lm, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return dataclasses.replace(bundle, lm=lm)


def count_int8_linears(module: nn.Module) -> int:
    """How many dynamically quantised linear layers `module` holds (0 for an fp32 model)."""
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in module.modules())
