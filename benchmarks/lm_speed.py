"""Speed of our decoder against Hugging Face's LlamaForCausalLM holding the same weights (CPU, fp32).

    .venv/bin/python -m benchmarks.lm_speed            # ~3 min, writes benchmarks/results/lm_speed.json
    .venv/bin/python -m benchmarks.lm_speed --compile  # also our torch.compile'd training and decoding

Shape: hidden 256, 4 layers, 8 heads, SwiGLU 688, vocabulary 2048, fp32, torch.set_num_threads(2).
Both models are checked to compute the same logits (full sequence and KV-cached) and the same
gradients before anything is timed. Measured, with ours and theirs alternating inside every repeat
(the order flips each repeat) so that background load hits both alike; each ratio is the median of
the per-repeat ratios ours/theirs:
1. training tokens/s: forward + cross-entropy + backward + AdamW step, batch 16 x 256 tokens;
2. KV-cached sampling tokens/s: batch 8, 16-token prompt, 256 new tokens, top-k 100, temperature 1;
   ours is models.sampling.generate, theirs is model.generate with whichever of its dynamic and
   static caches is faster here (both are timed first);
3. the product path: what generate.text_to_image runs, a guided batch with left padding (4 conditional
   prompts of 6-16 tokens + 4 unconditional ones of 3, cfg 3, only "image" ids allowed), 256 new tokens;
   theirs decodes the same 8 left-padded rows with its attention mask (no guidance: the same forward
   work per token, the guidance mix itself is one [4, V] operation);
4. an fp32 matmul peak (2048^3 torch.mm) and both models' training GFLOP/s as a share of it.
The load average is recorded: other processes on the machine slow both sides, not always equally.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import pyplot, write_report
from models.config import LMConfig
from models.hf import state_dict_from_hf
from models.sampling import generate, id_range_mask, left_pad, make_step_fn
from models.transformer import Transformer

RESULTS = Path(__file__).resolve().parent / "results" / "lm_speed.json"

VOCAB, DIM, LAYERS, HEADS, MLP = 2048, 256, 4, 8, 688
TRAIN_BATCH, TRAIN_LEN = 16, 256
DEC_BATCH, DEC_PROMPT, DEC_NEW, DEC_TOP_K = 8, 16, 256, 100
MAX_LEN = 512


# ---------------------------------------------------------------------------------------------
# Two models, one set of weights
# ---------------------------------------------------------------------------------------------

def build_models(seed: int = 0):
    """HF LlamaForCausalLM with its own random init, and our Transformer holding a copy of its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    hf_cfg._attn_implementation = "sdpa"  # transformers' default on CPU, stated explicitly
    theirs = LlamaForCausalLM(hf_cfg)
    cfg = LMConfig(vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, mlp_dim=MLP,
                   rope_theta=10000.0, norm_eps=1e-5, max_len=MAX_LEN)
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(theirs.state_dict(), cfg))  # the product's own HF conversion
    return ours, theirs


def check_same_function(ours, theirs) -> dict:
    """Same logits (full sequence, KV-cached steps, greedy decoding) and same gradients, or raise."""
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 65), generator=g)
    tol = dict(atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        lo, lt = ours.head(ours(ids)), theirs(ids).logits
        torch.testing.assert_close(lo, lt, **tol)
        cache = ours.new_cache(2, 65)
        stepped = [ours.head(ours(ids[:, :48], cache=cache))] + [ours.head(ours(ids[:, i:i + 1], cache=cache))
                                                                 for i in range(48, 65)]
        torch.testing.assert_close(torch.cat(stepped, 1), lt, **tol)
    prompt = ids[:, :DEC_PROMPT]
    greedy_ours = generate(ours, prompt, 16, temperature=0)
    greedy_theirs = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=16, min_new_tokens=16, pad_token_id=0)[:, DEC_PROMPT:]
    assert torch.equal(greedy_ours, greedy_theirs), "greedy decoding differs"

    def grads(model, hf):
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1]).logits if hf else model.head(model(ids[:, :-1]))
        F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()

    grads(ours, False), grads(theirs, True)
    pairs = [(ours.tok_emb.weight.grad, theirs.model.embed_tokens.weight.grad),
             (ours.head.weight.grad, theirs.lm_head.weight.grad), (ours.norm.weight.grad, theirs.model.norm.weight.grad)]
    for blk, layer in zip(ours.blocks, theirs.model.layers):
        a, m = layer.self_attn, layer.mlp
        pairs += [
            (blk.attn.qkv.weight.grad, torch.cat([a.q_proj.weight.grad, a.k_proj.weight.grad, a.v_proj.weight.grad])),
            (blk.attn.proj.weight.grad, a.o_proj.weight.grad),
            (blk.mlp.gate_up.weight.grad, torch.cat([m.gate_proj.weight.grad, m.up_proj.weight.grad])),
            (blk.mlp.down.weight.grad, m.down_proj.weight.grad),
            (blk.attn_norm.weight.grad, layer.input_layernorm.weight.grad),
            (blk.mlp_norm.weight.grad, layer.post_attention_layernorm.weight.grad),
        ]
    for x, y in pairs:
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-3)
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    return {"max_logit_diff": float((lo - lt).abs().max()),
            "max_grad_diff": max(float((x - y).abs().max()) for x, y in pairs)}


# ---------------------------------------------------------------------------------------------
# FLOPs and the matmul peak
# ---------------------------------------------------------------------------------------------

def non_embedding_params(ours: Transformer) -> int:
    """Every weight except the input embedding table (a lookup, no FLOPs); the lm head is counted."""
    return ours.num_params() - ours.tok_emb.weight.numel()


def train_flops_per_token(n_params: int, seq: int) -> float:
    """Training FLOPs per token (PaLM, appendix B; backward = 2 x forward):

        6 * N  +  12 * n_layers * dim * seq

    N = non-embedding parameters (a multiply-add per weight and token forward, two backward). The
    second term is attention's QK^T and AV (2 * 2 * seq * dim per token and layer forward, x3),
    counted over the full seq x seq square as PaLM does, although causal kernels skip about half.
    """
    return 6.0 * n_params + 12.0 * LAYERS * DIM * seq


def matmul_peak_gflops(n: int = 2048, reps: int = 6) -> float:
    """Best-of-reps fp32 torch.mm GFLOP/s on n x n @ n x n (the practical peak on this machine)."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------

def alternate(fns: dict, repeats: int, deadline: float, min_repeats: int = 3) -> dict[str, list[float]]:
    """Run every fn once per repeat, the order rotating, and collect the seconds each returns; stop
    early (after `min_repeats`) once past `deadline` (a perf_counter value) to stay within budget."""
    names, times = list(fns), {k: [] for k in fns}
    for r in range(repeats):
        if r >= min_repeats and time.perf_counter() > deadline:
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(fns[name]())
    return times


def timed(fn):
    """fn -> a function that runs fn and returns its wall time in seconds."""
    def run():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def ratio(times: dict, ours: str, theirs: str = "theirs") -> float:
    """Median over repeats of (tokens/s ours) / (tokens/s theirs) = t_theirs / t_ours."""
    return statistics.median(t / o for o, t in zip(times[ours], times[theirs]))


def ratio_of_medians(times: dict, ours: str, theirs: str = "theirs") -> dict:
    """(tokens/s ours) / (tokens/s theirs) from the median times, with the spread of the per-repeat ratios
    (min and max): what the table's own columns give."""
    per = [t / o for o, t in zip(times[ours], times[theirs])]
    return {"ratio": statistics.median(times[theirs]) / statistics.median(times[ours]),
            "min": min(per), "max": max(per), "repeats": len(per)}


# ---------------------------------------------------------------------------------------------
# 1. Training
# ---------------------------------------------------------------------------------------------

def make_train_step(model, hf: bool, compile: bool = False):
    """One AdamW step. `compile=True` (ours only) runs the loss computation (backbone + head +
    cross-entropy) through torch.compile(dynamic=True), as `compile: true` does in the LM recipe."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # same (default) settings for both

    def loss(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids[:, :-1]).logits if hf else model.head(model(ids[:, :-1]))  # [B, T, V]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    loss_fn = torch.compile(loss, dynamic=True) if compile else loss

    def step(ids: torch.Tensor) -> None:
        loss_fn(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(ours, theirs, repeats: int, steps: int, warmup: int, deadline: float, compiled: bool = False) -> dict:
    ours.train(), theirs.train()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (TRAIN_BATCH, TRAIN_LEN + 1), generator=g) for _ in range(steps)]
    steppers = {"ours": make_train_step(ours, hf=False), "theirs": make_train_step(theirs, hf=True)}
    if compiled:
        steppers["ours_compiled"] = make_train_step(ours, hf=False, compile=True)
    for fn in steppers.values():
        for i in range(warmup):
            fn(batches[i % steps])

    def repeat(fn):
        def run():
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            return time.perf_counter() - t0
        return run

    wall = alternate({k: repeat(fn) for k, fn in steppers.items()}, repeats, deadline)
    ours.eval(), theirs.eval()
    return wall


# ---------------------------------------------------------------------------------------------
# 2. KV-cached sampling
# ---------------------------------------------------------------------------------------------

def hf_generate(theirs, prompt, new_tokens: int, cache_impl: str | None, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    kw = {"cache_implementation": cache_impl} if cache_impl else {}
    out = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=DEC_TOP_K,
        top_p=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kw,
    )
    assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens), out.shape
    return out[:, prompt.shape[1]:]


def bench_decode(ours, theirs, repeats: int, new_tokens: int, deadline: float, compiled: dict | None = None) -> dict:
    """Our generate() (and with each compiled step in `compiled`, name -> step_fn) against HF generate
    with its dynamic and with its static cache, all in one alternating loop; the HF cache with the
    lower median time is the one compared."""
    ours.eval(), theirs.eval()
    prompt = torch.randint(3, VOCAB, (DEC_BATCH, DEC_PROMPT), generator=torch.Generator().manual_seed(3))
    seed = iter(range(10 ** 6))

    def ours_run(step_fn=None):
        return lambda: generate(ours, prompt, new_tokens, temperature=1.0, top_k=DEC_TOP_K,
                                generator=torch.Generator().manual_seed(next(seed)), step_fn=step_fn)

    fns = {"ours": ours_run()}
    for name, step_fn in (compiled or {}).items():
        fns[name] = ours_run(step_fn)
    for name, impl in {"dynamic": None, "static": "static"}.items():
        try:
            hf_generate(theirs, prompt, 8, impl, 0)  # warmup
            fns[f"theirs_{name}"] = lambda impl=impl: hf_generate(theirs, prompt, new_tokens, impl, next(seed))
        except Exception as e:  # noqa: BLE001 - a cache that does not work here is simply not used
            print(f"  HF {name} cache failed, not used: {type(e).__name__}: {e}")
    generate(ours, prompt, 8, top_k=DEC_TOP_K)  # warmup (the compiled step ran when it was compiled)
    times = alternate({k: timed(fn) for k, fn in fns.items()}, repeats, deadline, min_repeats=2)
    hf = {k.removeprefix("theirs_"): statistics.median(v) for k, v in times.items() if k.startswith("theirs_")}
    best = min(hf, key=hf.get)
    times["theirs"] = times[f"theirs_{best}"]
    return {"times": times, "hf_cache": best, "hf_cache_times": hf}


def product_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What text_to_image decodes: 4 conditional prompts of 6-16 tokens then 4 unconditional ones of
    3 tokens, left-padded (ids, valid [8, 16]), and the allowed "image" id range (the top half)."""
    g = torch.Generator().manual_seed(5)
    cond = [torch.randint(3, VOCAB // 2, (n,), generator=g).tolist() for n in (6, 9, 12, 16)]
    uncond = [[1, 4, 5]] * 4
    ids, valid = left_pad(cond + uncond, pad_id=0)
    return ids, valid, id_range_mask(VOCAB, VOCAB // 2, VOCAB)


def bench_product(ours, theirs, repeats: int, new_tokens: int, deadline: float, compiled=None) -> dict:
    """Guided, left-padded decoding as text_to_image runs it, against HF on the same padded rows."""
    ids, valid, allowed = product_batch()
    seed = iter(range(10 ** 6))

    def ours_run(step_fn=None):
        return lambda: generate(ours, ids, new_tokens, valid=valid, top_k=DEC_TOP_K, allowed=allowed, cfg_scale=3.0,
                                generator=torch.Generator().manual_seed(next(seed)), step_fn=step_fn)

    def theirs_run():
        torch.manual_seed(next(seed))
        return theirs.generate(ids, attention_mask=valid.long(), do_sample=True, temperature=1.0, top_k=DEC_TOP_K,
                               top_p=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    fns = {"ours": ours_run(), "theirs": theirs_run}
    for name, step_fn in (compiled or {}).items():
        fns[name] = ours_run(step_fn)
    for fn in fns.values():  # warmup
        fn()
    return alternate({k: timed(fn) for k, fn in fns.items()}, repeats, deadline, min_repeats=2)


# ---------------------------------------------------------------------------------------------
# 4. Images and captions per second as users count them (the demo's model shape, through mmar.Pipeline)
# ---------------------------------------------------------------------------------------------

def demo_shape_bundle(seed: int = 0):
    """A random-weight Bundle of the demo's exact shape: the `demo` LM preset at the vocabulary of a caption BPE
    (512) + 256 codes, max_len 80, and configs/mnist_vq.yaml's VQ tokenizer (28 x 28 -> 7 x 7 = 49 codes). Random
    weights draw noise, but every step costs what the trained demo's does (the same shapes and token counts)."""
    from models.bundle import Bundle
    from models.objectives import NextTokenPrediction
    from models.text_tokenizer import TextTokenizer
    from models.vocab import VocabLayout
    from train.sources import DIGIT_WORDS, digit_captions
    from vision_tokenizers.vq import VQConfig, VQTokenizer

    torch.manual_seed(seed)
    tok = TextTokenizer.train_bpe([c for d in range(10) for c in digit_captions(d)] + DIGIT_WORDS, 512)
    vq = VQTokenizer(VQConfig(in_channels=1, image_size=28, channels=(32, 32, 32), mid_attention=False, latent_dim=32,
                              codebook_size=256)).eval()
    layout = VocabLayout(tok.vocab_size, vq.config.codebook_size)
    lm = Transformer(LMConfig.from_preset("demo", vocab_size=layout.size, max_len=80)).eval()
    return Bundle(lm, tok, layout, vq, 80, NextTokenPrediction())


def bench_users(batches=(1, 8, 32), repeats: int = 3, compile: bool = True, int8: bool = True,
                cfg: float = 3.0, temperature: float = 0.8) -> list[dict]:
    """Images/s of Pipeline.text_to_image(prompts, batch_size=B) (guided, the demo's saved cfg 3 / temperature 0.8;
    prompt, LM decoding, VQ decoding and PIL conversion included) and captions/s of Pipeline.draw_captions on a
    batch of B images (VQ encoding, greedy decoding to <eos> or 32 tokens, text decoding included), per
    batch size, fp32 / int8, eager / compiled. Median of `repeats` after one warmup call (which compiles)."""
    from mmar.pipeline import Pipeline
    from models.quantize import quantize_int8

    base = demo_shape_bundle()
    out = []
    variants = [("fp32", False, base)] + ([("int8", False, quantize_int8(base))] if int8 else [])
    variants = [(p, c, b) for p, _, b in variants for c in ((False, True) if compile else (False,))]
    images = torch.rand(max(batches), 1, 28, 28) * 2 - 1
    for precision, comp, bundle in variants:
        try:
            pipe = Pipeline(bundle, compile=comp)
        except ValueError as e:
            print(f"  {precision} {'compiled' if comp else 'eager'}: {e}")
            continue
        for b in batches:
            prompts = [f"a handwritten {i % 10}" for i in range(b)]
            for task, fn in (
                ("text_to_image", lambda: pipe.text_to_image(prompts, cfg=cfg, temperature=temperature, batch_size=b)),
                ("caption", lambda: pipe.draw_captions(images[:b], 32, 0.0)),
            ):
                t0 = time.perf_counter()
                fn()  # warmup; compiles this shape when compiled
                first = time.perf_counter() - t0
                ts = [timed(fn)() for _ in range(repeats)]
                med = statistics.median(ts)
                row = {"task": task, "precision": precision, "compiled": comp, "batch": b,
                       "per_s": b / med, "sec_per_call_median": med, "sec_per_call": ts, "first_call_s": first,
                       "lm_tokens_per_item": bundle.vision.num_tokens if task == "text_to_image" else 32,
                       "threads": torch.get_num_threads()}
                out.append(row)
                print(f"  {task:<13} {precision} {'compiled' if comp else 'eager   '} batch {b:>2}: "
                      f"{row['per_s']:8.2f} /s (first call {first:.1f} s)")
    return out


def users_table(rows: list[dict]) -> str:
    """The images/s and captions/s rows as a Markdown table."""
    lines = ["| task | batch | LM tokens each | precision | decoding | per second | threads |", "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        what = "images" if r["task"] == "text_to_image" else "captions"
        lines.append(f"| {r['task']} | {r['batch']} | {r['lm_tokens_per_item']} | {r['precision']} | "
                     f"{'compiled static' if r['compiled'] else 'eager'} | {r['per_s']:.2f} {what}/s | {r['threads']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="alternating decoding repeats (at least 2 run)")
    ap.add_argument("--train-repeats", type=int, default=8, help="alternating training repeats (at least 3 run)")
    ap.add_argument("--train-steps", type=int, default=2, help="timed training steps per repeat and model")
    ap.add_argument("--new-tokens", type=int, default=DEC_NEW)
    ap.add_argument("--compile", action="store_true", help="also time our backbone under torch.compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="wall-time budget: training stops repeating (after 3) at 45%% of it, plain decoding "
                         "(after 2) at 80%%, the product path (after 2) at 100%%")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--users-batches", type=int, nargs="*", default=[1, 8, 32],
                    help="batch sizes of the images/s and captions/s table (none: skip it)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (under a minute without --compile): 16 new tokens, the fewest repeats, "
                         "users table at batch 1 and 2, fp32 only")
    args = ap.parse_args(argv)
    if args.quick:  # smaller training batches too: the figures of a smoke run are not comparable
        global TRAIN_BATCH, TRAIN_LEN
        TRAIN_BATCH, TRAIN_LEN = 4, 64
        args.repeats, args.train_repeats, args.train_steps, args.new_tokens, args.budget_s = 2, 3, 1, 16, 20.0
        args.users_batches = [1, 2]

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"note: load average {load_before[0]:.1f}: other processes are using the CPUs"
              + (f"; with {args.threads} threads each parallel kernel may wait for a busy core" if args.threads > 1 else ""))
    ours, theirs = build_models()
    n_params = non_embedding_params(ours)
    checks = check_same_function(ours, theirs)
    print(f"same function: max |logit diff| {checks['max_logit_diff']:.1e}, max |grad diff| "
          f"{checks['max_grad_diff']:.1e}, greedy decoding identical ({n_params / 1e6:.2f}M non-embedding params)")
    peak = res_peak_start = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048^3 torch.mm, {args.threads} threads): {peak:.1f} GFLOP/s")

    res: dict = {}
    rows = []
    # Budget split: training ~45%, decoding the rest (compile time comes out of decoding's share).
    tr = bench_train(ours, theirs, args.train_repeats, args.train_steps, 1, t_start + 0.45 * args.budget_s,
                     args.compile)
    tokens = args.train_steps * TRAIN_BATCH * TRAIN_LEN
    flops = train_flops_per_token(n_params, TRAIN_LEN)
    o, t = tokens / statistics.median(tr["ours"]), tokens / statistics.median(tr["theirs"])
    res.update(
        train_tokens_per_s_ratio=ratio(tr, "ours"), train_ratio_of_medians=ratio_of_medians(tr, "ours"),
        train_tokens_per_s_ours=o, train_tokens_per_s_theirs=t,
        train_gflop_per_token=flops / 1e9,
        train_gflops_ours=o * flops / 1e9, train_gflops_theirs=t * flops / 1e9,
        train_repeats=len(tr["ours"]), train_steps_per_repeat=args.train_steps,
    )
    rows += [(f"train tokens/s ({TRAIN_BATCH}x{TRAIN_LEN}, fwd+CE+bwd+AdamW)", o, t, res["train_tokens_per_s_ratio"]),
             ("train GFLOP/s", res["train_gflops_ours"], res["train_gflops_theirs"], None)]
    if args.compile:
        oc = tokens / statistics.median(tr["ours_compiled"])
        res.update(train_compiled_tokens_per_s_ratio=ratio(tr, "ours_compiled"), train_compiled_tokens_per_s_ours=oc,
                   train_compiled_ratio_of_medians=ratio_of_medians(tr, "ours_compiled"))
        rows.append(("  ... our loss step (backbone+head+CE) through torch.compile", oc, t,
                     res["train_compiled_tokens_per_s_ratio"]))
    print(f"training done ({time.perf_counter() - t_start:.0f} s)")

    compiled, compile_s = {}, {}
    if args.compile:  # the dynamic-shape compiled step (kept for comparison) and the static-cache compiled one
        for name, step_fn in (("ours_compiled", make_step_fn(ours, compile=True)),
                              ("ours_static", make_step_fn(ours, static=True, compile=True))):
            t0 = time.perf_counter()
            generate(ours, torch.randint(3, VOCAB, (DEC_BATCH, DEC_PROMPT)), 4, top_k=DEC_TOP_K, step_fn=step_fn)
            ids, valid, allowed = product_batch()
            generate(ours, ids, 4, valid=valid, cfg_scale=3.0, top_k=DEC_TOP_K, allowed=allowed, step_fn=step_fn)
            compile_s[name] = time.perf_counter() - t0
            compiled[name] = step_fn
            print(f"compiled our decode step ({name}): {compile_s[name]:.0f} s")
    labels = {"ours_compiled": "  ... through torch.compile (dynamic shapes)",
              "ours_static": "  ... static cache, compiled step (make_step_fn(static=True, compile=True))"}
    de = bench_decode(ours, theirs, args.repeats, args.new_tokens, t_start + 0.8 * args.budget_s, compiled)
    tokens = DEC_BATCH * args.new_tokens
    dt = de["times"]
    o, t = tokens / statistics.median(dt["ours"]), tokens / statistics.median(dt["theirs"])
    res.update(
        decode_tokens_per_s_ratio=ratio(dt, "ours"),
        decode_tokens_per_s_ours=o, decode_tokens_per_s_theirs=t,
        decode_ratio_of_medians=ratio_of_medians(dt, "ours"),
        decode_hf_cache=de["hf_cache"],
        **{f"decode_tokens_per_s_theirs_{k}_cache": tokens / v for k, v in de["hf_cache_times"].items()},
        decode_repeats=len(dt["ours"]), decode_new_tokens=args.new_tokens,
    )
    rows.append((f"decode tokens/s (8 x {args.new_tokens}, top-k {DEC_TOP_K}; HF {de['hf_cache']} cache)",
                 o, t, res["decode_tokens_per_s_ratio"]))
    def compiled_rows(part: str, times: dict, theirs: float) -> None:  # each compiled step's row of `part`
        for name in compiled:
            key = f"{part}_compiled" if name == "ours_compiled" else f"{part}_static_compiled"
            oc = tokens / statistics.median(times[name])
            res.update({f"{key}_tokens_per_s_ratio": ratio(times, name), f"{key}_tokens_per_s_ours": oc,
                        f"{key}_ratio_of_medians": ratio_of_medians(times, name),
                        f"{key}_vs_eager": statistics.median(times["ours"]) / statistics.median(times[name])})
            if part == "decode":
                res[f"{key}_compile_s"] = compile_s[name]
            rows.append((labels[name], oc, theirs, res[f"{key}_tokens_per_s_ratio"]))

    compiled_rows("decode", dt, t)

    pr = bench_product(ours, theirs, args.repeats, args.new_tokens, t_start + args.budget_s, compiled)
    tokens = DEC_BATCH * args.new_tokens  # rows decoded per step, as in HF's count
    o, t = tokens / statistics.median(pr["ours"]), tokens / statistics.median(pr["theirs"])
    res.update(product_tokens_per_s_ratio=ratio(pr, "ours"), product_tokens_per_s_ours=o,
               product_tokens_per_s_theirs=t, product_ratio_of_medians=ratio_of_medians(pr, "ours"),
               product_repeats=len(pr["ours"]))
    rows.append((f"product path: guided + left-padded 8 x {args.new_tokens} (text_to_image)", o, t, res["product_tokens_per_s_ratio"]))
    compiled_rows("product", pr, t)

    if args.users_batches:
        print("images and captions per second (random weights of the demo's exact shape: 49 codes per image):")
        users = bench_users(tuple(args.users_batches), repeats=1 if args.quick else 3, compile=args.compile,
                            int8=not args.quick)
        res.update(users=users, users_table=users_table(users),
                   users_note="random-weight model of the demo's exact shape and token count (speed only)")

    peak_end = matmul_peak_gflops()
    peak = max(peak, peak_end)  # the better of the two measurements (start and end) is the peak
    res.update(train_peak_share_ours=res["train_gflops_ours"] / peak,
               train_peak_share_theirs=res["train_gflops_theirs"] / peak)
    rows.insert(2 + args.compile, ("train share of the matmul peak", res["train_peak_share_ours"],
                                   res["train_peak_share_theirs"], None))
    wall = time.perf_counter() - t_start
    res.update(
        matmul_peak_gflops=peak, matmul_peak_gflops_start=res_peak_start, matmul_peak_gflops_end=peak_end,
        non_embedding_params=n_params, **checks,
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        platform=platform.platform(), machine=platform.machine(), processor=platform.processor(),
        torch_version=torch.__version__, transformers_version=__import__("transformers").__version__,
        python_version=platform.python_version(),
        loadavg_1min_before=load_before[0], loadavg_1min_after=os.getloadavg()[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_s=wall,
    )

    print(f"\n{'':<56}{'ours':>12}{'theirs':>12}{'ours/theirs':>13}   ratio of medians [min, max]")
    for name, o, t, r in rows:
        fmt = "{:>12.3f}" if o < 10 else "{:>12.1f}"
        rm = "" if r is None or t == 0 else f"   {o / t:.3f}"
        print(f"{name:<56}" + fmt.format(o) + fmt.format(t) + (f"{r:>13.3f}" if r is not None else "") + rm)
    for key in [k for k in res if k.endswith("_ratio_of_medians")]:
        v = res[key]
        print(f"  {key}: {v['ratio']:.3f} [{v['min']:.3f}, {v['max']:.3f}] over {v['repeats']} repeats")
    print(f"ratios: medians of per-repeat ratios ({res['train_repeats']} training, {res['decode_repeats']} "
          f"decoding repeats); load average {load_before[0]:.1f} -> {res['loadavg_1min_after']:.1f}; "
          f"wall time {wall:.0f} s")

    if res.get("users_table"):
        print("\n" + res["users_table"])
    write_report(res, args.out, plot)


def plot(res: dict, png: Path) -> None:
    """Ours / theirs throughput ratios (eager and compiled) per workload."""
    plt = pyplot()

    names = [("train", "training"), ("decode", "KV-cached sampling"), ("product", "guided text-to-image")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    kinds = (("", "eager"), ("_compiled", "torch.compile (dynamic)"), ("_static_compiled", "static cache, compiled"))
    for j, (suffix, label) in enumerate(kinds):
        vals = [res.get(f"{k}{suffix}_tokens_per_s_ratio") for k, _ in names]
        xs = [i + (j - 1) * 0.27 for i in range(len(names))]
        ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], 0.27, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), [n for _, n in names])
    ax.set_ylabel("tokens/s, ours / transformers")
    ax.set_title(f"LM speed vs transformers {res.get('transformers_version', '')} (CPU fp32, {res['threads']} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
