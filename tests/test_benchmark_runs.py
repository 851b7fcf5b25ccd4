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
