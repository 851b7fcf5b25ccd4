"""Speed and quality benchmarks (`make bench-<name>` runs `benchmarks/<name>.py`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_report(report: dict, out: str | Path, plot: Callable[[dict, Path], None] | None = None) -> None:
    """The report as JSON (written atomically) and, when matplotlib is installed, its plot as a PNG beside it."""
    from models.io import write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    if plot is not None:
        try:
            plot(report, out.with_suffix(".png"))
        except ImportError:
            print("matplotlib not installed: no plot (pip install -e '.[bench]')")
    print(f"wrote {out}")
