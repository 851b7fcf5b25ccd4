"""The Python API (`from mmar import Pipeline`) on tiny models: loading both checkpoint forms, PIL in and out,
batched calls equal one-by-one calls, save/load round trip, video checkpoints, int8, bad arguments."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmar import Pipeline
from models.bundle import Bundle
from models.config import LMConfig
from models.objectives import NextTokenPrediction
from models.transformer import Transformer
from models.vocab import VocabLayout
from vision_tokenizers.video import VideoTokenizer, VideoTokenizerConfig

PROMPTS = ["a handwritten 1", "a handwritten 7", "a seven written by hand"]


def arr(images):
    return np.stack([np.asarray(im) for im in images])


def bundle_ckpt(bundle: Bundle, path):
    """A Lightning-style .ckpt of a bundle, as the LM module writes it (the "mmar" entry + prefixed weights)."""
    state = {**{f"lm.{k}": v for k, v in bundle.lm.state_dict().items()},
             **{f"objective.{k}": v for k, v in bundle.objective.state_dict().items()},
             **{f"vision.{k}": v for k, v in bundle.vision.state_dict().items()}}
    torch.save({"mmar": {**bundle.meta(), "tokenizer_json": bundle.tokenizer.to_json()}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_bundle_dir):
    return Pipeline.from_pretrained(tiny_bundle_dir)


@pytest.fixture(scope="module")
def video_pipe(caption_tokenizer):
    torch.manual_seed(0)
    vision = VideoTokenizer(VideoTokenizerConfig(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16],
                                                 spatial_down=[True], time_down=[True], levels=[5, 4])).eval()
    layout = VocabLayout(caption_tokenizer.vocab_size, 20)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=72)).eval()
    return Pipeline(Bundle(lm, caption_tokenizer, layout, vision, 72, NextTokenPrediction()))


def test_text_to_image_returns_pil_images(pipe):
    images = pipe.text_to_image(PROMPTS[:2], n=2, seed=0)
    assert len(images) == 4
    assert all(isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "L" for im in images)
    assert "text-to-image + captioning" in repr(pipe)


def test_batched_text_to_image_equals_one_by_one(pipe):
    batch = arr(pipe.text_to_image(PROMPTS, n=2, cfg=2.0, temperature=1.0, seed=11))
    singles = arr([pipe.text_to_image([p], n=1, cfg=2.0, temperature=1.0, seed=11 + j)[0]
                   for p in PROMPTS for j in range(2)])
    np.testing.assert_array_equal(batch, singles)
    per_prompt = arr([im for p in PROMPTS for im in pipe.text_to_image(p, n=2, cfg=2.0, seed=11)])
    np.testing.assert_array_equal(batch, per_prompt)
    other = arr(pipe.text_to_image(PROMPTS[:1], n=2, cfg=2.0, seed=12))
    assert not np.array_equal(batch[:2], other)  # the seed matters


def test_batched_caption_equals_one_by_one(pipe, tmp_path):
    images = pipe.text_to_image(PROMPTS, n=1, seed=3)
    batch = pipe.caption(images)
    assert batch == [pipe.caption([im])[0] for im in images] and all(isinstance(t, str) for t in batch)
    hot = pipe.caption(images, temperature=1.0, seed=5)
    assert hot == [pipe.caption([im], temperature=1.0, seed=5 + i)[0] for i, im in enumerate(images)]


def test_caption_takes_paths_and_any_size_or_mode(pipe, tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8))  # RGB, 30x40
    path = tmp_path / "x.png"
    img.save(path)
    assert pipe.caption([path]) == pipe.caption([str(path)]) == pipe.caption(img)
    assert len(pipe.caption([img.convert("RGBA"), img.convert("P")])) == 2
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.caption([tmp_path / "missing.png"])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        pipe.caption([img, tmp_path / "text.png"])
    with pytest.raises(ValueError, match="expected a PIL image or a file path"):
        pipe.caption([np.zeros((8, 8))])
    with pytest.raises(ValueError, match="at least one image"):
        pipe.caption([])


def test_save_pretrained_and_ckpt_give_the_same_model(pipe, tiny_bundle, tmp_path):
    out = pipe.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "vision_tokenizer.safetensors"]
    ref = arr(pipe.text_to_image(PROMPTS[:1], n=2, seed=4))
    np.testing.assert_array_equal(arr(Pipeline.from_pretrained(out).text_to_image(PROMPTS[:1], n=2, seed=4)), ref)
    ckpt = bundle_ckpt(tiny_bundle, tmp_path / "lm.ckpt")
    np.testing.assert_array_equal(arr(Pipeline.from_pretrained(ckpt).text_to_image(PROMPTS[:1], n=2, seed=4)), ref)


def test_numpy_integers_are_accepted(pipe):
    a = arr(pipe.text_to_image("a handwritten 1", n=np.int64(2), seed=np.int64(3), top_k=np.int32(5)))
    np.testing.assert_array_equal(a, arr(pipe.text_to_image("a handwritten 1", n=2, seed=3, top_k=5)))


def test_progress_reaches_the_total(pipe):
    seen = []
    pipe.text_to_image(PROMPTS[:2], n=2, seed=0, progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] and len(set(t for _, t in seen)) == 1
    assert len(seen) > 4  # finer than one step per image


def test_bad_arguments_are_value_errors(pipe):
    for kw, msg in [(dict(prompts=[]), "at least one prompt"), (dict(prompts=["  "]), "prompt 1 is empty"),
                    (dict(prompts="x", n=0), "n must be"), (dict(prompts="x", cfg=float("nan")), "cfg must be"),
                    (dict(prompts="x", temperature=-1), "temperature must be"), (dict(prompts="x", top_p=1.5), "top_p"),
                    (dict(prompts="x", top_k=0), "top_k"), (dict(prompts="x", n=1.5), "n must be an integer"),
                    (dict(prompts="x", n=True), "n must be an integer"), (dict(prompts="x", seed=-1), "seed must be"),
                    (dict(prompts="x", seed="0"), "seed must be an integer")]:
        with pytest.raises(ValueError, match=msg):
            pipe.text_to_image(**kw)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Pipeline.from_pretrained("no/such/model")


def test_text_to_video_on_an_image_checkpoint_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="cannot make videos"):
        pipe.text_to_video("a 3 moving up")


def test_text_to_video_frames_and_batching(video_pipe):
    assert video_pipe.can_make_video and not video_pipe.can_caption
    videos = video_pipe.text_to_video(["a 3 moving up", "a 5"], n=1, seed=2)
    assert len(videos) == 2 and len(videos[0]) == 5 and videos[0][0].size == (32, 32)
    one = video_pipe.text_to_video("a 5", n=1, seed=2)[0]
    np.testing.assert_array_equal(arr(videos[1]), arr(one))
    with pytest.raises(ValueError, match="draws videos"):
        video_pipe.text_to_image("a 3")
    with pytest.raises(ValueError, match="does not caption"):
        video_pipe.caption([Image.new("L", (32, 32))])


def test_int8_pipeline(tiny_bundle_dir):
    q = Pipeline.from_pretrained(tiny_bundle_dir, int8=True)
    assert not any(type(m) is torch.nn.Linear for m in q.bundle.lm.modules())
    assert "int8 LM (" in repr(q)
    images = q.text_to_image(PROMPTS[:1], n=2, seed=0)
    assert len(images) == 2 and isinstance(q.caption(images)[0], str)


def test_xar_checkpoint_draws_and_refuses_captions(tmp_path):
    """A continuous-latent (xAR) model: text_to_image takes steps/sampler, batched equals one-by-one, no captions."""
    from models.objectives import XARFlowMatching
    from train.latent_data import LatentDataModule
    from train.lm_module import MultimodalLMModule
    from vision_tokenizers import registry
    from vision_tokenizers.kl import KLConfig, KLTokenizer

    torch.manual_seed(0)
    registry.save(KLTokenizer(KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4)), tmp_path / "kl.st")
    dm = LatentDataModule(str(tmp_path / "kl.st"), source="digits", holdout=200, bpe_vocab_size=200, batch_size=32,
                          max_len=48, cache_dir=str(tmp_path / "cache"))
    obj = XARFlowMatching(dim=64, latent_channels=4, grid=4, entity="cell", entity_size=2, steps=2)
    module = MultimodalLMModule(dm.spec, obj, preset="xar-demo", dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                mlp_dim=128)
    module.configure_model()
    pipe = Pipeline(module.bundle())
    pipe.save_pretrained(tmp_path / "xar")
    pipe = Pipeline.from_pretrained(tmp_path / "xar")
    assert not pipe.can_make_video and not pipe.can_caption
    images = pipe.text_to_image(["a handwritten 3", "a 5"], n=2, cfg=2.0, seed=1, steps=2, sampler="em")
    assert len(images) == 4 and images[0].size == (8, 8)
    one = pipe.text_to_image(["a 5"], n=1, cfg=2.0, seed=2, steps=2, sampler="em")[0]
    np.testing.assert_array_equal(np.asarray(one), np.asarray(images[3]))
    with pytest.raises(ValueError, match="does not caption"):
        pipe.caption(images)
    with pytest.raises(ValueError, match="temperature, top-k and top-p do not apply"):
        pipe.text_to_image(["a 5"], temperature=0.5)


def test_saved_sampling_defaults_are_what_every_entry_point_draws_with(tiny_bundle, tmp_path, capsys):
    """The recipe's sampling settings travel with the exported model: Pipeline and `mmar t2i` draw with them when
    no option is given, exactly as with the same options given explicitly; a bad saved value is one clear error."""
    import dataclasses
    import json

    from mmar.cli import main
    from models.sampling import SamplingConfig

    tuned = dataclasses.replace(tiny_bundle, sampling=SamplingConfig(cfg=2.0, temperature=0.5, top_k=5))
    tuned.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["sampling"]["temperature"] == 0.5
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    assert pipe.sampling == tuned.sampling
    arr = lambda ims: np.stack([np.asarray(i) for i in ims])  # noqa: E731
    implicit = pipe.text_to_image(PROMPTS[:1], n=2, seed=3)
    explicit = pipe.text_to_image(PROMPTS[:1], n=2, seed=3, cfg=2.0, temperature=0.5, top_k=5)
    plain = pipe.text_to_image(PROMPTS[:1], n=2, seed=3, cfg=3.0, temperature=1.0, top_k=100)
    np.testing.assert_array_equal(arr(implicit), arr(explicit))
    assert not np.array_equal(arr(implicit), arr(plain))
    for name, flags in (("cli_default", []), ("cli_explicit", ["--cfg", "2", "--temperature", "0.5", "--top-k", "5"])):
        assert main(["t2i", "--ckpt", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--n", "2", "--seed", "3",
                     "--out", str(tmp_path / name), *flags]) == 0
    a, b = (tmp_path / "cli_default"), (tmp_path / "cli_explicit")
    for f in sorted(p.name for p in a.glob("0*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f)))
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["sampling"]["top_p"] = 1.5
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config.json: sampling top_p must be in \(0, 1\], got 1.5"):
        Pipeline.from_pretrained(tmp_path / "m")
    meta["sampling"] = {"temprature": 0.5}
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown SamplingConfig keys"):
        Pipeline.from_pretrained(tmp_path / "m")


def test_batch_size_fast_mode(pipe):
    """batch_size=k: k images per sampler call; reproducible for the same call, one generator per call."""
    import torch

    from mmar.pipeline import Pipeline

    fast = arr(pipe.text_to_image(PROMPTS[:2], n=2, seed=7, batch_size=3))
    assert fast.shape == (4, 8, 8)
    np.testing.assert_array_equal(fast, arr(pipe.text_to_image(PROMPTS[:2], n=2, seed=7, batch_size=3)))
    first = Pipeline(pipe.bundle).draw_images([PROMPTS[0], PROMPTS[0], PROMPTS[1]], 1,
                          generator=torch.Generator().manual_seed(7))  # chunk 0: the first three images
    np.testing.assert_array_equal(fast[:3], arr(tensor_to_pil_all(first)))
    exact = arr(pipe.text_to_image(PROMPTS[:2], n=2, seed=7))
    np.testing.assert_array_equal(arr(pipe.text_to_image(PROMPTS[:2], n=2, seed=7, batch_size=1))[0], exact[0])
    with pytest.raises(ValueError, match="batch_size must be"):
        pipe.text_to_image("x", batch_size=0)


def tensor_to_pil_all(x):
    from vision_tokenizers.image_io import tensor_to_pil

    return [tensor_to_pil(t) for t in x]


def test_token_models_refuse_a_cfg_schedule(tiny_bundle):
    """cfg_schedule guides flow-matching entities; a token model given one says so instead of ignoring it."""
    from mmar.pipeline import Pipeline

    with pytest.raises(ValueError, match="cfg_schedule applies to flow-matching"):
        Pipeline(tiny_bundle).draw_images(["a 3"], 1, cfg_schedule="constant")
