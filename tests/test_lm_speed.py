"""`make bench`'s benchmarks/lm_speed.py as a smoke run (--quick): every row is produced and written, the images/s
and captions/s table included. Slow (`make test-slow`): it times transformers too."""
import json

import pytest


@pytest.mark.slow
def test_quick_lm_speed_benchmark_runs(tmp_path):
    from benchmarks.lm_speed import main

    out = tmp_path / "lm_speed.json"
    main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("train", "decode", "product"):
        r = res[f"{key}_ratio_of_medians"]
        assert r["min"] <= r["max"] and r["ratio"] > 0
    users = res["users"]
    assert {(u["task"], u["batch"]) for u in users} == {(t, b) for t in ("text_to_image", "caption") for b in (1, 2)}
    assert all(u["per_s"] > 0 and u["lm_tokens_per_item"] in (49, 32) for u in users)
    assert res["users_table"].count("\n") == 1 + len(users)


def test_demo_shape_bundle_has_the_demo_shape():
    """The random-weight bundle of the images/s table has the demo LM and its 49 codes per image."""
    from benchmarks.lm_speed import demo_shape_bundle

    b = demo_shape_bundle()
    assert b.vision.num_tokens == 49 and b.lm.cfg.dim == 256 and b.max_len == 80
