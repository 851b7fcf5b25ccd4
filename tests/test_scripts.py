"""The two generation scripts, in-process, on tiny checkpoints built in the tests; and their errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmar.cli import run
from mmar.pipeline import Pipeline
from models.bundle import load_bundle


def test_text_to_image_writes_pngs_and_grid(tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("t2i", ["--ckpt", str(tiny_bundle_dir), "--prompt", "a handwritten 3",
                                    "--prompt", "the digit seven", "--n", "3", "--top-k", "10",
                                    "--top-p", "0.9", "--seed", "1", "--out", str(out)])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([f"{i:03d}_{j:02d}.png" for i in range(2) for j in range(3)] + ["grid.png"])
    assert Image.open(out / "000_00.png").size == (8, 8)
    assert "wrote 6 images" in capsys.readouterr().out


def test_text_to_image_same_seed_same_images(tiny_bundle):
    run = lambda s: Pipeline(tiny_bundle).draw_images(["a handwritten 1"], 2, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(5), run(5))


def test_prompts_file(tiny_bundle_dir, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a handwritten 1\n\nthe digit two\n")
    assert run("t2i", ["--ckpt", str(tiny_bundle_dir), "--prompts-file", str(f), "--n", "1",
                                      "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("0*.png"))) == 2


def _digit_png(path, size, mode="L"):
    Image.fromarray((np.random.default_rng(0).random(size) * 255).astype(np.uint8)).convert(mode).save(path)


def test_caption_any_size_png_and_jpeg(tiny_bundle_dir, tmp_path, capsys):
    _digit_png(tmp_path / "a.png", (28, 28))
    _digit_png(tmp_path / "b.jpg", (50, 37), "RGB")
    rc = run("caption", ["--ckpt", str(tiny_bundle_dir), str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                                        "--max-new-tokens", "5"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    # a folder works too
    assert run("caption", ["--ckpt", str(tiny_bundle_dir), str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_scripts_on_a_lightning_checkpoint(fitted_lm, tmp_path):
    _, _, ckpt, _ = fitted_lm
    _digit_png(tmp_path / "a.png", (8, 8))
    assert run("caption", ["--ckpt", str(ckpt), str(tmp_path / "a.png")]) == 0
    assert run("t2i", ["--ckpt", str(ckpt), "--prompt", "a handwritten 4", "--n", "2",
                                      "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "grid.png").is_file()


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_and_corrupt_images(tiny_bundle_dir, tmp_path, capsys):
    assert run("caption", ["--ckpt", str(tiny_bundle_dir), str(tmp_path / "nope.png")]) == 2
    assert "nope.png: image file not found" in _err(capsys)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert run("caption", ["--ckpt", str(tiny_bundle_dir), str(bad)]) == 2
    assert "bad.png: cannot read image" in _err(capsys)
    assert capsys.readouterr().out == ""  # nothing printed for the other files either


def test_empty_prompt_and_bad_cli_values(tiny_bundle_dir, tmp_path, capsys):
    assert run("t2i", ["--ckpt", str(tiny_bundle_dir), "--prompt", "  ", "--out", str(tmp_path / "o")]) == 2
    assert "prompt 1 is empty" in capsys.readouterr().err
    assert run("t2i", ["--ckpt", str(tiny_bundle_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert run("t2i", ["--ckpt", str(tiny_bundle_dir), "--prompt", "x", "--n", "zero"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_config(tiny_bundle_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle_dir, other)
    meta = json.loads((other / "config.json").read_text())
    meta["lm"]["dim"] = 128  # config says one shape, the weights hold another
    meta["lm"]["mlp_dim"] = 256
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.safetensors: \S+ has shape \(\d+, 64\), expected \(\d+, 128\)"):
        load_bundle(other)
    assert run("t2i", ["--ckpt", str(other), "--prompt", "a 1", "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors" in _err(capsys) and not (tmp_path / "o").exists()

    dropped = tmp_path / "dropped"
    shutil.copytree(tiny_bundle_dir, dropped)
    state = load_file(dropped / "model.safetensors")
    del state["blocks.1.mlp.down.weight"]
    save_file(state, dropped / "model.safetensors")
    with pytest.raises(ValueError, match="missing key blocks.1.mlp.down.weight"):
        load_bundle(dropped)


def test_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "x.ckpt"
    junk.write_bytes(b"junk")
    assert run("caption", ["--ckpt", str(junk), str(junk)]) == 2
    assert "x.ckpt: cannot read checkpoint" in _err(capsys)
    assert run("caption", ["--ckpt", str(tmp_path / "none"), str(junk)]) == 2
    assert "checkpoint not found" in _err(capsys)
