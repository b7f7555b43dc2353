"""Benchmark of segment mAP (`dsanet.metrics.detection_map`) on the xd_metrics_seed0 fixture.

Times the 800-video XD call (best of N runs) and prints one markdown row for bench/RESULTS.md:
`python bench/bench_map.py [--repeats N]`; `--quick` runs once, as a CI smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import machine  # bench/ is the script's folder, first on sys.path

from dsanet import metrics
from dsanet.datasets import load_spec
from dsanet.npyio import load_object_list

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def load_inputs() -> tuple[list[np.ndarray], np.ndarray, np.ndarray, dict]:
    """Frame-level class probabilities per video, gt segments and labels, fixture metadata."""
    spec = load_spec("xd")
    fixture = SHARED / "fixtures" / "xd_metrics_seed0"
    with np.load(fixture.with_suffix(".npz")) as arrays:
        offsets, probs = arrays["offsets"], arrays["probs_modulated"]
    meta = json.loads(fixture.with_suffix(".json").read_text())
    frames = [
        metrics.snippets_to_frames(probs[offsets[i] : offsets[i + 1]], spec.frames_per_snippet)
        for i in range(len(offsets) - 1)
    ]
    data = SHARED / "data" / spec.name
    segments = load_object_list(data / spec.gt_segments)
    labels = load_object_list(data / spec.gt_labels)
    return frames, segments, labels, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is kept")
    parser.add_argument("--quick", action="store_true", help="one run (CI smoke test)")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    frames, segments, labels, meta = load_inputs()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = metrics.detection_map(frames, segments, labels, meta["classes"])
        times.append(time.perf_counter() - start)
    error = float(np.max(np.abs(np.subtract(result, meta["expected"]["map"]))))
    command = " ".join(["python bench/bench_map.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"| segment mAP, XD fixture (800 videos, 7 classes, 5 IoUs) | `{command}` | {machine()} "
        f"| {datetime.date.today()} | best {min(times):.3f} s of {repeats} "
        f"(largest mAP deviation from the fixture {error:.1e}) |"
    )


if __name__ == "__main__":
    main()
