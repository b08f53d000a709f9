"""Entry points behind the CLI: train a run folder, select from it, export from it, evaluate it."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..spaces import Arch, SearchSpace
from . import distributed as dist_utils
from .config import TrainConfig
from .onnx_requirements import require_onnx_export
from .palette import build_palette, measure_subnet, write_outputs
from .run_record import Run
from .selection_sidecar import select_from_sidecar
from .strategies import parse_arch
from .trainer import Trainer


def _estimator(run: Run):
    from ..estimator import Estimator

    return Estimator(run.space, num_classes=run.num_classes)


def train(config: TrainConfig, resume: bool = False) -> list[dict]:
    """Train (or resume) and write checkpoint.pt, palette.json, report.md, pareto.png in config.out."""
    start = time.perf_counter()
    trainer = Trainer(config, resume=resume)
    if resume and trainer.dist.is_main:
        print(f"resuming {trainer.checkpoint_path} at epoch {trainer.epoch}/{trainer.config.epochs}", flush=True)
    try:
        trainer.fit()
    except BaseException:
        dist_utils.shutdown()
        raise
    if not trainer.dist.is_main:  # rank 0 evaluates and writes the run folder
        dist_utils.shutdown()
        return []
    run = trainer.run()
    palette = build_palette(run, _estimator(run))
    s = trainer.splits
    extra = {
        "labelled / unlabelled / test images": f"{len(s.labelled)} / "
        f"{len(s.unlabelled) if s.unlabelled is not None else 0} / {len(s.test)}",
        "subnets in the selection index": len(trainer.selection),
        "step": f"{trainer.step_backend.name}, {trainer.compute_format.precision}"
        + (", channels_last" if trainer.compute_format.channels_last else ""),
        "torch threads": torch.get_num_threads(),
        "processes": trainer.dist.world_size,
    }
    write_outputs(trainer.config.out, palette, trainer.config.to_dict(), time.perf_counter() - start, extra)
    dist_utils.shutdown()
    return palette


def open_run(run: str, device: str | None = None) -> Run:
    """The run in folder ``run`` (:meth:`Run.open`: no data loaded until a subnet is measured)."""
    return Run.open(run, device=device)


@dataclass(frozen=True)
class Budget:
    """What a zero-cost choice must fit (TOFA Algorithm 2's metric M and budget B): at most
    ``max_mflops`` MFLOPs, ``max_params`` parameters or ``max_latency_ms`` milliseconds predicted by
    the ``latency_table`` a ``tofa-fast profile`` wrote — exactly one of the three."""

    max_mflops: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None
    latency_table: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("max_mflops", "max_params", "max_latency_ms") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a budget needs exactly one of max_mflops, max_params, max_latency_ms, got {given}")
        if self.max_latency_ms is not None and self.latency_table is None:
            raise ValueError(
                "a latency budget needs a latency table: write one with `tofa-fast profile --space SPACE -o "
                "table.json` on the target device and pass it as --latency-table"
            )
        if self.latency_table is not None and self.max_latency_ms is None:
            raise ValueError("a latency table is for a latency budget (--max-latency-ms): FLOPs and params need none")

    def choose(self, run: Run) -> Arch:
        """TOFA's zero-cost choice among ``run``'s trained subnets (:meth:`Run.zero_cost_choice`)."""
        from ..estimator import Estimator

        estimator = Estimator(run.space, num_classes=run.num_classes, latency_table=self.latency_table)
        if self.max_mflops is not None:
            return run.zero_cost_choice(estimator.flops, self.max_mflops * 1e6, "FLOPs")
        if self.max_params is not None:
            return run.zero_cost_choice(estimator.params, self.max_params, "params")
        return run.zero_cost_choice(estimator.latency, self.max_latency_ms, "latency (ms)")


def select_from_checkpoint(run: str, max_mflops: float | None = None, **budget) -> Arch:
    """The zero-cost choice read from ``RUN/checkpoint.pt`` (the path without ``selection.json``),
    for a :class:`Budget` (``max_mflops``, ``max_params`` or ``max_latency_ms`` + ``latency_table``)."""
    return Budget(max_mflops, **budget).choose(open_run(run, device="cpu"))


def select(run: str, max_mflops: float | None = None, **budget) -> Arch:
    """The zero-cost choice; for a FLOPs or parameter budget from the run's ``selection.json`` when it
    describes the checkpoint on disk (no torch needed, see selection_sidecar.py), else through the checkpoint."""
    # as `tofa-fast select` decides (cli._select): the sidecar holds no latencies
    fast = budget.get("max_latency_ms") is None and budget.get("latency_table") is None
    arch = select_from_sidecar(run, max_mflops, budget.get("max_params")) if fast else None
    return arch if arch is not None else select_from_checkpoint(run, max_mflops, **budget)


def read_arch(space: SearchSpace, value: str) -> Arch:
    """The subnet an ``--arch`` value names: its canonical string (``str(arch)``, as ``search.md``
    lists them), a JSON dict (SPEC §2, as ``select`` prints it), or the path of a file holding either."""
    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif value.strip().endswith(".json"):
        raise ValueError(f"--arch file {value!r} does not exist")
    return parse_arch(space, text)


def export(run: str, max_mflops: float | None, output: str, arch: str | None = None, **budget) -> Arch:
    """Write a subnet (BN recalibrated) as ONNX (``.onnx``) or a torch.export archive (``.pt``): the
    zero-cost choice for a :class:`Budget` (``max_mflops``, or ``max_params``, or ``max_latency_ms`` +
    ``latency_table``), or the one ``arch`` names (:func:`read_arch`: e.g. a validation search's pick
    from ``search.md``)."""
    if arch is not None and (max_mflops is not None or any(v is not None for v in budget.values())):
        raise ValueError("give a budget or an arch, not both")
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".onnx", ".pt", ".pt2"):
        raise ValueError(f"output must end in .onnx or .pt, got {output!r}")
    if ext == ".onnx":
        require_onnx_export()  # before selecting and recalibrating: name the package to install
    chosen = None if arch is not None else Budget(max_mflops, **budget)  # a bad budget fails before any work
    record = open_run(run, device="cpu")
    arch = read_arch(record.space, arch) if chosen is None else chosen.choose(record)
    sub = record.calibrated_subnet(arch).cpu().eval()
    # batch 2, not 1: export specialises size-1 dimensions to constants
    example = torch.zeros(2, record.space.in_channels, arch.resolution, arch.resolution)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if ext == ".onnx":
        # The batch dimension stays dynamic so the model serves any batch size.
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            sub,
            (example,),
            output,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.export.save(torch.export.export(sub, (example,), dynamic_shapes=({0: batch},)), output)
    return arch


def evaluate(run: str, archs: Sequence[str] = ()) -> list[dict]:
    """Test accuracy of the palette's subnets (chosen again from the selection index), or of the
    subnets ``archs`` name (:func:`read_arch`), each BN recalibrated: entries as in ``palette.json``
    (without ``budget_mflops`` for named archs), sorted by FLOPs."""
    record = open_run(run)
    estimator = _estimator(record)
    if not archs:
        return build_palette(record, estimator)
    chosen = [read_arch(record.space, a) for a in archs]  # every one checked before any is measured
    return sorted((measure_subnet(record, estimator, arch) for arch in chosen), key=lambda e: e["flops"])
