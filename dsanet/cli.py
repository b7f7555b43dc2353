"""Command line: `python -m dsanet {synth,train,evaluate,demo}`: single runs, no search.

Bad input ends in one `error:` line naming the file or field and the fix, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("dsanet")

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _print_result(result) -> None:
    """The run's outcome as JSON on stdout (logs go to stderr)."""
    summary = {"best_epoch": result.best_epoch}
    if result.select_metric:
        summary[result.select_metric] = result.best_metric
    summary.update({f"test_{k}": v for k, v in result.test.items()})
    print(json.dumps(summary, indent=1))


def _synth(args: argparse.Namespace) -> int:
    from dsanet.synth import generate

    summary = generate(
        args.preset,
        Path(args.out),
        seed=args.seed,
        scale=args.scale,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    log.info("wrote %s", summary)
    return 0


def _train(args: argparse.Namespace) -> int:
    from dsanet.config import load_config

    cfg = load_config(args.config, args.overrides)  # bad input fails before torch loads
    from dsanet.trainer import fit

    result = fit(cfg, resume=not args.restart)
    _print_result(result)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dsanet.runs import load_run

    if args.plots and args.split != "test":
        raise ValueError("--plots draws the test set: leave out --split val, or --plots")
    run = load_run(args.checkpoint, args.overrides, split=args.split)
    scores = run.test_metrics() if args.split == "test" else run.validation_metrics()
    print(json.dumps(scores, indent=1))
    if args.plots:
        from dsanet.plots import write_test_plots

        print(f"plots in {write_test_plots(run, Path(args.plots))}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dsanet.config import load_config
    from dsanet.synth import MARKER, generate
    from dsanet.trainer import fit

    out = Path(args.out).resolve()
    if not (out / "data" / MARKER).is_file():  # a finished tree from an earlier demo is reused
        generate("xd-mini", out / "data", seed=0)
    cfg = load_config(
        DEMO_CONFIG,
        [
            f"data.list_dir={out / 'data' / 'lists'}",
            f"data.feature_root={out / 'data' / 'features'}",
            f"train.out_dir={out / 'run'}",
            *args.overrides,
        ],
    )
    result = fit(cfg, resume=False)
    _print_result(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsanet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic benchmark in VadCLIP format")
    synth.add_argument("--preset", required=True, help="xd-mini | ucf-mini | xd-full | ucf-full")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scale", type=float, default=1.0, help="multiply the video counts")
    synth.add_argument("--workers", type=int, default=1, help="processes writing features")
    synth.add_argument(
        "--overwrite", action="store_true", help="replace an existing synthetic tree at --out"
    )
    synth.set_defaults(run=_synth)

    train = sub.add_parser("train", help="train one configuration")
    train.add_argument(
        "--config",
        required=True,
        help="experiment YAML, or a shipped name: xd, ucf, xd_reference, ucf_reference, demo",
    )
    train.add_argument(
        "--restart",
        action="store_true",
        help="ignore a checkpoint in train.out_dir instead of resuming from it",
    )
    train.add_argument("overrides", nargs="*", help="section.field=value ...")
    train.set_defaults(run=_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate.add_argument(
        "--checkpoint", required=True, help="best.pt or last.pt of a run, or the run folder"
    )
    evaluate.add_argument("--split", choices=["test", "val"], default="test")
    evaluate.add_argument(
        "--plots", metavar="DIR", help="also draw test-set plots (videos, ROC, PR, classes) here"
    )
    evaluate.add_argument("overrides", nargs="*", help="section.field=value ...")
    evaluate.set_defaults(run=_evaluate)

    demo = sub.add_parser("demo", help="synthesise xd-mini and train a CPU-sized DSANet on it")
    demo.add_argument("--out", default="demo-out", help="output folder")
    demo.add_argument("overrides", nargs="*", help="section.field=value ...")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; a later run with the same train.out_dir resumes from the last checkpoint",
            file=sys.stderr,
        )
        return 130
