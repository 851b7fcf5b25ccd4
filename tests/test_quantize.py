"""int8 dynamic quantisation of the LM (models/quantize.py): close to fp32 on a tiny model, and the
generate scripts' --int8 flag end to end."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmar.cli import run
from models.quantize import count_int8_linears, quantize_int8


def test_quantized_logits_close_to_fp32(tiny_bundle):
    q = quantize_int8(tiny_bundle)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_bundle.lm.modules())
    assert count_int8_linears(q.lm) == n_linear > 0
    assert count_int8_linears(tiny_bundle.lm) == 0  # the input bundle is left alone
    ids = torch.randint(0, tiny_bundle.layout.size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # hidden states -> head: the path the sampler uses
        h32 = tiny_bundle.lm(ids)
        h8 = q.lm(ids)
        l32, l8 = tiny_bundle.lm.head(h32), q.lm.head(h8)
    assert l8.shape == l32.shape
    err = (l8 - l32).abs().max().item()
    assert err < 0.1 * l32.abs().max().item() + 1e-3, err
    # the most likely token agrees almost everywhere
    assert (l8.argmax(-1) == l32.argmax(-1)).float().mean() > 0.9


def test_int8_flag_end_to_end(tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("t2i", ["--ckpt", str(tiny_bundle_dir), "--prompt", "a handwritten 3", "--n", "2",
                                      "--int8", "--out", str(out)]) == 0
    assert Image.open(out / "000_00.png").size == (8, 8)
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    capsys.readouterr()
    assert run("caption", ["--ckpt", str(tiny_bundle_dir), "--int8", str(tmp_path / "a.png")]) == 0
    assert "a.png\t" in capsys.readouterr().out
