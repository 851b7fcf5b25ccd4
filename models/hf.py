"""Hugging Face checkpoint interchange for our Transformer: Llama, Qwen2 and Mistral.

`load_hf` reads a `save_pretrained` folder (config.json + safetensors, single file or sharded) into a
Transformer; `save_hf` writes one that `AutoModelForCausalLM.from_pretrained` reads back. Our q/k/v
and gate/up projections are fused, so loading concatenates the HF tensors and saving splits them.
Both checkpoints use the same "rotate half" RoPE layout, so no row permutation is needed.
Weights are read with safetensors only: pickle checkpoints (pytorch_model.bin) are refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common.weights import atomic_dir
from models.config import LMConfig
from models.transformer import RotaryEmbedding, Transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# Tensors some checkpoints carry that hold no weights (old Llama exports saved RoPE's inv_freq).
_IGNORED_SUFFIXES = (".self_attn.rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------- config


def _rope_theta(hf: dict) -> float:
    """RoPE base, from transformers 5's `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`.

    Only plain RoPE is supported: our RotaryEmbedding has no linear/dynamic/yarn/llama3 scaling, so a
    scaled checkpoint would silently compute different positions.
    """
    theta = hf.get("rope_theta")
    for field in ("rope_parameters", "rope_scaling"):
        params = hf.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"config.json: unsupported {field} {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config.json: unsupported RoPE scaling {field}.rope_type={kind!r} (only 'default')")
        theta = params.get("rope_theta", theta)
    return float(theta if theta is not None else 10000.0)


def config_from_hf(hf_config: dict) -> LMConfig:
    """LMConfig for a Hugging Face config.json dict (model_type llama, qwen2 or mistral).

    Raises ValueError for anything our decoder cannot compute exactly (other architectures, RoPE
    scaling, a head_dim that is not hidden_size / num_attention_heads, a non-SiLU MLP, MLP biases).
    Sliding-window attention is not implemented, so max_len is capped at the window: within it,
    sliding and full attention agree.
    """
    hf = hf_config
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.json: unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing {', '.join(missing)}")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and n_heads * int(head_dim) != dim:
        raise ValueError(f"config.json: head_dim {head_dim} != hidden_size {dim} / num_attention_heads {n_heads}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json: unsupported hidden_act {act!r} (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError("config.json: unsupported mlp_bias=true")
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        max_len = min(max_len, int(window))
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and never an o_proj bias
    elif model_type == "llama":
        qkv_bias = bool(hf.get("attention_bias", False))  # also adds an o_proj bias, which must be zero
    else:
        qkv_bias = False
    return LMConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        mlp_dim=int(hf["intermediate_size"]),
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_len=max_len,
    )


def _hf_config(cfg: LMConfig, arch: str, dtype: torch.dtype, bos_token_id, eos_token_id) -> dict:
    """config.json contents for `arch`; writes RoPE both ways so transformers 4 and 5 read the same theta."""
    out = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_len,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
    elif arch == "qwen2":
        del out["head_dim"]  # Qwen2 derives it
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        out.update(sliding_window=None)
    # Written even when None: otherwise transformers fills in its own defaults (Llama: 1 and 2).
    out.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return out


# ---------------------------------------------------------------------------------------------- names


def _hf_shapes(cfg: LMConfig, o_bias: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config must hold, with its shape (lm_head absent when tied)."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.mlp_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (rows, d)
            if cfg.qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (q|k|v and gate|up concatenated along the output rows)."""
    sd = {"tok_emb.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        sd[o + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        sd[o + "attn.qkv.weight"] = torch.cat([hf[a + f"{n}_proj.weight"] for n in "qkv"])
        if cfg.qkv_bias:
            sd[o + "attn.qkv.bias"] = torch.cat([hf[a + f"{n}_proj.bias"] for n in "qkv"])
        sd[o + "attn.proj.weight"] = hf[a + "o_proj.weight"]
        sd[o + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        sd[o + "mlp.gate_up.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        sd[o + "mlp.down.weight"] = hf[p + "mlp.down_proj.weight"]
    sd["head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return sd


def _to_hf(model: Transformer, qkv_bias: bool, o_bias: bool) -> dict[str, torch.Tensor]:
    """Our parameters -> HF tensors, split and cloned (safetensors refuses views sharing storage).

    `qkv_bias` / `o_bias` say which biases the target architecture has; missing ones are written as zeros.
    """
    cfg = model.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", copy=True).contiguous()

    out = {"model.embed_tokens.weight": t(model.tok_emb.weight)}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = t(blk.attn_norm.weight)
        for n, w in zip("qkv", blk.attn.qkv.weight.split((q, kv, kv))):
            out[a + f"{n}_proj.weight"] = t(w)
        if qkv_bias:
            bias = blk.attn.qkv.bias
            if bias is None:
                bias = blk.attn.qkv.weight.new_zeros(q + 2 * kv)
            for n, b in zip("qkv", bias.split((q, kv, kv))):
                out[a + f"{n}_proj.bias"] = t(b)
        out[a + "o_proj.weight"] = t(blk.attn.proj.weight)
        if o_bias:
            out[a + "o_proj.bias"] = blk.attn.proj.weight.new_zeros(cfg.dim).cpu()
        out[p + "post_attention_layernorm.weight"] = t(blk.mlp_norm.weight)
        gate, up = blk.mlp.gate_up.weight.chunk(2)
        out[p + "mlp.gate_proj.weight"] = t(gate)
        out[p + "mlp.up_proj.weight"] = t(up)
        out[p + "mlp.down_proj.weight"] = t(blk.mlp.down.weight)
    out["model.norm.weight"] = t(model.norm.weight)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t(model.head.weight)
    return out


# ---------------------------------------------------------------------------------------------- load


def _weight_files(folder: Path) -> tuple[dict[str, str], str]:
    """Map each tensor name to the file holding it; also return the file to blame for missing tensors."""
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {k: WEIGHTS for k in f.keys()}, WEIGHTS
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{INDEX}: not a safetensors index ({e})") from None
        names: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard}: shard listed in {INDEX} does not exist")
            with safe_open(folder / shard, framework="pt") as f:
                for k in f.keys():
                    names[k] = shard
        for k, shard in weight_map.items():
            if names.get(k) != shard:
                raise ValueError(f"{shard}: {k} is listed in {INDEX} but not stored in this shard")
        return names, INDEX
    if any((folder / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise FileNotFoundError(f"{folder}: only pickle weights (pytorch_model.bin) found; "
                                f"convert them to {WEIGHTS} (pickle is never loaded)")
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS} nor {INDEX} exists")


def _check(names: dict[str, str], expected: dict[str, tuple[int, ...]], blame: str, folder: Path,
           model_type: str) -> None:
    """Raise one ValueError line naming the first (in model order) missing, wrongly shaped or unexpected tensor."""
    wanted = dict(expected)
    if "lm_head.weight" not in expected and "lm_head.weight" in names:  # tied, but stored anyway: ignored
        wanted["lm_head.weight"] = expected["model.embed_tokens.weight"]
    problems = []
    with contextlib.ExitStack() as stack:
        opened: dict[str, object] = {}
        for k, want in wanted.items():
            if k not in names:
                problems.append(f"{blame}: missing tensor {k} (expected shape {want})")
                continue
            file = names[k]
            if file not in opened:
                opened[file] = stack.enter_context(safe_open(folder / file, framework="pt"))
            shape = tuple(opened[file].get_slice(k).get_shape())
            if shape != want:
                problems.append(f"{file}: {k} has shape {shape}, expected {want} for this config")
    for k, file in names.items():
        if k not in wanted and not k.endswith(_IGNORED_SUFFIXES):
            problems.append(f"{file}: unexpected tensor {k} for a {model_type} model with this config")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def load_hf(folder: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> tuple[Transformer, LMConfig]:
    """Load a Llama/Qwen2/Mistral `save_pretrained` folder into our Transformer (eval mode).

    Every tensor name and shape is checked against config.json before any weight is read; the first
    problem is raised as a one-line ValueError naming the file and the tensor. The model is built on
    the meta device and the loaded tensors are assigned to it, so no time goes into a random init
    that would be overwritten. `dtype=None` keeps the checkpoint's dtype.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG}: missing (not a Hugging Face checkpoint folder?)")
    hf_config = json.loads((folder / CONFIG).read_text())
    cfg = config_from_hf(hf_config)
    o_bias = hf_config["model_type"] == "llama" and bool(hf_config.get("attention_bias", False))
    names, blame = _weight_files(folder)
    expected = _hf_shapes(cfg, o_bias)
    _check(names, expected, blame, folder, hf_config["model_type"])

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({names[k] for k in expected}):
        with safe_open(folder / file, framework="pt") as f:
            for k in expected:
                if names[k] == file:
                    x = f.get_tensor(k)
                    if not x.is_floating_point():
                        raise ValueError(f"{file}: {k} has dtype {x.dtype}, expected a floating-point tensor")
                    tensors[k] = x if dtype is None else x.to(dtype)
    if o_bias:
        for i in range(cfg.n_layers):
            k = f"model.layers.{i}.self_attn.o_proj.bias"
            if tensors[k].any():
                raise ValueError(f"{names[k]}: {k} is nonzero; our attention output projection has no bias")

    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state_dict_from_hf(tensors, cfg), strict=True, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.tok_emb.weight
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)  # non-persistent buffer: rebuild off meta
    left = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if left:
        raise RuntimeError(f"load_hf: tensors left uninitialised on the meta device: {left}")
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------- save


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, x in tensors.items():
        n = x.numel() * x.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = x
        size += n
    return shards


def save_hf(
    model: Transformer,
    folder: str | os.PathLike,
    arch: str | None = None,
    max_shard_bytes: int | None = None,
    tokenizer_json: str | os.PathLike | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face checkpoint folder that AutoModelForCausalLM loads.

    arch: "llama", "qwen2" or "mistral"; None picks qwen2 for q/k/v biases, else llama. Biases the
    target has but we lack are written as zeros (Qwen2 q/k/v, Llama's o_proj with attention_bias),
    which is exact; mistral cannot hold nonzero q/k/v biases. Tied embeddings write no lm_head.
    max_shard_bytes splits the weights into shards plus model.safetensors.index.json.
    Everything is written to a temporary folder beside `folder` and renamed into place, so a crash
    never leaves a half-written folder; an existing non-empty folder is replaced only with overwrite.
    """
    cfg = model.cfg
    arch = arch or ("qwen2" if cfg.qkv_bias else "llama")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported arch {arch!r}; choose from {sorted(ARCHITECTURES)}")
    if cfg.tie_embeddings and model.head.weight is not model.tok_emb.weight:
        raise ValueError("cfg.tie_embeddings is set but head.weight is not tok_emb.weight")
    has_bias = cfg.qkv_bias and model.blocks[0].attn.qkv.bias is not None
    if arch == "mistral" and has_bias and any(b.attn.qkv.bias.any() for b in model.blocks):
        raise ValueError("arch 'mistral' has no q/k/v biases but this model's are nonzero; use 'qwen2' or 'llama'")
    qkv_bias = arch == "qwen2" or (arch == "llama" and has_bias)
    hf_cfg = dataclasses.replace(cfg, qkv_bias=qkv_bias)
    dtype = model.tok_emb.weight.dtype
    config = _hf_config(hf_cfg, arch, dtype, bos_token_id, eos_token_id)
    tensors = _to_hf(model, qkv_bias=qkv_bias, o_bias=arch == "llama" and qkv_bias)

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder}: exists and is not empty (pass overwrite=True to replace it)")
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        meta = {"format": "pt"}
        if max_shard_bytes is None:
            save_file(tensors, tmp / WEIGHTS, metadata=meta)
        else:
            shards = _shards(tensors, max_shard_bytes)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata=meta)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(x.numel() * x.element_size() for x in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / TOKENIZER)
    return folder


# ---------------------------------------------------------------------------------------------- vocab


@torch.no_grad()
def extend_vocab(model: Transformer, new_size: int) -> Transformer:
    """Grow tok_emb and head to `new_size` rows in place (e.g. to add image tokens to a text LM).

    Old rows are kept exactly, so logits of old tokens do not change; new rows start at the mean of
    the old rows, which keeps the new tokens' initial logits near the average instead of random.
    Tying is kept. Updates model.cfg.vocab_size and returns the model.
    """
    old = model.cfg.vocab_size
    if new_size < old:
        raise ValueError(f"extend_vocab: new_size {new_size} is smaller than the current vocabulary {old}")
    if new_size == old:
        return model

    def grown(w: torch.Tensor) -> torch.Tensor:
        extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(new_size - old, -1)
        return torch.cat([w, extra])

    emb = nn.Embedding(new_size, model.cfg.dim, device="meta")
    emb.weight = nn.Parameter(grown(model.tok_emb.weight), requires_grad=model.tok_emb.weight.requires_grad)
    head = nn.Linear(model.cfg.dim, new_size, bias=False, device="meta")
    if model.cfg.tie_embeddings:
        head.weight = emb.weight
    else:
        head.weight = nn.Parameter(grown(model.head.weight), requires_grad=model.head.weight.requires_grad)
    model.tok_emb, model.head = emb, head
    model.cfg.vocab_size = new_size
    return model
