"""The "train on your own data" path as a new user takes it (docs/own_data.md): the example RGB shapes written as
JSONL by train/shapes.py, the tokenizer and LM recipes (configs/shapes_*.yaml) run through the CLI, the
reconstruction grid the tokenizer writes at validation, export and captioning of a held-out image."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from mmar.cli import main as mmar_main
from train.cli import main as cli_main
from train.shapes import COLOURS, SHAPES, main as shapes_main, write_shapes


def test_shapes_are_deterministic_rgb_jsonl(tmp_path):
    a = write_shapes(tmp_path / "a", n=30, seed=3)
    b = write_shapes(tmp_path / "b", n=30, seed=3)
    lines = a.read_text().splitlines()
    assert lines == b.read_text().splitlines() and len(lines) == 30
    caps = [json.loads(line)["caption"] for line in lines]
    assert len(set(caps[:24])) == 24  # every shape x colour class appears
    assert all(c.split()[1] in COLOURS and c.split()[2] in SHAPES for c in caps)
    img = Image.open(a.parent / json.loads(lines[0])["image"])
    assert img.mode == "RGB" and img.size == (32, 32)
    assert (a.parent / "images/00029.png").read_bytes() == (b.parent / "images/00029.png").read_bytes()


def test_shapes_refuses_to_overwrite(tmp_path, capsys):
    write_shapes(tmp_path / "d", n=2)
    with pytest.raises(SystemExit, match="already exists"):
        shapes_main(["--out", str(tmp_path / "d")])
    assert not (tmp_path / "d.partial").exists()


def test_recipes_train_tokenizer_and_lm_on_jsonl(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", n=60)
    vq = tmp_path / "vq.safetensors"
    cli_main(["fit", "--config", "configs/shapes_vq.yaml", "--data.init_args.path", str(data),
              "--trainer.default_root_dir", str(tmp_path / "vq"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
              "--trainer.check_val_every_n_epoch", "1",
              "--data.init_args.batch_size", "8", "--model.init_args.export_path", str(vq)])
    grids = sorted((tmp_path / "vq" / "reconstructions").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000004.png"]
    assert Image.open(grids[-1]).size == (8 * 34 + 2, 2 * 34 + 2)  # 8 inputs over their 8 reconstructions
    run = tmp_path / "lm"
    cli_main(["fit", "--config", "configs/shapes_lm.yaml", "--data.init_args.path", str(data),
              "--data.init_args.vision_tokenizer", str(vq), "--data.init_args.cache_dir", str(tmp_path / "cache"),
              "--data.init_args.augment_copies", "0", "--model.init_args.preset", "tiny",
              "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "3"])
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert mmar_main(["export", str(last), str(tmp_path / "model")]) in (0, None)
    held = json.loads(data.read_text().splitlines()[-1])["image"]
    capsys.readouterr()
    assert mmar_main(["caption", "--ckpt", str(tmp_path / "model"), str(data.parent / held)]) in (0, None)
    assert str(data.parent / held) in capsys.readouterr().out
