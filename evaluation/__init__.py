"""Evaluation: independent judges (classifiers trained on held-out real data), caption scores, FID, intervals,
and the one `evaluate()` that `mmar eval` and the demo call. Sits above the product packages; never imported by them
except by the scripts that report (train/demo.py)."""
