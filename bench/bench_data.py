"""Benchmark B3: epoch data time of the packed memory-mapped cache vs the reference's loader, and
the resident memory of 1, 2 and 4 processes attached to one cache.

Ours: `dsanet.cache.open_train` + `dsanet.data.epoch_batches` / `iterate_batches`. Naive: the
official Dataset's pattern (`bench/naive_data.py`). Both read a VadCLIP-format tree, e.g. one
written by `python -m dsanet synth --preset xd-full --scale 0.25 --out DIR`:
`python bench/bench_data.py --root DIR [--repeats N] [--procs 1 2 4]`; `--quick` writes a tiny
tree to a temporary folder and runs each part once, as a CI smoke test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from common import command, row

from dsanet.cache import open_train
from dsanet.data import epoch_batches, iterate_batches, read_list
from dsanet.datasets import load_spec

T, D, BATCH = 256, 512, 96


def ours_epoch(packed, seed: int) -> int:
    """One shuffled pass over the cache, batch by batch; returns the number of rows read."""
    rows = np.arange(len(packed.lengths))
    count = 0
    for batch in iterate_batches(
        packed.features,
        packed.lengths,
        packed.targets,
        epoch_batches(rows, packed.targets, "mixed", BATCH, seed, 0),
    ):
        count += batch.features.shape[0]
    return count


def open_cache(root: Path, cache: Path):
    spec = load_spec("xd")
    videos = read_list(root / "lists" / spec.train_list, root / "features", spec)
    start = time.perf_counter()
    packed = open_train(cache, videos, T, D)
    return packed, time.perf_counter() - start


def naive_dataset(root: Path):
    import naive_data

    spec = load_spec("xd")
    return naive_data.NaiveDataset(root / "lists" / spec.train_list, root / "features", T)


def same_rows(dataset, packed, count: int = 8) -> float:
    """Largest difference between the two loaders' rows (float32 vs float64 bin means)."""
    error = 0.0
    for i in np.linspace(0, len(dataset) - 1, count).astype(int):
        features, _, length = dataset[int(i)]
        assert length == packed.lengths[i], f"row {i}: length {length} vs {packed.lengths[i]}"
        error = max(error, float(np.abs(features.numpy() - packed.features[i]).max()))
    return error


# ---------------------------------------------------------------------------- memory


def memory(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File of a process in bytes, from /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
            out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out


def attach(root: Path, cache: Path) -> None:
    """A trial's view of the data: open the shared cache, read one epoch, then hold the mapping
    until stdin closes."""
    packed, _ = open_cache(root, cache)
    ours_epoch(packed, seed=1)
    print("ready", flush=True)
    sys.stdin.read()


def concurrent_memory(root: Path, cache: Path, procs: int) -> list[dict[str, int]]:
    """Start `procs` readers together; measure each once all of them hold a read epoch."""
    args = [sys.executable, __file__, "--attach", "--root", str(root), "--cache", str(cache)]
    readers = [
        subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(procs)
    ]
    try:
        for reader in readers:
            assert reader.stdout.readline().strip() == "ready", "a reader process failed"
        return [memory(reader.pid) for reader in readers]
    finally:
        for reader in readers:
            reader.stdin.close()
            reader.wait(timeout=60)


# ---------------------------------------------------------------------------- main


def time_epochs(root: Path, cache: Path, repeats: int) -> str:
    """The side-by-side epoch times, as the result column of one row."""
    import naive_data

    packed, _ = open_cache(root, cache)
    dataset = naive_dataset(root)
    error = same_rows(dataset, packed)
    naive_data.epoch(dataset, BATCH, seed=0)  # warm the page cache for both
    ours_epoch(packed, seed=0)
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for r in range(repeats):
        order = [
            ("ours", partial(ours_epoch, packed, r)),
            ("naive", partial(naive_data.epoch, dataset, BATCH, r)),
        ]
        for name, epoch in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            start = time.perf_counter()
            assert epoch() == len(dataset)
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    return (
        f"cache {best['ours']:.2f} s, naive {best['naive']:.2f} s (best of {repeats}, "
        f"interleaved, warm page cache): {best['naive'] / best['ours']:.1f}x; rows equal "
        f"(largest difference {error:.1e})"
    )


def run(root: Path, cache: Path, repeats: int, procs: list[int], cmd: str) -> None:
    packed, _ = open_cache(root, cache)  # built here on first use (meta.json has the time)
    rows, gib = len(packed.lengths), packed.features.nbytes / 2**30
    del packed  # this process holds no mapping while the readers are measured
    print(
        row(
            f"B3 epoch data time, {rows} training rows of `{root.name}` (B={BATCH}, T={T})",
            cmd,
            "cpu",
            time_epochs(root, cache, repeats),
        ),
        flush=True,
    )
    for n in procs:
        usage = concurrent_memory(root, cache, n)
        rss = max(m["Rss"] for m in usage) / 2**30
        pss = sum(m["Pss"] for m in usage) / 2**30
        pss_file = sum(m["Pss_File"] for m in usage) / 2**30
        print(
            row(
                f"B3 resident memory, {n} process(es) each reading one epoch of the shared cache",
                cmd,
                "cpu",
                f"RSS per process up to {rss:.2f} GiB; PSS summed over the processes "
                f"{pss:.2f} GiB, of it file-backed {pss_file:.2f} GiB, for a {gib:.2f} GiB "
                f"cache (a private copy each would be {n * gib:.2f} GiB)",
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a VadCLIP-format tree (lists/, features/)")
    parser.add_argument("--cache", type=Path, help="cache folder (default ROOT/.dsanet-cache)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs; the best is kept")
    parser.add_argument("--procs", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="tiny tree, one round (CI)")
    parser.add_argument("--attach", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        from dsanet.synth import generate

        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            root = Path(tmp) / "tree"
            generate("xd-full", root, seed=0, scale=0.003)
            run(root, root / ".dsanet-cache", 1, [2], command("bench_data.py", argv))
        return
    if args.root is None:
        parser.error("--root is required (or --quick)")
    cache = args.cache or args.root / ".dsanet-cache"
    if args.attach:
        attach(args.root, cache)
        return
    run(args.root, cache, args.repeats, args.procs, command("bench_data.py", argv))


if __name__ == "__main__":
    main()
