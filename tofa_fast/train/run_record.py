"""A trained run, opened for use: space, network weights, selection index, config and classes.

:meth:`Run.open` reads ``RUN/checkpoint.pt`` and nothing else: no data set is loaded and no
optimizer is built. (``tofa-fast select`` does not even open the run when its ``selection.json``
describes the checkpoint: selection_sidecar.py.) The
network is built on first use of :attr:`Run.net`, the data set on first use of :attr:`Run.splits`
(BN recalibration and testing need images; choosing a subnet does not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..nn import Supernet
from ..spaces import Arch, SearchSpace
from . import evaluation
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data import DataSplits, ImageSet, load_run_data
from .selection import SelectionIndex, select_subnet
from .strategies import STRATEGY_CLASSES


class Run:
    """The products of a training run (SPEC §10) and what measuring its subnets needs.

    Args:
        config: the run's resolved training configuration (its ``out`` is the run folder).
        space: the supernet's search space.
        classes: class names, in label order.
        selection: the zero-cost selection index.
        weights: the supernet's state dict (``net`` is built from it on first use), or
        net: the trained supernet itself (a run handed over by the trainer).
        splits: the data (default: loaded from ``config`` on first use).
        device: where subnets are measured (default: CUDA when available).
    """

    def __init__(
        self,
        config: TrainConfig,
        space: SearchSpace,
        classes: list[str],
        selection: SelectionIndex,
        *,
        weights: dict[str, torch.Tensor] | None = None,
        net: Supernet | None = None,
        splits: DataSplits | None = None,
        device: str | torch.device | None = None,
    ):
        if (weights is None) == (net is None):
            raise ValueError("give exactly one of weights and net")
        self.config, self.space, self.classes, self.selection = config, space, list(classes), selection
        self._weights, self._net, self._splits = weights, net, splits
        if device is None:
            device = (
                next(net.parameters()).device if net is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            )
        self.device = torch.device(device)

    @classmethod
    def open(cls, folder: str, device: str | torch.device | None = None) -> Run:
        """The run in ``folder`` (its ``checkpoint.pt``); ``ValueError`` when it is missing or foreign."""
        if not os.path.isdir(folder):
            raise ValueError(f"run folder {folder!r} does not exist")
        state = load_checkpoint(os.path.join(folder, "checkpoint.pt"))
        config = TrainConfig.from_dict({**state["config"], "out": folder}).resolved()
        space = SearchSpace.from_json(state["space"])
        return cls(
            config,
            space,
            state["classes"],
            SelectionIndex(space, state["selection_index"]),
            weights=state["model"],
            device=device,
        )

    # -- what the checkpoint holds --------------------------------------------------------------

    @property
    def folder(self) -> str:
        return self.config.out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sandwich_selection(self) -> bool:
        """Whether a_max and a_min trained at every step (``tofa``): the zero-cost rule treats them apart."""
        return STRATEGY_CLASSES[self.config.strategy].sandwich_selection

    @property
    def net(self) -> Supernet:
        if self._net is None:
            net = Supernet(self.space, self.num_classes)
            net.load_state_dict(self._weights)
            self._net, self._weights = net.to(self.device).eval(), None
        return self._net

    @property
    def splits(self) -> DataSplits:
        if self._splits is None:
            self._splits = load_run_data(self.config, self.space)
            if self._splits.classes != self.classes:
                raise ValueError(
                    f"the data of run {self.folder!r} ({self.config.data!r}) now has classes "
                    f"{self._splits.classes}, but the run was trained on {self.classes}"
                )
        return self._splits

    # -- choosing and measuring subnets ---------------------------------------------------------

    def zero_cost_choice(
        self, metric: Callable[[list[Arch]], Iterable[float]], budget: float, metric_name: str = "metric"
    ) -> Arch:
        """TOFA's zero-cost choice for ``budget`` (:func:`~.selection.select_subnet`)."""
        return select_subnet(self.selection, metric, budget, metric_name, sandwich=self.sandwich_selection)

    def calibration_batches(self, resolution: int, batch_size: int = 128) -> list[torch.Tensor]:
        """The BN recalibration batches (N, C, r, r) of every subnet at ``resolution``."""
        return evaluation.calibration_batches(
            self.splits, self.space, resolution, self.config.calibration_images, batch_size
        )

    def calibrated_subnet(self, arch: Arch) -> torch.nn.Module:
        return evaluation.calibrated_subnet(self.net, arch, self.splits, self.config.calibration_images)

    def evaluate(self, model: torch.nn.Module, resolution: int, images: ImageSet | None = None) -> float:
        """Top-1 accuracy in [0, 1] of ``model`` on ``images`` (default: the test split) at ``resolution``."""
        images = images if images is not None else self.splits.test
        transform = evaluation.eval_transform_for(self.splits, self.space)
        return evaluation.accuracy(model, images, transform, resolution, self.device, self.config.num_workers)

    def meta(self) -> dict[str, Any]:
        """What a report says about the run."""
        c = self.config
        return {
            "run": c.out,
            "data": c.data,
            "strategy": c.strategy,
            "loss": c.loss,
            "epochs": c.epochs,
            "seed": c.seed,
        }
