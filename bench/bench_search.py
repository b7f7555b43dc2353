"""Benchmark B4a: how busy a search keeps its trial slots (slot utilisation of a study).

Runs a study through the real driver (`tune.driver.main`, what `tune/run.py` calls) on a local
Ray with `--final-seeds 0`, timing `Tuner.fit`, then reads each trial's `reports.jsonl`:

    python bench/bench_search.py [--quick] [--scheduler asha|asha-promotion]

utilisation = Σ trial busy time / (slots × Tuner.fit wall), where a trial attempt is busy from
the trainable's entry to its last report; the slot time is split into trial start-up, epochs,
checkpoint + report between epochs, and idle (worker start, between trials, the drain at the end
when a slot has no trial left). The full mode runs `search_spaces/demo.yaml`; `--quick` a
4-trial tiny-model study (CI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from common import machine  # bench/ is the script's folder, first on sys.path

from dsanet.yamlio import load_yaml_file

REPO = Path(__file__).resolve().parents[1]
SCRATCH = Path(os.environ.get("DSANET_BENCH_SCRATCH", "/work/scratch/bench5"))
FIT_TIMES = "bench_fit_times.json"  # written into the study folder by the driver below
GOAL = 0.90

# The driver: tune.driver.main with Tuner.fit timed (start and end, epoch seconds).
DRIVER = """
import json, sys, time
from ray import tune
out, argv = sys.argv[1], sys.argv[2:]
fit = tune.Tuner.fit
def timed_fit(self, *args, **kwargs):
    start = time.time()
    try:
        return fit(self, *args, **kwargs)
    finally:
        with open(out, "w") as f:
            json.dump({"start": start, "end": time.time()}, f)
tune.Tuner.fit = timed_fit
from tune.driver import main
raise SystemExit(main(argv))
"""


# ---------------------------------------------------------------------------- running studies


def small_tree(scale: float) -> dict[str, Path]:
    """A synthetic xd-mini tree under the scratch folder (generated once), with its cache dir."""
    from dsanet import synth

    data = SCRATCH / f"xd-mini-x{scale:g}"
    if not (data / synth.MARKER).is_file():
        synth.generate("xd-mini", data, seed=0, scale=scale)
    return {"lists": data / synth.LISTS, "features": data / synth.FEATURES, "cache": data / "cache"}


def tiny_overrides(data: dict[str, Path], epochs: int, steps: int) -> dict[str, Any]:
    """The tests' tiny DSANet (tests/conftest.py: tiny_run_overrides) as space overrides."""
    return {
        "data.list_dir": str(data["lists"]),
        "data.feature_root": str(data["features"]),
        "data.cache_dir": str(data["cache"]),
        "data.val_fraction": 0.2,
        "model.visual_length": 64,
        "model.attn_window": 16,
        "model.decoder_depth": 1,
        "text.layers": 1,
        "train.batch_size": 8,
        "train.epochs": epochs,
        "train.max_steps_per_epoch": steps,
    }


def run_study(space: Path, storage: Path, log: Path, timeout: float) -> dict[str, float]:
    """`tune/run.py --space SPACE --storage-path STORAGE --final-seeds 0` with Tuner.fit timed.

    Returns the study's wall times: {"start", "end"} of Tuner.fit and the driver's "driver".
    Ray runs in a temp dir of its own; on a timeout the driver's process group is killed.
    """
    name = load_yaml_file(space)["name"]
    times = storage / name / FIT_TIMES
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # Unix sockets need short paths
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    args = ["--space", str(space), "--storage-path", str(storage), "--final-seeds", "0"]
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(times), *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"the study ran past {timeout:.0f} s; see {log}") from None
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"the study exited with {code}; {log} ends with:\n{tail}")
    return {**json.loads(times.read_text()), "driver": time.time() - started}


def read_reports(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every trial's reports.jsonl lines, by Ray trial id."""
    from tune.layout import REPORTS_FILE, TRIALS_DIR

    found = {}
    for path in sorted((root / TRIALS_DIR).glob(f"*/{REPORTS_FILE}")):
        found[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return found


# ---------------------------------------------------------------------------- utilisation


@dataclass(frozen=True)
class Attempt:
    """One run of the trainable: entered, then epochs (end time, seconds)."""

    pid: int
    entered: float
    epochs: list[tuple[float, float]]

    @property
    def busy(self) -> float:
        return self.epochs[-1][0] - self.entered

    @property
    def startup(self) -> float:
        end, seconds = self.epochs[0]
        return end - seconds - self.entered

    @property
    def training(self) -> float:
        return sum(seconds for _, seconds in self.epochs)


def attempts(reports: dict[str, list[dict[str, Any]]]) -> list[Attempt]:
    """Split each trial's lines at the ones that carry `entered` (a (re)start)."""
    found = []
    for lines in reports.values():
        for line in lines:
            if "entered" in line:
                found.append(Attempt(line["pid"], line["entered"], []))
            found[-1].epochs.append((line["time"], line["seconds"]))
    return sorted(found, key=lambda a: a.entered)


def utilisation(runs: list[Attempt], slots: int, start: float, end: float) -> dict[str, Any]:
    """Slot time split into busy parts and idle parts, by worker process (one per slot).

    Idle is split into worker start (fit start -> the worker's first trial), between trials
    (a trial's last report -> the worker's next trial) and drain (the worker's last report ->
    fit end: no trial was left for it while others ran; the study's last trial ends it).
    """
    total = slots * (end - start)
    busy = sum(a.busy for a in runs)
    startup = sum(a.startup for a in runs)
    training = sum(a.training for a in runs)
    by_worker: dict[int, list[Attempt]] = {}
    for a in runs:
        by_worker.setdefault(a.pid, []).append(a)
    first = [ws[0] for ws in by_worker.values()]
    gaps = [
        b.entered - a.epochs[-1][0]
        for ws in by_worker.values()
        for a, b in zip(ws, ws[1:], strict=False)
    ]
    worker_start = sum(a.entered - start for a in first)
    drain = sum(end - ws[-1].epochs[-1][0] for ws in by_worker.values())
    later = [a.startup for ws in by_worker.values() for a in ws[1:]]
    idle = total - busy
    return {
        "utilisation": busy / total,
        "without_drain": busy / (total - drain),
        "training_share": training / total,
        "wall": end - start,
        "slots": slots,
        "attempts": len(runs),
        "workers": len(by_worker),
        "epochs": sum(len(a.epochs) for a in runs),
        "share": {
            "busy: trial start-up (entry -> first step)": startup / total,
            "busy: epochs (train + validation)": training / total,
            "busy: checkpoint + report between epochs": (busy - startup - training) / total,
            "idle: worker start (before its first trial)": worker_start / total,
            "idle: between trials of a worker": sum(gaps) / total,
            "idle: drain (no trial left for the slot)": drain / total,
            "idle: other": (idle - worker_start - sum(gaps) - drain) / total,
        },
        "worker_start": statistics.median(a.entered - start for a in first),
        "startup_first": statistics.median(a.startup for a in first),
        "startup_later": statistics.median(later) if later else float("nan"),
        "gap_between_trials": statistics.median(gaps) if gaps else float("nan"),
    }


def describe(u: dict[str, Any]) -> str:
    rows = [f"  {name:<46} {share:6.1%}" for name, share in u["share"].items()]
    return "\n".join(
        [
            f"Tuner.fit {u['wall']:.1f} s, {u['slots']} slots, {u['attempts']} trial attempts "
            f"on {u['workers']} workers, {u['epochs']} epochs",
            "share of slot time:",
            *rows,
            f"utilisation {u['utilisation']:.3f}; without the drain {u['without_drain']:.3f}",
            f"medians: worker start {u['worker_start']:.1f} s; trial start-up "
            f"{u['startup_first']:.2f} s (first in a worker), {u['startup_later']:.2f} s "
            f"(reused worker); gap between trials {u['gap_between_trials']:.2f} s",
        ]
    )


# ---------------------------------------------------------------------------- main


def quick_space(folder: Path) -> Path:
    """A 4-trial study of the tiny model: 2 epochs of 2 steps, ASHA, 2 at a time."""
    space = {
        "name": "bench-search-quick",
        "base": "demo",
        "overrides": tiny_overrides(small_tree(0.25), epochs=2, steps=2),
        "search": {"optim.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True}},
        "metric": "val_ap",
        "mode": "max",
        "searcher": {"kind": "tpe", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"kind": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 4,
        "max_concurrent": 2,
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"tracking_uri": "", "experiment": "bench-search-quick"},
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 tiny trials (CI smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the study folder")
    parser.add_argument(
        "--scheduler",
        choices=("asha", "asha-promotion"),
        default="asha",
        help="the study's scheduler.kind (default asha, as the demo space)",
    )
    args = parser.parse_args(argv)
    folder = SCRATCH / f"search-{'quick' if args.quick else 'demo'}-{os.getpid()}"
    folder.mkdir(parents=True)
    space = quick_space(folder) if args.quick else REPO / "search_spaces" / "demo.yaml"
    spec = load_yaml_file(space)
    if args.scheduler != spec["scheduler"]["kind"]:  # a copy of the space with the other kind
        spec["scheduler"]["kind"] = args.scheduler
        spec["name"] = f"{spec['name']}-{args.scheduler}"
        space = folder / f"{spec['name']}.yaml"
        space.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        times = run_study(space, folder, folder / "study.log", timeout=1500)
        root = folder / spec["name"]
        runs = attempts(read_reports(root))
        cpus = spec["resources"]["cpu"]
        slots = min(spec["max_concurrent"], int((os.cpu_count() or 1) // cpus))
        u = utilisation(runs, slots, times["start"], times["end"])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(describe(u))
    load = os.getloadavg()[0]
    what = "4 tiny trials" if args.quick else f"demo space, {spec['num_samples']} trials"
    what += "" if args.scheduler == "asha" else f", {args.scheduler}"
    command = " ".join(["python bench/bench_search.py", *(sys.argv[1:] if argv is None else argv)])
    verdict = "met" if u["utilisation"] >= GOAL else "not met"
    print(
        f"| B4 slot utilisation ({what}, {slots} slots) | `{command}` | {machine()} "
        f"| {datetime.date.today()} | utilisation {u['utilisation']:.2f} "
        f"({u['training_share']:.2f} in epochs; {u['without_drain']:.2f} without the "
        f"end-of-study drain) over "
        f"{u['wall']:.0f} s of Tuner.fit, driver {times['driver']:.0f} s; goal >= {GOAL:.2f} "
        f"{verdict}; load {load:.1f} |"
    )


if __name__ == "__main__":
    main()
