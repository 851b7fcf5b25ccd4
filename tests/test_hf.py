"""Hugging Face interchange: logits match transformers both ways (Llama, Qwen2, Mistral), errors are clear."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from models.config import LMConfig
from models.hf import config_from_hf, extend_vocab, load_hf, save_hf
from models.transformer import Transformer

V = 128
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
TOL = dict(atol=1e-5, rtol=1e-5)


def _hf_model(kind: str, tied: bool, **extra):
    """A tiny random HF model with every weight, norm and bias random (zero biases would hide bugs)."""
    torch.manual_seed(0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}
    config = cls[0](**SIZES, **rope, tie_word_embeddings=tied, **extra)
    config._attn_implementation = "eager"
    model = cls[1](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.15)  # large enough that attention is peaked, so RoPE/GQA bugs show
    return model


def _ids(b=2, t=11):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = [("llama", False, {}), ("llama", True, {}), ("qwen2", True, {}), ("mistral", False, {"sliding_window": None})]


@pytest.mark.parametrize("kind,tied,extra", CASES, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t, _ in CASES])
def test_hf_to_ours_and_back(tmp_path, kind, tied, extra):
    hf = _hf_model(kind, tied, **extra)
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_hf(tmp_path / "hf")
    assert cfg.tie_embeddings == tied and cfg.n_kv_heads == 2 and cfg.rope_theta == 5000.0
    assert cfg.qkv_bias == (kind == "qwen2")
    assert (ours.head.weight is ours.tok_emb.weight) == tied
    ids = _ids()
    want = _hf_logits(hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.head(ours(ids)), want, **TOL)

    save_hf(ours, tmp_path / "ours", arch=kind)
    files = load_file(tmp_path / "ours" / "model.safetensors")
    assert ("lm_head.weight" in files) == (not tied)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(_hf_logits(back, ids), want, **TOL)


def test_sharded_both_ways(tmp_path):
    hf = _hf_model("qwen2", tied=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours, _ = load_hf(tmp_path / "hf")
    ids = _ids()
    want = _hf_logits(hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.head(ours(ids)), want, **TOL)

    save_hf(ours, tmp_path / "ours", max_shard_bytes=20_000)
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    torch.testing.assert_close(_hf_logits(back, ids), want, **TOL)
    again, _ = load_hf(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again.head(again(ids)), want, **TOL)


def test_our_model_exports_as_each_arch(tmp_path):
    """A random model of ours (with q/k/v biases) exports exactly as qwen2 and as llama (zero o_proj bias)."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96, qkv_bias=True,
                   rope_theta=20000.0, max_len=64)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.5 if p.dim() == 1 else 0, 0.15)
    ids = _ids()
    with torch.no_grad():
        want = ours.head(ours(ids))
    for arch in ("qwen2", "llama"):
        save_hf(ours, tmp_path / arch, arch=arch, eos_token_id=3)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch, attn_implementation="eager")
        assert hf.config.model_type == arch and hf.config.eos_token_id == 3
        torch.testing.assert_close(_hf_logits(hf.eval(), ids), want, **TOL)
    with pytest.raises(ValueError, match="mistral"):
        save_hf(ours, tmp_path / "mistral", arch="mistral")
    assert not (tmp_path / "mistral").exists()


def test_config_round_trip_and_rejections():
    base = transformers.MistralConfig(**SIZES, sliding_window=None).to_dict()
    cfg = config_from_hf(base)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_dim, cfg.max_len) == (64, 4, 2, 96, 64)
    assert cfg.rope_theta == 10000.0 and cfg.norm_eps == 1e-6 and not cfg.qkv_bias
    assert config_from_hf({**base, "sliding_window": 16}).max_len == 16  # windowed attention only agrees within it
    old_style = {**base, "rope_theta": 1e6}
    del old_style["rope_parameters"]
    assert config_from_hf(old_style).rope_theta == 1e6  # transformers 4 config.json
    with pytest.raises(ValueError, match="gemma"):
        config_from_hf({**base, "model_type": "gemma"})
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(ValueError, match="linear"):
        config_from_hf({**old_style, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_extend_vocab_keeps_old_rows(tmp_path):
    for tied in (False, True):
        torch.manual_seed(0)
        model = Transformer(LMConfig.from_preset("tiny", vocab_size=V, tie_embeddings=tied)).eval()
        emb, head = model.tok_emb.weight.detach().clone(), model.head.weight.detach().clone()
        ids = _ids()
        with torch.no_grad():
            before = model.head(model(ids))
        extend_vocab(model, V + 10)
        assert model.cfg.vocab_size == V + 10 and model.tok_emb.weight.shape == (V + 10, 64)
        assert model.head.weight.shape == (V + 10, 64) and model.head.out_features == V + 10
        assert (model.head.weight is model.tok_emb.weight) == tied
        assert torch.equal(model.tok_emb.weight[:V], emb) and torch.equal(model.head.weight[:V], head)
        torch.testing.assert_close(model.tok_emb.weight[V:], emb.mean(0).expand(10, -1))
        with torch.no_grad():
            after = model.head(model(ids))
        torch.testing.assert_close(after[..., :V], before, atol=0, rtol=0)
        save_hf(model, tmp_path / str(tied))
        again, cfg = load_hf(tmp_path / str(tied))
        assert cfg.vocab_size == V + 10
        with pytest.raises(ValueError, match="smaller"):
            extend_vocab(model, V)


def test_llama_attention_bias_needs_zero_o_proj_bias(tmp_path):
    hf = _hf_model("llama", tied=False, attention_bias=True)
    hf.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(ValueError, match=r"^model\.safetensors: model\.layers\.0\.self_attn\.o_proj\.bias is nonzero"):
        load_hf(tmp_path / "nonzero")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    hf.save_pretrained(tmp_path / "zero")
    ours, cfg = load_hf(tmp_path / "zero")
    assert cfg.qkv_bias
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.head(ours(ids)), _hf_logits(hf, ids), **TOL)


@pytest.fixture
def llama_folder(tmp_path):
    _hf_model("llama", tied=False).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_config_shape_mismatch_names_file_and_key(llama_folder):
    cfg_path = llama_folder / "config.json"
    config = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError) as e:
        load_hf(llama_folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.safetensors: model.layers.0.mlp.gate_proj.weight")
    assert "has shape (96, 64), expected (48, 64)" in msg


def test_missing_and_unexpected_tensor_named(llama_folder):
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^model\.safetensors: missing tensor model\.layers\.1\.self_attn\.k_proj"):
        load_hf(llama_folder)
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.q_proj"):
        load_hf(llama_folder)


def test_missing_files_are_clear(tmp_path, llama_folder):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(llama_folder)


def test_save_is_atomic_and_copies_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    tok_path = tmp_path / "tok.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tok_path))
    model = Transformer(LMConfig.from_preset("tiny"))
    out = tmp_path / "out"
    save_hf(model, out, tokenizer_json=tok_path)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("b") == 1
    with pytest.raises(FileExistsError):
        save_hf(model, out)
    model.blocks[0].attn.qkv.weight = None  # make the export fail midway
    with pytest.raises(Exception):
        save_hf(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tok.json"]  # no temp folder left behind
    assert load_hf(out)[1].vocab_size == 256  # the old checkpoint is intact
    model.blocks[0].attn.qkv.weight = model.blocks[1].attn.qkv.weight
    save_hf(model, out, overwrite=True)
    assert not (out / "tokenizer.json").exists()


def test_lm_recipe_starts_from_a_hf_folder(tmp_path, tiny_vq_path):
    """`hf_init` in the LM recipe: a tiny random Llama (with its tokenizer.json) becomes the backbone; its
    vocabulary grows by our special and image tokens, its old rows kept exactly; a short fit trains it."""
    from models.text_tokenizer import TextTokenizer
    from train.datamodules import ImageTextDataModule
    from train.lm_module import MultimodalLMModule
    from train.sources import DIGIT_WORDS, digit_captions

    from conftest import LossRecorder, make_trainer

    base = TextTokenizer.train_bpe([c for d in range(10) for c in digit_captions(d)] + DIGIT_WORDS, 100).tok
    n_text = base.get_vocab_size()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SIZES, "vocab_size": n_text})
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    base.save(str(tmp_path / "hf" / "tokenizer.json"))

    dm = ImageTextDataModule(str(tiny_vq_path), source="digits", holdout=200, batch_size=16, max_len=48,
                             text_tokenizer=str(tmp_path / "hf" / "tokenizer.json"), cache_dir=str(tmp_path / "c"))
    assert dm.tokenizer.encode("a handwritten 3") == base.encode("a handwritten 3", add_special_tokens=False).ids
    module = MultimodalLMModule(dm.spec, hf_init=str(tmp_path / "hf"), lr=3e-3, warmup_steps=2)
    module.configure_model()
    lm = module.lm
    assert lm.cfg.vocab_size == dm.layout.size > n_text and lm.cfg.dim == SIZES["hidden_size"]
    torch.testing.assert_close(lm.tok_emb.weight[:n_text], hf.model.embed_tokens.weight)
    ids = torch.randint(0, n_text, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.head(lm(ids))[..., :n_text], _hf_logits(hf, ids), **TOL)
    rec = LossRecorder()
    make_trainer(tmp_path, 30, [rec]).fit(module, dm)
    assert sum(rec.losses[-5:]) / 5 < sum(rec.losses[:3]) / 3
