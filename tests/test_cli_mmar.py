"""The `mmar` command: help lists every subcommand with examples, the delegated scripts keep their flags,
export and eval work on tiny models, and errors are one line with a non-zero exit code."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmar.cli import COMMANDS, main
from models.bundle import load_bundle
from test_api import bundle_ckpt


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_top_help_lists_every_command(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in ("fit", "validate", "t2i", "t2v", "caption", "eval", "export", "demo"):
        assert f"\n  {name} " in out
    assert "from mmar import Pipeline" in out
    assert set(COMMANDS) == {"fit", "validate", "t2i", "t2v", "caption", "eval", "export", "demo"}


def test_test_and_predict_are_not_commands(capsys):
    """No module has a test or predict loop: neither `mmar` nor the LightningCLI offers them."""
    from train.cli import MMARCLI

    assert set(MMARCLI.subcommands()) == {"fit", "validate"}
    code, _, err = run(["test", "--config", "configs/mnist_lm.yaml"], capsys)
    assert code == 2 and "unknown command 'test'" in err


@pytest.mark.parametrize("cmd", ["t2i", "t2v", "caption", "eval", "export", "demo"])
def test_every_subcommand_help_has_examples(cmd, capsys):
    code, out, _ = run([cmd, "--help"], capsys)
    assert code == 0 and f"usage: mmar {cmd}" in out
    examples = out[out.index("examples:"):]
    assert f"mmar {cmd} " in examples


def test_lightning_help_has_examples(capsys):
    code, out, _ = run(["fit", "--help"], capsys)
    assert code == 0 and "--trainer" in out and "mmar fit --config configs/mnist_lm.yaml" in out


def test_lightning_argument_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and err.startswith("error: ") and "nope.yaml" in err and err.count("\n") == 1
    code, _, err = run(["fit", "--config", "configs/mnist_lm.yaml", "--trainer.max_stepz", "3"], capsys)
    assert code == 2 and err == "error: unrecognized arguments: --trainer.max_stepz 3 (see mmar fit --help)\n"


def test_console_script_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "mmar", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "commands:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mmar", "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown command 'nonsense'")
    assert "Traceback" not in r.stderr


def test_t2i_then_caption_same_flags_as_the_scripts(tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "t2i"
    code, stdout, _ = run(["t2i", "--ckpt", str(tiny_bundle_dir), "--prompt", "a handwritten 7", "--n", "2",
                           "--seed", "3", "--out", str(out)], capsys)
    assert code == 0 and "wrote 2 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["000_00.png", "000_01.png", "grid.png", "prompts.txt"]
    code, stdout, _ = run(["caption", "--ckpt", str(tiny_bundle_dir), str(out / "000_00.png")], capsys)
    assert code == 0 and stdout.startswith(f"{out / '000_00.png'}\t")


@pytest.mark.parametrize("argv,message", [
    (["t2i", "--ckpt", "no/such/model", "--prompt", "x"], "error: no/such/model: checkpoint not found"),
    (["caption", "--ckpt", "BUNDLE", "missing.png"], "error: missing.png: image file not found"),
    (["export", "no/such.ckpt", "OUT"], "error: no/such.ckpt: checkpoint not found"),
    (["eval", "--ckpt", "BUNDLE", "--source", "nope"], "error: unknown data source 'nope'"),
    (["eval", "--ckpt", "BUNDLE", "--source", "digits", "--holdout", "5000"], "error: holdout 5000 must leave training"),
    (["eval", "--ckpt", "BUNDLE", "--source", "digits", "--holdout", "3"], "error: --holdout 3 leaves 3 held-out"),
    (["t2v", "--ckpt", "BUNDLE", "--prompt", "x", "--out", "OUT"], "error: this model's vision tokenizer is not a video"),
])
def test_errors_are_one_line(argv, message, tiny_bundle_dir, tmp_path, capsys):
    argv = [str(tiny_bundle_dir) if a == "BUNDLE" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, _, err = run(argv, capsys)
    assert code != 0 and err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_argument_errors_exit_2(tiny_bundle_dir, capsys):
    code, _, err = run(["t2i", "--ckpt", str(tiny_bundle_dir), "--prompt", "x", "--n", "0"], capsys)
    assert code == 2 and "--n must be >= 1" in err
    code, _, err = run(["demo"], capsys)
    assert code == 2 and "--ckpt" in err


def test_demo_without_gradio_is_one_line(tiny_bundle_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    code, _, err = run(["demo", "--ckpt", str(tiny_bundle_dir)], capsys)
    assert code == 2 and err.startswith("error: the web demo needs gradio: run `make demo-deps`")
    code, _, err = run(["demo", "--ckpt", str(tiny_bundle_dir), "--port", "70000"], capsys)
    assert code == 2 and err == "error: --port must be in 1..65535, got 70000\n"


def test_export_ckpt_to_folder(tiny_bundle, tmp_path, capsys):
    ckpt = bundle_ckpt(tiny_bundle, tmp_path / "lm.ckpt")
    out = tmp_path / "exported"
    code, stdout, _ = run(["export", str(ckpt), str(out)], capsys)
    assert code == 0 and stdout.startswith(f"wrote {out}")
    b = load_bundle(out)
    for k, v in tiny_bundle.lm.state_dict().items():
        torch.testing.assert_close(b.lm.state_dict()[k], v, rtol=0, atol=0)
    code, _, err = run(["export", str(ckpt), str(out)], capsys)
    assert code == 2 and "add --overwrite" in err
    code, _, _ = run(["export", str(ckpt), str(out), "--overwrite"], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json", "vision_tokenizer.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_export_to_a_hugging_face_checkpoint(tiny_bundle, tmp_path, capsys):
    """`mmar export --hf llama`: transformers loads the folder and gives our LM's logits."""
    import transformers

    ckpt = bundle_ckpt(tiny_bundle, tmp_path / "lm.ckpt")
    out = tmp_path / "hf"
    code, stdout, err = run(["export", str(ckpt), str(out), "--hf", "llama"], capsys)
    assert code == 0 and "Hugging Face llama" in stdout, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tiny_bundle.format.t2i_prompt("a handwritten 3")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tiny_bundle.lm.head(tiny_bundle.lm(ids)), atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_eval_on_digits(tiny_bundle_dir, tmp_path, capsys):
    report_path = tmp_path / "eval.json"
    code, stdout, _ = run(["eval", "--ckpt", str(tiny_bundle_dir), "--source", "digits", "--holdout", "120",
                           "--per-class", "1", "--captions", "8", "--out", str(report_path)], capsys)
    assert code == 0, stdout
    r = json.loads(report_path.read_text())
    assert r["held_out"] == 120 and r["labelled"] and r["t2i_images"] == 10 and r["t2i_accuracy_n"] == 10 and r["caption_accuracy_n"] == 8
    assert 0 <= r["t2i_accuracy"] <= 1 and 0 <= r["caption_accuracy"] <= 1
    lo, hi = r["caption_accuracy_ci95"]
    assert lo <= r["caption_accuracy"] <= hi
    assert "t2i_accuracy:" in stdout and "caption_accuracy:" in stdout


def test_eval_unlabelled_jsonl(tiny_bundle_dir, tmp_path, capsys):
    rows = []
    for i in range(24):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": "a handwritten 7"}))
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    report_path = tmp_path / "eval.json"
    code, stdout, _ = run(["eval", "--ckpt", str(tiny_bundle_dir), "--source", "jsonl", "--path",
                           str(tmp_path / "data.jsonl"), "--holdout", "0.5", "--per-class", "1",
                           "--out", str(report_path)], capsys)
    assert code == 0
    r = json.loads(report_path.read_text())
    assert r["held_out"] == 12 and not r["labelled"] and "caption_exact_match" in r and r["t2i_images"] == 4


def test_eval_refuses_a_video_checkpoint(caption_tokenizer, tmp_path, capsys):
    from models.bundle import Bundle
    from models.config import LMConfig
    from models.objectives import NextTokenPrediction
    from models.transformer import Transformer
    from models.vocab import VocabLayout
    from vision_tokenizers.video import VideoTokenizer, VideoTokenizerConfig

    vision = VideoTokenizer(VideoTokenizerConfig(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16],
                                                 spatial_down=[True], time_down=[True], levels=[5, 4]))
    layout = VocabLayout(caption_tokenizer.vocab_size, 20)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=72))
    Bundle(lm, caption_tokenizer, layout, vision, 72, NextTokenPrediction()).save(tmp_path / "video")
    code, _, err = run(["eval", "--ckpt", str(tmp_path / "video"), "--source", "digits", "--holdout", "120"], capsys)
    assert code == 2 and err.startswith("error: mmar eval scores image checkpoints")
