"""benchmarks/xar.py (issue 30's grid): the weight tracks, the summary's claims and verdicts, the cfg schedule it
tunes, and (slow) the whole grid at toy size on toy tokenizers."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch


def _fit(module, tracks, steps):
    """Drive Tracks' hooks over `steps` SGD-like updates of `module` (no Lightning needed)."""
    trainer = SimpleNamespace(global_step=0)
    tracks.on_train_start(trainer, module)
    seen = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(float(step))
        trainer.global_step = step
        seen.append([p.detach().clone() for p in module.parameters() if p.requires_grad])
        tracks.on_train_batch_end(trainer, module)
    tracks.on_train_end(trainer, module)
    return seen


def test_tracks_keep_each_ema_and_the_weights_at_budget_fractions():
    from benchmarks.xar import Tracks

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    m.register_parameter("frozen", frozen)
    start = [p.detach().clone() for p in (m.weight, m.bias)]
    tracks = Tracks(decays=[0.5, 0.9], fractions=[0.25, 0.5], steps=8)
    seen = _fit(m, tracks, 8)
    for d in (0.5, 0.9):  # the formula of train.callbacks.EMA, by hand
        avg = [s.clone() for s in start]
        for n, w in enumerate(seen):
            dd = min(d, (1 + n) / (10 + n))
            avg = [dd * a + (1 - dd) * x for a, x in zip(avg, w)]
        tracks.load(m, f"ema{d:g}")
        assert all(torch.allclose(p, a) for p, a in zip((m.weight, m.bias), avg))
    tracks.load(m, "raw", 0.25)  # step 2 of 8
    assert all(torch.equal(p, s) for p, s in zip((m.weight, m.bias), seen[1]))
    tracks.load(m, "raw", 0.5)
    assert all(torch.equal(p, s) for p, s in zip((m.weight, m.bias), seen[3]))
    tracks.load(m, "raw")  # the end
    assert all(torch.equal(p, s) for p, s in zip((m.weight, m.bias), seen[-1]))
    assert torch.equal(m.frozen, torch.ones(2))  # frozen weights are not tracked
    with pytest.raises(ValueError, match="exactly one budget"):
        Tracks(steps=4, seconds=1.0)


def _row(arm, regime, seed, fid, acc, steps=100):
    return {"arm": arm, "regime": regime, "seed": seed, "train_steps": steps, "train_seconds": 10.0,
            "seconds_per_image": 0.1, "test": {"fid": fid, "fid_ci95": [fid, fid + 1], "accuracy": acc,
                                               "accuracy_ci95": [acc - 0.01, acc + 0.01], "samples": 1000}}


def _cached():
    return {"vq": {"test_rfid": 10.0, "test_rfid_ci95": [10, 12], "test_accuracy": 0.97, "test_accuracy_ci95": [0.96, 0.98]},
            "kl": {"test_rfid": 8.0, "test_rfid_ci95": [8, 9], "test_accuracy": 0.96, "test_accuracy_ci95": [0.95, 0.97]},
            "kl_over_vq_rfid": 0.8, "kl_over_vq_rfid_ci95": [0.8, 0.9]}


def test_summary_pairs_seeds_and_judges_claims_by_hand():
    from benchmarks.xar import summarize, tables

    runs = {}
    for s, (ntp, cell, tf) in enumerate([(30, 20, 40), (32, 21, 41), (31, 22, 39)]):
        runs[f"ntp_vq/time/{s}"] = _row("ntp_vq", "time", s, ntp, 0.9)
        runs[f"xar_cell/time/{s}"] = _row("xar_cell", "time", s, cell, 0.8 + 0.05 * s)
        runs[f"xar_cell_tf/time/{s}"] = _row("xar_cell_tf", "time", s, tf, 0.8 + 0.05 * s)
    runs["xar_token/time/0"] = _row("xar_token", "time", 0, 50, 0.5)
    summary = summarize({"runs": runs, "tuning": {}}, _cached())
    r = summary["regimes"]["time"]
    assert set(summary["regimes"]) == {"time"}
    c = r["claims"]["c_xar_beats_ntp"]
    diffs = [20 - 30, 21 - 32, 22 - 31]
    assert c["seeds"] == [0, 1, 2] and c["fid_xar_cell_minus_ntp_vq"]["mean"] == pytest.approx(np.mean(diffs))
    half = 4.302652729911275 * np.std(diffs, ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert c["fid_xar_cell_minus_ntp_vq"]["ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half])
    assert c["verdict_fid"] == "holds"  # lower FID, interval below 0
    assert c["accuracy_xar_cell_minus_ntp_vq"]["mean"] == pytest.approx(np.mean([-0.1, -0.05, 0.0]))
    assert r["claims"]["b_noisy_context_beats_teacher_forcing"]["verdict_accuracy"] == "unresolved"  # equal accuracies
    assert r["claims"]["a_cell_beats_token"]["verdict_fid"] == "incomplete (1 seed(s))"
    assert r["arms"]["xar_cell"]["fid_over_floor"]["mean"] == pytest.approx(np.mean([20, 21, 22]) / 8.0)
    t = r["targets"]
    assert t["fid_target_met"] is False and t["accuracy_target_met"] is False  # 2.6x the floor, 0.85 accuracy
    assert summary["kl_over_vq_rfid"]["met"] is True
    text = tables(summary)
    assert "| c_xar_beats_ntp | 3 |" in text and "holds" in text


def test_verdict_reads_the_interval_and_the_direction():
    from benchmarks.xar import verdict

    d = lambda lo, hi, n=3: {"ci95": [lo, hi], "n": n}  # noqa: E731
    assert verdict(d(-3, -1), True, lower_is_better=True) == "holds"
    assert verdict(d(1, 3), True, lower_is_better=True) == "reversed"
    assert verdict(d(0.01, 0.2), True, lower_is_better=False) == "holds"
    assert verdict(d(-1, 1), True, lower_is_better=True) == "unresolved"
    assert verdict(d(-3, -1, 2), False, lower_is_better=True) == "incomplete (2 seed(s))"


def test_cfg_schedule_constant_guides_every_entity_and_linear_ramps():
    from models.objectives.xar import cfg_ramp

    assert [cfg_ramp(3.0, k, 4) for k in range(4)] == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    assert [cfg_ramp(3.0, k, 4, "constant") for k in range(4)] == [3.0] * 4
    assert cfg_ramp(3.0, 0, 1) == cfg_ramp(3.0, 0, 1, "constant") == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_ramp(3.0, 0, 4, "cosine")


def test_bench_xar_rejects_bad_values():
    from benchmarks.xar import main

    for bad in (["--lm-steps", "0"], ["--curve-per-class", "200"], ["--ema-decays", "1.0"], ["--seeds", "0", "0"],
                ["--probe-steps", "5"]):
        with pytest.raises(SystemExit):
            main(bad)


@pytest.mark.slow
def test_bench_xar_grid_end_to_end(tmp_path, monkeypatch):
    """Toy tokenizers (benchmarks.xar_tokenizers), then two arms x two seeds x both regimes with a small feature
    network in place of Inception: tuning stored once per arm, runs stored and reused, the summary and tables."""
    import benchmarks.xar as bx
    import benchmarks.xar_tokenizers as xt

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(64, 16))
    monkeypatch.setattr(xt, "inception_path", lambda: net)
    monkeypatch.setattr(bx, "inception_path", lambda: net)
    monkeypatch.setattr(bx, "SAMPLES", tmp_path / "samples")
    tok = tmp_path / "tok.json"
    xt.main(["--holdout", "300", "--out", str(tmp_path / "tok"), "--results", str(tok), "--kl-weights", "1e-3",
             "--grid-steps", "2", "--tune-images", "40", "--max-steps", "3", "--val-every", "2", "--patience", "1",
             "--publish", str(tmp_path / "published")])
    store, out = tmp_path / "runs.json", tmp_path / "xar.json"
    args = ["--tokenizers", str(tok), "--arms", "ntp_vq", "xar_cell", "--seeds", "0", "1", "--curve-seeds", "0",
            "--work", str(tmp_path / "work"), "--store", str(store), "--results", str(out), "--lm-seconds", "3",
            "--lm-steps", "3", "--probe-steps", "10", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
            "--mlp-dim", "64", "--per-class", "2", "--curve-per-class", "1", "--tune-per-class", "1",
            "--tune-reference", "20", "--tune-cfg", "2.0", "--tune-temperature", "1.0", "--ema-decays", "0.9",
            "--gen-batch", "2", "--batch-size", "8", "--warmup-steps", "1"]
    bx.main(args)
    st = json.loads(store.read_text())
    assert set(st["runs"]) == {f"{a}/{r}/{s}" for a in ("ntp_vq", "xar_cell") for r in ("time", "steps") for s in (0, 1)}
    assert set(st["tuning"]) == {"ntp_vq", "xar_cell"}
    t = st["tuning"]["xar_cell"]
    assert t["weights"] in ("raw", "ema0.9") and set(t["settings"]) == {"cfg", "cfg_schedule", "sampler", "steps"}
    assert len(t["tried"]) == 2 + 2 + 2  # weights, then cfg x schedule (one new), then sampler x steps (two new)
    assert st["runs"]["xar_cell/steps/1"]["train_steps"] == 3 and st["runs"]["xar_cell/steps/1"]["test"]["samples"] == 20
    assert [p["fraction"] for p in st["runs"]["ntp_vq/time/0"]["curve"]] == [0.25, 0.5, 1.0]
    assert "curve" not in st["runs"]["ntp_vq/time/1"]
    assert (tmp_path / "samples" / "xar_cell_time.png").is_file()
    rep = json.loads(out.read_text())["summary"]
    c = rep["regimes"]["steps"]["claims"]["c_xar_beats_ntp"]
    assert c["seeds"] == [0, 1] and c["verdict_fid"] == "incomplete (2 seed(s))"
    dates = {k: r["date"] for k, r in st["runs"].items()}
    bx.main(args)  # everything stored: nothing retrained
    assert {k: r["date"] for k, r in json.loads(store.read_text())["runs"].items()} == dates
    bx.main([*args, "--summary-only"])  # rebuilt from the store alone: the judge's real-test accuracy survives
    assert 0 < json.loads(out.read_text())["classifier_accuracy_on_real_test"] <= 1
