"""The PRIOR benchmark's scenes part end to end at a tiny size (slow: `make test-slow`): reference LM, NTP and
PRIOR in both settings, scores at each checkpoint, the JSON and its plot."""
from __future__ import annotations

import json
import math

import pytest


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
