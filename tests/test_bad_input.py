"""Bad input to the tools, table-driven: each case gives a non-zero exit, one line naming the file or flag and
the problem, no traceback and no output file; merely unusual images (RGBA, palette, CMYK, 16-bit, 1x1,
10,000 x 10,000) are converted and captioned."""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmar.cli import run
from train.sources import load_jsonl_set
from vision_tokenizers.image_io import pil_to_tensor

ROOT = Path(__file__).resolve().parents[1]


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _digit() -> Image.Image:
    arr = np.zeros((8, 8), np.uint8)
    arr[2:6, 3:5] = 255
    return Image.fromarray(arr)


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 30,000 x 30,000 pixels (a decompression bomb's shape)."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", 30_000, 30_000)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def _animated_gif() -> bytes:
    frames = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


# name -> (file name, bytes maker, expected message)
BAD_IMAGES = {
    "zero-byte file": ("empty.png", lambda: b"", "empty.png: cannot read image"),
    "truncated PNG": ("cut.png", lambda: _png_bytes(Image.new("L", (64, 64), 77))[:60], "cut.png: cannot read image"),
    "truncated JPEG": ("cut.jpg", lambda: _png_bytes(Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), "JPEG")[:400], "cut.jpg: cannot read image"),
    "text named .png": ("notes.png", lambda: b"just some text\n", "notes.png: cannot read image"),
    "animated GIF": ("anim.gif", _animated_gif, "anim.gif: animated image with 2 frames"),
    "decompression bomb": ("bomb.png", _bomb_png, "bomb.png: image too large"),
}


def _err(capsys) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert cap.out == "", cap.out  # nothing printed for the good files either
    return err


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_caption_refuses_bad_image(case, tiny_bundle_dir, tmp_path, capsys):
    name, make, expected = BAD_IMAGES[case]
    good, bad = tmp_path / "good.png", tmp_path / name
    _digit().save(good)
    bad.write_bytes(make())
    assert run("caption", ["--ckpt", str(tiny_bundle_dir), str(good), str(bad)]) == 2
    assert expected in _err(capsys)


def test_caption_other_bad_paths(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    ck = ["--ckpt", str(tiny_bundle_dir)]
    assert run("caption", [*ck, str(tmp_path / "missing.png")]) == 2
    assert "missing.png: image file not found" in _err(capsys)
    (tmp_path / "nothing").mkdir()
    assert run("caption", [*ck, str(tmp_path / "nothing")]) == 2
    assert "nothing: no images" in _err(capsys)
    _digit().save(tmp_path / "locked.png")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", denied)  # root reads any file, so unreadability is simulated
    assert run("caption", [*ck, str(tmp_path / "locked.png")]) == 2
    assert "locked.png: cannot read image (permission denied)" in _err(capsys)


def test_unusual_images_are_converted(tiny_bundle_dir, tmp_path, capsys):
    d = np.asarray(_digit())
    images = {
        "rgba.png": Image.fromarray(np.dstack([d, d, d, np.full_like(d, 255)]), "RGBA"),
        "palette.png": _digit().convert("P"),
        "cmyk.jpg": _digit().convert("CMYK"),
        "sixteen.png": Image.fromarray(d.astype(np.uint16) * 257),
        "tiny.png": Image.new("L", (1, 1), 200),
        "huge.png": Image.new("L", (10_000, 10_000), 0),
    }
    for name, img in images.items():
        img.save(tmp_path / name)
    assert run("caption", ["--ckpt", str(tiny_bundle_dir), str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in out) == sorted(images)
    sixteen = pil_to_tensor(Image.open(tmp_path / "sixteen.png"), 1, 8)
    assert sixteen.max().item() == pytest.approx(1.0) and sixteen.min().item() == pytest.approx(-1.0)  # scaled


T2I_FLAG_CASES = {
    "--n 0": (["--prompt", "a 1", "--n", "0"], "--n must be >= 1"),
    "negative --cfg": (["--prompt", "a 1", "--cfg", "-1"], "--cfg must be a finite number >= 0"),
    "NaN --cfg": (["--prompt", "a 1", "--cfg", "nan"], "--cfg must be a finite number >= 0"),
    "--top-p 0": (["--prompt", "a 1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    "--top-p 1.5": (["--prompt", "a 1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "NaN temperature": (["--prompt", "a 1", "--temperature", "nan"], "--temperature must be a finite number"),
    "empty prompt": (["--prompt", "   "], "prompt 1 is empty"),
}


@pytest.mark.parametrize("case", sorted(T2I_FLAG_CASES))
def test_text_to_image_bad_flags(case, tiny_bundle_dir, tmp_path, capsys):
    argv, expected = T2I_FLAG_CASES[case]
    assert run("t2i", ["--ckpt", str(tiny_bundle_dir), *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_text_to_image_bad_prompts(tiny_bundle_dir, tmp_path, capsys):
    ck, out = ["--ckpt", str(tiny_bundle_dir)], ["--out", str(tmp_path / "o")]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for argv, expected in (
        (["--prompts-file", str(latin1)], "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
        (["--prompts-file", str(empty)], "empty.txt: no prompts in the file"),
        (["--prompts-file", str(tmp_path)], "is a folder, expected a text file"),
        (["--prompts-file", str(tmp_path / "nope.txt")], "nope.txt: file not found"),
    ):
        assert run("t2i", [*ck, *argv, *out]) == 2
        assert expected in capsys.readouterr().err
    assert run("t2i", [*ck, "--prompt", "seven " * 2000, *out]) == 2
    err = _err(capsys)
    assert "prompt of 12004 tokens" in err and "exceeds max_len 48" in err
    assert not (tmp_path / "o").exists()


def test_bad_checkpoints(tiny_bundle_dir, tiny_vq_path, tmp_path, capsys):
    out = ["--prompt", "a 1", "--out", str(tmp_path / "o")]
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_bundle_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    cut = tmp_path / "cut"
    shutil.copytree(tiny_bundle_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    other = tmp_path / "vq.ckpt"
    torch.save({"state_dict": {}, "mmar": {"vision": {"kind": "vq"}}}, other)
    for ckpt, expected in (
        (no_tok, "tokenizer.json: missing from the model folder"),
        (cut, "model.safetensors: not a readable safetensors file"),
        (other, "vq.ckpt: not an mmar language-model checkpoint"),
        (tiny_vq_path, "vq.safetensors: not an mmar language-model checkpoint"),  # a tokenizer, not an LM
    ):
        assert run("t2i", ["--ckpt", str(ckpt), *out]) == 2
        assert expected in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_jsonl_source_errors_name_file_and_line(tmp_path):
    _digit().save(tmp_path / "a.png")
    rows = {
        "missing image": ('{"image": "gone.png", "caption": "x"}', "data.jsonl:2: image file"),
        "empty caption": ('{"image": "a.png", "caption": "  "}', "data.jsonl:2: empty caption"),
        "bad JSON": ('{"image": "a.png", "caption": ', "data.jsonl:2: invalid JSON"),
        "no image field": ('{"caption": "x"}', "data.jsonl:2: no 'image' field"),
    }
    for line, expected in rows.values():
        (tmp_path / "data.jsonl").write_text('{"image": "a.png", "caption": "a digit"}\n' + line + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=expected.replace("(", r"\(")):
            load_jsonl_set(tmp_path / "data.jsonl")


@pytest.mark.slow
def test_training_cli_bad_values_are_one_line(tmp_path):
    """`python -m train fit` with a bad flag value or a missing data file: exit != 0, no traceback."""
    cases = (
        (["--trainer.max_epochs", "abc"], "max_epochs"),
        (["--data.init_args.source", "jsonl", "--data.init_args.path", str(tmp_path / "none.jsonl")],
         "none.jsonl: JSONL file not found"),
    )
    for extra, expected in cases:
        r = subprocess.run([sys.executable, "-m", "train", "fit", "--config", "configs/mnist_vq.yaml", *extra,
                            "--trainer.default_root_dir", str(tmp_path / "run")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_bad_samples_stop_or_skip(tiny_vq_path, tmp_path):
    """A JSONL with a corrupt image, an empty caption and an over-long caption among good rows: the default
    stops with the file and line; "skip" drops exactly those, counts them and logs file:line: problem."""
    from train.datamodules import ImageTextDataModule

    for i in range(12):
        _digit().save(tmp_path / f"d{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rows = [f'{{"image": "d{i}.png", "caption": "digit {i % 10}"}}' for i in range(12)]
    rows[3] = '{"image": "broken.png", "caption": "a digit"}'
    rows[5] = '{"image": "d5.png", "caption": ""}'
    rows[7] = '{"image": "d7.png", "caption": "' + "very long " * 40 + '"}'
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    kw = dict(vision_tokenizer=str(tiny_vq_path), source="jsonl", path=str(tmp_path / "data.jsonl"), holdout=0,
              bpe_vocab_size=200, batch_size=2, max_len=48, val_size=0)
    with pytest.raises(ValueError, match=r"data.jsonl:6: empty caption"):
        ImageTextDataModule(**kw, cache_dir=str(tmp_path / "c1"))
    log = tmp_path / "bad.log"
    dm = ImageTextDataModule(**kw, cache_dir=str(tmp_path / "c2"), on_bad_sample="skip", bad_samples_log=str(log))
    dm.setup()
    assert len(dm.train_set) == 9
    lines = log.read_text().splitlines()
    assert [ln.split(": ")[0].rsplit("/", 1)[-1] for ln in lines] == ["data.jsonl:6", "data.jsonl:4", "data.jsonl:8"]
    assert "empty caption" in lines[0] and "could not be read" in lines[1] and "max_len" in lines[2]
    rows[5] = '{"image": "d5.png", "caption": "digit 5"}'
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:4: .*broken.png: cannot read image"):
        ImageTextDataModule(**kw, cache_dir=str(tmp_path / "c3")).setup()
