"""The PRIOR benchmark's scenes part end to end at a tiny size (slow: `make test-slow`): reference LM, NTP and
PRIOR in both settings, scores at each checkpoint, the JSON and its plot; and pieces of other benchmarks
that the test suite can run quickly."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

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
             "--patience", "1", "--publish", str(tmp_path / "published")])
    res = json.loads(out.read_text())
    assert (res["validation_images"], res["tuning_images"], res["test_images"]) == (50, 150, 100)
    assert set(res["kl_grid"]) == {"0.001", "1e-06"} and res["kl_weight"] in (1e-3, 1e-6)
    for kind in ("vq", "kl"):
        r = res[kind]
        assert 2 <= r["steps"] <= 8 and math.isfinite(r["best_val_mse"]) and r["test_images"] == 100
        assert r["test_rfid_ci95"][0] <= r["test_rfid"] <= r["test_rfid_ci95"][1]
        assert 0 <= r["test_accuracy_ci95"][0] <= r["test_accuracy"] <= r["test_accuracy_ci95"][1] <= 1
        registry.load(res["files"][kind])  # the cached tokenizers load, from the published copies
        assert res["files"][kind] == str(tmp_path / "published" / f"{kind}.safetensors")
        assert res["sha256"][kind] == hashlib.sha256(Path(res["files"][kind]).read_bytes()).hexdigest()
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


def test_xar_tokenizers_grid_from_an_earlier_report(tmp_path):
    """--grid-from takes an earlier report's KL weight grid and choice (same dataset and holdout) and refuses another
    split's."""
    from types import SimpleNamespace

    from benchmarks.xar_tokenizers import kl_grid

    prev = {"dataset": "mnist", "holdout": 3000, "kl_grid": {"0.001": {"tuning_rfid": 30.0}}, "kl_weight": 0.001,
            "tolerance": 0.1, "grid_steps": 300, "tune_images": 500, "date": "2026-12-04T00:00:00+00:00"}
    path = tmp_path / "prev.json"
    path.write_text(json.dumps(prev))
    a = SimpleNamespace(grid_from=path, dataset="mnist", holdout=3000)
    res = kl_grid(a, None, {}, {}, tmp_path, [])
    assert res["kl_weight"] == 0.001 and res["kl_grid"] == prev["kl_grid"] and res["grid_date"] == prev["date"]
    with pytest.raises(SystemExit, match="holdout 3000"):
        kl_grid(SimpleNamespace(grid_from=path, dataset="mnist", holdout=1500), None, {}, {}, tmp_path, [])
