import gzip
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from models.sequence import IMAGE, SequenceConfig, SequenceFormat
from models.vocab import VocabLayout
from train.sources import load_source, read_idx, split_indices


def _png(path, value=128, size=(10, 12)):
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_digits_source_and_split():
    d = load_source("digits")
    assert len(d) == 1797 and d.image(0, 1, 8).shape == (1, 8, 8)
    assert -1 <= d.image(0, 1, 8).min() and d.image(0, 1, 8).max() <= 1
    assert any("handwritten 0" in c for c in d.captions[0])
    tr, held = split_indices(len(d), 300, seed=0)
    assert len(set(tr) & set(held)) == 0 and len(tr) + len(held) == 1797
    assert len(set(d.labels[held[:100]])) == 10  # held-out prefix is mixed even if the source is sorted


def test_idx_reader(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape) + arr.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="bad: IDX header"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_missing_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_source("fashion_mnist", str(tmp_path))


def test_jsonl_source_and_errors(tmp_path):
    _png(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "a.png", "caption": "a grey square"}) + "\n")
    d = load_source("jsonl", str(good))
    assert list(d.captions) == [["a grey square"]] and d.image(0, 3, 16).shape == (3, 16, 16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": "a.png", "caption": " "}) + "\n")
    with pytest.raises(ValueError, match=r"empty.jsonl:1: empty caption"):
        load_source("jsonl", str(empty))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl:1: image file .*nope.png not found"):
        load_source("jsonl", str(missing))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: invalid JSON"):
        load_source("jsonl", str(broken))


def test_folder_and_webdataset_sources(tmp_path):
    (tmp_path / "imgs" / "red_car").mkdir(parents=True)
    _png(tmp_path / "imgs" / "red_car" / "1.png")
    _png(tmp_path / "imgs" / "2.png")
    (tmp_path / "imgs" / "2.txt").write_text("a flat image")
    d = load_source("folder", str(tmp_path / "imgs"))
    assert sorted(c[0] for c in d.captions) == ["a flat image", "red car"]

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, cap in (("s1", b"first"), ("s2", json.dumps({"caption": "second"}).encode())):
            buf = io.BytesIO()
            Image.fromarray(np.zeros((5, 5), np.uint8)).save(buf, format="PNG")
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.{'txt' if key == 's1' else 'json'}", cap)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    w = load_source("wds", str(tmp_path / "shard-*.tar"))
    assert sorted(c[0] for c in w.captions) == ["first", "second"]
    assert w.image(0, 1, 8).shape == (1, 8, 8)


def test_corrupt_image_error_names_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    d = load_source("jsonl", str(_jsonl(tmp_path, "bad.png")))
    with pytest.raises(ValueError, match=r"bad.png: cannot read image"):
        d.image(0, 1, 8)


def _jsonl(tmp_path, image):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"image": image, "caption": "c"}) + "\n")
    return p


@pytest.fixture()
def fmt(caption_tokenizer):
    layout = VocabLayout(caption_tokenizer.vocab_size, 32)
    return SequenceFormat(caption_tokenizer, layout, SequenceConfig(max_len=60))


def test_sequence_format_tasks_ranges_and_padding(fmt):
    tok, layout = fmt.tok, fmt.layout
    rng = random.Random(0)
    codes = torch.randint(0, 32, (4, 4))
    samples = [fmt.build(codes, "a handwritten 3", rng) for _ in range(400)]
    i2t = [s.ids[1].item() == tok.i2t_id for s in samples]
    assert 0.4 < np.mean(i2t) < 0.6  # both tasks, about 50/50
    for s in samples[:50]:
        assert s.ids[1].item() in (tok.t2i_id, tok.i2t_id) and s.task == ("i2t" if s.ids[1] == tok.i2t_id else "t2i")
        img = s.ids[s.modality == IMAGE]
        assert img[0] == tok.boi_id and img[-1] == tok.eoi_id
        assert ((img[1:-1] >= layout.image_offset) & (img[1:-1] < layout.size)).all()
        assert torch.equal(img[1:-1] - layout.image_offset, codes.flatten())
        assert s.ids[0] == tok.bos_id and s.ids[-1] == tok.eos_id and not s.loss[:2].any() and s.loss[2:].all()
    batch = fmt.collate(samples[:8] + [fmt.build(codes, "a picture of the number 3", rng)])
    pad = ~batch["valid"]
    assert pad.any()
    assert (batch["ids"][pad] == tok.pad_id).all() and not batch["loss"][pad].any()
    assert (batch["valid"].long().diff(dim=1) <= 0).all()  # right padding only
    assert torch.equal(batch["position_ids"][0], torch.arange(batch["ids"].shape[1]))


def _is_prefix(prompt, sample):
    return sample.ids[: len(prompt)].tolist() == list(prompt)


def test_every_inference_prompt_is_a_prefix_of_a_training_sample_of_its_task(fmt):
    codes = torch.randint(0, 32, (4, 4))
    cap = "the digit seven"
    rng = random.Random(3)
    samples = [fmt.build(codes, cap, rng) for _ in range(300)]
    by_task = {t: [s for s in samples if s.task == t] for t in ("t2i", "i2t")}
    cond = [s for s in by_task["t2i"] if s.conditional]
    uncond = [s for s in by_task["t2i"] if not s.conditional]
    assert cond and uncond and by_task["i2t"]
    assert all(_is_prefix(fmt.t2i_prompt(cap), s) for s in cond)
    assert all(_is_prefix(fmt.t2i_prompt(None), s) for s in uncond)
    assert all(_is_prefix(fmt.caption_prompt(codes), s) for s in by_task["i2t"])
    # and no prompt of one task starts a sample of the other
    assert not any(_is_prefix(fmt.t2i_prompt(None), s) for s in by_task["i2t"])
    assert not any(_is_prefix(fmt.caption_prompt(codes)[:3], s) for s in by_task["t2i"])


def test_guidance_drop_rate_over_10000_samples(fmt):
    rng = random.Random(1)
    codes = torch.zeros(16, dtype=torch.long)
    samples = [fmt.build(codes, "the digit seven", rng) for _ in range(10_000)]
    t2i = [s for s in samples if s.task == "t2i"]
    dropped = [s for s in t2i if s.ids.tolist()[:3] == [fmt.tok.bos_id, fmt.tok.t2i_id, fmt.tok.boi_id]]
    assert all(not s.conditional for s in dropped) and sum(not s.conditional for s in t2i) == len(dropped)
    rate = len(dropped) / len(t2i)
    sd = (fmt.cfg.p_drop_caption * (1 - fmt.cfg.p_drop_caption) / len(t2i)) ** 0.5
    assert abs(rate - fmt.cfg.p_drop_caption) < 4 * sd, rate
    # the unconditional share of image spans that follow a text->image prompt is the drop rate, and
    # no image->text sample looks unconditional
    assert all(s.ids[1] == fmt.tok.i2t_id for s in samples if s.task == "i2t")


def test_format_rejects_empty_caption_and_overlong(fmt):
    with pytest.raises(ValueError, match="empty caption"):
        fmt.build(torch.zeros(16, dtype=torch.long), "  ", random.Random(0))
    with pytest.raises(ValueError, match="sample 7.*exceeds max_len 60"):
        fmt.build(torch.zeros(80, dtype=torch.long), "a", random.Random(0), where="sample 7")
    with pytest.raises(ValueError, match="p_drop_caption"):
        SequenceConfig(p_drop_caption=1.5)


def _shapes_jsonl(tmp_path, n: int):
    """n tiny images, each with its index in its caption, plus a blank line and a bad record (skipped)."""
    lines = []
    for i in range(n):
        _png(tmp_path / f"{i}.png", value=i % 256, size=(4, 4))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"image {i}"}))
        if i == 2:
            lines += ["", json.dumps({"caption": "no image"})]
    p = tmp_path / "many.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_is_read_on_demand_and_subsets_stay_lazy(tmp_path):
    import pickle

    from train.sources import BadSamples, Lazy

    bad = BadSamples("skip")
    d = load_source("jsonl", str(_shapes_jsonl(tmp_path, 8)), bad)
    assert len(d) == 8 and bad.skipped == [f"{tmp_path / 'many.jsonl'}:5: no 'image' field"]
    assert isinstance(d.items, Lazy) and isinstance(d.captions, Lazy)
    sub = d.subset([6, 3])
    assert isinstance(sub.items, Lazy) and list(sub.captions) == [["image 6"], ["image 3"]]
    assert sub.where(1) == f"{tmp_path / 'many.jsonl'}:6"  # lines 4-5 are the blank line and the bad record
    # a value written after indexing is what is read: records are not held in memory
    (tmp_path / "3.png").unlink()
    _png(tmp_path / "3.png", value=200, size=(4, 4))
    assert sub.image(1, 1, 4).max().item() == pytest.approx(200 / 127.5 - 1)
    again = pickle.loads(pickle.dumps(sub))  # DataLoader workers get the index, not the data
    assert list(again.captions) == list(sub.captions)


def test_webdataset_index_reads_members_on_demand(tmp_path):
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(buf, format="PNG")
            for name, data in ((f"k{i}.png", buf.getvalue()), (f"k{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    w = load_source("wds", str(tmp_path / "s-*.tar")).subset([4, 1])
    assert list(w.captions) == [["caption 4"], ["caption 1"]]
    assert w.where(0) == f"{shard}:k4" and w.where(1) == f"{shard}:k1"
    assert w.image(0, 1, 4).max().item() == pytest.approx(160 / 127.5 - 1)


def test_holdout_is_a_count_or_a_share():
    from train.datamodules import holdout_count

    assert holdout_count(1500, 5000) == 1500 and holdout_count(0.1, 5000) == 500 and holdout_count(0.1, 3) == 1
    assert holdout_count(0, 10) == 0 and holdout_count(3.0, 10) == 3
    for bad in (10, -1, 2.5, -0.2):
        with pytest.raises(ValueError, match="holdout"):
            holdout_count(bad, 10)


def test_image_facts_come_from_the_tokenizer_and_mismatches_are_refused():
    from train.datamodules import ImageDataModule, check_image_facts
    from train.tokenizer_module import VQTokenizerModule
    from vision_tokenizers.vq import VQConfig

    model = VQTokenizerModule(VQConfig(in_channels=3, image_size=16, channels=[8, 8], latent_dim=4, codebook_size=8))
    dm = ImageDataModule("digits")
    check_image_facts(model, dm)
    assert (dm.channels, dm.image_size) == (3, 16)
    with pytest.raises(ValueError, match="data.channels is 1 but the model's tokenizer has in_channels 3"):
        check_image_facts(model, ImageDataModule("digits", channels=1))
