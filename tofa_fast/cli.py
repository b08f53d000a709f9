"""Command line: ``tofa-fast train | select | export | evaluate | search | profile | info`` (SPEC §10).

``python -m tofa_fast`` is the same program.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from .train.config import (
    EPOCH_UNITS,
    LOSS_VARIANTS,
    LR_SCHEDULES,
    PRECISIONS,
    RSS_EVERY,
    RSS_SCHEMES,
    STEP_MODES,
    STRATEGIES,
    TrainConfig,
    strategy_defaults_table,
)

#: --arch of `export` and `evaluate`: how a subnet is named on the command line (train.run.read_arch)
ARCH_HELP = (
    "its canonical string (as search.md lists the searched ones), a JSON dict (as `select` prints it), "
    "or a file holding either"
)


def _budget_arguments(parser: argparse.ArgumentParser, group, prefix: str = "") -> None:
    """The zero-cost choice's budget (train.run.Budget): one of FLOPs, parameters, predicted latency."""
    group.add_argument("--max-mflops", type=_positive_number, metavar="B", help=prefix + "at most B MFLOPs")
    group.add_argument("--max-params", type=_positive_number, metavar="N", help=prefix + "at most N parameters")
    group.add_argument(
        "--max-latency-ms",
        type=_positive_number,
        metavar="T",
        help=prefix + "at most T ms as --latency-table predicts it",
    )
    parser.add_argument(
        "--latency-table", default=None, metavar="FILE", help="with --max-latency-ms: a `tofa-fast profile` table"
    )


def _budget(args: argparse.Namespace) -> dict:
    """The budget flags given besides --max-mflops, as train.run.Budget's keywords."""
    given = {"max_params": args.max_params, "max_latency_ms": args.max_latency_ms, "latency_table": args.latency_table}
    return {k: v for k, v in given.items() if v is not None}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_number(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_number(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _device_name(text: str) -> str:
    """A device name PyTorch reads (``profile --validate`` compares it with its table's own)."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device name (cpu, cuda, cuda:1, …): {text!r}") from None
    return text


def _device(text: str) -> str:
    """A device name PyTorch reads, and for CUDA one that this machine has."""
    import torch

    device = torch.device(_device_name(text))
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible == 0:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but no CUDA device is visible")
        if device.index is not None and device.index >= visible:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but only {visible} CUDA device(s) are visible")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tofa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a supernet and write its run folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the table's lines
        epilog="Per-strategy defaults (each paper's; an explicit flag wins):\n\n" + strategy_defaults_table(),
    )
    train.add_argument(
        "--data",
        default="digits",
        help="'digits' (embedded), 'mnist' / 'fashion-mnist' (IDX files), a torchvision data-set name, "
        "or an ImageFolder path",
    )
    train.add_argument("--out", default="runs/digits", metavar="DIR", help="run folder (default: %(default)s)")
    train.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs (default: the data set's preset)"
    )
    train.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="tofa",
        help="tofa: sandwich + TOFA loss; rss: one random subnet per epoch; ps: OFA progressive shrinking; "
        "single: one fixed arch (default: %(default)s)",
    )
    train.add_argument(
        "--arch", default=None, help="with --strategy single: the arch to train (canonical string or JSON dict)"
    )
    train.add_argument(
        "--loss",
        choices=LOSS_VARIANTS,
        default=None,
        help="TOFA loss variant (default: sup+fm+kd with unlabelled data, else sup)",
    )
    train.add_argument("--labels-per-class", type=_positive_int, default=None, metavar="N")
    train.add_argument(
        "--val-per-class",
        type=_positive_int,
        default=None,
        metavar="N",
        help="hold N labelled images per class out of training as a validation split (for `search`)",
    )
    train.add_argument(
        "--init",
        default=None,
        metavar="SOURCE",
        help="ofa:PATH | torchvision:{mobilenet_v3_large,mobilenet_v3_small,mobilenet_v2}[:WEIGHTS|PATH] | "
        "efficientnet_lite:efficientnet-lite0..4[:PATH] (local weights files; nothing is downloaded)",
    )
    train.add_argument("--seed", type=int, default=0, metavar="S")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument(
        "--device", type=_device, default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)"
    )
    train.add_argument(
        "--space",
        default=None,
        help="search space preset (default: digits for --data digits, rss for CIFAR, else tofa)",
    )
    train.add_argument("--data-root", default="data", help="where torchvision data sets live (default: %(default)s)")
    train.add_argument(
        "--download", action="store_true", help="download a torchvision data set if missing (needs network)"
    )
    # The knobs the papers turn; TrainConfig validates them. None: the strategy's paper value
    # (config.STRATEGY_DEFAULTS, the table under `train --help` and in the README).
    strategy_default = "default: the strategy's (see README)"
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"global batch, split over torchrun processes ({strategy_default})",
    )
    train.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({strategy_default})")
    train.add_argument(
        "--label-smoothing", type=float, default=None, metavar="EPS", help=f"CE label smoothing ({strategy_default})"
    )
    knobs = TrainConfig()
    train.add_argument(
        "--threshold", type=float, default=knobs.threshold, metavar="TAU", help="FixMatch confidence threshold"
    )
    train.add_argument("--mu", type=_positive_int, default=knobs.mu, help="unlabelled batch = MU x the labelled batch")
    train.add_argument("--weight-decay", type=float, default=None, metavar="WD", help=strategy_default)
    train.add_argument("--momentum", type=float, default=None, help=f"SGD momentum ({strategy_default})")
    train.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"Nesterov momentum; --no-nesterov: plain SGD momentum ({strategy_default})",
    )
    train.add_argument("--dropout", type=float, default=None, help=f"classifier dropout ({strategy_default})")
    train.add_argument("--drop-connect", type=float, default=None, help=f"residual drop-connect ({strategy_default})")
    train.add_argument("--warmup-epochs", type=int, default=None, metavar="N", help=strategy_default)
    train.add_argument(
        "--epoch-unit",
        choices=EPOCH_UNITS,
        default=None,
        help=f"one epoch = a pass over the unlabelled pool (when there is one) or over the labelled images "
        f"({strategy_default})",
    )
    train.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=knobs.lr_schedule,
        help="after the warm-up: cosine decay to 0 or a constant learning rate (default: %(default)s)",
    )
    # The RSS paper's ablations (its Figs. 5-7), options of --strategy rss.
    train.add_argument(
        "--rss-every",
        choices=RSS_EVERY,
        default=knobs.rss_every,
        help="rss: draw the subnet(s) once per epoch or every batch (default: %(default)s)",
    )
    train.add_argument(
        "--rss-subnets",
        type=_positive_int,
        default=knobs.rss_subnets,
        metavar="N",
        help="rss: subnets per draw, their gradients summed into one step (default: %(default)s)",
    )
    train.add_argument(
        "--rss-scheme",
        choices=RSS_SCHEMES,
        default=knobs.rss_scheme,
        help="rss: which subnet(s): uniform random, one fixed subnet (smallest / middle / largest), or max and "
        "min in turn (max-then-min, min-then-max: half the epochs each; alternating: by epoch) "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--freeze-bn", action="store_true", help="keep batch norm in inference mode (fine-tuning with tiny batches)"
    )
    train.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    train.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="also write the checkpoint every N steps mid-epoch (pre-emption; default: at epoch ends only)",
    )
    train.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=None,
        metavar="M",
        help="also write the checkpoint every M minutes mid-epoch; SIGTERM / SIGINT always write one and stop",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="fp32, or bf16 autocast with fp32 master weights (default auto: bf16 on CUDA, fp32 on the CPU)",
    )
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC activations and weights (default: on; --no-channels-last computes in NCHW)",
    )
    train.add_argument(
        "--step",
        choices=STEP_MODES,
        default="auto",
        help="how a step computes its subnets' logits (default auto: the fastest entry that serves; see `info`)",
    )
    train.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="list and leave out images that do not decode, instead of stopping before training",
    )

    select = sub.add_parser("select", help="print the arch chosen for a budget as JSON")
    select.add_argument("run", metavar="RUN")
    _budget_arguments(select, select.add_mutually_exclusive_group(required=True))

    export = sub.add_parser(
        "export",
        help="write a standalone subnet (.onnx or .pt)",
        # argparse drops a required group's parentheses from a usage line it has to wrap
        usage="tofa-fast export [-h] (--max-mflops B | --max-params N | --max-latency-ms T --latency-table FILE "
        "| --arch ARCH) -o FILE RUN",
    )
    export.add_argument("run", metavar="RUN")
    chosen = export.add_mutually_exclusive_group(required=True)
    _budget_arguments(export, chosen, "the zero-cost choice (as `select`) for ")
    chosen.add_argument(
        "--arch", metavar="ARCH", help="this subnet of the run's space instead of a budget: " + ARCH_HELP
    )
    export.add_argument("-o", "--output", required=True, metavar="FILE")

    evaluate = sub.add_parser("evaluate", help="evaluate subnets of a run on its test split")
    evaluate.add_argument("run", metavar="RUN")
    evaluate.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="ARCH",
        help="evaluate this subnet of the run's space instead of the palette (repeatable): " + ARCH_HELP,
    )
    evaluate.add_argument(
        "--population",
        type=_positive_int,
        default=None,
        metavar="N",
        help="population evaluation: N random subnets per FLOPs target instead of the palette "
        "(writes population.json/.md/.png)",
    )
    evaluate.add_argument(
        "--protocol",
        choices=("band", "rss"),
        default="band",
        help="with --population: 'band' draws uniformly among the subnets in a band around evenly spaced "
        "targets; 'rss' is the RSS paper's §6.1 protocol (fixed targets, per-layer uniform draws until in "
        "range, width locked at the extreme targets) (default: %(default)s)",
    )
    evaluate.add_argument(
        "--targets", type=_positive_int, default=None, help="band: number of FLOPs targets (default: 10)"
    )
    evaluate.add_argument(
        "--band", type=float, default=None, help="band: relative band around each target (default: 0.05)"
    )
    evaluate.add_argument(
        "--targets-mflops",
        type=_positive_number,
        nargs="+",
        default=None,
        metavar="T",
        help="rss: the MFLOPs targets (default: 4 6 8 10 12 14 on the rss space, else 6 spread over the range)",
    )
    evaluate.add_argument(
        "--tolerance-mflops",
        type=_positive_number,
        default=None,
        metavar="TOL",
        help="rss: keep draws within ±TOL MFLOPs of the target (default: 0.5 on the rss space, else the "
        "FLOPs range / 24)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the population draws")

    search = sub.add_parser(
        "search", help="validation-based selection (evolution / random) vs the zero-cost choice, per budget"
    )
    search.add_argument("run", metavar="RUN", help="a run trained with --val-per-class N")
    search.add_argument("--method", choices=("all", "evolution", "random", "zero-cost"), default="all")
    search.add_argument("--budgets", type=_positive_int, default=6, metavar="K", help="budgets spanning the range")
    search.add_argument("--metric", choices=("flops", "params", "latency"), default="flops")
    search.add_argument("--latency-table", default=None, metavar="FILE", help="table from `tofa-fast profile`")
    search.add_argument("--population", type=_positive_int, default=24, help="evolution population")
    search.add_argument("--generations", type=_positive_int, default=8, help="evolution generations")
    search.add_argument("--seed", type=int, default=0)

    profile = sub.add_parser("profile", help="build or validate a latency table on this device")
    profile.add_argument("--space", default="rss")
    profile.add_argument(
        "--device", type=_device_name, default=None, help="cpu or cuda (default: cpu; with --validate: the table's)"
    )
    profile.add_argument(
        "-o", "--output", metavar="FILE", help="latency table to write or resume (with --validate: a JSON report)"
    )
    profile.add_argument("--validate", metavar="TABLE", default=None, help="time random subnets against TABLE")
    profile.add_argument("--batch-size", type=_positive_int, default=1)
    profile.add_argument("--num-classes", type=_positive_int, default=1000, help="classifier outputs (default: 1000)")
    profile.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: torch's)")
    profile.add_argument(
        "--time-budget", type=_positive_number, default=None, metavar="SECONDS", help="stop (resumably) after"
    )
    profile.add_argument(
        "--min-time", type=_positive_number, default=0.05, metavar="SECONDS", help="timing time per layer"
    )
    profile.add_argument(
        "--calibration", type=_non_negative_int, default=16, metavar="N", help="subnets timed to fit overheads"
    )
    profile.add_argument("--passes", type=_positive_int, default=3, help="timing passes (minimum kept)")
    profile.add_argument(
        "--cold-mib",
        type=_non_negative_number,
        default=0,
        metavar="MIB",
        help="weights cycled per layer (default: 2x last-level cache)",
    )
    profile.add_argument("--samples", type=_positive_int, default=50, metavar="N", help="subnets to validate on")
    profile.add_argument("--seed", type=int, default=0, help="first seed of the validation subnets")

    sub.add_parser("info", help="version, available backends and why any is missing")
    return parser


def _format_data_warning(message, category, filename, lineno, line=None) -> str:
    """DataWarnings name the file or folder at fault; the line of tofa_fast that noticed is noise."""
    from .train.data import DataWarning

    if issubclass(category, DataWarning):
        return f"tofa-fast: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_data_warning
    if args.command == "info":
        from .info import info_text

        print(info_text())
        return 0
    try:
        return _select(args) if args.command == "select" else _run(args)
    except ValueError as exc:  # bad input: a clear message, no traceback
        print(f"tofa-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a checkpoint that could not be written: say what, no traceback
        print(f"tofa-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _select(args: argparse.Namespace) -> int:
    """From the run's selection.json when it describes checkpoint.pt (no torch: a fraction of a
    second), else through the checkpoint (selection_sidecar.py)."""
    from .train.selection_sidecar import select_from_sidecar

    # FLOPs and parameter budgets: the sidecar holds both metrics. A latency budget needs the table,
    # and the full path (train.run.Budget) also refuses a table given with another budget.
    fast = args.max_latency_ms is None and args.latency_table is None
    arch = select_from_sidecar(args.run, args.max_mflops, args.max_params) if fast else None
    if arch is None:
        from .train import run

        arch = run.select_from_checkpoint(args.run, args.max_mflops, **_budget(args))
    print(json.dumps(arch.to_dict()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .host_memory import retain_freed_host_memory
    from .train import run

    # This command owns its process, so it takes the allocator policy that spares the steps'
    # page faults (host_memory.py says why and what it costs).
    retain_freed_host_memory()

    if args.command == "train":
        from .train import TrainConfig

        config = TrainConfig(
            data=args.data,
            out=args.out,
            epochs=args.epochs,
            strategy=args.strategy,
            loss=args.loss,
            labels_per_class=args.labels_per_class,
            val_per_class=args.val_per_class,
            init=args.init,
            seed=args.seed,
            device=args.device,
            space=args.space,
            data_root=args.data_root,
            download=args.download,
            batch_size=args.batch_size,
            lr=args.lr,
            label_smoothing=args.label_smoothing,
            threshold=args.threshold,
            mu=args.mu,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            nesterov=args.nesterov,
            dropout=args.dropout,
            drop_connect=args.drop_connect,
            warmup_epochs=args.warmup_epochs,
            epoch_unit=args.epoch_unit,
            lr_schedule=args.lr_schedule,
            rss_every=args.rss_every,
            rss_subnets=args.rss_subnets,
            rss_scheme=args.rss_scheme,
            freeze_bn=args.freeze_bn,
            arch=args.arch,
            num_workers=args.workers,
            precision=args.precision,
            checkpoint_every=args.checkpoint_every,
            checkpoint_minutes=args.checkpoint_minutes,
            channels_last=args.channels_last,
            step=args.step,
            skip_bad_images=args.skip_bad_images,
        )
        from .train.preemption import TrainingStopped

        try:
            palette = run.train(config, resume=args.resume)
        except TrainingStopped as stop:  # pre-empted or Ctrl-C: the checkpoint is written
            print(
                f"tofa-fast train: {stop}\nresume with: tofa-fast train --out {args.out} --resume "
                "(under torchrun: the same torchrun command with --resume)",
                file=sys.stderr,
            )
            return stop.exit_code
        if not palette:  # a torchrun rank other than 0: rank 0 reports
            return 0
        print(f"wrote {args.out}/checkpoint.pt, palette.json, report.md, pareto.png")
        for entry in palette:
            print(
                f"  {entry['flops'] / 1e6:8.2f} MFLOPs  {entry['params']:>9,} params  accuracy {entry['accuracy']:.2%}"
            )
        return 0
    if args.command == "export":
        arch = run.export(args.run, args.max_mflops, args.output, arch=args.arch, **_budget(args))
        print(f"wrote {args.output} ({arch})")
        return 0
    if args.command == "evaluate" and args.population is not None:
        from .search import population_run

        if args.arch:  # a population is drawn, not named
            raise ValueError("--arch and --population are two different evaluations: give one of them")
        for t in population_run(
            args.run,
            per_target=args.population,
            protocol=args.protocol,
            targets=args.targets,
            band=args.band,
            targets_mflops=args.targets_mflops,
            tolerance_mflops=args.tolerance_mflops,
            seed=args.seed,
        ):
            print(
                f"{t.target_mflops:8.2f} MFLOPs  mean {t.mean:.2%}  min {t.min:.2%}  max {t.max:.2%}  ({t.n} subnets)"
            )
        print(f"wrote {args.run}/population.json, population.md, population.png")
        return 0
    if args.command == "search":
        from .search import search_run

        search_run(
            args.run,
            method=args.method,
            budgets=args.budgets,
            metric=args.metric,
            population=args.population,
            generations=args.generations,
            seed=args.seed,
            latency_table=args.latency_table,
        )
        print(open(f"{args.run}/search.md").read())
        return 0
    if args.command == "evaluate":
        population_options = {
            "--protocol": args.protocol != "band",
            "--targets": args.targets is not None,
            "--band": args.band is not None,
            "--targets-mflops": args.targets_mflops is not None,
            "--tolerance-mflops": args.tolerance_mflops is not None,
        }
        given = [flag for flag, present in population_options.items() if present]
        if given:  # the palette evaluation would silently ignore them
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --population N")
        for entry in run.evaluate(args.run, args.arch):
            print(f"{entry['flops'] / 1e6:8.2f} MFLOPs  accuracy {entry['accuracy']:.2%}  {json.dumps(entry['arch'])}")
        return 0
    if args.command == "profile":
        from .estimator.profile import main as profile_main

        return profile_main(args)
    print(f"tofa-fast {args.command}: not implemented yet", file=sys.stderr)
    return 2
