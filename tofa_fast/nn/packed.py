"""Several subnets of one supernet in one pass: the packed forward behind ``Supernet.forward_many`` (SPEC §5).

A sandwich step trains 4 members (max, min, 2 random) of the same weights. Computed one after the
other, every layer runs 4 times on small tensors. Here the members share each call instead.

Measured, this does not pay yet (``bench/test_bench_fused_step.py``): on the 2-core CPU the step is
bound by memory passes more than by per-op overhead, and the packing adds passes — the narrower
members computed at the widest member's width, rows copied between layouts — while every member's
activations are held at once. ``--step auto`` therefore keeps the sequential step (train/step.py).

Layout (flash-attention's "varlen" idea). The activations of all members live in one 2-D tensor of
shape (P, C): rows are pixels — each member's (N_i, C, H_i, W_i) channels-last image flattened to
(N_i·H_i·W_i, C) —, member after member; C is the widest member's width and a narrower member's
extra columns hold exact zeros. Members may differ in resolution, depth, kernel sizes, expand
ratios and widths. Then

* a 1×1 convolution is one matrix product for all members: each member's rows times the prefix of
  the shared weight; the zero columns of a narrower input add nothing, and the extra output columns
  of a narrower member are garbage that the next step zeroes;
* batch norm + activation is one call of ``tofa_fast.ops.packed_batch_norm_act``: per-member
  statistics over its own rows and channel prefix, zeros written to the other columns (this is what
  makes the invariant hold again), running statistics updated member after member as the sequential
  passes would;
* the depthwise convolution is spatial, so it runs per member on a zero-copy channels-last view of
  its rows (resolutions and kernel sizes differ);
* depth: at each stage the members are ordered by their depth there, deepest first, so that the
  members a block serves are always the first rows; a block runs on that prefix only and the other
  rows pass through (blocks past a member's depth are residual ones: stride 1, same width). The
  running statistics are still updated in member order (the op's ``update_order``).

Because every padding value is an exact zero, the result — logits, every gradient, the BN running
statistics — equals what ``set_active`` + ``forward`` computes member by member, up to the rounding of
sums taken in another order. Dropout and drop-connect draw their masks in one call for all members,
so with those on the two paths draw different (equally distributed) masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import packed_batch_norm_act
from ..spaces import Arch
from .activations import activation_name
from .elastic_batchnorm import ElasticBatchNorm2d
from .elastic_conv import ElasticConv2d
from .mbconv import ElasticMBConv, drop_connect_add, drop_connect_mask


@dataclass(frozen=True)
class Packed:
    """Members' activations as rows of one (P, C) tensor (module docstring).

    Segment ``i`` holds member ``members[i]``: its ``shapes[i]`` = (N, H, W) and active width
    ``channels[i]`` (columns beyond it are zero). Segments are in any member order (see depth).
    """

    data: torch.Tensor
    shapes: tuple[tuple[int, int, int], ...]
    channels: tuple[int, ...]
    members: tuple[int, ...]

    @property
    def offsets(self) -> list[int]:
        offsets = [0]
        for n, h, w in self.shapes:
            offsets.append(offsets[-1] + n * h * w)
        return offsets

    @property
    def samples(self) -> list[int]:
        return [n for n, _, _ in self.shapes]

    @property
    def update_order(self) -> list[int]:
        """Segments in member order: the order the members' own passes update running statistics."""
        return sorted(range(len(self.members)), key=self.members.__getitem__)

    def member_rows(self) -> tuple[torch.Tensor, ...]:
        """Each segment's rows, as views. One ``split`` rather than M slices: autograd then
        concatenates the segments' gradients once, where each slice's backward would write a
        zero-filled (P, C) tensor."""
        return self.data.split([n * h * w for n, h, w in self.shapes])

    def member_images(self) -> list[torch.Tensor]:
        """Each segment's rows as an (N, C, H, W) channels-last view (no copy)."""
        c = self.data.shape[1]
        return [rows.view(n, h, w, c).permute(0, 3, 1, 2) for rows, (n, h, w) in zip(self.member_rows(), self.shapes)]

    def pooled(self) -> torch.Tensor:
        """Global average pool of every sample: (ΣN_i, C)."""
        c = self.data.shape[1]
        return torch.cat([rows.view(n, h * w, c).mean(1) for rows, (n, h, w) in zip(self.member_rows(), self.shapes)])

    def per_sample_to_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(ΣN_i, K) per-sample values repeated over each sample's pixels: (P, K)."""
        pixels = torch.tensor([h * w for n, h, w in self.shapes for _ in range(n)], device=values.device)
        return values.repeat_interleave(pixels, dim=0, output_size=self.data.shape[0])

    def replace(self, data: torch.Tensor, channels: Sequence[int] | None = None, shapes=None) -> Packed:
        return Packed(
            data,
            self.shapes if shapes is None else tuple(shapes),
            self.channels if channels is None else tuple(channels),
            self.members,
        )

    def reordered(self, order: Sequence[int]) -> Packed:
        """The segments in ``order`` (positions of this packing); one copy of the rows."""
        if list(order) == list(range(len(self.members))):
            return self
        rows = self.member_rows()
        return Packed(
            torch.cat([rows[i] for i in order]),
            tuple(self.shapes[i] for i in order),
            tuple(self.channels[i] for i in order),
            tuple(self.members[i] for i in order),
        )

    def split_first(self, k: int) -> tuple[Packed, torch.Tensor]:
        """The first ``k`` segments as a :class:`Packed` view, and the rows of the others."""
        head_rows = self.offsets[k]
        head, tail = self.data.split([head_rows, self.data.shape[0] - head_rows])
        return Packed(head, self.shapes[:k], self.channels[:k], self.members[:k]), tail


def rows_of(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N·H·W, C) rows; a view when ``images`` is channels-last."""
    return images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])


def pack(images: Sequence[torch.Tensor], channels: Sequence[int]) -> Packed:
    """Members' (N_i, C, H_i, W_i) images → :class:`Packed` (one copy)."""
    shapes = tuple((t.shape[0], t.shape[2], t.shape[3]) for t in images)
    return Packed(torch.cat([rows_of(t) for t in images]), shapes, tuple(channels), tuple(range(len(images))))


def column_mask(samples: Sequence[int], widths: Sequence[int], columns: int, like: torch.Tensor) -> torch.Tensor:
    """(ΣN_i, columns) 0/1 mask: the first ``widths[i]`` columns of member i's samples."""
    width_per_sample = torch.tensor([w for n, w in zip(samples, widths) for _ in range(n)], device=like.device)
    return (torch.arange(columns, device=like.device) < width_per_sample[:, None]).to(like.dtype)


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


def pointwise(conv: ElasticConv2d, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """A 1×1 convolution of packed rows (P, C_in) with the (out_channels, C_in) prefix of the weight."""
    if conv.kernel_size != 1 or conv.stride != 1:
        raise ValueError(f"only 1×1 stride-1 convolutions run packed, got {conv}")
    weight = conv.weight[:out_channels, : x.shape[1], 0, 0]
    bias = conv.bias[:out_channels] if conv.bias is not None else None
    return F.linear(x, weight, bias)


def batch_norm_act(
    bn: ElasticBatchNorm2d, packed: Packed, x: torch.Tensor, channels: Sequence[int], act: str
) -> torch.Tensor:
    """``bn`` + activation of packed rows ``x`` (P, C), segment i on its first ``channels[i]``
    columns, zeros elsewhere. Updates the running statistics and ``num_batches_tracked`` once per
    member, in member order, as the members' own passes would."""
    c = x.shape[1]
    factors = [0.0] * len(channels)
    if bn.training and bn.update_running_stats:
        for i in packed.update_order:
            factors[i] = bn.count_batch()
    return packed_batch_norm_act(
        x,
        packed.offsets,
        list(channels),
        bn.weight[:c],
        bn.bias[:c],
        bn.running_mean[:c],
        bn.running_var[:c],
        bn.training,
        factors,
        bn.eps,
        act,
        packed.update_order,
    )


def depthwise(layer: ElasticMBConv, packed: Packed, kernels: Sequence[int]) -> Packed:
    """The layer's depthwise convolution, segment by segment on channels-last views of its rows."""
    outputs = [layer.dw_conv(images, kernel) for images, kernel in zip(packed.member_images(), kernels)]
    shapes = [(y.shape[0], y.shape[2], y.shape[3]) for y in outputs]
    return packed.replace(torch.cat([rows_of(y) for y in outputs]), shapes=shapes)


def squeeze_excite(layer: ElasticMBConv, packed: Packed, mids: Sequence[int]) -> torch.Tensor:
    """The layer's squeeze-and-excite on packed rows: pooled per sample, both 1×1 convs as one
    matrix product each, the gate repeated over each sample's pixels."""
    se = layer.se
    pooled = packed.pooled()
    reduced_widths = [se.mid_channels(m) if m > 0 else 0 for m in mids]
    reduced = F.relu(pointwise(se.reduce, pooled, max(reduced_widths)))
    # A narrower member's extra reduced columns are garbage: zero them before the expand conv reads them.
    reduced = reduced * column_mask(packed.samples, reduced_widths, reduced.shape[1], reduced)
    gate = F.hardsigmoid(pointwise(se.expand, reduced, packed.data.shape[1]))
    return packed.data * packed.per_sample_to_rows(gate)


def mbconv(layer: ElasticMBConv, packed: Packed, choices: Sequence[tuple[int, float, int]]) -> Packed:
    """One elastic MBConv layer for every segment; ``choices[i]`` = segment i's (kernel, expand, width)."""
    act = activation_name(layer.act)
    mids = [layer.middle_channels(c_in, expand) for c_in, (_, expand, _) in zip(packed.channels, choices)]
    x = packed
    if layer.expand_conv is not None:
        y = pointwise(layer.expand_conv, x.data, max(mids))
        x = x.replace(batch_norm_act(layer.expand_bn, x, y, mids, act), channels=mids)
    y = depthwise(layer, x, [kernel for kernel, _, _ in choices])
    y = y.replace(batch_norm_act(layer.dw_bn, y, y.data, mids, act), channels=mids)
    if layer.se is not None:
        y = y.replace(squeeze_excite(layer, y, mids))
    widths = [width for _, _, width in choices]
    # A residual output is added to the input, which may be wider than these members (when they are
    # the prefix of a stage's segments that a block serves): project to the input's columns; the
    # extra ones come out of the batch norm as zeros.
    columns = packed.data.shape[1] if layer.residual else max(widths)
    out = batch_norm_act(layer.project_bn, y, pointwise(layer.project_conv, y.data, columns), widths, "none")
    if not layer.residual:
        return y.replace(out, channels=widths)
    if layer.training and layer.drop_connect_rate > 0:
        mask = drop_connect_mask(layer.drop_connect_rate, sum(y.samples), out)
        rows = y.per_sample_to_rows(mask[:, None])
        return y.replace(drop_connect_add(packed.data, out, rows, layer.drop_connect_rate), channels=widths)
    return y.replace(packed.data + out, channels=widths)


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------


def forward_many(net, images: Sequence[torch.Tensor], archs: Sequence[Arch]) -> list[torch.Tensor]:
    """Logits of ``archs[i]`` on ``images[i]`` for every i, in one packed pass of ``net`` (a
    :class:`~tofa_fast.nn.Supernet`); see the module docstring."""
    space = net.space
    stems = [a.stem for a in archs]
    stem_out = max(stems)
    packed = pack([net.stem_conv(x, stem_out) for x in images], stems)
    packed = packed.replace(batch_norm_act(net.stem_bn, packed, packed.data, stems, activation_name(net.stem_act)))

    for s, layers in enumerate(net.stages):
        depths = [archs[m].stages[s].depth for m in packed.members]
        # Deepest first (stable), so that every block of the stage serves a prefix of the segments.
        packed = packed.reordered(sorted(range(len(depths)), key=lambda i: -depths[i]))
        for j, layer in enumerate(layers):
            stage_archs = [archs[m].stages[s] for m in packed.members]
            served = sum(st.depth > j for st in stage_archs)
            if served == 0:
                break
            choices = [(st.kernel[j], st.expand[j], st.width) for st in stage_archs[:served]]
            if served == len(stage_archs):
                packed = mbconv(layer, packed, choices)
                continue
            head, rest = packed.split_first(served)  # the others' rows pass through (residual layer)
            head = mbconv(layer, head, choices)
            packed = packed.replace(torch.cat([head.data, rest]), channels=head.channels + packed.channels[served:])

    finals = [space.final_channels(c, archs[m].head) for c, m in zip(packed.channels, packed.members)]
    head_act = activation_name(net.head_act)
    y = pointwise(net.final_expand_conv, packed.data, max(finals))
    packed = packed.replace(batch_norm_act(net.final_expand_bn, packed, y, finals, head_act), channels=finals)
    features = packed.pooled()
    if net.feature_mix_conv is not None:
        heads = [archs[m].head for m in packed.members]
        features = net.head_act(pointwise(net.feature_mix_conv, features, max(heads)))
        features = features * column_mask(packed.samples, heads, features.shape[1], features)
    logits = net.classifier(net.dropout(features)).split(packed.samples)
    by_member = dict(zip(packed.members, logits))
    return [by_member[i] for i in range(len(archs))]
