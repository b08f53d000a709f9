"""One training step: plan + batch → member logits → loss terms → backward (SPEC §7).

Nothing else happens here: the trainer zeroes gradients, averages them over processes, steps the
optimizer and the schedule, and updates the selection index.

How the members are computed is one seam, :meth:`StepBackend.backward_members`, chosen from
:data:`STEP_TABLE` in the style of the op's dispatch table (``ops/elastic_dwconv_dispatch.py``):
each entry declares whether it can serve a network on a device and why not, and ``--step auto``
takes the first that can. ``sequential`` runs one member per forward/backward pass (the graph of
one member alive at a time); ``shared`` also runs the members one at a time but computes what
members with the same images agree on once (``Supernet.backward_many``); ``fused`` computes all
members in one packed pass (``Supernet.forward_many``); ``graphed`` replays the members from CUDA
graphs (:mod:`.member_graphs`: a_max and a_min whole, the others part by part). Every entry trains exactly the same.

Loss terms stay on the device: :func:`train_step` returns 0-dim tensors summed over members, and
the trainer reads them back once per logging interval, so a step makes no host synchronisation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..nn import Supernet, shared_prefix
from ..spaces import Arch
from . import losses, member_graphs
from .loaders import resize
from .plan import Member, StepPlan


@dataclass(frozen=True)
class ComputeFormat:
    """Numerics and memory layout of the training passes."""

    precision: str  # "fp32" or "bf16" (autocast; master weights stay fp32)
    channels_last: bool

    @classmethod
    def resolve(cls, precision: str, channels_last: bool | None, device: torch.device) -> ComputeFormat:
        """``auto`` / ``None`` become bf16 + channels_last on CUDA and fp32 + channels_last on the CPU.

        Channels-last on the CPU too: mkldnn's 1×1 convolutions, the depthwise kernel and the fused
        batch norm + activation (ElasticBatchNorm2d) are all at their fastest in NHWC, and the
        default run's step is 1.4-1.5× faster than in NCHW (bench/test_bench_sequential_step.py).
        """
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if channels_last is None:
            channels_last = True
        return cls(precision, channels_last)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class StepBatch:
    """One step's images on the training device: labelled (B, C, S, S) + labels (B,), and the weak
    and strong views of the unlabelled batch (μB, C, S, S) when the plan uses them."""

    x: torch.Tensor
    y: torch.Tensor
    u_weak: torch.Tensor | None = None
    u_strong: torch.Tensor | None = None

    @classmethod
    def to_device(cls, labelled, unlabelled, device: torch.device, fmt: ComputeFormat) -> StepBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True).to(memory_format=fmt.memory_format)

        x, y = labelled
        u_weak, u_strong = (move(t) for t in unlabelled) if unlabelled is not None else (None, None)
        return cls(move(x), y.to(device, non_blocking=True), u_weak, u_strong)


# ------------------------------------------------------------------------------------------------
# The seam: member logits
# ------------------------------------------------------------------------------------------------


class StepBackend:
    """A way to compute the logits of a step's members."""

    name = "abstract"
    supports = ""  # one line for `tofa-fast info`
    #: members per forward/backward pass; ``None``: all of a step's members in one pass
    members_per_pass: int | None = 1

    def not_supported_reasons(self, net: Supernet, device: torch.device) -> list[str]:
        raise NotImplementedError

    def forward_members(
        self, net: Supernet, archs: Sequence[Arch], images: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Logits (N_i, classes) of ``archs[i]`` on ``images[i]`` (N_i, C, r_i, r_i)."""
        raise NotImplementedError

    def backward_members(
        self,
        net: Supernet,
        archs: Sequence[Arch],
        images: Sequence[torch.Tensor],
        loss_of: Callable[[int, torch.Tensor], torch.Tensor | None],
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        """Forward the members (under ``autocast()``) and back-propagate the sum of their
        ``loss_of(i, logits_i)`` (None: no term). By default: :meth:`forward_members`, one backward."""
        with autocast():
            logits = self.forward_members(net, archs, images)
        member_losses = [loss for i, out in enumerate(logits) if (loss := loss_of(i, out)) is not None]
        if member_losses:
            torch.stack(member_losses).sum().backward()


class SequentialStep(StepBackend):
    name = "sequential"
    supports = "every network and device: set_active + forward, one member per pass"

    def not_supported_reasons(self, net: Supernet, device: torch.device) -> list[str]:
        return []

    def forward_members(
        self, net: Supernet, archs: Sequence[Arch], images: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        logits = []
        for arch, x in zip(archs, images):
            net.set_active(arch)
            logits.append(net(x))
        return logits


class FusedStep(StepBackend):
    """All members of a step in one packed pass (``Supernet.forward_many``, :mod:`tofa_fast.nn.packed`),
    one backward for all of them. ``auto`` takes it only on the device types where
    ``bench/test_bench_fused_step.py`` measured it faster than ``sequential``: none yet. On the
    2-core CPU the packed pass computes the narrower members at the widest member's width and
    copies rows between layouts, which costs more than the per-op overhead it saves (0.54–0.70× the
    channels-last sequential digits step on two threads; bench/results/fused_step_cpu.md), and
    holds every member's activations at once (3–4× the memory); on an H200 it ran at 0.80×
    sequential in bf16 (ofa_mbv3 128 px, batch 32; bench/results/fused_step_gpu.md)."""

    name = "fused"
    supports = "every supernet: all members in one packed pass (Supernet.forward_many); not faster yet"
    members_per_pass = None
    #: device types where ``auto`` prefers this entry (measured faster there); elsewhere it serves when asked by name
    auto_device_types: tuple[str, ...] = ()

    def not_supported_reasons(self, net: Supernet, device: torch.device) -> list[str]:
        return [] if isinstance(net, Supernet) else [f"{type(net).__name__} has no forward_many"]

    def forward_members(
        self, net: Supernet, archs: Sequence[Arch], images: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        return net.forward_many(images, archs)


class SharedPrefixStep(SequentialStep):
    """Members one after the other, what members with the same images agree on computed once
    (``Supernet.backward_many``, :mod:`tofa_fast.nn.shared_prefix`): the stem, and every expansion,
    depthwise and projection up to where their choices part, at the widest member's width. Each
    branch runs forward and backward before the next, so memory stays that of the largest member.

    Members run in groups of consecutive members with the same images (``consecutive_groups``), in
    member order: a group of one shares nothing and takes the sequential pass (with its fused
    kernels); each larger group is one tree, whose expansions with a single depthwise child take the
    fused op too (nn/shared_prefix.py). ``auto`` takes this entry on the CPU, where it measured
    1.20–1.32× the sequential step on a digits ``ps`` step (four subnets, one batch), 1.08–1.14× on
    OFA's sandwich step and 0.99–1.02× on the default TOFA step (``bench/test_bench_fused_step.py``,
    interleaved; 0.96× on TOFA while every member went through the unfused tree). On CUDA it is not
    measured yet."""

    name = "shared"
    supports = "every supernet: one member at a time, what members with the same images agree on once"
    members_per_pass = None
    auto_device_types: tuple[str, ...] = ("cpu",)

    def not_supported_reasons(self, net: Supernet, device: torch.device) -> list[str]:
        return [] if isinstance(net, Supernet) else [f"{type(net).__name__} has no backward_many"]

    def backward_members(self, net, archs, images, loss_of, autocast) -> None:
        groups = shared_prefix.consecutive_groups(images)
        if groups is None:  # members that share images are not next to each other: one tree for all
            net.backward_many(images, archs, loss_of, autocast)
            return
        # One group at a time, in member order (so the running statistics are updated in it). A member
        # that shares nothing takes the sequential pass, whose layers take the fused kernels the
        # tree's prefix-reading nodes do not (nn/bn_act_dwconv.py): in the default TOFA step, where
        # only the two random members share one step in three, that made this step 0.96× the
        # sequential one when every member went through the tree.
        for group in groups:
            if len(group) == 1:
                i = group[0]
                super().backward_members(net, [archs[i]], [images[i]], lambda _, out, i=i: loss_of(i, out), autocast)
            else:
                net.backward_many(
                    [images[i] for i in group],
                    [archs[i] for i in group],
                    lambda j, out, group=group: loss_of(group[j], out),
                    autocast,
                )


class GraphedStep(SequentialStep):
    """The sequential step replayed from CUDA graphs (:mod:`.member_graphs`): the GPU step is bound
    by the host's launches, and a replay launches once. The members every step has — a_max, a_min,
    and a_max's pseudo-label pass — are recorded whole; the random members part by part (stem,
    layers, head: a layer's kernel × expand × width choices recur even when the member does not).
    Trains exactly what ``sequential`` trains (running statistics and dropout masks included).

    ``auto`` does not take it until ``bench/test_bench_fused_step_gpu.py`` has measured it on a GPU.
    ``recorder`` (tests): a :class:`~.member_graphs.EagerRecorder` runs the same code on a CPU,
    everything but the capture itself."""

    name = "graphed"
    supports = (
        "CUDA: sequential, replayed from CUDA graphs (a_max / a_min whole, the others part by part); not measured yet"
    )
    auto_device_types: tuple[str, ...] = ()

    def __init__(self, recorder=None):
        self._recorder = recorder
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def not_supported_reasons(self, net: Supernet, device: torch.device) -> list[str]:
        reasons = []
        if device.type != "cuda" and self._recorder is None:
            reasons.append(f"CUDA graphs need a CUDA device, not {device.type}")
        if not isinstance(net, Supernet):
            reasons.append(f"{type(net).__name__} is not a Supernet")
        elif any(getattr(m, "momentum", 0.1) is None for m in net.modules()):
            # the cumulative average's factor is read from a buffer on the host at every pass
            reasons.append("a batch norm has momentum=None")
        return reasons

    def graphs_of(self, net: Supernet, device: torch.device) -> member_graphs.MemberGraphs:
        """``net``'s recordings (made as its members are first met)."""
        graphs = self._graphs.get(net)
        if graphs is None:
            recorder = self._recorder or member_graphs.CudaGraphRecorder(device)
            graphs = self._graphs[net] = member_graphs.MemberGraphs(net, recorder)
        return graphs

    def forward_members(
        self, net: Supernet, archs: Sequence[Arch], images: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if torch.is_grad_enabled():
            # A replayed member's activations live in its recording until its backward: a forward
            # whose backward this step does not control runs eagerly.
            return super().forward_members(net, archs, images)
        logits = []
        for arch, x in zip(archs, images):
            graphs = self.graphs_of(net, x.device)
            logits.append(graphs(arch, x) if graphs.recurs(arch) else super().forward_members(net, [arch], [x])[0])
        return logits

    def backward_members(self, net, archs, images, loss_of, autocast) -> None:
        for i, (arch, x) in enumerate(zip(archs, images)):
            if not torch.is_grad_enabled():
                super().backward_members(net, [arch], [x], lambda _, logits, i=i: loss_of(i, logits), autocast)
                continue
            graphs = self.graphs_of(net, x.device)
            with autocast():
                logits = graphs(arch, x) if graphs.recurs(arch) else graphs.layerwise(arch, x)
            loss = loss_of(i, logits)
            if loss is not None:
                loss.backward()


#: in order of preference for ``--step auto`` (an entry with ``auto_device_types`` only where listed)
STEP_TABLE: tuple[StepBackend, ...] = (FusedStep(), SharedPrefixStep(), GraphedStep(), SequentialStep())


def _auto_serves(backend: StepBackend, net: Supernet, device: torch.device) -> bool:
    preferred = getattr(backend, "auto_device_types", None)
    if preferred is not None and device.type not in preferred:
        return False
    return not backend.not_supported_reasons(net, device)


def choose_step_backend(name: str, net: Supernet, device: torch.device) -> StepBackend:
    """The entry ``name`` names (``auto``: the first that serves ``net`` on ``device`` and is
    preferred there); an entry that cannot serve raises ``ValueError`` with its reasons."""
    if name == "auto":
        return next(b for b in STEP_TABLE if _auto_serves(b, net, device))
    for backend in STEP_TABLE:
        if backend.name == name:
            reasons = backend.not_supported_reasons(net, device)
            if reasons:
                raise ValueError(f"step {name!r} cannot train this network on {device}: {'; '.join(reasons)}")
            return backend
    raise ValueError(f"step must be 'auto' or one of {[b.name for b in STEP_TABLE]}, got {name!r}")


def describe_step_backends() -> list[str]:
    """One line per entry of :data:`STEP_TABLE`, for ``tofa-fast info``: what it serves, and where
    ``auto`` takes it."""
    lines = []
    for b in STEP_TABLE:
        preferred = getattr(b, "auto_device_types", None)
        if preferred is None:
            where = "auto: wherever no entry above is taken"
        else:
            where = f"auto on: {', '.join(preferred)}" if preferred else "auto: nowhere yet (by name only)"
        lines.append(f"{b.name:<10} {b.supports} [{where}]")
    return lines


def forward_members(
    net: Supernet, archs: Sequence[Arch], images: Sequence[torch.Tensor], backend: StepBackend | None = None
) -> list[torch.Tensor]:
    """Logits of several members, each on its own images, through ``backend`` (default: ``auto``)."""
    if len(archs) != len(images):
        raise ValueError(f"archs and images must have the same length, got {len(archs)} and {len(images)}")
    backend = backend or choose_step_backend("auto", net, next(net.parameters()).device)
    return backend.forward_members(net, archs, images)


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSettings:
    label_smoothing: float
    threshold: float  # FixMatch confidence τ


def train_step(
    net: Supernet,
    plan: StepPlan,
    batch: StepBatch,
    settings: LossSettings,
    fmt: ComputeFormat,
    backend: StepBackend,
    teacher: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Forward every member of ``plan``, back-propagate the sum of its loss terms (gradients add up
    in ``.grad``), return the terms summed over members as detached 0-dim tensors on the device
    (``sup``, and ``fm``, ``kd``, ``mask`` — the share of confident pseudo-labels — when present).

    Terms per member (SPEC §7): CE on the labelled batch; FixMatch on the strong unlabelled view
    against the pseudo-label teacher's labels on the weak view; distillation of the teacher's soft
    labels on the weak view; with a strategy ``teacher`` (``ps``), distillation of its soft labels
    on the labelled batch.
    """
    device = batch.x.device
    autocast = fmt.autocast(device)
    pseudo = None
    if plan.pseudo_label_teacher is not None:
        if batch.u_weak is None:
            raise ValueError("the step plan has unlabelled terms but the batch has no unlabelled images")
        arch = plan.pseudo_label_teacher
        with torch.no_grad(), autocast, net.pseudo_label_pass():
            logits = forward_members(net, [arch], [resize(batch.u_weak, arch.resolution)], backend)[0]
        pseudo = losses.pseudo_labels(logits, settings.threshold)

    soft_targets: dict[int, losses.PseudoLabels] = {}  # the ps teacher's, per resolution

    def teacher_targets(images: torch.Tensor, resolution: int) -> losses.PseudoLabels:
        if resolution not in soft_targets:  # members of one step often share a resolution
            with torch.no_grad(), autocast:
                logits_t = losses.at_least_fp32(teacher(images[: batch.x.shape[0]]))
            soft_targets[resolution] = losses.pseudo_labels(logits_t, settings.threshold)
        return soft_targets[resolution]

    member_inputs: dict[tuple, tuple[torch.Tensor, list[int]]] = {}

    def member_images(member: Member) -> tuple[torch.Tensor, list[int]]:
        """The member's images, one tensor for all members with the same terms and resolution
        (the ``shared`` step computes what those agree on once)."""
        key = (member.fm, member.kd, member.arch.resolution)
        if key not in member_inputs:
            parts = [batch.x] + ([batch.u_strong] if member.fm else []) + ([batch.u_weak] if member.kd else [])
            member_inputs[key] = resize(torch.cat(parts), member.arch.resolution), [p.shape[0] for p in parts]
        return member_inputs[key]

    terms: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> torch.Tensor:
        terms[name] = terms[name] + value.detach() if name in terms else value.detach()
        return value

    per_pass = backend.members_per_pass or len(plan.members)
    for start in range(0, len(plan.members), per_pass):
        members = plan.members[start : start + per_pass]
        inputs = [member_images(m) for m in members]

        def loss_of(i: int, logits: torch.Tensor, members=members, inputs=inputs) -> torch.Tensor | None:
            """Member i's loss terms, summed (and added to the step's terms)."""
            member, (images, sizes) = members[i], inputs[i]
            chunks = losses.at_least_fp32(logits).split(sizes)
            member_terms = []
            if member.sup:
                member_terms.append(add("sup", losses.supervised_loss(chunks[0], batch.y, settings.label_smoothing)))
            if member.fm:
                member_terms.append(add("fm", losses.fixmatch_loss(chunks[1], pseudo)))
            if member.kd:
                member_terms.append(add("kd", losses.distillation_loss(chunks[-1], pseudo)))
            if member.teacher_kd:
                if teacher is None:
                    raise ValueError("a member takes teacher_kd but the strategy has no teacher")
                targets = teacher_targets(images, member.arch.resolution)
                member_terms.append(add("kd", losses.distillation_loss(chunks[0], targets)))
            return torch.stack(member_terms).sum() if member_terms else None

        archs = [m.arch for m in members]
        backend.backward_members(net, archs, [images for images, _ in inputs], loss_of, lambda: fmt.autocast(device))
    if pseudo is not None:
        terms["mask"] = pseudo.mask.mean()
    return terms
