"""``tofa_fast.accelerate(model)``: the fast depthwise op inside an existing `ofa` supernet, in place.

Once-For-All training code keeps its model, optimizer, checkpoints and training script::

    import tofa_fast
    tofa_fast.accelerate(ofa_model)       # every ofa DynamicSeparableConv2d now runs elastic_dwconv2d

How. Each ``ofa.imagenet_classification.elastic_nn.modules.dynamic_op.DynamicSeparableConv2d`` in the
model gets its ``__class__`` set to :class:`FastDynamicSeparableConv2d`, a subclass that overrides
``forward`` alone. Of the ways to swap a forward this is the cleanest:

* the module stays the *same object*: its parents (``DynamicMBConvLayer.depth_conv.conv``), hooks,
  ``nn.Parameter`` objects (``conv.weight`` and the ``7to5_matrix``-style transform matrices), buffers
  and ``state_dict()`` keys are untouched, so optimizers built before the call and old checkpoints
  keep working, and nothing has to be copied or re-registered;
* ``isinstance(m, DynamicSeparableConv2d)`` still holds and every attribute and method OFA reads or
  writes (``active_kernel_size``, ``kernel_size_list``, ``_ks_set``, ``max_in_channels``, ``stride``,
  ``dilation``, ``get_active_filter``, ``KERNEL_TRANSFORM_MODE`` …) is the inherited one, so
  ``set_active_subnet``, ``sample_active_subnet``, ``get_active_subnet``, ``re_organize_middle_weights``
  and progressive shrinking run unchanged;
* a bound-method ``forward`` set on the instance would do the same, but it is lost on
  ``copy.deepcopy``/pickling (or pins the old module), and replacing modules by new ones would break
  optimizers and any reference held to the old module.

To undo, set ``m.__class__ = DynamicSeparableConv2d`` back.

Semantics (checked against ofa's ``get_active_filter`` + ``F.conv2d``): the active filter of kernel
size ``k`` is the centred ``k×k`` window of ``conv.weight`` (C_max, 1, K, K), K = max(kernel_size_list);
with ``KERNEL_TRANSFORM_MODE`` set (ofa's default, read at every call as ofa does) and ``k < K`` it is
formed by walking down ofa's ``_ks_set`` (the sorted distinct kernel sizes) from K to k, each step
``src → tgt`` applying ``F.linear(centre_tgt(filter), <src>to<tgt>_matrix)``: exactly the op's transform
chain. Padding is ofa's ``get_same_padding(k) = k // 2``, groups = input channels C ≤ C_max.

The fast forward falls back to ofa's own forward for a call it does not cover, so results never
change: a dilation other than 1, weight standardization (``MyConv2d`` with ``WS_EPS`` set), a kernel
size that ofa's chain does not reach exactly (not in ``_ks_set``), a missing transform matrix, a
non-4-D input, more input channels than C_max, a non-int stride, or dtypes/devices the op rejects
(x and weight in different dtypes outside ``torch.autocast``: ofa's forward then raises as before).
Modules that cannot take the fast path at all (dilation ≠ 1, even kernel sizes, weight standardization
on, subclasses of DynamicSeparableConv2d that may override its math) are left unpatched and listed,
with the reason, in the returned summary.

Numerics: fp32/fp64 results equal ofa's up to summation order (``tests/test_accelerate_ofa.py``).
Under ``torch.autocast`` the op forms the active filter in fp32 (ofa's ``F.linear`` runs it in the
autocast dtype), so the two differ by the low-precision rounding of the filter only.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .ops import elastic_dwconv2d
from .ops.elastic_dwconv_reference import MIXED_PRECISION_DTYPES

# FastDynamicSeparableConv2d is importable too (``from tofa_fast.accelerate_ofa import ...``), made on
# first use so that importing tofa_fast never imports ofa (seconds); hence not in __all__. The package
# exports the function as ``tofa_fast.accelerate`` (the module has another name, so that importing
# it never shadows the function).
__all__ = ["AccelerateSummary", "Accelerated", "accelerate"]

_OFA_DYNAMIC_OP = "ofa.imagenet_classification.elastic_nn.modules.dynamic_op"
_FAST_CLASS: type | None = None


def _ofa_class() -> type | None:
    """ofa's DynamicSeparableConv2d when ofa's dynamic ops are loaded, else None.

    Importing ofa costs seconds, and a model can hold its modules only once they are imported: so
    ``sys.modules`` answers whether there can be any, and ofa is never imported here.
    """
    dynamic_op = sys.modules.get(_OFA_DYNAMIC_OP)
    if dynamic_op is None or not hasattr(dynamic_op, "DynamicSeparableConv2d"):
        return None
    return dynamic_op.DynamicSeparableConv2d


def _weight_standardized(conv: nn.Module) -> bool:
    """ofa's MyConv2d with weight standardization on (``WS_EPS`` set); matched by name, ofa not imported."""
    return any(c.__name__ == "MyConv2d" for c in type(conv).__mro__) and getattr(conv, "WS_EPS", None) is not None


def _transform_chain(module, kernel_size: int) -> list[torch.Tensor] | None:
    """ofa's matrices from K down to ``kernel_size`` (``[]`` for the plain centre slice), or None when
    ofa's own walk (``get_active_filter``) would not end at exactly ``kernel_size``."""
    ks_set = module._ks_set
    max_ks = max(module.kernel_size_list)
    if module.KERNEL_TRANSFORM_MODE is None or kernel_size >= max_ks:
        return []
    chain, size = [], ks_set[-1]
    for i in range(len(ks_set) - 1, 0, -1):
        src, target = ks_set[i], ks_set[i - 1]
        if src <= kernel_size:
            break
        matrix = module._parameters.get(f"{src}to{target}_matrix")
        if matrix is None:
            return None
        chain.append(matrix)
        size = target
    return chain if size == kernel_size and ks_set[-1] == max_ks else None


def _fast_forward(self, x, kernel_size=None):
    if kernel_size is None:
        kernel_size = self.active_kernel_size
    transforms = _fast_transforms(self, x, kernel_size)
    if transforms is None:  # a call the op does not cover: ofa's own forward
        return super(_FAST_CLASS, self).forward(x, kernel_size)
    return elastic_dwconv2d(x, self.conv.weight, kernel_size, self.stride, transforms)


def _fast_transforms(self, x, kernel_size) -> list[torch.Tensor] | None:
    """The op's ``transforms`` for this call, or None to take ofa's forward."""
    weight = self.conv.weight
    if (
        self.dilation != 1
        or isinstance(self.stride, bool)
        or not isinstance(self.stride, int)
        or self.stride < 1
        or isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size % 2 == 0
        or not 1 <= kernel_size <= weight.shape[-1]
        or not isinstance(x, torch.Tensor)
        or x.dim() != 4
        or not 1 <= x.shape[1] <= weight.shape[0]
        or x.device != weight.device
        or not (x.dtype == weight.dtype or _autocast_mixed(x, weight))
        or _weight_standardized(self.conv)
    ):
        return None
    chain = _transform_chain(self, kernel_size)
    if chain is None or any(m.dtype != weight.dtype or m.device != weight.device for m in chain):
        return None
    return chain


def _autocast_mixed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x in bf16/fp16 with fp32 weights inside an autocast region (an earlier layer's autocast output):
    the op's mixed precision. Outside autocast ofa's F.conv2d refuses such a pair, and so do we (by
    taking ofa's forward, which raises its own error)."""
    return (
        x.dtype in MIXED_PRECISION_DTYPES
        and weight.dtype == torch.float32
        and torch.amp.is_autocast_available(x.device.type)
        and torch.is_autocast_enabled(x.device.type)
    )


def _fast_class() -> type:
    """:class:`FastDynamicSeparableConv2d`, made on first use (it subclasses ofa's class)."""
    global _FAST_CLASS
    if _FAST_CLASS is None:
        base = _ofa_class()
        if base is None:  # asked for by name (unpickling a model) before ofa was imported
            base = importlib.import_module(_OFA_DYNAMIC_OP).DynamicSeparableConv2d
        _FAST_CLASS = type(
            "FastDynamicSeparableConv2d",
            (base,),
            {
                "__module__": __name__,
                "__qualname__": "FastDynamicSeparableConv2d",
                "__doc__": (
                    "ofa's ``DynamicSeparableConv2d`` whose forward runs ``tofa_fast.ops.elastic_dwconv2d``.\n\n"
                    "Set as the ``__class__`` of existing modules by :func:`accelerate`; everything but "
                    "``forward`` is ofa's. Calls the op does not cover take ofa's forward."
                ),
                "forward": _fast_forward,
            },
        )
    return _FAST_CLASS


def __getattr__(name: str):
    # ``tofa_fast.accelerate_ofa.FastDynamicSeparableConv2d`` (isinstance checks, unpickling a whole model)
    # without importing ofa when tofa_fast is imported.
    if name == "FastDynamicSeparableConv2d":
        return _fast_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class AccelerateSummary:
    """What :func:`accelerate` did: module names (as in ``model.named_modules()``) per outcome."""

    patched: list[str] = field(default_factory=list)
    already_accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name → why it stays ofa's
    note: str = ""

    @property
    def num_patched(self) -> int:
        return len(self.patched)

    def __str__(self) -> str:
        lines = [
            f"tofa_fast.accelerate: {len(self.patched)} ofa DynamicSeparableConv2d patched, "
            f"{len(self.already_accelerated)} already accelerated, {len(self.skipped)} left alone"
        ]
        if self.note:
            lines.append(f"  {self.note}")
        lines += [f"  left alone: {name or '<model>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class Accelerated(NamedTuple):
    """``accelerate``'s result: the same model object (patched in place) and the summary."""

    model: nn.Module
    summary: AccelerateSummary


def _unsupported_reason(module, ofa_class: type) -> str | None:
    """Why ``module`` (an ofa DynamicSeparableConv2d) cannot take the fast path, or None."""
    if type(module) is not ofa_class:
        return (
            f"{type(module).__qualname__} is a subclass of ofa's DynamicSeparableConv2d and may override "
            "its math (only the exact class is patched)"
        )
    if module.dilation != 1:
        return f"dilation {module.dilation!r} (the fast op covers dilation 1)"
    sizes = list(module.kernel_size_list)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in sizes):
        return f"kernel_size_list {sizes} has a size that is not an odd int (the fast op covers odd kernels)"
    if isinstance(module.stride, bool) or not isinstance(module.stride, int) or module.stride < 1:
        return f"stride {module.stride!r} is not a positive int"
    weight = getattr(module.conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != 1:
        return "conv.weight is not a (C, 1, K, K) depthwise weight"
    if weight.shape[-2] != weight.shape[-1] or weight.shape[-1] != max(sizes):
        return f"conv.weight's kernel {tuple(weight.shape[-2:])} is not max(kernel_size_list) = {max(sizes)}"
    if _weight_standardized(module.conv):
        return "weight standardization (MyConv2d.WS_EPS set) is not part of the fast op"
    return None


def accelerate(model: nn.Module) -> Accelerated:
    """Make ``model``'s ofa dynamic depthwise convolutions run ``tofa_fast.ops.elastic_dwconv2d``, in place.

    Every ``ofa`` ``DynamicSeparableConv2d`` the fast op covers (dilation 1, odd kernel sizes) gets
    the class :class:`FastDynamicSeparableConv2d` (see the module docstring for why a class swap):
    same object, same parameters and ``state_dict`` keys, same attributes; only ``forward`` changes,
    and it computes what ofa computes (the transform matrices included), faster, above all backward.

    Idempotent (patched modules are counted as already accelerated); a ``tofa_fast.Supernet``
    already runs the op and is returned untouched, as is a model without ofa modules.

    Args:
        model: any ``torch.nn.Module`` (an ``OFAMobileNetV3``, a module holding one, a DDP wrapper…).

    Returns:
        ``Accelerated(model, summary)``: the same ``model`` object, and an :class:`AccelerateSummary`
        (``print(summary)`` lists what was patched and what was left alone, and why).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    summary = AccelerateSummary()
    from .nn import Supernet

    if isinstance(model, Supernet):
        summary.note = "a tofa_fast Supernet already runs tofa_fast.ops.elastic_dwconv2d: nothing to do"
        return Accelerated(model, summary)
    ofa_class = _ofa_class()
    if ofa_class is None:
        summary.note = "ofa's dynamic modules are not loaded (the `ofa` package unused): nothing to do"
        return Accelerated(model, summary)
    fast_class = _fast_class()
    for name, module in model.named_modules():
        if isinstance(module, fast_class):
            summary.already_accelerated.append(name)
        elif isinstance(module, ofa_class):
            reason = _unsupported_reason(module, ofa_class)
            if reason is None:
                module.__class__ = fast_class
                summary.patched.append(name)
            else:
                summary.skipped[name] = reason
    if not (summary.patched or summary.already_accelerated or summary.skipped):
        summary.note = "no ofa DynamicSeparableConv2d in the model: nothing to do"
    return Accelerated(model, summary)
