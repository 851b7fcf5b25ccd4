"""The cells task (train/cells.py): data, caption parser and scoring, its data modules, and `init_lm_from` (an
understanding model's LM started from a text-only LM, text rows copied across vocabularies)."""
import numpy as np
import pytest
import torch

from models.bundle import Bundle
from models.config import LMConfig
from models.objectives import NextTokenPrediction
from models.transformer import Transformer
from models.vocab import VocabLayout
from train.cells import CELL, FILLERS, PLACES, UNREAD, WORDS, Cells, compose_caption, parse_cells, score_cells
from train.understanding.data import ScenesDataModule, check_class_words, scenes_tokenizer
from train.understanding.module import UnderstandingLMModule


@pytest.fixture(scope="module")
def cells():
    return Cells.load("train", 64, seed=3)


def test_canvases_are_deterministic_and_match_their_truth(cells):
    again = Cells.load("train", 64, seed=3)
    assert [cells.truth(i) for i in range(64)] == [again.truth(i) for i in range(64)]
    assert [cells.truth(i) for i in range(64)] != [Cells.load("train", 64, seed=4).truth(i) for i in range(64)]
    for i in range(16):
        img = cells.image(i)
        assert img.shape == (64, 64) and img.dtype == np.uint8
        for k, c in enumerate(cells.truth(i)):
            cell = img[(k // 2) * CELL:(k // 2 + 1) * CELL, (k % 2) * CELL:(k % 2 + 1) * CELL]
            assert (cell.max() == 0) == (c == -1)  # an empty cell is black, a digit's is not
    truths = np.array([cells.truth(i) for i in range(64)])
    assert 0.1 < (truths == -1).mean() < 0.4  # p_empty 0.25
    assert set(np.unique(truths)) <= set(range(-1, 10))


def test_splits_use_disjoint_digits():
    rows = {s: {r for i in range(300) for r in Cells.load(s, 300).layout(i) if r >= 0} for s in ("train", "val", "test")}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]


def test_caption_format_and_fillers(cells):
    assert compose_caption([7, -1, 3, 0], 0) == "top left 7 , top right none , bottom left 3 , bottom right 0 . a small picture"
    caps = cells.captions(0)
    assert len(caps) == len(FILLERS) == len(set(FILLERS)) == 64
    for f in FILLERS:  # the fillers say nothing about the image
        assert not set(f.split()) & (set(WORDS) | {w for p in PLACES for w in p.split()})


def test_one_tokenizer_for_every_seed_with_single_token_class_words():
    a = scenes_tokenizer(Cells.load("train", 10, seed=0), None, 512)
    b = scenes_tokenizer(Cells.load("train", 10, seed=5), None, 512)
    assert a.to_json() == b.to_json()
    check_class_words(a, "test")
    for w in WORDS:
        assert len(a.encode(" " + w)) == 1
    with pytest.raises(ValueError, match="not single tokens"):
        from models.text_tokenizer import TextTokenizer

        check_class_words(TextTokenizer.train_bpe(["x y"], 260), "tiny.json")


def test_parse_cells_reads_each_place():
    assert parse_cells("top left 7 , top right none , bottom left 3 , bottom right 0 . a grey photo") == [7, -1, 3, 0]
    assert parse_cells("top right 4 , top left 2") == [2, 4, UNREAD, UNREAD]  # order-free, missing places unread
    assert parse_cells("top left seven , top right , bottom left 5 5") == [UNREAD, UNREAD, 5, UNREAD]
    assert parse_cells("") == [UNREAD] * 4


def test_score_cells_by_hand():
    truths = [[7, -1, 3, 0], [-1, -1, 2, 2]]
    caps = ["top left 7 , top right 1 , bottom left 3 , bottom right none",  # 2 right; occupancy 2/4 right
            "top left none , top right none , bottom left 2"]  # 3 right; bottom right unread
    s = score_cells(caps, truths)
    np.testing.assert_allclose(s["cell"], [0.5, 0.75])
    np.testing.assert_allclose(s["occupancy"], [0.5, 0.75])
    np.testing.assert_array_equal(s["class_right"], [2, 1])
    np.testing.assert_array_equal(s["occupied"], [3, 2])
    np.testing.assert_array_equal(s["all"], [False, False])
    with pytest.raises(ValueError, match="captions for"):
        score_cells(caps[:1], truths)


def test_cells_data_module_batches():
    dm = ScenesDataModule(task="cells", n_train=64, n_val=8, tokens=4, p_caption_first=0.0, batch_size=8, max_len=64)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 1, 64, 64)
    assert dm.format.image_slots(batch["ids"]).sum(1).tolist() == [4] * 8
    with pytest.raises(ValueError, match="task must be one of"):
        ScenesDataModule(task="nope", tokens=4, p_caption_first=0.0)
    with pytest.raises(ValueError, match="too short"):
        ScenesDataModule(task="cells", n_train=8, tokens=64, p_caption_first=0.0, max_len=64)


def _text_lm_folder(tmp_path, tokenizer, codebook: int, seed: int = 0):
    """A 'pretrained' text LM saved as an inference folder: random weights, the models' text tokenizer."""
    torch.manual_seed(seed)
    layout = VocabLayout(tokenizer.vocab_size, codebook)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=64))
    folder = tmp_path / f"text_lm{seed}"
    Bundle(lm, tokenizer, layout, None, 64, NextTokenPrediction()).save(folder)
    return folder, lm


def test_init_lm_from_copies_the_lm_and_its_text_rows(tmp_path):
    dm = ScenesDataModule(task="cells", n_train=16, n_val=4, tokens=4, p_caption_first=0.0, max_len=64)
    text = dm.tokenizer.vocab_size
    folder, src = _text_lm_folder(tmp_path, dm.tokenizer, codebook=32)  # vocabulary: text + 32 codes
    torch.manual_seed(1)
    m = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", init_lm_from=str(folder),
                              vit=dict(image_size=64, patch_size=8, vit_dim=16, vit_depth=1, vit_heads=2,
                                       counts=[4], default_tokens=4))
    assert m.lm.tok_emb.weight.shape[0] == text  # this model has no image codes
    own, theirs = m.lm.state_dict(), src.state_dict()
    for k, v in own.items():
        ref = theirs[k][:text] if k in ("tok_emb.weight", "head.weight") else theirs[k]
        torch.testing.assert_close(v, ref, msg=k)
    torch.manual_seed(1)
    fresh = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool",
                                  vit=dict(image_size=64, patch_size=8, vit_dim=16, vit_depth=1, vit_heads=2,
                                           counts=[4], default_tokens=4))
    assert not torch.equal(fresh.lm.tok_emb.weight, m.lm.tok_emb.weight)  # so the copy above is not the init


def test_init_lm_from_refuses_another_tokenizer_or_shape(tmp_path, caption_tokenizer):
    dm = ScenesDataModule(task="cells", n_train=16, n_val=4, tokens=4, p_caption_first=0.0, max_len=64)
    vit = dict(image_size=64, patch_size=8, vit_dim=16, vit_depth=1, vit_heads=2, counts=[4], default_tokens=4)
    folder, _ = _text_lm_folder(tmp_path, caption_tokenizer, codebook=0)
    with pytest.raises(ValueError, match="another tokenizer"):
        UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit=vit, init_lm_from=str(folder))
    folder, _ = _text_lm_folder(tmp_path, dm.tokenizer, codebook=0, seed=1)
    with pytest.raises(ValueError, match="has shape"):  # another width: a clear error naming the file
        UnderstandingLMModule(dm.spec, preset="scenes", inputs="vit_pool", vit=vit, init_lm_from=str(folder))
    with pytest.raises(ValueError, match="not both"):
        UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit=vit, init_lm_from=str(folder),
                              init_from=str(folder))


def test_init_encoder_from_copies_only_the_vit(tmp_path):
    dm = ScenesDataModule(task="cells", n_train=16, n_val=4, tokens=4, p_caption_first=0.0, max_len=64)
    vit = dict(image_size=64, patch_size=8, vit_dim=16, vit_depth=1, vit_heads=2, counts=[4], default_tokens=4)
    torch.manual_seed(0)
    src = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit=vit)
    ckpt = tmp_path / "src.ckpt"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    torch.manual_seed(1)
    m = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit=vit, init_encoder_from=str(ckpt))
    for k, v in m.visual.encoder.state_dict().items():
        torch.testing.assert_close(v, src.visual.encoder.state_dict()[k], msg=k)
    # the projector and the LM start fresh (seed 1's init, not the source's)
    assert not torch.equal(m.visual.projector.out.weight, src.visual.projector.out.weight)
    assert not torch.equal(m.lm.tok_emb.weight, src.lm.tok_emb.weight)
    wide = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit={**vit, "vit_dim": 32})
    torch.save({"state_dict": wide.state_dict()}, tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match="wide.ckpt.*has shape"):
        UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit=vit,
                              init_encoder_from=str(tmp_path / "wide.ckpt"))
    with pytest.raises(FileNotFoundError, match="missing.ckpt: no such checkpoint"):
        UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", vit=vit,
                              init_encoder_from=str(tmp_path / "missing.ckpt"))


def test_teacher_forced_reads_the_class_word_predictions():
    """benchmarks.cells.teacher_forced against a plain recomputation: each class word's prediction from its own
    prefix (no padding, one canvas at a time)."""
    from benchmarks.cells import teacher_forced
    from train.cells import FILLERS
    from vision_tokenizers.projectors import WithEmbeds

    dm = ScenesDataModule(task="cells", n_train=16, n_val=4, tokens=4, p_caption_first=0.0, max_len=64)
    torch.manual_seed(0)
    m = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool",
                              vit=dict(image_size=64, patch_size=8, vit_dim=16, vit_depth=1, vit_heads=2, counts=[4],
                                       default_tokens=4))
    b = m.bundle()
    b.lm.eval(), b.visual.eval()
    c = Cells.load("test", 3)
    images, truths = c.images(), [c.truth(i) for i in range(3)]
    got = teacher_forced(b, images, truths, tokens=4)
    tok = b.tokenizer
    words = [tok.encode(" " + w)[0] for w in WORDS]
    with torch.inference_mode():
        for i in range(3):
            embeds = b.visual(images[i:i + 1], None, 4)
            prompt = b.format.caption_prompt_slots(4)
            cap = tok.encode(compose_caption(truths[i], i % len(FILLERS)))
            right, nll = [], []
            for j, t in enumerate(cap):
                if t not in words:
                    continue
                ids = torch.tensor([prompt + cap[:j]])
                lm = WithEmbeds(b.lm, embeds[0], b.format.image_slots(ids))
                logits = b.lm.head(lm(ids))[0, -1]
                right.append(int(logits[words].argmax()) == words.index(t))
                nll.append(float(-logits.log_softmax(-1)[t]))
            assert len(right) == 4
            assert got["tf_cell"][i] == pytest.approx(sum(right) / 4)
            assert got["tf_class_nll"][i] == pytest.approx(sum(nll) / 4, rel=1e-4)
