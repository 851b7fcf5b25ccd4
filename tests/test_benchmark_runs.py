"""The PRIOR benchmark's scenes part end to end at a tiny size (slow: `make test-slow`): reference LM, NTP and
PRIOR in both settings, scores at each checkpoint, the JSON and its plot; and pieces of other benchmarks
that the test suite can run quickly."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_prior_benchmark_scenes_part(tmp_path):
    from benchmarks.prior import main

    out = tmp_path / "prior.json"
    main(["--parts", "scenes", "--work", str(tmp_path / "work"), "--out", str(out), "--scenes-vq", str(tmp_path / "vq.safetensors"),
          "--tokenizer-steps", "2",
          "--n-train", "64", "--scenes-test", "12", "--scenes-steps", "2", "--ref-steps", "2", "--points", "2"])
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and (tmp_path / "vq.safetensors").is_file()
    scenes = report["scenes"]
    assert scenes["test_scenes"] == 12 and set(scenes["settings"]) == {"codes", "vit"}
    for setting in scenes["settings"].values():
        for variant in ("ntp", "prior"):
            assert [p["step"] for p in setting["curves"][variant]] == [1, 2]
            assert all(0 <= p["slot_accuracy"] <= 1 and p["n"] == 12 for p in setting["curves"][variant])
        assert math.isfinite(setting["prior_vs_ntp_at_end"]["cider"]["ci95"][0])
    timing = scenes["reference_timing"]
    assert 0 < timing["reference_cached_s"] and 0 < timing["on_the_fly_share_of_step"] < 1


@pytest.mark.slow
def test_cells_benchmark_end_to_end(tmp_path):
    """benchmarks/cells.py, every part at a tiny size with 2 seeds: tokenizer and stand-in trained, the ETT stages
    chained, NTP shared by the ETT and PRIOR parts (trained once), paired differences equal to per-seed ones."""
    from benchmarks.cells import main, tables

    out, work = tmp_path / "cells.json", tmp_path / "work"
    main(["--parts", "pilot", "ett", "tokenflex", "prior", "--work", str(work), "--out", str(out),
          "--tokenizer", str(tmp_path / "vq.safetensors"), "--tokenizer-steps", "2", "--text-lm-steps", "2",
          "--seeds", "0", "1", "--steps", "4", "--pilot-steps", "8", "--n-train", "64", "--test", "8", "--val", "8",
          "--vq-images", "2", "--probe-train", "16"])
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert [p["step"] for p in r["pilot"]["curve"]] == list(range(1, 9)) and r["pilot"]["canvases"] == 8
    ett, prior = r["ett"], r["prior"]
    assert set(ett["arms"]) == {"a_codes", "b_frozen", "c_ett"}
    for arm in ett["per_seed"].values():
        for run in arm.values():
            assert [p["step"] for p in run["curve"]] == [1, 2, 3, 4]
            assert 0 <= run["final"]["cell"] <= 1 and run["final"]["tf_class_nll"] > 0
    assert prior["per_seed"]["ntp"] == ett["per_seed"]["a_codes"]
    assert len(list(work.glob("seed0/*/stage0"))) == 3 + 4 + 3  # ETT (a, b, c), TokenFLEX (4), PRIOR (3 more)
    d = prior["paired"]["oracle_minus_ntp"]["tf_cell"]
    by_hand = [prior["per_seed"]["oracle"][s]["final"]["tf_cell"] - prior["per_seed"]["ntp"][s]["final"]["tf_cell"]
               for s in ("0", "1")]
    assert d["n"] == 2 and np.allclose(d["per_seed"], by_hand)
    assert set(r["tokenflex"]["by_count"]) == {"4", "16", "36", "64"}
    assert set(r["tokenflex"]["by_count"]["36"]["paired"]) == {f"flexible_minus_fixed_{n}" for n in (4, 16, 64)}
    assert 0 <= ett["probe"]["frozen"] <= 1 and "tuned_seed1" in ett["probe"]
    md = tables(r)  # the docs' tables: one row per arm and per paired difference
    for row in ("| a_codes |", "| c_ett_minus_b_frozen |", "| flexible_minus_fixed_64 |", "| oracle_minus_ntp |"):
        assert row in md


def test_fit_recipe_reuses_a_finished_run_only_while_its_inputs_are_unchanged(tmp_path, monkeypatch):
    import train.cli
    from benchmarks import fit_recipe

    runs = []

    def fake_main(cmd):
        runs.append(cmd)
        (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")

    monkeypatch.setattr(train.cli, "main", fake_main)
    stage = tmp_path / "stage1.ckpt"
    stage.write_bytes(b"first")
    args = ("configs/scenes_lm_codes.yaml", tmp_path / "run", ["--model.init_args.init_from", str(stage)])
    fit_recipe(*args, reuse=True)
    fit_recipe(*args, reuse=True)
    assert len(runs) == 1  # same command line, same input files: kept
    stage.write_bytes(b"second, longer")  # an earlier stage was redone
    fit_recipe(*args, reuse=True)
    fit_recipe(*args[:2], [*args[2], "--trainer.max_steps", "5"], reuse=True)
    fit_recipe(*args[:2], [*args[2], "--trainer.max_steps", "5"], reuse=False)
    assert len(runs) == 4


def test_xar_reconstruction_rows_round_trip_each_tokenizer(tmp_path):
    """bench-xar's rFID rows: each saved tokenizer's decode(encode(x)) is scored against the labels of x."""
    from conftest import TINY_VQ

    from benchmarks.xar import reconstructions
    from vision_tokenizers import registry
    from vision_tokenizers.kl import KLConfig, KLTokenizer
    from vision_tokenizers.vq import VQTokenizer

    torch.manual_seed(0)
    registry.save(VQTokenizer(TINY_VQ), tmp_path / "vq.safetensors")
    kl = KLTokenizer(KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4))
    registry.save(kl, tmp_path / "kl.safetensors")
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = np.array([0, 1, 0, 1, 0, 1])
    seen = []

    class Clf:  # "predicts" 1 for the images whose mean is above the set's median
        def predict(self, imgs):
            m = imgs.mean((1, 2, 3))
            return (m > m.median()).long().numpy()

    class Fid:
        def interval(self, imgs, boot):
            seen.append(imgs)
            return float(len(seen)), (0.0, 2.0)

    res = reconstructions({t: tmp_path / f"{t}.safetensors" for t in ("vq", "kl")}, x, labels, Fid(), Clf(), boot=3)
    assert [r.shape for r in seen] == [x.shape, x.shape] and all(r.abs().max() <= 1 for r in seen)
    with torch.no_grad():
        assert torch.allclose(seen[1], kl.decode(kl.encode(x)).clamp(-1, 1), atol=1e-6)
    want = (Clf().predict(seen[0]) == labels).mean()
    assert res["vq_reconstruction_accuracy"] == pytest.approx(want)
    assert res["kl_reconstruction_fid"] == 2.0 and res["kl_reconstruction_samples"] == 6
    assert len(res["vq_reconstruction_accuracy_ci95"]) == 2


def test_video_tokenizer_ablation_runs_and_has_the_recipe_as_a_row(tmp_path, monkeypatch):
    import yaml

    import benchmarks.video_tokenizer as vt
    from benchmarks.video_tokenizer import BASE, RECIPE, VARIANTS, config, main
    from evaluation.judges import HeldOutClassifier
    from train.video.data import _mnist_split

    digits, labels = _mnist_split("heldout")  # a small classifier keeps the test fast; the benchmark fits all
    small = HeldOutClassifier(torch.from_numpy(digits[:200]).float().div(127.5).sub(1).unsqueeze(1), labels[:200],
                              augment=False)
    monkeypatch.setattr(vt, "heldout_classifier", lambda *a, **k: small)

    recipe = yaml.safe_load(open("configs/video_tokenizer.yaml"))["model"]["init_args"]["tokenizer"]
    assert {k: recipe[k] for k in BASE} == {k: getattr(config(RECIPE), k) for k in BASE}  # the README recipe's row
    assert all(set(v) <= set(BASE) and len(v) <= 1 for v in VARIANTS.values())  # one change per variant
    out = tmp_path / "vt.json"
    main(["--variants", "s8_t4", "s4_t4", "--steps", "1", "--n-train", "8", "--n-eval", "8", "--results", str(out)])
    res = json.loads(out.read_text())
    assert res["s8_t4"]["codes"] == 5 * 8 * 8 and res["s4_t4"]["codes"] == 5 * 16 * 16
    for r in res.values():
        assert 0 <= r["digit_acc_lo"] <= r["digit_acc"] <= r["digit_acc_hi"] <= 1 and math.isfinite(r["psnr"])


def test_nbp_benchmark_runs_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """`make bench-nbp` at toy size: the recipe's row-block model (here a one-step toy of configs/video32_*.yaml,
    tuned and saved as `make video` does), the NTP and frame-block arms trained from the same recipe, each tuned,
    scored, and timed interleaved; the JSON rows and the Markdown table."""
    import benchmarks.nbp as nbp
    from evaluation.judges import HeldOutClassifier
    from models.bundle import load_bundle
    from train.cli import main as cli
    from train.video.data import _mnist_split

    digits, labels = _mnist_split("heldout")
    small = HeldOutClassifier(torch.from_numpy(digits[:200]).float().div(127.5).sub(1).unsqueeze(1), labels[:200],
                              augment=False)
    monkeypatch.setattr(nbp, "heldout_classifier", lambda *a, **k: small)
    monkeypatch.setattr(nbp, "TUNE_GRID", {"cfg": (1.0, 3.0), "temperature": (1.0,)})
    tok = tmp_path / "tok.safetensors"
    quiet = ["--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             "--trainer.val_check_interval=1"]
    cli(["fit", "--config", "configs/video32_tokenizer.yaml", *quiet, "--trainer.default_root_dir", str(tmp_path / "t"),
         "--model.init_args.export_path", str(tok), "--data.init_args.n_train", "4", "--data.init_args.n_val", "2",
         "--data.init_args.batch_size", "2"])
    lm = ["--model.init_args.dim=64", "--model.init_args.n_layers=1", "--model.init_args.n_heads=2",
          "--model.init_args.n_kv_heads=2", "--model.init_args.mlp_dim=128", f"--data.init_args.vision_tokenizer={tok}",
          "--data.init_args.n_train=4", "--data.init_args.n_val=2", "--data.init_args.batch_size=2"]
    cli(["fit", "--config", "configs/video32_lm.yaml", *quiet, *lm, "--trainer.default_root_dir", str(tmp_path / "l"),
         "--data.init_args.cache_dir", str(tmp_path / "cache")])
    row = tmp_path / "row_model"
    nbp.main(["--n-eval", "8", "--digit-size", "20", "--start", "centred", "--score-results", str(tmp_path / "r.json"),
              "--tune", str(tmp_path / "l" / "checkpoints" / "last.ckpt"), "--tuned-model", str(row)])
    assert load_bundle(row).sampling.cfg in (1.0, 3.0) and (row / "tuning.json").is_file()
    out = tmp_path / "nbp.json"
    nbp.main(["--n-eval", "8", "--repeats", "2", "--results", str(out), "--save", str(tmp_path / "bench"),
              "--recipe-model", str(row), *[f"--fit-arg={x}" for x in quiet + lm]])
    res = json.loads(out.read_text())["arms"]
    assert list(res) == ["ntp", "nbp_row8", "nbp_frame64"]
    # backbone forwards per video, prefill included: 192 codes; 7 + 24 row blocks; 63 + 3 frame blocks
    assert [res[k]["forwards_b1"] for k in res] == [192, 1 + 7 + 23, 1 + 63 + 2]
    for r in res.values():
        assert r["speedup_b1_lm"] > 0 and r["fps_b8_with_decode"] > 0 and len(r["tuning"]["grid"]) == 2
        assert r["sec_per_call_b1_lm"]["q25"] <= r["sec_per_call_b1_lm"]["median"] <= r["sec_per_call_b1_lm"]["q75"]
    assert res["ntp"]["speedup_b1_lm"] == 1.0
    assert load_bundle(tmp_path / "bench" / "nbp_frame64" / "model").objective.config.block_size == 64
    assert nbp.table(json.loads(out.read_text())).count("\n") == 4  # header, rule, three samplers


def test_over_seeds_and_auc_by_hand():
    from benchmarks.cells import auc, over_seeds

    s = over_seeds([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["n"] == 3
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    curve = [{"fraction": 0.5, "tf_cell": 0.5}, {"fraction": 1.0, "tf_cell": 1.0}]
    assert auc(curve) == pytest.approx((0.5 * (1 / 11 + 0.5) + 0.5 * (0.5 + 1.0)) / 2 * 1.0)


def test_cells_summary_pairs_by_seed_and_prints_its_tables():
    """summarize: arms over seeds, paired differences per seed; tables(): one row per arm and per difference."""
    from benchmarks.cells import METRICS, summarize, tables

    def run(x):
        return {"final": {m: x for m in METRICS}}

    per_seed = {"a": {0: run(0.5), 1: run(0.6), 2: run(0.7)}, "b": {0: run(0.6), 1: run(0.8), 2: run(0.7)}}
    part = summarize(per_seed, [("a", "b")])
    d = part["paired"]["b_minus_a"]["cell"]
    assert d["per_seed"] == pytest.approx([0.1, 0.2, 0.0]) and d["mean"] == pytest.approx(0.1) and d["n"] == 3
    assert part["arms"]["b"]["tf_cell"]["mean"] == pytest.approx(0.7)
    md = tables({"prior": part})
    assert "| a | 0.600 [" in md and "| b_minus_a | +0.100 [" in md and md.startswith("**PRIOR**")


def test_xar_tokenizers_choose_the_most_regular_weight_within_tolerance():
    from benchmarks.xar_tokenizers import choose_weight, main

    assert choose_weight({1e-3: 60.0, 1e-4: 52.0, 1e-5: 50.0, 1e-6: 50.5}, 0.1) == 1e-4  # 52 <= 1.1 x 50
    assert choose_weight({1e-3: 60.0, 1e-4: 56.0, 1e-5: 50.0}, 0.1) == 1e-5
    assert choose_weight({1e-3: 60.0, 1e-6: 50.0}, 0.0) == 1e-6
    with pytest.raises(SystemExit):
        main(["--max-steps", "0"])


@pytest.mark.slow
def test_xar_tokenizers_benchmark_end_to_end(tmp_path, monkeypatch):
    """`python -m benchmarks.xar_tokenizers` at toy size, with a small feature network in place of Inception: the
    grid, the early-stopped runs, the test floors with the paired ratio, the JSON and the cached tokenizer files."""
    import benchmarks.xar_tokenizers as xt
    from vision_tokenizers import registry

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(64, 16))
    monkeypatch.setattr(xt, "inception_path", lambda: net)
    out = tmp_path / "r.json"
    xt.main(["--holdout", "300", "--out", str(tmp_path / "tok"), "--results", str(out), "--kl-weights", "1e-3",
             "1e-6", "--grid-steps", "3", "--tune-images", "40", "--max-steps", "8", "--val-every", "2",
             "--patience", "1"])
    res = json.loads(out.read_text())
    assert (res["validation_images"], res["tuning_images"], res["test_images"]) == (50, 150, 100)
    assert set(res["kl_grid"]) == {"0.001", "1e-06"} and res["kl_weight"] in (1e-3, 1e-6)
    for kind in ("vq", "kl"):
        r = res[kind]
        assert 2 <= r["steps"] <= 8 and math.isfinite(r["best_val_mse"]) and r["test_images"] == 100
        assert r["test_rfid_ci95"][0] <= r["test_rfid"] <= r["test_rfid_ci95"][1]
        assert 0 <= r["test_accuracy_ci95"][0] <= r["test_accuracy"] <= r["test_accuracy_ci95"][1] <= 1
        registry.load(res["files"][kind])  # the cached tokenizers load
    lo, hi = res["kl_over_vq_rfid_ci95"]
    assert lo <= res["kl_over_vq_rfid"] <= hi
    assert res["kl_over_vq_rfid"] == pytest.approx(res["kl"]["test_rfid"] / res["vq"]["test_rfid"], rel=1e-6)
    assert res["target_met"] == (res["kl_over_vq_rfid"] <= 1.2)


def test_xar_adaln_benchmark_writes_its_ratio(tmp_path):
    from benchmarks.xar_adaln import main

    out = tmp_path / "a.json"
    main(["--steps", "1", "--batch", "2", "--prompt", "3", "--results", str(out)])
    res = json.loads(out.read_text())
    med = res["ms_per_step_median"]
    assert set(med) == {"per token", "per entity"} and min(med.values()) > 0
    assert res["speedup"] == pytest.approx(med["per token"] / med["per entity"])
    with pytest.raises(SystemExit):
        main(["--steps", "0", "--results", str(out)])
