"""Image understanding on scenes (train/scenes.py): ETT's end-to-end tokenizer tuning and TokenFLEX's flexible
token counts, each against its baselines with the same LM size, data and number of steps.

ETT (configs/scenes_tokenizer.yaml, scenes_lm_codes.yaml, scenes_ett_stage{1,2,3}.yaml):
    (a) codes     the LM reads the frozen tokenizer's code ids                       `steps` steps
    (b) embedding codebook embeddings of the frozen tokenizer through the projector:
                  stage 1 (projector only) then stage 3 (LM + projector)             s1 + (steps - s1)
    (c) ETT       stage 1, stage 2 (everything, L_cap + 0.25 L_vq), stage 3          s1 + s2 + (steps - s1 - s2)
    Every model also trains text->image on code ids (half the samples), so each one draws: text-to-image
    per-cell accuracy of (c) with its tuned tokenizer against (b) with the untuned one, and tokenizer PSNR
    before / after tuning. Claim (paper): (c) > (b) >= (a) on understanding, reconstruction slightly worse,
    generation kept.
TokenFLEX (configs/scenes_tokenflex.yaml): one model trained with the count drawn per batch (16 / 36 / 64 tokens,
    20 / 30 / 50%) and three fixed models (16, 36, 64), all evaluated at 16, 25, 36, 49 and 64 tokens. Claim:
    the flexible model beats each fixed model at that model's own count, and fixed models degrade away from it.

Scores on `--test` held-out scenes (their items come from the test pool: never trained on), greedy captions:
slot accuracy (share of the 4 cells named right; a per-caption figure), scene accuracy (all cells right,
Wilson 95% interval), CIDEr-D and BLEU-4; model differences with paired bootstrap 95% intervals over the same
test scenes. Writes benchmarks/results/understanding_scenes.json and understanding_scenes.png.

    python -m benchmarks.understanding                 # the default run (about an hour on 2 idle cores)
    python -m benchmarks.understanding --parts ett     # only ETT (the JSON keeps the last TokenFLEX figures)
    python -m benchmarks.understanding --reuse         # models already trained in --work are not retrained
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import fit_recipe, last_ckpt as _last, pyplot, write_report

RESULTS = Path("benchmarks/results")
COUNTS_TRAINED = (16, 36, 64)
COUNTS_EVAL = (16, 25, 36, 49, 64)
MIX = {16: 0.2, 36: 0.3, 64: 0.5}


REUSE = False  # --reuse: a model whose run (same recipe and arguments) already finished in --work is not retrained


def _fit(config: str, root: Path, extra: list[str]) -> float:
    return fit_recipe(config, root, extra, reuse=REUSE)


@torch.inference_mode()
def captions_of(bundle, images: torch.Tensor, tokens: int | None = None, batch: int = 250) -> list[str]:
    from mmar.pipeline import Pipeline

    out = []
    for i in range(0, len(images), batch):
        out += Pipeline(bundle).draw_captions(images[i:i + batch], max_new_tokens=48, temperature=0.0, tokens=tokens)
    return out


def score_scene_captions(caps: list[str], truths, refs) -> dict:
    from evaluation.judges import wilson_interval
    from train.scenes import score_captions

    s = score_captions(caps, truths, refs)
    boot = bootstrap_mean(s["slot"])
    return {"slot_accuracy": float(s["slot"].mean()), "slot_accuracy_ci95": boot,
            "scene_accuracy": float(s["scene"].mean()),
            "scene_accuracy_ci95": list(wilson_interval(int(s["scene"].sum()), len(caps))),
            "exact_match": float(s["exact"].mean()), "cider": s["cider"],
            "cider_ci95": bootstrap_mean(s["cider_each"]), "bleu4": s["bleu4"], "n": len(caps),
            "examples": caps[:4], "_slot": s["slot"], "_cider": s["cider_each"], "_exact": s["exact"]}


def bootstrap_mean(x: np.ndarray) -> list[float]:
    """95% percentile bootstrap interval of a mean (evaluation.judges.mean_interval)."""
    from evaluation.judges import mean_interval

    return list(mean_interval(x)[1])


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """b - a (means) with a paired percentile bootstrap 95% interval over the same test items."""
    from evaluation.judges import paired_difference

    diff, ci = paired_difference(a, b)
    return {"diff": diff, "ci95": list(ci), "relative": float(np.mean(b) / max(np.mean(a), 1e-9) - 1)}


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def run_ett(args, work: Path, test, images: torch.Tensor, truths, refs, report: dict) -> None:
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle
    from evaluation.judges import psnr
    from train.scenes import CellReader, ItemPools, compose_caption
    from vision_tokenizers import registry

    s1, s2 = args.stage1_steps, args.stage2_steps
    s3 = args.steps - s1 - s2
    if s3 < 1:
        raise SystemExit("error: --steps must exceed --stage1-steps + --stage2-steps")
    vq = work / "vq.safetensors"
    data = ["--data.init_args.n_train", str(args.n_train), "--data.init_args.vision_tokenizer", str(vq)]
    seconds = {}
    if args.tokenizer:
        import shutil

        if Path(args.tokenizer).resolve() != vq.resolve():  # a tokenizer trained before (e.g. by the default run)
            shutil.copyfile(args.tokenizer, vq)
    else:
        print("== ETT: tokenizer ==", flush=True)
        seconds["tokenizer"] = _fit("configs/scenes_tokenizer.yaml", work / "tokenizer",
                                    ["--trainer.max_steps", str(args.tokenizer_steps), "--data.init_args.batch_size",
                                     "32", "--data.init_args.n_train", str(args.n_train),
                                     "--model.init_args.export_path", str(vq)])
    models, scores = {}, {}

    def evaluate(name: str, root: Path) -> None:  # right after training, so a long run reports as it goes
        t = time.time()
        models[name] = b = load_bundle(_last(root))
        scores[name] = s = score_scene_captions(captions_of(b, images), truths, refs)
        seconds[f"caption_{name}"] = time.time() - t
        print(f"{name:13s} slot {s['slot_accuracy']:.4f}  scene {s['scene_accuracy']:.4f}  CIDEr {s['cider']:.3f}  "
              f"BLEU-4 {s['bleu4']:.3f}  e.g. {s['examples'][0]!r}", flush=True)

    print("== ETT (a): code ids ==", flush=True)
    seconds["a_codes"] = _fit("configs/scenes_lm_codes.yaml", work / "a", [*data, "--trainer.max_steps", str(args.steps),
                                                                          "--model.init_args.export_path", "null"])
    evaluate("a_codes", work / "a")
    print("== ETT stage 1 (shared by (b) and (c)) ==", flush=True)
    seconds["stage1"] = _fit("configs/scenes_ett_stage1.yaml", work / "ett1",
                             [*data, "--trainer.max_steps", str(s1), "--model.init_args.export_path", "null"])
    print("== ETT (b): embeddings, frozen tokenizer (stage 3 after stage 1) ==", flush=True)
    seconds["b_embeddings"] = _fit("configs/scenes_ett_stage3.yaml", work / "b",
                                   [*data, "--trainer.max_steps", str(args.steps - s1), "--model.init_args.init_from",
                                    _last(work / "ett1"), "--model.init_args.export_path", "null"])
    evaluate("b_embeddings", work / "b")
    print("== ETT (c): stage 2 (tokenizer tuned) ==", flush=True)
    seconds["stage2"] = _fit("configs/scenes_ett_stage2.yaml", work / "ett2",
                             [*data, "--trainer.max_steps", str(s2), "--model.init_args.init_from", _last(work / "ett1"),
                              "--model.init_args.vq_images", str(args.vq_images), "--model.init_args.export_path", "null"])
    print("== ETT (c): stage 3 ==", flush=True)
    seconds["c_stage3"] = _fit("configs/scenes_ett_stage3.yaml", work / "c",
                               [*data, "--trainer.max_steps", str(s3), "--model.init_args.init_from",
                                _last(work / "ett2"), "--model.init_args.export_path", "null"])
    evaluate("c_ett", work / "c")
    t = time.time()
    comparisons = {}
    for lo, hi in (("b_embeddings", "c_ett"), ("a_codes", "b_embeddings"), ("a_codes", "c_ett")):
        comparisons[f"{hi}_minus_{lo}"] = {"slot_accuracy": _paired(scores[lo]["_slot"], scores[hi]["_slot"]),
                                          "cider": _paired(scores[lo]["_cider"], scores[hi]["_cider"])}
    # reconstruction before / after tuning, on the test scenes
    untuned, tuned = registry.load(vq), models["c_ett"].vision
    with torch.inference_mode():
        rec = {name: torch.cat([tok.decode(tok.encode(images[i:i + 250])) for i in range(0, len(images), 250)])
               for name, tok in (("untuned", untuned), ("tuned", tuned))}
    psnrs = {k: psnr(v, images) for k, v in rec.items()}
    # text-to-image: per-cell accuracy of drawn scenes, read by a classifier trained on the val pool's real items
    reader = CellReader(ItemPools.load(0), "val", per_class=args.reader_per_class)
    n_t2i = min(args.t2i, len(test))
    prompts = [compose_caption(truths[i], 0, 0) for i in range(n_t2i)]
    t2i = {"prompts": n_t2i, "reader_accuracy_on_real_test_scenes": float(reader.accuracy(images[:n_t2i],
                                                                                         truths[:n_t2i]).mean())}
    drawn = {}
    for name in ("a_codes", "b_embeddings", "c_ett"):
        g = torch.Generator().manual_seed(0)
        imgs = torch.cat([Pipeline(models[name]).draw_images(prompts[i:i + 100], n=1, cfg=args.cfg, temperature=0.8,
                                        generator=g) for i in range(0, n_t2i, 100)])
        acc = reader.accuracy(imgs, truths[:n_t2i])
        drawn[name] = acc
        t2i[name] = {"cell_accuracy": float(acc.mean()), "cell_accuracy_ci95": bootstrap_mean(acc),
                     "tokenizer": "tuned (stage 2)" if name == "c_ett" else "untuned"}
        _save_grid(imgs[:16], work / f"t2i_{name}.png")
        print(f"t2i {name:13s} cell accuracy {acc.mean():.4f}", flush=True)
    t2i["c_ett_minus_b_embeddings"] = _paired(drawn["b_embeddings"], drawn["c_ett"])
    seconds["psnr_and_t2i"] = time.time() - t
    report["ett"] = {
        "steps": {"total": args.steps, "stage1": s1, "stage2": s2, "stage3_c": s3, "stage3_b": args.steps - s1,
                  "tokenizer": args.tokenizer_steps, "stage2_vq_images": args.vq_images,
                  "tokenizer_file": args.tokenizer or "trained in this run"},
        "captioning": {k: _public(v) for k, v in scores.items()}, "comparisons": comparisons,
        "tokenizer_psnr_db": psnrs, "t2i": t2i, "seconds": seconds,
        "paper": {"claim": "(c) > (b) >= (a) on understanding; rFID 1.033 -> 1.648 at alpha 0.25; GenEval 0.40/0.34 "
                           "(index/embedding frozen) -> 0.43 (ETT)"}}


def run_tokenflex(args, work: Path, images: torch.Tensor, truths, refs, report: dict) -> None:
    from models.bundle import load_bundle

    data = ["--data.init_args.n_train", str(args.n_train), "--trainer.max_steps", str(args.tokenflex_steps),
            "--model.init_args.export_path", "null"]
    runs = {"flexible": json.dumps(MIX), **{f"fixed_{n}": json.dumps({n: 1.0}) for n in COUNTS_TRAINED}}
    seconds, table, raw = {}, {}, {}
    for name, mix in runs.items():
        print(f"== TokenFLEX {name} (token_mix {mix}) ==", flush=True)
        seconds[name] = _fit("configs/scenes_tokenflex.yaml", work / f"tf_{name}",
                             [*data, "--data.init_args.token_mix", mix])
        b = load_bundle(_last(work / f"tf_{name}"))
        table[name], raw[name] = {}, {}
        for n in COUNTS_EVAL:
            s = score_scene_captions(captions_of(b, images, tokens=n), truths, refs)
            table[name][str(n)] = _public(s)
            raw[name][n] = s["_slot"]
            print(f"{name:9s} at {n:2d} tokens: slot {s['slot_accuracy']:.4f}  scene {s['scene_accuracy']:.4f}  "
                  f"CIDEr {s['cider']:.3f}", flush=True)
    verdicts = {}
    for n in COUNTS_TRAINED:
        d = _paired(raw[f"fixed_{n}"][n], raw["flexible"][n])
        verdicts[str(n)] = {**d, "paper_relative": {16: 0.016, 36: 0.010, 64: 0.004}[n]}
    report["tokenflex"] = {"steps": args.tokenflex_steps, "mix": MIX, "counts_evaluated": list(COUNTS_EVAL),
                           "slot_accuracy_table": {k: {c: v[c]["slot_accuracy"] for c in v} for k, v in table.items()},
                           "scores": table, "flexible_minus_fixed_at_own_count": verdicts, "seconds": seconds,
                           "paper": {"claim": "flexible beats fixed at 64/144/256 by +1.6/+1.0/+0.4% (8 benchmarks)"}}


def _save_grid(images: torch.Tensor, path: Path) -> None:
    from vision_tokenizers.image_io import grid, save_png

    save_png(grid(images, 8), path)


def plot(report: dict, png: Path) -> None:
    plt = pyplot()

    panels = [p for p in ("ett", "tokenflex") if p in report]
    fig, axes = plt.subplots(1, 2 * len(panels), figsize=(5.5 * 2 * len(panels), 4))
    axes = np.atleast_1d(axes)
    k = 0
    if "ett" in report:
        cap = report["ett"]["captioning"]
        names = list(cap)
        for metric, ax in (("slot_accuracy", axes[k]), ("cider", axes[k + 1])):
            vals = [cap[m][metric] for m in names]
            err = np.array([[v - cap[m][metric + "_ci95"][0], cap[m][metric + "_ci95"][1] - v] for m, v in zip(names, vals)]).T
            ax.bar(names, vals, yerr=err, capsize=4, color=["#999", "#69c", "#c63"])
            ax.set_title(f"ETT: {metric.replace('_', ' ')} ({cap[names[0]]['n']} test scenes)")
        t2i = report["ett"]["t2i"]
        axes[k].text(0.02, 0.02, "t2i cell acc.: " + ", ".join(f"{m.split('_')[0]} {t2i[m]['cell_accuracy']:.2f}"
                                                               for m in names), transform=axes[k].transAxes, fontsize=8)
        k += 2
    if "tokenflex" in report:
        tab = report["tokenflex"]["scores"]
        ax = axes[k]
        for name, row in tab.items():
            xs = [int(c) for c in row]
            ax.errorbar(xs, [row[c]["slot_accuracy"] for c in row],
                        yerr=np.array([[row[c]["slot_accuracy"] - row[c]["slot_accuracy_ci95"][0],
                                        row[c]["slot_accuracy_ci95"][1] - row[c]["slot_accuracy"]] for c in row]).T,
                        marker="o", capsize=3, label=name, lw=2.5 if name == "flexible" else 1.2)
        ax.set_xlabel("visual tokens at evaluation")
        ax.set_ylabel("caption slot accuracy")
        ax.set_title("TokenFLEX: trained-at (lines) x evaluated-at")
        ax.legend(fontsize=8)
        ax = axes[k + 1]
        v = report["tokenflex"]["flexible_minus_fixed_at_own_count"]
        xs = list(v)
        ax.errorbar(xs, [v[x]["diff"] for x in xs], yerr=np.array([[v[x]["diff"] - v[x]["ci95"][0],
                                                                   v[x]["ci95"][1] - v[x]["diff"]] for x in xs]).T,
                    fmt="o", capsize=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("count (the fixed model's own)")
        ax.set_title("flexible - fixed slot accuracy (paired 95% CI)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["ett", "tokenflex"], choices=["ett", "tokenflex"])
    p.add_argument("--work", default="results/bench_understanding")
    p.add_argument("--n-train", type=int, default=20_000, help="training scenes")
    p.add_argument("--test", type=int, default=1000, help="test scenes captioned per model and count")
    p.add_argument("--tokenizer-steps", type=int, default=300)
    p.add_argument("--tokenizer", help="use this scenes tokenizer file instead of training one (same recipe)")
    p.add_argument("--steps", type=int, default=600, help="LM steps of every ETT model (batch 32)")
    p.add_argument("--stage1-steps", type=int, default=60)
    p.add_argument("--stage2-steps", type=int, default=240)
    p.add_argument("--vq-images", type=int, default=8, help="stage 2: images per batch in the reconstruction loss")
    p.add_argument("--tokenflex-steps", type=int, default=400, help="steps of each TokenFLEX model (batch 32)")
    p.add_argument("--t2i", type=int, default=500, help="text-to-image prompts per ETT model")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--reader-per-class", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "understanding_scenes.json"))
    p.add_argument("--reuse", action="store_true",
                   help="keep models of --work whose training (same recipe and arguments) already finished")
    args = p.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    from train.scenes import ItemPools, Scenes

    t0, work = time.time(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test = Scenes(ItemPools.load(0), "test", args.test, seed=0)
    images = test.images()
    truths = [test.truth(i) for i in range(len(test))]
    refs = [test.captions(i) for i in range(len(test))]
    report = {"test_scenes": len(test), "threads": torch.get_num_threads(), "args": vars(args)}
    out = Path(args.out)
    if set(args.parts) != {"ett", "tokenflex"} and out.exists():  # one part: keep the other part's last figures
        old = json.loads(out.read_text())
        report.update({k: old[k] for k in ("ett", "tokenflex") if k in old and k not in args.parts})
    if "ett" in args.parts:
        run_ett(args, work, test, images, truths, refs, report)
    if "tokenflex" in args.parts:
        run_tokenflex(args, work, images, truths, refs, report)
    report.update(seconds=time.time() - t0, torch=torch.__version__, machine=platform.machine(),
                  processor=platform.processor(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
