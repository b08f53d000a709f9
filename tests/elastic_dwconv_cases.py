"""Problem generator shared by the elastic_dwconv2d tests (CPU, Triton, CUDA) and the benchmarks.

A case fixes every axis the kernels branch on: K, k ≤ K, stride, C_active < or = C_max, odd and
non-square H×W, batch, memory layout (contiguous / channels_last / strided view), with or without
the transform chain, dtype of x and, for mixed precision, of the weights (float32 with a
bfloat16/float16 x, as under autocast).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from conftest import tolerance

from tofa_fast.ops import elastic_dwconv2d, elastic_dwconv2d_reference
from tofa_fast.ops.elastic_dwconv_dispatch import use_backend

LAYOUTS = ("contiguous", "channels_last", "strided")

# A whole network's gradient under autocast against its float32 gradient: least cosine similarity.
# bf16 keeps 8 mantissa bits (relative rounding 2⁻⁹ per op); through the digits max subnet the
# direction agreed to 0.996 (NCHW and channels_last), and a wrong gradient lands far below 0.99.
AUTOCAST_GRADIENT_COSINE: dict[torch.dtype, float] = {torch.bfloat16: 0.99}


@dataclass(frozen=True)
class DwconvCase:
    batch: int
    channels: int
    max_channels: int
    height: int
    width: int
    max_kernel: int
    kernel: int
    stride: int
    layout: str
    with_transforms: bool
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype | None = None  # None: x's dtype

    @property
    def parameter_dtype(self) -> torch.dtype:
        return self.weight_dtype or self.dtype

    def __str__(self) -> str:
        chain = "T" if self.with_transforms and self.kernel < self.max_kernel else "-"
        mixed = f"_w{str(self.weight_dtype).removeprefix('torch.')}" if self.weight_dtype else ""
        return (
            f"N{self.batch}C{self.channels}of{self.max_channels}_{self.height}x{self.width}_K{self.max_kernel}"
            f"k{self.kernel}s{self.stride}_{self.layout}_{chain}_{str(self.dtype).removeprefix('torch.')}{mixed}"
        )


def transform_chain(max_kernel: int, kernel: int, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """OFA's chain K→K−2→…→k, identity plus noise so every entry matters."""
    sizes = range(max_kernel - 2, kernel - 1, -2)
    return [
        torch.eye(t * t, dtype=dtype, device=device) + 0.1 * torch.randn(t * t, t * t, dtype=dtype, device=device)
        for t in sizes
    ]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A view with a gap between columns and permuted batch/channel strides: neither NCHW nor NHWC.
        wide = torch.zeros(x.shape[1], x.shape[0], x.shape[2], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x.transpose(0, 1)
        return wide.transpose(0, 1)[..., ::2]
    return x.contiguous()


def make_inputs(case: DwconvCase, device="cpu", generator_seed: int = 0):
    """(x, weight, transforms) for a case; float64 values are drawn first so dtypes share data."""
    gen = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(case.batch, case.channels, case.height, case.width, generator=gen, dtype=torch.float64)
    weight = torch.randn(case.max_channels, 1, case.max_kernel, case.max_kernel, generator=gen, dtype=torch.float64)
    torch.manual_seed(generator_seed)
    transforms = transform_chain(case.max_kernel, case.kernel, torch.float64) if case.with_transforms else []
    x = _layout(x.to(case.dtype).to(device), case.layout)
    weight = weight.to(case.parameter_dtype).to(device)
    if case.layout == "strided":
        weight = _layout(weight, "strided")  # a non-contiguous weight too
    return x, weight, [m.to(case.parameter_dtype).to(device) for m in transforms]


def reference_outputs(x, weight, kernel, stride, transforms, grad_output=None):
    """Output and autograd gradients (x, weight, *transforms) of the reference: the test oracle."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *transforms)]
    out = elastic_dwconv2d_reference(leaves[0], leaves[1], kernel, stride, leaves[2:])
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad_output = grad_output.to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_output)
    return out.detach(), grad_output, list(grads)


def assert_matches_oracle(got, torch_value, oracle, dtype, tolerance, name="output"):
    """float64: equal to the reference within tolerance(float64). Lower precisions (flash-attention's
    rule): the kernel's largest error against the float64 oracle is at most twice PyTorch's own error
    in that dtype, plus what tolerance(dtype) allows at the largest value (atol + rtol·max|oracle|);
    both implementations round differently over long reductions (weight gradients).

    ``dtype`` is the compute dtype (x's), which sets the tolerance; ``got`` must have the reference's
    dtype (in mixed precision the weight and transform gradients are float32 while x is bf16/fp16).
    """
    if dtype == torch.float64:
        torch.testing.assert_close(got, oracle.to(got.dtype), **tolerance(dtype), msg=lambda m: f"{name}: {m}")
        return
    assert got.shape == oracle.shape and got.dtype == torch_value.dtype, (
        f"{name}: {got.shape}/{got.dtype} vs {oracle.shape}/{torch_value.dtype}"
    )
    ours = (got.double() - oracle).abs().max().item()
    theirs = (torch_value.double() - oracle).abs().max().item()
    tol = tolerance(dtype)
    bound = 2 * theirs + tol["atol"] + tol["rtol"] * oracle.abs().max().item()
    assert ours <= bound, f"{name}: max error {ours:.3g} > 2 × PyTorch's {theirs:.3g} + atol"


def assert_backend_matches_oracle(backend: str, case: DwconvCase, device="cpu"):
    """Forward and every gradient of the op with ``backend`` pinned, against the float64 oracle
    (:func:`assert_matches_oracle`); a channels_last input must give a channels_last output."""
    x, weight, transforms = make_inputs(case, device=device)
    expected, grad_output, expected_grads = reference_outputs(x, weight, case.kernel, case.stride, transforms)
    oracle, _, oracle_grads = oracle_outputs(x, weight, case.kernel, case.stride, transforms, grad_output)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *transforms)]
    with use_backend(backend):
        out = elastic_dwconv2d(leaves[0], leaves[1], case.kernel, case.stride, leaves[2:] or None)
        grads = torch.autograd.grad(out, leaves, grad_output)
    names = ["output", "grad x", "grad weight"] + [f"grad transforms[{i}]" for i in range(len(transforms))]
    for name, got, want, exact in zip(names, [out, *grads], [expected, *expected_grads], [oracle, *oracle_grads]):
        assert_matches_oracle(got, want, exact, case.dtype, tolerance, name)
    if case.layout == "channels_last" and x.shape[0] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "output must keep the channels_last layout"


def oracle_outputs(x, weight, kernel, stride, transforms, grad_output):
    """The reference run in float64 on the same (upcast) values: what every dtype is measured against."""
    return reference_outputs(
        x.double(), weight.double(), kernel, stride, [m.double() for m in transforms], grad_output.double()
    )


def grid_cases(count: int, seed: int, dtypes=(torch.float32, torch.float64), max_batch: int = 32) -> list[DwconvCase]:
    """`count` cases cycling through (K, k) × stride × layout, other axes drawn from a seeded RNG.

    Every fourth case has batch `max_batch`, every third uses all C_max channels, transforms alternate.
    """
    rng = random.Random(seed)
    kernel_pairs = [(big, k) for big in (3, 5, 7) for k in (3, 5, 7) if k <= big]
    axes = list(itertools.product(kernel_pairs, (1, 2), LAYOUTS))
    rng.shuffle(axes)
    cases = []
    for i in range(count):
        (big, k), stride, layout = axes[i % len(axes)]
        max_channels = rng.choice([3, 16, 19, 33])
        channels = max_channels if i % 3 == 0 else rng.randint(1, max_channels - 1)
        cases.append(
            DwconvCase(
                batch=max_batch if i % 4 == 0 else rng.choice([1, 2, 3]),
                channels=channels,
                max_channels=max_channels,
                height=rng.choice([1, 5, 7, 9, 12]),
                width=rng.choice([3, 6, 8, 11]),
                max_kernel=big,
                kernel=k,
                stride=stride,
                layout=layout,
                with_transforms=i % 2 == 0,
                dtype=dtypes[i % len(dtypes)],
            )
        )
    return cases


def large_plane_cases() -> list[DwconvCase]:
    """Channels-last cases where the C++ kernels prefetch their loads (planes of >= 256 pixels) and take
    several channel blocks per pass (csrc/ops/cpu/dwconv_tiles_impl.h), which the small planes of
    :func:`grid_cases` never reach. A pass takes blocks within one task's group, and groups split the
    blocks only while the call has few batch chunks (task_plan): 16 samples of ~2 MiB in all make 13-16
    chunks, so groups of 2 blocks (16 lanes) to 4 (8 lanes); the last block is partial at every width."""
    shapes = [
        (120, 16, 17, 7, 5, 2, True, torch.float32),
        (120, 17, 16, 5, 3, 1, False, torch.float64),
        (100, 16, 16, 3, 3, 2, True, torch.float32),
        (100, 18, 16, 7, 7, 1, False, torch.float32),
    ]
    return [
        DwconvCase(
            batch=16,
            channels=channels,
            max_channels=channels + 3,
            height=height,
            width=width,
            max_kernel=big,
            kernel=kernel,
            stride=stride,
            layout="channels_last",
            with_transforms=transforms,
            dtype=dtype,
        )
        for channels, height, width, big, kernel, stride, transforms, dtype in shapes
    ]
