"""Training configuration: a typed dataclass that round-trips to JSON and lives in every checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The loss variants of TOFA's ablation (losses.py computes them). Here, not there, so that the CLI's
# argument parser and `tofa-fast select` import no torch.
LOSS_VARIANTS = ("sup", "sup+kd", "sup+fm", "sup+fm+kd")

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
STEP_MODES = ("auto", "fused", "shared", "graphed", "sequential")
#: What one epoch is: a pass over the unlabelled pool (when the run has one, else over the labelled
#: images: FixMatch's epoch), or a pass over the labelled images (a supervised paper's epoch).
EPOCH_UNITS = ("unlabelled", "labelled")
LR_SCHEDULES = ("cosine", "constant")
#: The RSS paper's ablations (Figs. 5–7), options of strategy ``rss`` (strategies.RssStrategy).
RSS_EVERY = ("epoch", "batch")
RSS_SCHEMES = ("random", "smallest", "middle", "largest", "max-then-min", "min-then-max", "alternating")

#: The knobs whose paper value differs per strategy. A ``None`` field of :class:`TrainConfig` takes
#: its strategy's value from here (:meth:`TrainConfig.resolved`); an explicit value always wins. The
#: README's "Strategies" table is :func:`strategy_defaults_table` of this data (a test keeps them equal).
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    # TOFA §4.2 names each knob, but our copy of the paper lost its numbers: these are SPEC §7's
    # values (mini-batch 32 labelled + 32 unlabelled is legible in §4.2). An epoch is a pass over
    # the unlabelled pool, as FixMatch counts it.
    "tofa": {
        "lr": 0.05,
        "batch_size": 32,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "dropout": 0.1,
        "drop_connect": 0.05,
        "epoch_unit": "unlabelled",
    },
    # RSS §6.1: "initial learning rate of 0.01 using cosine learning rate decay; batch size of 64;
    # momentum of 0.9; [...] cross-entropy loss" (no label smoothing, no warm-up); an epoch is a pass
    # over the (labelled) training set, each with its own subnet (§4.2). The weight-decay value is lost
    # from our copy of §6.1; RSS derives its subnets with OFA's code (§6.1), so weight decay, Nesterov,
    # dropout and drop-connect are OFA's MobileNetV3 settings (train_ofa_net.py; see "ps").
    "rss": {
        "lr": 0.01,
        "batch_size": 64,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 3e-5,
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "dropout": 0.1,
        "drop_connect": 0.0,
        "epoch_unit": "labelled",
    },
    # OFA's train_ofa_net.py (mit-han-lab/once-for-all): base_lr 3e-2 of the kernel phase (the phase
    # ratios are strategies.PS_PHASES) for base_batch_size 64 per GPU (init_lr = base_lr x GPUs: one
    # GPU here), momentum 0.9, no_nesterov False, weight_decay 3e-5 (not on BN and biases, as here),
    # label_smoothing 0.1, dropout 0.1, no drop-connect (OFAMobileNetV3 has none); an epoch is a pass
    # over its labelled training set. Its 5-epoch warm-ups belong to the kernel, depth-2 and expand-2
    # phases (strategies.PS_WARMUP_SHARE); the full net's training is not in that script (it downloads
    # the trained full net), so the full phase keeps tofa's one warm-up epoch.
    "ps": {
        "lr": 0.03,
        "batch_size": 64,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 3e-5,
        "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "dropout": 0.1,
        "drop_connect": 0.0,
        "epoch_unit": "labelled",
    },
}
# The baseline trains as the product does, so that the price of weight sharing is all that differs.
STRATEGY_DEFAULTS["single"] = dict(STRATEGY_DEFAULTS["tofa"])
#: Where each strategy's defaults come from, one line each (the README table's last row).
STRATEGY_DEFAULT_SOURCES: dict[str, str] = {
    "tofa": "TOFA §4.2 (values: SPEC §7)",
    "rss": "RSS §6.1; wd, Nesterov, dropout, drop-connect: OFA's",
    "ps": "OFA `train_ofa_net.py`",
    "single": "as `tofa`",
}
#: The CLI flag of each per-strategy knob, in the table's order.
STRATEGY_KNOB_FLAGS: dict[str, str] = {name: "--" + name.replace("_", "-") for name in STRATEGY_DEFAULTS["tofa"]}


def strategy_defaults_table() -> str:
    """The per-strategy defaults as a Markdown table (knob × strategy, sources in the last row)."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:g}" if isinstance(value, float) else str(value)

    names = list(STRATEGY_DEFAULTS)
    lines = [
        "| knob | " + " | ".join(f"`{s}`" for s in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for knob, flag in STRATEGY_KNOB_FLAGS.items():
        lines.append(f"| `{flag}` | " + " | ".join(cell(STRATEGY_DEFAULTS[s][knob]) for s in names) + " |")
    lines.append("| source | " + " | ".join(STRATEGY_DEFAULT_SOURCES[s] for s in names) + " |")
    return "\n".join(lines)


def check_device_name(device: str) -> None:
    """Raise ``ValueError`` naming ``device`` unless PyTorch reads it as a device (``cpu``, ``cuda:1``…)."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, …): {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (SPEC §7).

    ``None`` fields are filled by :meth:`resolved`: the knobs of :data:`STRATEGY_DEFAULTS` with the
    strategy's paper values, the others per data set.
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
    # The knobs the papers turn; None: the strategy's value (STRATEGY_DEFAULTS).
    batch_size: int | None = None
    mu: int = 1  # unlabelled batch = mu × batch_size
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    label_smoothing: float | None = None
    threshold: float = 0.95
    dropout: float | None = None
    drop_connect: float | None = None
    epoch_unit: str | None = None  # one of EPOCH_UNITS
    lr_schedule: str = "cosine"  # after the warm-up: cosine decay to 0, or constant (RSS Fig. 7)
    # The RSS paper's ablations (strategy "rss" only): a draw per epoch or per batch, subnets per
    # draw (their gradients summed into one step), and which subnets (Figs. 5–7; strategies.py).
    rss_every: str = "epoch"
    rss_subnets: int = 1
    rss_scheme: str = "random"
    palette_size: int = 6
    calibration_images: int = 500
    num_workers: int = 0
    freeze_bn: bool = False  # BN layers normalise with their running statistics and do not update them
    skip_bad_images: bool = False  # leave out (and list) images that do not decode instead of refusing the data
    # Numerics and layout: "auto" is bf16 autocast + channels_last on CUDA, fp32 + channels_last on
    # the CPU. The trainer records the resolved values, so a resumed run computes as it did.
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
        paper = STRATEGY_DEFAULTS[c.strategy]
        c = replace(c, **{name: value for name, value in paper.items() if getattr(c, name) is None})
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
        for name, choices in (
            ("epoch_unit", EPOCH_UNITS),
            ("lr_schedule", LR_SCHEDULES),
            ("rss_every", RSS_EVERY),
            ("rss_scheme", RSS_SCHEMES),
        ):
            if getattr(c, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(c, name)!r}")
        _check_rss_options(c)
        if c.arch is not None and c.strategy != "single":
            raise ValueError(f"arch fixes the subnet of strategy 'single'; strategy {c.strategy!r} samples its own")
        for name in ("epochs", "batch_size", "mu", "palette_size", "calibration_images", "log_every", "rss_subnets"):
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
        if not isinstance(c.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {c.nesterov!r}")
        if c.nesterov and c.momentum == 0:  # torch.optim.SGD refuses it, naming neither flag
            raise ValueError("nesterov needs momentum > 0; give a momentum or turn nesterov off (--no-nesterov)")
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
        """The config ``to_dict`` wrote. A field missing from ``d`` (a checkpoint written before it
        existed) takes the value every run had then (:data:`FIELDS_BEFORE_THEY_EXISTED`), else
        its default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training-config field(s) {unknown}")
        return cls(**{**FIELDS_BEFORE_THEY_EXISTED, **d})


#: Fields added after checkpoints were written whose default differs from what those runs did: such
#: a checkpoint resumes as it trained (before ``epoch_unit``, every strategy counted an epoch as a
#: pass over the unlabelled pool; before ``channels_last``, CPU runs computed in NCHW, and CUDA did
#: not train).
FIELDS_BEFORE_THEY_EXISTED: dict[str, Any] = {"epoch_unit": "unlabelled", "channels_last": False}


def _check_rss_options(c: TrainConfig) -> None:
    """The RSS ablations are options of strategy ``rss`` and combine only where they mean something."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name.startswith("rss_")}
    changed = [name for name, default in defaults.items() if getattr(c, name) != default]
    if changed and c.strategy != "rss":
        raise ValueError(f"{changed[0]} is an option of strategy 'rss', not of strategy {c.strategy!r}")
    if c.rss_scheme == "random":
        return
    # The other schemes fix each epoch's subnet (RSS Figs. 6 and 7): one at a time, epoch by epoch.
    if c.rss_subnets != 1:
        raise ValueError(f"rss_subnets > 1 needs rss_scheme 'random'; scheme {c.rss_scheme!r} trains one subnet")
    if c.rss_every != "epoch":
        raise ValueError(f"rss_every 'batch' needs rss_scheme 'random'; scheme {c.rss_scheme!r} is fixed per epoch")
