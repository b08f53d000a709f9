"""Entry points behind the CLI: train a run folder, select from it, export from it, evaluate it."""

from __future__ import annotations

import json
import os
import time

import torch

from ..spaces import Arch
from . import distributed as dist_utils
from .config import TrainConfig
from .palette import build_palette, write_outputs
from .selection import select_subnet
from .trainer import Trainer


def _estimator(trainer: Trainer):
    from ..estimator import Estimator

    return Estimator(trainer.space, num_classes=trainer.splits.num_classes)


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
    palette = build_palette(trainer, _estimator(trainer))
    extra = {
        "labelled / unlabelled / test images": f"{len(trainer.splits.labelled)} / "
        f"{len(trainer.splits.unlabelled) if trainer.splits.unlabelled is not None else 0} / {len(trainer.splits.test)}",
        "subnets in the selection index": len(trainer.selection),
        "torch threads": torch.get_num_threads(),
        "processes": trainer.dist.world_size,
    }
    write_outputs(trainer.config.out, palette, trainer.config.to_dict(), time.perf_counter() - start, extra)
    dist_utils.shutdown()
    return palette


def open_run(run: str, device: str | None = None) -> Trainer:
    """A trainer restored from ``run/checkpoint.pt`` (data reloaded, for BN recalibration)."""
    if not os.path.isdir(run):
        raise ValueError(f"run folder {run!r} does not exist")
    return Trainer(TrainConfig(out=run, device=device), resume=True)


def _select(trainer: Trainer, max_mflops: float) -> Arch:
    return select_subnet(
        trainer.selection,
        _estimator(trainer).flops,
        max_mflops * 1e6,
        "FLOPs",
        sandwich=trainer.strategy.sandwich_selection,
    )


def select(run: str, max_mflops: float) -> Arch:
    return _select(open_run(run), max_mflops)


def export(run: str, max_mflops: float, output: str) -> Arch:
    """Write the selected subnet (BN recalibrated) as ONNX (``.onnx``) or a torch.export archive (``.pt``)."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".onnx", ".pt", ".pt2"):
        raise ValueError(f"output must end in .onnx or .pt, got {output!r}")
    trainer = open_run(run, device="cpu")
    arch = _select(trainer, max_mflops)
    sub = trainer.calibrated_subnet(arch).cpu().eval()
    # batch 2, not 1: export specialises size-1 dimensions to constants
    example = torch.zeros(2, trainer.space.in_channels, arch.resolution, arch.resolution)
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


def evaluate(run: str) -> list[dict]:
    trainer = open_run(run)
    return build_palette(trainer, _estimator(trainer))


def arch_json(arch: Arch) -> str:
    return json.dumps(arch.to_dict())
