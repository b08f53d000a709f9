"""Training strategies (SPEC §7): which subnets each step trains, with which loss terms.

=========  ==================================================================================
``tofa``   sandwich rule: a_max, a_min and two uniform random subnets every step, TOFA loss
           (labelled CE + FixMatch + distillation from a_max on unlabelled images).
``rss``    the RSS paper: *one* uniformly random subnet per epoch, trained with CE on the
           labelled images (no weight-sharing tricks, no unlabelled data). Its ablations are
           options (``TrainConfig.rss_*``, :class:`RssStrategy`): a draw per batch, several
           subnets per draw, fixed smallest / middle / largest subnets, Max→Min, Min→Max and
           alternating orders; ``lr_schedule="constant"`` is its Fig. 7 schedule.
``ps``     OFA progressive shrinking: full net → elastic kernel → elastic depth (2 phases) →
           elastic expand (2 phases), 1/2/4 subnets per step, CE + distillation from a frozen copy
           of the full net, middle channels re-sorted by importance before each expand phase.
``single`` one fixed arch (``TrainConfig.arch``, default the max subnet): the baseline a
           palette of separately trained networks would be made of. CE, plus FixMatch when
           unlabelled data is given (``sup+fm``, the default then).
=========  ==================================================================================

Each strategy's optimizer settings default to its paper's (``config.STRATEGY_DEFAULTS``).

A strategy turns the step's RNG into a :class:`~.plan.StepPlan` (members and their roles) and acts on
the network and optimizer only through :meth:`Strategy.on_epoch_start`, which receives them. It is
stateless apart from what :meth:`Strategy.state_dict` returns (the ``ps`` teacher), so a run resumed
from a checkpoint trains exactly what the uninterrupted run trains.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..nn import Supernet
from ..spaces import Arch, SearchSpace
from .config import TrainConfig
from .losses import variant_terms
from .plan import Member, StepPlan


class Strategy:
    """Base class. Subclasses decide the members of each step and the loss terms each takes."""

    name = ""
    #: whether a_max / a_min are trained every step (the zero-cost rule then treats them specially)
    sandwich_selection = False

    def __init__(self, space: SearchSpace, epochs: int, steps_per_epoch: int, config: TrainConfig):
        self.space, self.epochs, self.steps_per_epoch, self.config = space, epochs, steps_per_epoch, config
        self.use_fm, self.use_kd = variant_terms(config.loss)

    def on_epoch_start(
        self, epoch: int, rng: random.Random, net: Supernet, optimizer: torch.optim.Optimizer, resumed: bool = False
    ) -> None:
        """Called at the start of every epoch, before its first step (phase changes go here).

        ``resumed``: the epoch continues from a mid-epoch checkpoint, so what the epoch's start did
        to ``net`` and ``optimizer`` is already in their restored state; only the strategy's own
        epoch state (and its draws from ``rng``) is to be set up again."""

    def plan(self, rng: random.Random) -> StepPlan:
        raise NotImplementedError

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step ``step`` (0-based): warm-up, then
        ``config.lr_schedule``."""
        warmup = self.config.warmup_epochs * self.steps_per_epoch
        return warmup_schedule(step, warmup, self.epochs * self.steps_per_epoch, self.config.lr_schedule)

    def teacher(self) -> torch.nn.Module | None:
        """A frozen network whose soft labels the students distil on the labelled batch (``ps``)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], net: Supernet) -> None:
        pass


class TofaStrategy(Strategy):
    name = "tofa"
    sandwich_selection = True

    def plan(self, rng: random.Random) -> StepPlan:
        """A_t = {a_max, a_min, a_1, a_2}, a_1 and a_2 uniform random (SPEC §7). Every member takes CE
        (and FixMatch); only the random members distil a_max and are indexed (selection.py says why)."""
        fm, kd = self.use_fm, self.use_kd
        fixed = [Member(a, fm=fm, indexed=False) for a in (self.space.max_arch(), self.space.min_arch())]
        sampled = [Member(self.space.sample(rng), fm=fm, kd=kd) for _ in range(2)]
        return StepPlan(tuple(fixed + sampled), self.space.max_arch() if fm or kd else None)


class RssStrategy(Strategy):
    """Random Subnet Sampling (RSS §4.2): one uniformly random subnet per *epoch*. The epoch's draw
    is the first use of the epoch's RNG, so it depends only on (seed, epoch).

    The paper's ablations, as options of the config:

    * ``rss_every="batch"`` (Fig. 5): a fresh draw every step, from the epoch's RNG after the
      previous step's draw, so it depends only on (seed, epoch, step);
    * ``rss_subnets=n`` (Fig. 5): n uniform subnets per draw, their gradients summed into one
      optimizer step;
    * ``rss_scheme`` (Figs. 6 and 7), one subnet a whole epoch: ``smallest`` / ``largest`` (the min /
      max arch), ``middle`` (:func:`middle_arch`); ``max-then-min`` (the max arch in the epochs
      e < E/2, then the min arch), ``min-then-max``, ``alternating`` (max in even epochs, min in odd
      ones). The paper trains Fig. 7's schemes with ``lr_schedule="constant"``.
    """

    name = "rss"

    def __init__(self, space: SearchSpace, epochs: int, steps_per_epoch: int, config: TrainConfig):
        super().__init__(space, epochs, steps_per_epoch, config)
        self.archs: tuple[Arch, ...] | None = None  # the epoch's subnets; None: each step draws

    def on_epoch_start(
        self, epoch: int, rng: random.Random, net: Supernet, optimizer: torch.optim.Optimizer, resumed: bool = False
    ) -> None:
        c = self.config
        if c.rss_scheme == "random":
            self.archs = self._draw(rng) if c.rss_every == "epoch" else None
            return
        if c.rss_scheme == "middle":
            self.archs = (middle_arch(self.space),)
            return
        first_half = 2 * epoch < self.epochs
        largest = {
            "largest": True,
            "smallest": False,
            "max-then-min": first_half,
            "min-then-max": not first_half,
            "alternating": epoch % 2 == 0,
        }[c.rss_scheme]
        self.archs = (self.space.max_arch() if largest else self.space.min_arch(),)

    def _draw(self, rng: random.Random) -> tuple[Arch, ...]:
        return tuple(self.space.sample(rng) for _ in range(self.config.rss_subnets))

    def plan(self, rng: random.Random) -> StepPlan:
        archs = self.archs if self.archs is not None else self._draw(rng)
        return StepPlan(tuple(Member(a) for a in archs))


class SingleStrategy(Strategy):
    """One fixed arch; with ``sup+fm`` it is its own FixMatch teacher."""

    name = "single"

    def __init__(self, space: SearchSpace, epochs: int, steps_per_epoch: int, config: TrainConfig):
        super().__init__(space, epochs, steps_per_epoch, config)
        self.arch = space.max_arch() if config.arch is None else parse_arch(space, config.arch)

    def plan(self, rng: random.Random) -> StepPlan:
        return StepPlan((Member(self.arch, fm=self.use_fm),), self.arch if self.use_fm else None)


# ----------------------------------------------------------------------------------------------
# Progressive shrinking
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One progressive-shrinking phase: how many of the largest choices of each dimension may be
    sampled (``None``: all of them), subnets per step, learning-rate multiplier, epoch range."""

    name: str
    kernels: int | None
    depths: int | None
    expands: int | None
    widths: int | None
    resolutions: int | None
    subnets: int
    lr_scale: float
    # OFA's expand_ratio_stage for the channel re-sort at the phase start, on the phase's expand list
    # (OFA's train_elastic_expand: the current network's list, stage = its length - 2)
    sort_channels: int | None
    warmup: bool  # OFA warms the learning rate up again at the start of this phase
    start: int = 0
    epochs: int = 0


#: OFA's schedule (Cai et al., 2020, §3.2 and the ofa repository's train_ofa_net.py): epochs
#: 180 (teacher) / 120 (kernel) / 25 + 120 (depth) / 25 + 120 (expand); base LRs 3e-2 for the kernel
#: phase, 2.5e-3 and 7.5e-3 for the first and second phase of depth and of expand; 1, 2 and 4 subnets
#: per step. We keep the epoch *proportions* and the LR *ratios* to the kernel phase (1/12 and 1/4);
#: the full net and the kernel phase train at ``config.lr``. Elastic width (stem, stage and head
#: widths; OFA's spaces have none) is unlocked together with expand: both are channel prefixes.
#: Elastic resolution is on from the kernel phase, as OFA samples the image size in every
#: progressive phase (one size per step, for all of its subnets); the full net trains at the
#: largest resolution.
_LOW, _HIGH = 2.5e-3 / 3e-2, 7.5e-3 / 3e-2
PS_PHASES = (
    Phase("full", 1, 1, 1, 1, 1, subnets=1, lr_scale=1.0, sort_channels=None, warmup=True),
    Phase("kernel", None, 1, 1, 1, None, subnets=1, lr_scale=1.0, sort_channels=None, warmup=True),
    Phase("depth-1", None, 2, 1, 1, None, subnets=2, lr_scale=_LOW, sort_channels=None, warmup=False),
    Phase("depth-2", None, None, 1, 1, None, subnets=2, lr_scale=_HIGH, sort_channels=None, warmup=True),
    Phase("expand-1", None, None, 2, 2, None, subnets=4, lr_scale=_LOW, sort_channels=0, warmup=False),
    Phase("expand-2", None, None, None, None, None, subnets=4, lr_scale=_HIGH, sort_channels=1, warmup=True),
)
PS_EPOCH_WEIGHTS = (180, 120, 25, 120, 25, 120)
#: OFA's warm-up in the kernel, depth-2 and expand-2 phases: 5 of their 120 epochs
#: (train_ofa_net.py); the full phase warms up for ``config.warmup_epochs`` like every strategy.
PS_WARMUP_SHARE = 5 / 120


def share_epochs(total: int, weights: tuple[int, ...] = PS_EPOCH_WEIGHTS) -> list[int]:
    """Split ``total`` epochs over the phases in proportion to ``weights``, at least one each
    (largest remainder). 25 epochs give [8, 5, 1, 5, 1, 5]."""
    if total < len(weights):
        raise ValueError(f"epochs must be at least {len(weights)} for strategy 'ps' (one per phase), got {total}")
    spare = total - len(weights)
    exact = np.array(weights, dtype=float) / sum(weights) * total - 1.0
    exact = np.clip(exact, 0.0, None)
    exact *= spare / exact.sum() if exact.sum() > 0 else 0.0
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: spare - counts.sum()]:
        counts[i] += 1
    return [int(c) + 1 for c in counts]


def _top(values: tuple, k: int | None) -> tuple:
    return tuple(values) if k is None else tuple(sorted(values)[-k:])


def _narrow(space: SearchSpace, choose: Callable[[str, tuple], tuple]) -> SearchSpace:
    """``space`` with each choice list replaced by ``choose(dimension, choices)``; ``dimension`` is
    one of ``resolutions``, ``widths``, ``depths``, ``kernels``, ``expands`` (per layer where the
    space lists expand choices per layer)."""
    stages = []
    for st in space.stages:
        layer_expands = None
        expands = choose("expands", st.expands)
        if st.layer_expands is not None:
            layer_expands = tuple(choose("expands", choices) for choices in st.layer_expands)
            expands = tuple(sorted({e for choices in layer_expands for e in choices}))
        stages.append(
            replace(
                st,
                widths=choose("widths", st.widths),
                depths=choose("depths", st.depths),
                kernels=choose("kernels", st.kernels),
                expands=expands,
                layer_expands=layer_expands,
            )
        )
    return replace(
        space,
        resolutions=choose("resolutions", space.resolutions),
        stem=replace(space.stem, widths=choose("widths", space.stem.widths)),
        stages=tuple(stages),
        head=replace(space.head, widths=choose("widths", space.head.widths)),
    )


def restrict(space: SearchSpace, phase: Phase) -> SearchSpace:
    """The sub-space a phase samples from: each dimension limited to its ``k`` largest choices."""
    return _narrow(space, lambda dimension, choices: _top(choices, getattr(phase, dimension)))


def middle_arch(space: SearchSpace) -> Arch:
    """RSS Fig. 6's "middle" subnet: every choice at index ``len // 2`` of its sorted choice list.
    On OFA's MobileNetV3 space that is the paper's kernel 5, expand 4, depth 3; the rule extends to
    the dimensions the paper's space lacks (widths, resolution) and to per-layer expand lists."""
    middle = _narrow(space, lambda dimension, choices: (sorted(choices)[len(choices) // 2],))
    return space.arch_from_dict(middle.max_arch().to_dict())


class ProgressiveShrinking(Strategy):
    name = "ps"

    def __init__(self, space: SearchSpace, epochs: int, steps_per_epoch: int, config: TrainConfig):
        super().__init__(space, epochs, steps_per_epoch, config)
        phases, start = [], 0
        for phase, n in zip(PS_PHASES, share_epochs(epochs)):
            phases.append(replace(phase, start=start, epochs=n))
            start += n
        self.phases = tuple(phases)
        self.spaces = [restrict(space, p) for p in self.phases]
        self.phase_index = 0
        self._teacher: torch.nn.Module | None = None

    def phase_at(self, epoch: int) -> int:
        return max(i for i, p in enumerate(self.phases) if p.start <= epoch)

    def on_epoch_start(
        self, epoch: int, rng: random.Random, net: Supernet, optimizer: torch.optim.Optimizer, resumed: bool = False
    ) -> None:
        self.phase_index = self.phase_at(epoch)
        phase = self.phases[self.phase_index]
        if epoch != phase.start or self.phase_index == 0 or resumed:
            return
        # Phase boundary (runs again, identically, when a run resumes at this epoch).
        if self._teacher is None:  # the full net, frozen when the full phase ends
            self._teacher = _frozen_copy(net.extract(self.space.max_arch()))
        if phase.sort_channels is not None:
            net.sort_channels(phase.sort_channels, phase.expands)
        # Each OFA phase is a fresh run with its own optimizer; stale momentum would also point the
        # wrong way after the channel re-sort.
        optimizer.state.clear()

    def plan(self, rng: random.Random) -> StepPlan:
        """The phase's subnets, each distilling the frozen full net once it exists. All of a step's
        subnets see the same images at one resolution — the first subnet's draw —, as in OFA, whose
        loader draws one image size per batch and runs every subnet of the step on that batch
        (progressive_shrinking.py's ``train_one_epoch``). The ``shared`` step then computes what
        they agree on once."""
        phase, sub = self.phases[self.phase_index], self.spaces[self.phase_index]
        distil = self._teacher is not None
        archs = [sub.sample(rng) for _ in range(phase.subnets)]
        archs = [self.space.arch_from_dict({**a.to_dict(), "resolution": archs[0].resolution}) for a in archs]
        return StepPlan(tuple(Member(a, teacher_kd=distil) for a in archs))

    def lr_factor(self, step: int) -> float:
        """A fresh schedule per phase (OFA runs each phase separately): a linear warm-up where OFA
        has one (``config.warmup_epochs`` in the full phase; OFA's 5/120 of the phase, at least one
        step, in the kernel, depth-2 and expand-2 phases), then ``config.lr_schedule`` within every
        phase (cosine decay to zero, OFA's; or constant), scaled by the phase's LR ratio."""
        epoch = min(step // self.steps_per_epoch, self.epochs - 1)
        phase = self.phases[self.phase_at(epoch)]
        local = step - phase.start * self.steps_per_epoch
        steps = phase.epochs * self.steps_per_epoch
        if not phase.warmup:
            warmup = 0
        elif phase.start == 0:
            warmup = self.config.warmup_epochs * self.steps_per_epoch
        else:
            warmup = max(1, round(PS_WARMUP_SHARE * steps))
        return phase.lr_scale * warmup_schedule(local, warmup, steps, self.config.lr_schedule)

    def teacher(self) -> torch.nn.Module | None:
        return self._teacher

    def state_dict(self) -> dict[str, Any]:
        return {} if self._teacher is None else {"teacher": self._teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any], net: Supernet) -> None:
        if "teacher" in state:
            teacher = net.extract(self.space.max_arch())
            teacher.load_state_dict(state["teacher"])
            self._teacher = _frozen_copy(teacher)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The ``ps`` teacher as OFA runs it: never set to eval mode, so batch norm normalises with the
    batch's statistics (OFA's teacher, ``args.teacher_model``, stays in train mode); its dropout is
    off (OFA builds it with ``dropout_rate=0``) and its running statistics stay as they were frozen
    (they do not enter a train-mode forward, and a checkpoint need not follow them)."""
    model = model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def parse_arch(space: SearchSpace, text: str) -> Arch:
    """An arch given as its canonical string (``str(arch)``) or as a JSON dict (SPEC §2)."""
    text = text.strip()
    try:
        return space.arch_from_json(text) if text.startswith("{") else space.arch_from_string(text)
    except ValueError as exc:
        raise ValueError(f"arch {text!r} is not a subnet of space {space.name!r}: {exc}") from None


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (TofaStrategy, RssStrategy, ProgressiveShrinking, SingleStrategy)
}


def build_strategy(name: str, space: SearchSpace, epochs: int, steps_per_epoch: int, config: TrainConfig) -> Strategy:
    if name not in STRATEGY_CLASSES:
        raise ValueError(f"strategy must be one of {list(STRATEGY_CLASSES)}, got {name!r}")
    return STRATEGY_CLASSES[name](space, epochs, steps_per_epoch, config)


def warmup_schedule(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then ``schedule``: ``cosine`` decay to 0 at ``total``,
    or ``constant`` 1 (RSS Fig. 7)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
