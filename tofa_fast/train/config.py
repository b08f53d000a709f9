"""Training configuration: a typed dataclass that round-trips to JSON and lives in every checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .losses import LOSS_VARIANTS

STRATEGIES = ("tofa", "rss", "ps", "single")

#: The loss variants each strategy accepts: (default without unlabelled data, default with it, others).
#: Data rather than strategy methods so that validating a config needs no strategy object.
STRATEGY_LOSSES: dict[str, tuple[str, ...]] = {
    "tofa": ("sup", "sup+fm+kd", "sup+kd", "sup+fm"),
    "rss": ("sup", "sup"),
    "ps": ("sup", "sup"),
    "single": ("sup", "sup+fm"),
}
PRECISIONS = ("auto", "fp32", "bf16")
STEP_MODES = ("auto", "fused", "sequential")


def check_device_name(device: str) -> None:
    """Raise ``ValueError`` naming ``device`` unless PyTorch reads it as a device (``cpu``, ``cuda:1``…)."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, …): {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (SPEC §7 defaults; paper §4.2).

    ``None`` fields are filled per data set by :meth:`resolved`.
    """

    data: str = "digits"
    out: str = "runs/digits"
    epochs: int | None = None
    strategy: str = "tofa"
    loss: str | None = None
    labels_per_class: int | None = None
    val_per_class: int | None = None  # labelled validation images held out per class (validation search)
    arch: str | None = None  # strategy "single": the arch (canonical string or JSON dict); default the max
    init: str | None = None
    seed: int = 0
    device: str | None = None
    space: str | None = None
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None  # base resolution images are stored at (≥ the largest resolution)
    batch_size: int = 32
    mu: int = 1  # unlabelled batch = mu × batch_size
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    threshold: float = 0.95
    dropout: float = 0.1
    drop_connect: float = 0.05
    palette_size: int = 6
    calibration_images: int = 500
    num_workers: int = 0
    freeze_bn: bool = False  # BN layers normalise with their running statistics and do not update them
    skip_bad_images: bool = False  # leave out (and list) images that do not decode instead of refusing the data
    # Numerics and layout: "auto" is bf16 autocast + channels_last on CUDA, fp32 + contiguous on the
    # CPU. The trainer records the resolved values, so a resumed run computes as it did.
    precision: str = "auto"
    channels_last: bool | None = None
    step: str = "auto"  # how a step computes its members' logits (train/step.py's table)
    log_every: int = 10  # steps between two reads of the loss terms from the device
    # Mid-epoch checkpoints (pre-emption): every N optimizer steps and/or every M minutes; the end of
    # every epoch and a SIGTERM / SIGINT always write one.
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None

    def resolved(self) -> TrainConfig:
        """Fill data-set dependent defaults and validate every field (errors name the field)."""
        c = self
        if c.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {c.strategy!r}")
        if c.space is None:  # a space near the images' own size (data.default_space_for_size)
            from .data import default_space_for_size, native_image_size

            c = replace(c, space=default_space_for_size(native_image_size(c.data, c.data_root))[0])
        if c.epochs is None:
            c = replace(c, epochs=25 if c.data == "digits" else 100)
        accepted = STRATEGY_LOSSES[c.strategy]
        if c.loss is None:
            has_unlabelled = c.data == "digits" or c.labels_per_class is not None
            c = replace(c, loss=accepted[1 if has_unlabelled else 0])
        if c.loss not in LOSS_VARIANTS:
            raise ValueError(f"loss must be one of {list(LOSS_VARIANTS)}, got {c.loss!r}")
        if c.loss not in accepted:
            raise ValueError(
                f"loss {c.loss!r} is not available with strategy {c.strategy!r}; use one of {sorted(set(accepted))}"
            )
        if c.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {c.precision!r}")
        if c.step not in STEP_MODES:
            raise ValueError(f"step must be one of {list(STEP_MODES)}, got {c.step!r}")
        if c.arch is not None and c.strategy != "single":
            raise ValueError(f"arch fixes the subnet of strategy 'single'; strategy {c.strategy!r} samples its own")
        for name in ("epochs", "batch_size", "mu", "palette_size", "calibration_images", "log_every"):
            value = getattr(c, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if c.checkpoint_minutes is not None and not c.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be positive, got {c.checkpoint_minutes!r}")
        for name in ("labels_per_class", "val_per_class", "checkpoint_every"):
            value = getattr(c, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "label_smoothing", "threshold", "weight_decay"):
            value = getattr(c, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        for name in ("label_smoothing", "threshold"):  # probabilities
            if getattr(c, name) > 1:
                raise ValueError(f"{name} must be at most 1, got {getattr(c, name)!r}")
        for name in ("momentum", "dropout", "drop_connect"):  # rates in [0, 1)
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if isinstance(c.warmup_epochs, bool) or not isinstance(c.warmup_epochs, int) or c.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {c.warmup_epochs!r}")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {c.seed!r}")
        if isinstance(c.num_workers, bool) or not isinstance(c.num_workers, int) or c.num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {c.num_workers!r}")
        if c.device is not None:
            check_device_name(c.device)
        return c

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training-config field(s) {unknown}")
        return cls(**d)
