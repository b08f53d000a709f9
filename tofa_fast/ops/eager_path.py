"""When an op's public function may skip ``torch.library``'s Python dispatch: plain eager calls.

Our ops are ``torch.library`` custom ops defined in Python, so ``torch.compile``, ``torch.export``
and ``torch.library.opcheck`` see one opaque op with a fake kernel. The price is paid in eager mode,
on every call: the Python dispatcher, argument normalisation against the schema, the
``register_autograd`` wrapper and a second op for the backward. Measured on the 2-core CI machine
(Intel Xeon 2.5 GHz, one thread, tiny tensors so the kernels cost nothing): ``elastic_dwconv2d``
forward + backward pays ≈ 580 µs more than its two compiled kernels, an ``autograd.Function`` around
the same kernels ≈ 150 µs; ``packed_batch_norm_act``'s forward alone ≈ 480 µs. A training step makes
over a hundred such calls, and on a GPU, where the step is bound by host time
(``bench/results/step_profile_gpu_h100.json``), that overhead is the step's time.

So the ops' public functions call the op's backend through an ``autograd.Function`` — the same
backend the op would select, the same kernels, so the same bits — whenever :func:`takes_eager_path`
says nothing can be watching the call at the dispatcher: not compiling or exporting, not tracing for
TorchScript, no ``TorchDispatchMode`` (FakeTensorMode, make_fx, FlopCounterMode) or
``TorchFunctionMode`` active, no functorch transform, only plain tensors. Anything else takes the op.
``use_library_dispatch()`` forces the op everywhere: the tests compare both paths through it, and
benchmarks measure what the eager path saves.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

__all__ = ["EAGER_PATH_LINE", "takes_eager_path", "use_library_dispatch"]

#: what ``tofa-fast info`` says of it
EAGER_PATH_LINE = (
    "plain eager calls run the selected backend through an autograd.Function; torch.compile, torch.export, "
    "jit tracing, fake tensors and dispatch modes see the torch.library custom ops"
)

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_LIBRARY_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("tofa_fast_library_dispatch_only", default=False)


@contextlib.contextmanager
def use_library_dispatch() -> Iterator[None]:
    """Inside the block every call of our ops goes through ``torch.library`` (the custom op)."""
    token = _LIBRARY_ONLY.set(True)
    try:
        yield
    finally:
        _LIBRARY_ONLY.reset(token)


def takes_eager_path(*tensors: torch.Tensor | None) -> bool:
    """True when a call with these tensor arguments may bypass the custom op (module docstring)."""
    if _LIBRARY_ONLY.get():
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    # Fake tensors, proxies, FLOP counters and the like live in these modes or in tensor subclasses.
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)
