"""Command line: ``tofa-fast train | select | export | evaluate | profile | info`` (SPEC §10).

``python -m tofa_fast`` is the same program.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

STRATEGIES = ("tofa", "rss", "ps", "single")
LOSSES = ("sup", "sup+kd", "sup+fm", "sup+fm+kd")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tofa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a supernet and write its run folder")
    train.add_argument(
        "--data", default="digits", help="'digits' (embedded), a torchvision data-set name, or an ImageFolder path"
    )
    train.add_argument("--out", default="runs/digits", metavar="DIR", help="run folder (default: %(default)s)")
    train.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs (default: the data set's preset)"
    )
    train.add_argument("--strategy", choices=STRATEGIES, default="tofa")
    train.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="TOFA loss variant (default: sup+fm+kd with unlabelled data, else sup)",
    )
    train.add_argument("--labels-per-class", type=_positive_int, default=None, metavar="N")
    train.add_argument(
        "--init", default=None, metavar="SOURCE", help="ofa:PATH or torchvision:mobilenet_v3_large[:WEIGHTS]"
    )
    train.add_argument("--seed", type=int, default=0, metavar="S")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")

    select = sub.add_parser("select", help="print the arch chosen for a budget as JSON")
    select.add_argument("run", metavar="RUN")
    select.add_argument("--max-mflops", type=float, required=True, metavar="B")

    export = sub.add_parser("export", help="write a standalone subnet (.onnx or .pt)")
    export.add_argument("run", metavar="RUN")
    export.add_argument("--max-mflops", type=float, required=True, metavar="B")
    export.add_argument("-o", "--output", required=True, metavar="FILE")

    evaluate = sub.add_parser("evaluate", help="evaluate subnets of a run on its test split")
    evaluate.add_argument("run", metavar="RUN")

    profile = sub.add_parser("profile", help="build or validate a latency table on this device")
    profile.add_argument("--space", default="rss")
    profile.add_argument("--device", default="cpu")
    profile.add_argument("-o", "--output", metavar="FILE")
    profile.add_argument("--validate", metavar="TABLE", default=None)

    sub.add_parser("info", help="version, available backends and why any is missing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import info_text

        print(info_text())
        return 0
    if args.command == "train":
        print("tofa-fast train: coming with the trainer (issue 5); arguments accepted:", vars(args))
        return 0
    print(f"tofa-fast {args.command}: not implemented yet", file=sys.stderr)
    return 2
