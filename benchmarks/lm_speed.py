"""Speed of our decoder against Hugging Face's LlamaForCausalLM holding the same weights (CPU, fp32).

    .venv/bin/python -m benchmarks.lm_speed            # full run, writes benchmarks/results/lm_speed.json
    .venv/bin/python -m benchmarks.lm_speed --compile  # our decode step through torch.compile as well

Measures (ours and theirs alternate inside every repeat; the reported ratio is the median of the
per-repeat ratios ours/theirs, so background load hits both sides alike):
1. training tokens/s: forward + cross-entropy + backward + AdamW step, batch 16 x 256 tokens;
2. KV-cached sampling tokens/s: batch 8, 16-token prompt, 256 new tokens, top-k 100, temperature 1;
3. an fp32 matmul peak (2048^3 torch.mm) and the training GFLOP/s of both models as a share of it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from generate.sampling import generate, make_step_fn
from models.config import LMConfig
from models.transformer import Transformer

RESULTS = Path(__file__).resolve().parent / "results" / "lm_speed.json"

# The shape under test: hidden 256, 4 layers, 8 heads (head dim 32), SwiGLU 688, vocabulary 2048.
VOCAB, DIM, LAYERS, HEADS, MLP = 2048, 256, 4, 8, 688
TRAIN_BATCH, TRAIN_LEN = 16, 256
DEC_BATCH, DEC_PROMPT, DEC_NEW, DEC_TOP_K = 8, 16, 256, 100
MAX_LEN = 512


# ---------------------------------------------------------------------------------------------
# Models with shared weights
# ---------------------------------------------------------------------------------------------

def build_models(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    hf_cfg._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_cfg)
    cfg = LMConfig(vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, mlp_dim=MLP,
                   rope_theta=10000.0, norm_eps=1e-5, max_len=MAX_LEN)
    ours = Transformer(cfg)
    copy_hf_weights(theirs, ours)
    return ours, theirs


@torch.no_grad()
def copy_hf_weights(hf, ours: Transformer) -> None:
    """Copy a LlamaForCausalLM's weights into our Transformer (fused qkv and gate_up projections)."""
    src = hf.model
    ours.tok_emb.weight.copy_(src.embed_tokens.weight)
    ours.norm.weight.copy_(src.norm.weight)
    ours.head.weight.copy_(hf.lm_head.weight)
    for layer, blk in zip(src.layers, ours.blocks):
        a, m = layer.self_attn, layer.mlp
        blk.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0))
        blk.attn.proj.weight.copy_(a.o_proj.weight)
        blk.mlp.gate_up.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0))
        blk.mlp.down.weight.copy_(m.down_proj.weight)
        blk.attn_norm.weight.copy_(layer.input_layernorm.weight)
        blk.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)


@torch.no_grad()
def check_same_function(ours, theirs) -> float:
    """Both models must compute the same logits (full sequence and KV-cached steps)."""
    ours.eval(), theirs.eval()
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    a, b = ours(ids), theirs(ids).logits
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    cache = ours.new_cache(2, 64)
    stepped = torch.cat([ours(ids[:, :48], cache=cache)] + [ours(ids[:, i:i + 1], cache=cache) for i in range(48, 64)], 1)
    torch.testing.assert_close(stepped, b, atol=2e-4, rtol=1e-4)
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------

def non_embedding_params(ours: Transformer) -> int:
    """All weights except the input embedding table (a lookup, no FLOPs); the lm head is counted."""
    return ours.num_params() - ours.tok_emb.weight.numel()


def train_flops_per_step(n_params: int, batch: int, seq: int) -> float:
    """Training FLOPs of one step (PaLM appendix B convention, forward + backward = 3x forward):

        6 * N * tokens  +  12 * n_layers * dim * seq * tokens

    N = non-embedding parameters (each weight: 1 multiply-add forward, 2 backward), tokens = batch * seq;
    the second term is attention scores QK^T and the weighted sum AV (2 * 2 * seq * dim per token and
    layer forward, times 3), counted over the full seq x seq square as PaLM does (no causal halving).
    """
    tokens = batch * seq
    return 6.0 * n_params * tokens + 12.0 * LAYERS * DIM * seq * tokens


def matmul_peak_gflops(n: int = 2048, reps: int = 8) -> float:
    """Best-of-reps fp32 torch.mm GFLOP/s on n x n @ n x n (the practical peak of this machine)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(times) / 1e9


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def make_train_step(model, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step(ids: torch.Tensor) -> float:
        inp, tgt = ids[:, :-1], ids[:, 1:]
        logits = model(inp).logits if hf else model(inp)  # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_train(ours, theirs, repeats: int, steps: int, warmup: int) -> dict:
    ours.train(), theirs.train()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (TRAIN_BATCH, TRAIN_LEN + 1), generator=g) for _ in range(steps)]
    fns = {"ours": make_train_step(ours, hf=False), "theirs": make_train_step(theirs, hf=True)}
    tps = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for name in order:
            fn = fns[name]
            for i in range(warmup):
                fn(batches[i % steps])
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            tps[name].append(steps * TRAIN_BATCH * TRAIN_LEN / (time.perf_counter() - t0))
    ours.eval(), theirs.eval()
    return tps


# ---------------------------------------------------------------------------------------------
# KV-cached sampling
# ---------------------------------------------------------------------------------------------

def hf_generate(theirs, prompt, new_tokens, cache_impl, seed):
    torch.manual_seed(seed)
    kw = {"cache_implementation": cache_impl} if cache_impl else {}
    out = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=DEC_TOP_K,
        top_p=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None, **kw,
    )
    return out[:, prompt.shape[1]:]


def pick_hf_cache(theirs, prompt, new_tokens) -> tuple[str | None, dict]:
    """Time HF's dynamic and static caches a few times each and keep the faster (fair to them)."""
    times = {}
    for impl in (None, "static"):
        try:
            hf_generate(theirs, prompt, new_tokens, impl, 0)  # warmup
            ts = []
            for s in range(3):
                t0 = time.perf_counter()
                out = hf_generate(theirs, prompt, new_tokens, impl, s)
                ts.append(time.perf_counter() - t0)
            assert out.shape == (prompt.shape[0], new_tokens), out.shape
            times[impl or "dynamic"] = statistics.median(ts)
        except Exception as e:  # static cache may be unsupported for some setups
            print(f"  HF cache {impl or 'dynamic'!r} failed: {type(e).__name__}: {e}")
    best = min(times, key=times.get)
    return (None if best == "dynamic" else best), times


def bench_decode(ours, theirs, repeats: int, new_tokens: int, step_fn=None) -> dict:
    ours.eval(), theirs.eval()
    prompt = torch.randint(3, VOCAB, (DEC_BATCH, DEC_PROMPT), generator=torch.Generator().manual_seed(3))
    cache_impl, cache_times = pick_hf_cache(theirs, prompt, new_tokens)

    def run_ours(seed):
        out = generate(ours, prompt, new_tokens, temperature=1.0, top_k=DEC_TOP_K,
                       generator=torch.Generator().manual_seed(seed), step_fn=step_fn)
        assert out.shape == (DEC_BATCH, new_tokens)

    def run_theirs(seed):
        hf_generate(theirs, prompt, new_tokens, cache_impl, seed)

    fns = {"ours": run_ours, "theirs": run_theirs}
    for fn in fns.values():
        fn(0)  # warmup
    tps = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for name in order:
            t0 = time.perf_counter()
            fns[name](r)
            tps[name].append(DEC_BATCH * new_tokens / (time.perf_counter() - t0))
    tps["hf_cache"] = cache_impl or "dynamic"
    tps["hf_cache_times"] = cache_times
    return tps


# ---------------------------------------------------------------------------------------------

def ratio_median(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(o / t for o, t in zip(ours, theirs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps per repeat and model")
    ap.add_argument("--train-warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=DEC_NEW)
    ap.add_argument("--compile", action="store_true", help="also time our decode step under torch.compile")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ours, theirs = build_models()
    n_params = non_embedding_params(ours)
    max_diff = check_same_function(ours, theirs)
    print(f"same weights: max |logit diff| = {max_diff:.2e} ({n_params / 1e6:.2f}M non-embedding params, "
          f"{ours.num_params() / 1e6:.2f}M total)")

    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048^3 torch.mm, {args.threads} threads): {peak:.1f} GFLOP/s")

    res: dict = {}
    rows = []
    if not args.skip_train:
        tr = bench_train(ours, theirs, args.repeats, args.train_steps, args.train_warmup)
        flops = train_flops_per_step(n_params, TRAIN_BATCH, TRAIN_LEN) / (TRAIN_BATCH * TRAIN_LEN)  # per token
        o, t = statistics.median(tr["ours"]), statistics.median(tr["theirs"])
        res.update(
            train_tokens_per_s_ours=o, train_tokens_per_s_theirs=t,
            train_tokens_per_s_ratio=ratio_median(tr["ours"], tr["theirs"]),
            train_gflop_per_token=flops / 1e9,
            train_gflops_ours=o * flops / 1e9, train_gflops_theirs=t * flops / 1e9,
            train_peak_share_ours=o * flops / 1e9 / peak, train_peak_share_theirs=t * flops / 1e9 / peak,
            train_repeats=args.repeats, train_steps_per_repeat=args.train_steps,
        )
        rows.append(("train tokens/s (16x256, AdamW)", o, t, res["train_tokens_per_s_ratio"]))
        rows.append(("train GFLOP/s", res["train_gflops_ours"], res["train_gflops_theirs"], None))
        rows.append(("train share of matmul peak", res["train_peak_share_ours"], res["train_peak_share_theirs"], None))

    if not args.skip_decode:
        de = bench_decode(ours, theirs, args.repeats, args.new_tokens)
        o, t = statistics.median(de["ours"]), statistics.median(de["theirs"])
        res.update(
            decode_tokens_per_s_ours=o, decode_tokens_per_s_theirs=t,
            decode_tokens_per_s_ratio=ratio_median(de["ours"], de["theirs"]),
            decode_hf_cache=de["hf_cache"],
            **{f"decode_hf_{k}_cache_s": v for k, v in de["hf_cache_times"].items()},
            decode_repeats=args.repeats, decode_new_tokens=args.new_tokens,
        )
        rows.append((f"decode tokens/s (8x{args.new_tokens}, top-k {DEC_TOP_K}; HF {de['hf_cache']} cache)",
                     o, t, res["decode_tokens_per_s_ratio"]))
        if args.compile:
            t0 = time.perf_counter()
            step_fn = make_step_fn(ours, compile=True)
            generate(ours, torch.randint(3, VOCAB, (DEC_BATCH, DEC_PROMPT)), args.new_tokens, top_k=DEC_TOP_K,
                     step_fn=step_fn)  # compiles
            compile_s = time.perf_counter() - t0
            dc = bench_decode(ours, theirs, args.repeats, args.new_tokens, step_fn=step_fn)
            o, t = statistics.median(dc["ours"]), statistics.median(dc["theirs"])
            res.update(
                decode_compiled_tokens_per_s_ours=o, decode_compiled_tokens_per_s_theirs=t,
                decode_compiled_tokens_per_s_ratio=ratio_median(dc["ours"], dc["theirs"]),
                decode_compile_s=compile_s,
            )
            rows.append(("decode tokens/s, ours torch.compile'd", o, t, res["decode_compiled_tokens_per_s_ratio"]))

    wall = time.perf_counter() - t_start
    res.update(
        matmul_peak_gflops=peak, non_embedding_params=n_params, max_logit_diff=max_diff,
        platform=platform.platform(), machine=platform.machine(), processor=platform.processor(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        transformers_version=__import__("transformers").__version__, python_version=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_s=wall,
    )

    print(f"\n{'metric':<58}{'ours':>12}{'theirs':>12}{'ours/theirs':>13}")
    for name, o, t, r in rows:
        fmt = "{:>12.3f}" if o < 10 else "{:>12.1f}"
        print(f"{name:<58}" + fmt.format(o) + fmt.format(t) + (f"{r:>13.3f}" if r is not None else ""))
    print(f"(ratios: median over {args.repeats} alternating repeats; wall time {wall:.0f} s)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
