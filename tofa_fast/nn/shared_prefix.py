"""Several members of one supernet trained together, each computation they agree on done once
(SPEC §5: "shared stem/prefix computation where subnets agree"). Behind ``Supernet.backward_many``
and the ``shared`` training step (train/step.py).

The members of a sandwich step see the same images whenever they take the same loss terms at the
same resolution (all four of an OFA step; TOFA's two random members one step in three). Their
forwards then start identically and part only where their choices part, and even then less than it
seems: every layer's channels are *prefixes* of the same weights, and a computation that treats
channels one by one gives each member the prefix of what the widest of them gets. So

* the stem (conv + BN + act) is computed once for all members with the same images, at their widest
  stem width (batch norm's statistics are per channel: a channel's are the same whatever the width);
* an expansion 1×1 conv + BN + act is computed once for all members at the same node with the same
  input width, at their widest middle width — the largest activations of the network, at the
  highest resolution, are these;
* a depthwise conv + BN + act once per kernel size, at the widest middle width of those members;
* the tail (squeeze-and-excite, which mixes the middle channels, projection conv + BN, residual)
  once per middle width, at the widest output width;
* the head once per member.

Where an expansion node has a single child (its members all take one kernel, always so once they
have parted), the two run as the sequential pass's fused op (``nn/bn_act_dwconv.py``: expansion,
batch norm + activation and depthwise convolution, the activated expansion never written): only that
child reads the expansion.

The members thus form a tree: each *node* is one such computation for the members that agree up to
it. It runs depth first, one branch at a time, the way the sequential step runs one member at a
time: a chain of nodes that the same members share runs as one autograd graph; where the members
part, what the branches read of the chain is detached (one leaf per channel prefix they read), each
branch runs forward *and backward* (its member's loss is back-propagated as soon as its logits
exist) and accumulates its gradient into those leaves, and then the chain itself is
back-propagated once with the sum. Only the activations of the
current path are alive at any time: memory stays that of the largest member, not of all of them.

Batch norm: a shared node's statistics over the shared batch are each member's own, so the forward
is exact. The running statistics are updated as the members' own passes would — once per member,
in member order, each member on its own channel prefix — after the forward, from the batch
statistics every node records (``ElasticBatchNorm2d(batch_stats=...)``): in training mode the
forward reads no running statistic, so postponing the updates changes nothing.

The result — every parameter gradient, the loss terms, the running statistics — equals the
sequential members' passes up to the rounding of sums taken in another order. Dropout and residual
drop-connect draw their masks in another order than the sequential passes; a tail with drop-connect
on is never shared (members sharing it would share a mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..spaces import Arch
from .bn_act_dwconv import expand_bn_act_dwconv
from .elastic_batchnorm import ElasticBatchNorm2d
from .mbconv import ElasticMBConv, drop_connect_add, drop_connect_mask

#: False computes an expansion node and its only (depthwise) child as two nodes, as every other node:
#: the baseline of bench/test_bench_fused_step.py's interleaved comparison.
FUSE_EXPANSION_WITH_DEPTHWISE = True

#: ``loss_of(i, logits_i)``: member i's loss (a 0-dim tensor) to back-propagate, or None for none
LossOf = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@dataclass(eq=False)
class Node:
    """One computation for the members that agree up to it (module docstring).

    ``kind`` is ``input`` (a tree's root: the members' common images), ``stem``, ``expand``, ``dw``,
    ``tail`` or ``head``; ``layer`` the MBConv layer of the middle three; ``widths[i]`` the output
    width member ``members[i]`` uses (a prefix of the node's output); ``arg`` the choice that all
    members of the node share (the input width of an expansion or of the head, a depthwise kernel
    size, the middle width of a tail); ``residual`` the node of the layer's input a tail adds.
    """

    kind: str
    parent: Node | None
    members: list[int]
    widths: list[int]
    arg: int = 0
    layer: ElasticMBConv | None = None
    residual: Node | None = None
    images: torch.Tensor | None = None
    children: list[Node] = field(default_factory=list)
    #: nodes above this one that this node's subtree reads (filled by :func:`build_tree`)
    reads_below: set[int] = field(default_factory=set)

    @property
    def width(self) -> int:
        return max(self.widths)


def _same_images(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def consecutive_groups(images: Sequence[torch.Tensor]) -> list[list[int]] | None:
    """The members split into runs of consecutive members with the same images, in order — when
    every images tensor is one run's (members that share are next to each other); else None.

    Such runs can be trained one after the other, each as its own tree, with every running-statistics
    update still in member order: a run of one shares nothing and can take the plain forward."""
    groups: list[list[int]] = []
    for i, x in enumerate(images):
        if groups and _same_images(images[groups[-1][0]], x):
            groups[-1].append(i)
        elif any(_same_images(images[g[0]], x) for g in groups):
            return None
        else:
            groups.append([i])
    return groups


def build_tree(net, images: Sequence[torch.Tensor], archs: Sequence[Arch]) -> list[Node]:
    """The roots (one per distinct images tensor) of the members' computation tree (module docstring)."""
    roots: list[Node] = []
    current: list[Node] = []  # each member's node so far
    for m, x in enumerate(images):
        root = next((r for r in roots if _same_images(r.images, x)), None)
        if root is None:
            root = Node("input", None, [], [], images=x)
            roots.append(root)
        root.members.append(m)
        root.widths.append(x.shape[1])
        current.append(root)

    def advance(kind: str, members: list[int], arg_of, width_of, layer=None, shares=None, residual_of=None) -> None:
        """One slot of the network for ``members``: those at the same node with the same ``arg_of``
        share a new node, unless ``shares(m)`` is False (then member m gets a node of its own)."""
        groups: dict[tuple, Node] = {}
        for m in members:
            arg = arg_of(m)
            key = (id(current[m]), arg if shares is None or shares(m) else ("alone", m))
            node = groups.get(key)
            if node is None:
                node = Node(kind, current[m], [], [], arg=arg, layer=layer)
                node.residual = residual_of(m) if residual_of is not None else None
                current[m].children.append(node)
                groups[key] = node
            elif residual_of is not None and residual_of(m) is not node.residual:
                raise AssertionError("members sharing a tail must share the layer's input")
            node.members.append(m)
            node.widths.append(width_of(m))
        for node in groups.values():
            for m in node.members:
                current[m] = node

    everyone = list(range(len(archs)))
    advance("stem", everyone, lambda m: 0, lambda m: archs[m].stem)
    width = [a.stem for a in archs]  # each member's current width
    for s, layers in enumerate(net.stages):
        for j, layer in enumerate(layers):
            members = [m for m in everyone if archs[m].stages[s].depth > j]
            if not members:
                break
            choices = {m: archs[m].stages[s] for m in members}
            layer_input = {m: current[m] for m in members}
            mid = {m: layer.middle_channels(width[m], choices[m].expand[j]) for m in members}
            if layer.expand_conv is not None:
                advance("expand", members, width.__getitem__, mid.__getitem__, layer)
            # advance calls its key functions before returning: binding this iteration's loop
            # variables late is what is meant (ruff's B023 cannot see that).
            advance("dw", members, lambda m: choices[m].kernel[j], mid.__getitem__, layer)  # noqa: B023
            noisy = layer.training and layer.residual and layer.drop_connect_rate > 0
            advance(
                "tail",
                members,
                mid.__getitem__,
                lambda m: choices[m].width,  # noqa: B023
                layer,
                shares=lambda m: not noisy,  # noqa: B023
                residual_of=layer_input.__getitem__ if layer.residual else None,
            )
            for m in members:
                width[m] = choices[m].width
    # The head reads the member's last width (its input may be a wider shared tensor) and is its own.
    advance("head", everyone, width.__getitem__, lambda m: archs[m].head, shares=lambda m: False)

    def collect(node: Node) -> set:
        reads = set()
        for child in node.children:
            reads |= collect(child) | {id(child.parent)} | ({id(child.residual)} if child.residual else set())
        node.reads_below = reads
        return reads

    for root in roots:
        collect(root)
    return roots


class _StatsRecorder:
    """The batch statistics each shared batch norm computed, replayed into the running statistics
    member by member after the forward (module docstring)."""

    def __init__(self):
        self.entries: list[tuple[ElasticBatchNorm2d, list[int], list[int], torch.Tensor, torch.Tensor]] = []

    def batch_norm(
        self, bn: ElasticBatchNorm2d, x: torch.Tensor, node: Node, activation=None, widths=None
    ) -> torch.Tensor:
        """``bn(x, activation)`` for ``node``'s members, member i on its first ``widths[i]``
        (default: the node's widths) channels of x."""
        return bn(x, activation, batch_stats=self.record(bn, x.shape[1], node, widths))

    def record(
        self, bn: ElasticBatchNorm2d, channels: int, node: Node, widths=None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``batch_stats`` buffers for a batch norm of ``channels`` channels at ``node`` (None when
        its forward updates no running statistics), replayed later as :meth:`batch_norm` says."""
        if not (bn.training and bn.update_running_stats):
            return None
        mean, var = torch.zeros_like(bn.running_mean[:channels]), torch.ones_like(bn.running_var[:channels])
        self.entries.append((bn, node.members, node.widths if widths is None else widths, mean, var))
        return mean, var

    def replay(self) -> None:
        by_bn: dict[int, list] = {}
        for bn, members, widths, mean, var in self.entries:
            for m, w in zip(members, widths):
                by_bn.setdefault(id(bn), []).append((m, bn, mean[:w], var[:w]))
        for updates in by_bn.values():
            for _, bn, mean, var in sorted(updates, key=lambda u: u[0]):
                bn.update_running_stats_with(mean, var)


def _prefix(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x's first ``channels`` channels; x itself when that is all of them (a full-range slice still
    costs its backward a zero-filled copy of the gradient)."""
    return x if channels == x.shape[1] else x[:, :channels]


class _PartingTensor:
    """A chain's output where its members part (module docstring), as the branches read it: one
    detached leaf per channel prefix they read, so that a narrower branch's gradient is a
    narrow tensor added into the prefix once, not a zero-filled full-width copy per read."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.leaves: dict[int, torch.Tensor] = {}

    def prefix(self, channels: int) -> torch.Tensor:
        leaf = self.leaves.get(channels)
        if leaf is None:
            leaf = self.leaves[channels] = _prefix(self.tensor.detach(), channels).requires_grad_()
        return leaf

    def gradient(self) -> torch.Tensor | None:
        """The sum of the branches' gradients (None: no branch back-propagated into it)."""
        grads = {c: leaf.grad for c, leaf in self.leaves.items() if leaf.grad is not None}
        if not grads:
            return None
        total = grads.pop(self.tensor.shape[1], None)
        if total is None:
            total = torch.zeros_like(self.tensor)
        for channels, grad in grads.items():
            total[:, :channels] += grad
        return total


def _compute(net, node: Node, read: Callable[[Node, int], torch.Tensor], stats: _StatsRecorder) -> torch.Tensor:
    """``node``'s output (at its widest member's width); ``read(n, c)`` is node n's output's first c channels."""
    layer = node.layer
    if node.kind == "stem":
        x = read(node.parent, node.parent.width)
        return stats.batch_norm(net.stem_bn, net.stem_conv(x, node.width), node, net.stem_act)
    if node.kind == "expand":
        x = read(node.parent, node.arg)
        return stats.batch_norm(layer.expand_bn, layer.expand_conv(x, node.width), node, layer.act)
    if node.kind == "dw":
        x = read(node.parent, node.width)
        return stats.batch_norm(layer.dw_bn, layer.dw_conv(x, node.arg), node, layer.act)
    if node.kind == "tail":
        y = read(node.parent, node.arg)
        if layer.se is not None:
            y = layer.se(y)
        y = stats.batch_norm(layer.project_bn, layer.project_conv(y, node.width), node)
        if node.residual is None:
            return y
        if layer.training and layer.drop_connect_rate > 0:
            mask = drop_connect_mask(layer.drop_connect_rate, y.shape[0], y)
            return drop_connect_add(read(node.residual, node.width), y, mask.view(-1, 1, 1, 1), layer.drop_connect_rate)
        return read(node.residual, node.width) + y
    if node.kind == "head":  # one member: its batch norm on all of the final conv's channels

        def batch_norm(bn, y, activation):
            return stats.batch_norm(bn, y, node, activation, widths=[y.shape[1]])

        return net.classify(read(node.parent, node.arg), node.width, batch_norm)
    raise AssertionError(node.kind)


def _fuses_with_its_depthwise(node: Node) -> bool:
    return (
        FUSE_EXPANSION_WITH_DEPTHWISE
        and node.kind == "expand"
        and len(node.children) == 1
        and node.children[0].kind == "dw"
    )


def _compute_expansion_and_depthwise(
    net, node: Node, read: Callable[[Node, int], torch.Tensor], stats: _StatsRecorder
) -> torch.Tensor:
    """A depthwise node's output computed from its expansion parent's input: the parent's and the
    node's members are the same, so the node reads all of the expansion's channels."""
    expansion, layer = node.parent, node.layer
    x = read(expansion.parent, expansion.arg)
    batch_stats = stats.record(layer.expand_bn, expansion.width, expansion)
    y = expand_bn_act_dwconv(
        layer.expand_conv, layer.expand_bn, layer.act, layer.dw_conv, x, expansion.width, node.arg, batch_stats
    )
    return stats.batch_norm(layer.dw_bn, y, node, layer.act)


def backward_many(
    net,
    images: Sequence[torch.Tensor],
    archs: Sequence[Arch],
    loss_of: LossOf,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[torch.Tensor]:
    """Forward every member, back-propagate ``loss_of(i, logits_i)`` (see the module docstring);
    returns the members' logits, detached. ``autocast()`` (a context manager factory) wraps the
    forward computations; losses and backward run outside it."""
    roots = build_tree(net, images, archs)
    stats = _StatsRecorder()
    logits: list[torch.Tensor | None] = [None] * len(archs)
    forward_context = autocast or contextlib.nullcontext

    def run_chain(node: Node, visible: dict[int, torch.Tensor | _PartingTensor]) -> None:
        """``node`` and the nodes below it that the same members share, then each branch below.
        ``visible``: the outputs of the nodes above the chain, by ``id``."""
        chain: dict[int, torch.Tensor] = {}

        def read(source: Node, channels: int) -> torch.Tensor:
            t = chain.get(id(source))
            if t is None:
                t = visible[id(source)]
                if isinstance(t, _PartingTensor):
                    return t.prefix(channels)
            return _prefix(t, channels)

        while True:
            with forward_context():
                if _fuses_with_its_depthwise(node):
                    # Only its depthwise child reads an expansion with one child: the two run as one
                    # fused op (nn/bn_act_dwconv.py), and the expansion's output is never materialised.
                    chain[id(node)] = None
                    node = node.children[0]
                    out = _compute_expansion_and_depthwise(net, node, read, stats)
                else:
                    out = _compute(net, node, read, stats)
            chain[id(node)] = out
            if node.kind == "head":
                m = node.members[0]
                logits[m] = out.detach()
                loss = loss_of(m, out)
                if loss is not None and loss.requires_grad:
                    loss.backward()
                return
            if len(node.children) == 1:
                node = node.children[0]
                continue
            break
        # The members part here: detach what the branches read, run them, back-propagate the chain once.
        parting = {
            key: _PartingTensor(t) if t.requires_grad else t
            for key, t in chain.items()
            if key in node.reads_below and t is not None
        }
        branch_visible = {**visible, **parting}
        for child in node.children:
            run_chain(child, branch_visible)
        outputs, grads = [], []
        for key, t in parting.items():
            grad = t.gradient() if isinstance(t, _PartingTensor) else None
            if grad is not None:
                outputs.append(chain[key])
                grads.append(grad)
        if outputs:
            torch.autograd.backward(outputs, grads)

    for root in roots:
        visible = {id(root): root.images}
        for child in root.children:
            run_chain(child, visible)
    stats.replay()
    return logits
