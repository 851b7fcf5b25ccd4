"""Image understanding on cells (train/cells.py, issue 31): ETT, TokenFLEX and PRIOR against their baselines, every
arm trained from the same text-only "pretrained" LM, with >= 3 training seeds, paired by seed.

Shared set-up (trained once, reused): the cells tokenizer (configs/cells_tokenizer.yaml), the text-only stand-in
(configs/cells_text_lm.yaml; also PRIOR's reference). A training seed s sets `seed_everything` and the data seed
(which canvases, their order and filler draws); the arms of one seed start from the same stand-in and see the same
batches, so their differences pair.

Parts (each arm trains `--steps` steps of 32 in total; S1 = S2 = steps / 4):
    pilot      one codes model on the validation split with 8 checkpoints: the gate (>= 0.85 per-cell accuracy,
               plateau within 10 minutes) that says the task is learnable at the budget
    ett        (a) codes: code ids (steps) | (b) frozen: codebook embeddings, stage 1 (projector only, S1) then
               stage 3 (LM + projector) | (c) ETT: stage 1, stage 2 (everything, L_cap + 0.25 L_vq, S2), stage 3;
               plus a probe: a logistic regression on each cell's frozen (or tuned) codebook embeddings
    tokenflex  flexible (4 / 16 / 64 tokens, 20 / 30 / 50%) vs fixed 4, 16, 64, all read at 4, 16, 36 (never
               trained; 6 x 6 pools straddle the cells) and 64 tokens
    prior      NTP (= ETT's (a), the same runs) vs PRIOR (w = 1 - P_ref, no floor: the paper's), PRIOR with the
               old floor 0.05, and an oracle that weights only the class words

Scores on `--test` canvases of the test pool (never trained or tuned on): greedy captions' per-cell accuracy,
occupancy and class accuracy (over occupied cells); teacher-forced per-cell accuracy and class-token NLL at every
checkpoint (1/4, 1/2, 3/4, all of the budget) and the area under that curve. Intervals: over seeds (t, n = seeds).

    python -m benchmarks.cells --parts ett tokenflex --out benchmarks/results/understanding.json
    python -m benchmarks.cells --parts prior --out benchmarks/results/prior.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import fit_recipe, last_ckpt, pyplot, write_report
from benchmarks.prior import _checkpoints_every, _step_checkpoints

RESULTS = Path("benchmarks/results")
MIX = {4: 0.2, 16: 0.3, 64: 0.5}
COUNTS_EVAL = (4, 16, 36, 64)
METRICS = ("cell", "occupancy", "class_accuracy", "tf_cell", "tf_class_nll", "auc_tf_cell")


# ---- scoring ------------------------------------------------------------------------------------
def _prompts(bundle, images: torch.Tensor, tokens: int | None):
    """(prompt ids [B, P], the LM seen through the image's vectors or None) as Pipeline.draw_captions builds them."""
    fmt = bundle.format
    if bundle.visual is not None:
        from vision_tokenizers.projectors import WithEmbeds

        embeds = bundle.visual(images, bundle.vision, tokens)  # [B, N, D]
        return torch.tensor([fmt.caption_prompt_slots(embeds.shape[1])] * len(images)), embeds
    codes = bundle.vision.encode(images)  # [B, h, w]
    return torch.tensor([fmt.caption_prompt(c) for c in codes]), None


@torch.inference_mode()
def teacher_forced(bundle, images: torch.Tensor, truths, tokens: int | None = None, batch: int = 250) -> dict:
    """Per canvas: the share of its 4 cells whose class word is the most likely of the 11 given the true caption so
    far (`tf_cell`), and the mean NLL of the true class words (`tf_class_nll`, over the whole vocabulary)."""
    from train.cells import FILLERS, WORDS, compose_caption
    from vision_tokenizers.projectors import WithEmbeds

    tok, fmt = bundle.tokenizer, bundle.format
    words = torch.tensor([tok.encode(" " + w)[0] for w in WORDS])  # [11]; WORDS[-1] is "none"
    cell, nll = [], []
    for i in range(0, len(images), batch):
        x, t = images[i:i + batch], truths[i:i + batch]
        prompt, embeds = _prompts(bundle, x, tokens)
        caps = [tok.encode(compose_caption(tr, (i + j) % len(FILLERS))) + [tok.eos_id] for j, tr in enumerate(t)]
        width = max(map(len, caps))
        tail = torch.tensor([c + [tok.pad_id] * (width - len(c)) for c in caps])  # [B, C], right-padded
        ids = torch.cat([prompt, tail], 1)  # [B, T]
        lm = bundle.lm if embeds is None else WithEmbeds(bundle.lm, embeds.flatten(0, 1), fmt.image_slots(ids))
        logits = bundle.lm.head(lm(ids)).float()  # [B, T, V]
        at = torch.isin(ids[:, 1:], words)  # [B, T-1]: the targets that are class words
        at[:, :prompt.shape[1] - 1] = False
        if not (at.sum(1) == 4).all():
            raise ValueError("a caption does not hold exactly 4 class words (class words must be single tokens)")
        sel, target = logits[:, :-1][at], ids[:, 1:][at]  # [4B, V], [4B]
        nll.append(torch.nn.functional.cross_entropy(sel, target, reduction="none").view(-1, 4).mean(1))
        truth_word = torch.tensor(t).flatten()
        truth_word = torch.where(truth_word < 0, len(WORDS) - 1, truth_word)
        cell.append((sel[:, words].argmax(1) == truth_word).float().view(-1, 4).mean(1))
    return {"tf_cell": torch.cat(cell).numpy(), "tf_class_nll": torch.cat(nll).numpy()}


@torch.inference_mode()
def greedy(bundle, images: torch.Tensor, truths, tokens: int | None = None, batch: int = 250) -> dict:
    from mmar.pipeline import Pipeline
    from train.cells import score_cells

    caps = []
    for i in range(0, len(images), batch):
        caps += Pipeline(bundle).draw_captions(images[i:i + batch], max_new_tokens=32, temperature=0.0, tokens=tokens)
    s = score_cells(caps, truths)
    return {**s, "examples": caps[:3]}


def score(bundle, images, truths, tokens=None, captions: bool = True) -> dict:
    """Figures of one model at one token count: test means (+ per-canvas arrays under `_`)."""
    tf = teacher_forced(bundle, images, truths, tokens)
    out = {"tf_cell": float(tf["tf_cell"].mean()), "tf_class_nll": float(tf["tf_class_nll"].mean())}
    if captions:
        g = greedy(bundle, images, truths, tokens)
        out.update(cell=float(g["cell"].mean()), occupancy=float(g["occupancy"].mean()),
                   class_accuracy=float(g["class_right"].sum() / max(g["occupied"].sum(), 1)),
                   all_cells=float(g["all"].mean()), examples=g["examples"])
    return out


def auc(curve: list[dict], key: str = "tf_cell") -> float:
    """Area under the learning curve over the fraction of the budget (0 at step 0 counts as chance: 1/11)."""
    xs = [0.0] + [p["fraction"] for p in curve]
    ys = [1 / 11] + [p[key] for p in curve]
    return float(np.trapezoid(ys, xs) / xs[-1])


def over_seeds(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (n = len(values))."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": [float("nan")] * 2, "n": len(v), "per_seed": v.tolist()}
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": len(v),
            "per_seed": v.tolist()}


# ---- training ------------------------------------------------------------------------------------
class Grid:
    """Trains arms (a list of stages) per seed under `work`, scores their checkpoints, keeps per-seed figures."""

    def __init__(self, args, vq: Path, stand_in: str, images, truths):
        self.args, self.vq, self.stand_in, self.images, self.truths = args, vq, stand_in, images, truths
        self.work, self.steps = Path(args.work), args.steps
        self.seconds: dict[str, float] = {}
        self.done: dict[tuple, dict] = {}  # (name, seed, stages, counts): figures of a run already trained and scored

    def common(self, seed: int, steps: int) -> list[str]:
        return ["--seed_everything", str(seed), "--data.init_args.seed", str(seed), "--data.init_args.n_train",
                str(self.args.n_train), "--trainer.max_steps", str(steps), "--model.init_args.export_path", "null",
                *_checkpoints_every(max(1, self.steps // 4))]

    def run(self, name: str, seed: int, stages: list[tuple[str, int, list[str]]], counts=(None,)) -> dict:
        """Train the stages in order (each from the previous one's last.ckpt), then score every checkpoint at global
        quarters of the budget: teacher-forced at every count, greedy captions too at the last. A run asked for twice
        (PRIOR's NTP arm is ETT's (a)) is trained once."""
        key = (name, seed, json.dumps(stages), tuple(counts))
        if key in self.done:
            return self.done[key]
        start, points, root = 0, [], None
        for k, (config, steps, extra) in enumerate(stages):
            prev = root
            root = self.work / f"seed{seed}" / name / f"stage{k}"
            init = ["--model.init_args.init_from", last_ckpt(prev), "--model.init_args.init_lm_from", "null"] \
                if prev is not None else ["--model.init_args.init_lm_from", self.stand_in]
            print(f"== seed {seed} {name} stage {k} ({steps} steps) ==", flush=True)
            self.seconds[f"seed{seed}/{name}/stage{k}"] = fit_recipe(
                config, root, [*self.common(seed, steps), *init, *extra], reuse=self.args.reuse)
            points += [(start + step, ckpt) for step, ckpt in _step_checkpoints(root)]
            start += steps
        from models.bundle import load_bundle

        result = {}
        for count in counts:
            curve = []
            for step, ckpt in points:
                last = step == start
                s = score(load_bundle(ckpt), self.images, self.truths, count, captions=last)
                curve.append({"step": step, "fraction": step / start, **s})
            key = "final" if count is None else f"final_{count}"
            result[key] = {**curve[-1], "auc_tf_cell": auc(curve)}
            result["curve" if count is None else f"curve_{count}"] = [
                {k: p[k] for k in ("step", "fraction", "tf_cell", "tf_class_nll")} for p in curve]
            f = result[key]
            print(f"seed {seed} {name} {count or ''}: cell {f['cell']:.4f} occ {f['occupancy']:.4f} class "
                  f"{f['class_accuracy']:.4f} | TF cell {f['tf_cell']:.4f} NLL {f['tf_class_nll']:.3f} "
                  f"AUC {f['auc_tf_cell']:.4f}", flush=True)
        self.done[key] = result
        return result


def summarize(per_seed: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], key: str = "final") -> dict:
    """Arms over seeds and paired differences (hi - lo, per seed, then over seeds) for every metric."""
    arms = {name: {m: over_seeds([r[key][m] for r in runs.values()]) for m in METRICS}
            for name, runs in per_seed.items()}
    diffs = {}
    for lo, hi in pairs:
        seeds = sorted(set(per_seed[lo]) & set(per_seed[hi]))
        diffs[f"{hi}_minus_{lo}"] = {m: over_seeds([per_seed[hi][s][key][m] - per_seed[lo][s][key][m] for s in seeds])
                                     for m in METRICS}
    return {"arms": arms, "paired": diffs}


# ---- the probe ------------------------------------------------------------------------------------
@torch.inference_mode()
def code_probe(tokenizers: dict[str, torch.nn.Module], n_train: int, n_test: int) -> dict:
    """Cell class (11 ways, empty included) from each cell's 2 x 2 codebook embeddings, by a logistic regression
    trained on training canvases and scored on test canvases: how much of the answer the (frozen or tuned) codes
    carry, beside the LM's accuracy. Pixels of the cell give the reference."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from train.cells import Cells

    def cells_of(split: str, n: int):
        c = Cells.load(split, n, seed=123)
        return c.images(), np.array([c.truth(i) for i in range(n)]).flatten()

    (xtr, ytr), (xte, yte) = cells_of("train", n_train), cells_of("test", n_test)

    def per_cell(feat: torch.Tensor) -> np.ndarray:  # [B, D, H, W] -> [4B, D * H/2 * W/2], cells in reading order
        b, d, h, w = feat.shape
        f = feat.reshape(b, d, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        return f.reshape(4 * b, -1).numpy()

    def fit(ftr, fte) -> float:
        sc = StandardScaler().fit(ftr)
        clf = LogisticRegression(max_iter=300).fit(sc.transform(ftr), ytr)
        return float((clf.predict(sc.transform(fte)) == yte).mean())

    out = {"pixels": fit(per_cell(xtr), per_cell(xte)), "train_canvases": n_train, "test_canvases": n_test}
    for name, tok in tokenizers.items():
        emb = lambda x: tok.quantizer.embed(tok.encode(x))  # noqa: E731  [B, D, h, w]
        out[name] = fit(per_cell(emb(xtr)), per_cell(emb(xte)))
    return out


# ---- parts ---------------------------------------------------------------------------------------
def run_pilot(args, vq: Path, stand_in: str) -> dict:
    """One codes model scored on the validation split at 8 points of `--pilot-steps`: the learnability gate."""
    from models.bundle import load_bundle
    from train.cells import Cells

    val = Cells.load("val", args.val, seed=0)
    images, truths = val.images(), [val.truth(i) for i in range(len(val))]
    root = Path(args.work) / "pilot"
    extra = ["--data.init_args.n_train", str(args.n_train), "--trainer.max_steps", str(args.pilot_steps),
             "--model.init_args.export_path", "null", "--model.init_args.init_lm_from", stand_in,
             "--data.init_args.vision_tokenizer", str(vq), *_checkpoints_every(max(1, args.pilot_steps // 8))]
    t = time.time()
    seconds = fit_recipe("configs/cells_codes.yaml", root, extra, reuse=args.reuse)
    curve = []
    for step, ckpt in _step_checkpoints(root):
        s = score(load_bundle(ckpt), images, truths)
        curve.append({"step": step, **{k: v for k, v in s.items() if k != "examples"}})
        print(f"pilot step {step}: cell {s['cell']:.4f} occ {s['occupancy']:.4f} class {s['class_accuracy']:.4f} "
              f"TF cell {s['tf_cell']:.4f}", flush=True)
    final = curve[-1]["cell"]
    return {"split": "val", "canvases": len(val), "steps": args.pilot_steps, "train_seconds": seconds,
            "seconds_with_scoring": time.time() - t, "curve": curve, "gate": {"target": 0.85, "cell": final,
                                                                               "met": final >= 0.85}}


def ett_arms(args, vq: Path) -> dict[str, list]:
    q = args.steps // 4
    data = ["--data.init_args.vision_tokenizer", str(vq)]
    stage1 = ("configs/cells_codebook.yaml", q, [*data, "--model.init_args.train_lm", "false"])
    stage2 = ("configs/cells_codebook.yaml", q, [*data, "--model.init_args.train_tokenizer", "true",
                                                 "--model.init_args.vq_images", str(args.vq_images)])
    return {"a_codes": [("configs/cells_codes.yaml", args.steps, data)],
            "b_frozen": [stage1, ("configs/cells_codebook.yaml", args.steps - q, data)],
            "c_ett": [stage1, stage2, ("configs/cells_codebook.yaml", args.steps - 2 * q, data)]}


def run_ett(args, grid: Grid, vq: Path) -> dict:
    from models.bundle import load_bundle
    from vision_tokenizers import registry

    per_seed = {name: {} for name in ett_arms(args, vq)}
    for seed in args.seeds:
        for name, stages in ett_arms(args, vq).items():
            per_seed[name][seed] = grid.run(name, seed, stages)
    probe_toks = {"frozen": registry.load(vq)}
    for seed in args.seeds:
        probe_toks[f"tuned_seed{seed}"] = load_bundle(last_ckpt(grid.work / f"seed{seed}" / "c_ett" / "stage2")).vision
    return {**summarize(per_seed, [("a_codes", "b_frozen"), ("b_frozen", "c_ett"), ("a_codes", "c_ett")]),
            "per_seed": per_seed, "probe": code_probe(probe_toks, args.probe_train, args.test),
            "stages": {"stage1": args.steps // 4, "stage2": args.steps // 4, "vq_images": args.vq_images},
            "paper": "ETT: (c) end-to-end tuned > (b) frozen codebook embeddings >= (a) code ids on understanding"}


def run_tokenflex(args, grid: Grid) -> dict:
    runs = {"flexible": MIX, **{f"fixed_{n}": {n: 1.0} for n in sorted(MIX)}}
    per_seed = {name: {} for name in runs}
    for seed in args.seeds:
        for name, mix in runs.items():
            per_seed[name][seed] = grid.run(name, seed, [("configs/cells_tokenflex.yaml", args.steps,
                                                          ["--data.init_args.token_mix", json.dumps(mix)])],
                                            counts=COUNTS_EVAL)
    by_count = {}
    for n in COUNTS_EVAL:
        pairs = [(f"fixed_{m}", "flexible") for m in sorted(MIX)]
        by_count[n] = summarize(per_seed, pairs, key=f"final_{n}")
    return {"by_count": by_count, "per_seed": per_seed, "mix": MIX, "counts_eval": COUNTS_EVAL,
            "paper": "TokenFLEX: one model trained on 64 / 144 / 256 tokens beats fixed-count models at each count"}


def run_prior(args, grid: Grid, vq: Path, stand_in: str) -> dict:
    from train.cells import WORDS

    data = ["--data.init_args.vision_tokenizer", str(vq)]
    prior = ["--model.init_args.objective.init_args.prior", "train.prior.PriorWeighting"]
    arms = {"ntp": [], "prior": [*prior, "--model.init_args.objective.init_args.prior.init_args.reference", stand_in],
            "prior_floor": [*prior, "--model.init_args.objective.init_args.prior.init_args.reference", stand_in,
                            "--model.init_args.objective.init_args.prior.init_args.floor", "0.05"],
            "oracle": [*prior, "--model.init_args.objective.init_args.prior.init_args.oracle_words", json.dumps(WORDS)]}
    per_seed = {name: {} for name in arms}
    for seed in args.seeds:
        for name, extra in arms.items():
            # NTP is ETT's (a) codes arm: the same run directory, so it is trained once for both parts
            per_seed[name][seed] = grid.run("a_codes" if name == "ntp" else name, seed,
                                            [("configs/cells_codes.yaml", args.steps, [*data, *extra])])
    return {**summarize(per_seed, [("ntp", "prior"), ("ntp", "prior_floor"), ("ntp", "oracle"), ("prior", "oracle")]),
            "per_seed": per_seed,
            "paper": "PRIOR: +8% relative without a visual encoder (+19% with one) over NTP, from a pretrained LLM"}


def plot(report: dict, png: Path) -> None:
    plt = pyplot()
    panels = [(k, report[k]["arms"]) for k in ("ett", "prior") if k in report]
    if "tokenflex" in report:
        panels += [(f"tokenflex @{n}", report["tokenflex"]["by_count"][str(n) if str(n) in
                    report["tokenflex"]["by_count"] else n]["arms"]) for n in COUNTS_EVAL]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, arms) in zip(axes[0], panels):
        names = list(arms)
        m = [arms[a]["cell"]["mean"] for a in names]
        err = np.array([[v - arms[a]["cell"]["ci95"][0], arms[a]["cell"]["ci95"][1] - v] for a, v in zip(names, m)]).T
        ax.bar(range(len(names)), m, yerr=np.nan_to_num(err), capsize=3, color="#69c")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: per-cell acc.", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _ci(m: dict, digits: int = 3) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def tables(report: dict) -> str:
    """The report's figures as the markdown tables of docs/understanding.md (means and 95% t-intervals over seeds)."""
    cols = ("cell", "occupancy", "class_accuracy", "tf_cell", "tf_class_nll", "auc_tf_cell")
    head = "| arm | per-cell acc. | occupancy | class acc. | TF per-cell | TF class NLL | AUC (TF) |\n" \
           "|---|---|---|---|---|---|---|"
    out = []
    if "pilot" in report:
        p = report["pilot"]
        out += [f"Pilot ({p['canvases']} {p['split']} canvases, {p['steps']} steps, {p['train_seconds']:.0f} s of "
                f"training): gate {p['gate']['target']} per-cell accuracy, reached {p['gate']['cell']:.4f} "
                f"({'met' if p['gate']['met'] else 'not met'})", "",
                "| step | per-cell | occupancy | class acc. | TF per-cell | TF class NLL |", "|---|---|---|---|---|---|"]
        out += [f"| {c['step']} | {c['cell']:.4f} | {c['occupancy']:.4f} | {c['class_accuracy']:.4f} | "
                f"{c['tf_cell']:.4f} | {c['tf_class_nll']:.3f} |" for c in p["curve"]]
        out.append("")

    def block(title: str, part: dict) -> None:
        out.extend([f"**{title}**", "", head])
        for name, arm in part["arms"].items():
            out.append(f"| {name} | " + " | ".join(_ci(arm[m]) for m in cols) + " |")
        out.extend(["", "| paired (per seed, then over seeds) | per-cell | occupancy | class acc. | TF per-cell | "
                        "TF class NLL | AUC (TF) |", "|---|---|---|---|---|---|---|"])
        for name, d in part["paired"].items():
            out.append(f"| {name} | " + " | ".join(_signed(d[m]) for m in cols) + " |")
        out.append("")

    if "ett" in report:
        block("ETT", report["ett"])
        pr = report["ett"]["probe"]
        out += ["Code probe (cell class from its codebook embeddings, logistic regression, "
                f"{pr['train_canvases']} training / {pr['test_canvases']} test canvases): " +
                ", ".join(f"{k} {v:.4f}" for k, v in pr.items() if k not in ("train_canvases", "test_canvases")), ""]
    if "tokenflex" in report:
        for n, part in report["tokenflex"]["by_count"].items():
            block(f"TokenFLEX, read at {n} tokens", part)
    if "prior" in report:
        block("PRIOR", report["prior"])
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["pilot", "ett", "tokenflex"],
                   choices=["pilot", "ett", "tokenflex", "prior"])
    p.add_argument("--work", default="results/bench_cells")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="steps of every arm (batch 32)")
    p.add_argument("--pilot-steps", type=int, default=800)
    p.add_argument("--n-train", type=int, default=20_000, help="training canvases")
    p.add_argument("--test", type=int, default=1000, help="test canvases scored per model")
    p.add_argument("--val", type=int, default=500, help="validation canvases of the pilot")
    p.add_argument("--vq-images", type=int, default=8, help="ETT stage 2: images per batch in L_vq")
    p.add_argument("--probe-train", type=int, default=2000, help="training canvases of the code probe")
    p.add_argument("--tokenizer", default="results/cells/vq.safetensors",
                   help="the cells tokenizer (configs/cells_tokenizer.yaml trains it when missing)")
    p.add_argument("--tokenizer-steps", type=int, default=800)
    p.add_argument("--text-lm-steps", type=int, default=300)
    p.add_argument("--reuse", action="store_true", help="keep runs of --work that already finished with the same arguments")
    p.add_argument("--out", default=str(RESULTS / "understanding.json"))
    p.add_argument("--tables", action="store_true", help="print --out's figures as markdown tables; train nothing")
    args = p.parse_args(argv)
    if args.tables:
        print(tables(json.loads(Path(args.out).read_text())))
        return
    from train.cells import Cells

    t0, work = time.time(), Path(args.work)
    vq, seconds = Path(args.tokenizer), {}
    if not vq.is_file():
        print("== cells tokenizer ==", flush=True)
        seconds["tokenizer"] = fit_recipe("configs/cells_tokenizer.yaml", work / "tokenizer",
                                          ["--trainer.max_steps", str(args.tokenizer_steps),
                                           "--model.init_args.export_path", str(vq)])
    print("== text-only stand-in ==", flush=True)
    seconds["text_lm"] = fit_recipe("configs/cells_text_lm.yaml", work / "text_lm",
                                    ["--data.init_args.vision_tokenizer", str(vq), "--trainer.max_steps",
                                     str(args.text_lm_steps)], reuse=args.reuse)
    stand_in = last_ckpt(work / "text_lm")
    test = Cells.load("test", args.test, seed=0)
    images, truths = test.images(), [test.truth(i) for i in range(len(test))]
    report = {"task": "cells (train/cells.py)", "test_canvases": len(test), "seeds": args.seeds,
              "threads": torch.get_num_threads(), "args": vars(args), "interval": "95% t-interval over seeds"}
    out = Path(args.out)
    if out.exists():  # parts not run keep their last figures
        old = json.loads(out.read_text())
        report.update({k: old[k] for k in ("pilot", "ett", "tokenflex", "prior") if k in old and k not in args.parts})
    grid = Grid(args, vq, stand_in, images, truths)
    if "pilot" in args.parts:
        report["pilot"] = run_pilot(args, vq, stand_in)
    if "ett" in args.parts:
        report["ett"] = run_ett(args, grid, vq)
    if "tokenflex" in args.parts:
        report["tokenflex"] = run_tokenflex(args, grid)
    if "prior" in args.parts:
        report["prior"] = run_prior(args, grid, vq, stand_in)
    report.update(seconds=time.time() - t0, setup_seconds=seconds, run_seconds=grid.seconds, torch=torch.__version__,
                  machine=platform.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
