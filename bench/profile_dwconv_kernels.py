"""The compiled CUDA depthwise kernels under Nsight Compute: one forward and one backward per case.

GPU time comes in short slots, and a kernel profile answers what a benchmark cannot: how long each
kernel of the op runs (the backward is an input-gradient kernel, a filter-gradient kernel and the
sum of its partials), how full the multiprocessors are, and what the warps wait on. Each case runs
twice outside the profiled range (module loading and the allocator's growth stay out of it), then
once inside ``torch.cuda.profiler.start() / stop()``, which ``ncu --profile-from-start
off`` honours, so only the cases' own launches are profiled.

Run (scripts/gpu_check.sh does, stage ``kernel-profile``)::

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python bench/profile_dwconv_kernels.py [--cases 192x56s1k7,1152x7s1k7] [--dtype bfloat16]

Cases are CxSsTkK (channels, square map size, stride, kernel size), OFA MobileNetV3 w1.2 shapes by
default; batch 32, channels_last (the layout training uses on CUDA).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

DEFAULT_CASES = "192x56s1k7,1152x7s1k7,144x112s2k7,192x56s1k3"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_cases(text: str) -> list[tuple[int, int, int, int]]:
    """'192x56s1k7,1152x7s1k7' -> [(channels 192, size 56, stride 1, kernel 7), (1152, 7, 1, 7)]."""
    cases = []
    for case in filter(None, (c.strip() for c in text.split(","))):
        match = re.fullmatch(r"(\d+)x(\d+)s(\d+)k(\d+)", case)
        if match is None:
            raise argparse.ArgumentTypeError(f"{case!r} is not CxSsTkK, e.g. 192x56s1k7")
        cases.append(tuple(int(g) for g in match.groups()))
    return cases


def _channels_last(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)


def _forward_backward(ops, x, grad_y, weight, kernel: int, stride: int) -> None:
    ops._elastic_dwconv2d_compiled_forward(x, weight, kernel, stride, [])
    ops._elastic_dwconv2d_compiled_backward(grad_y, x, weight, kernel, stride, [], [True, True, False])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", type=parse_cases, default=DEFAULT_CASES, help=f"comma-separated CxSsTkK (default {DEFAULT_CASES})"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    from tofa_fast import _extension

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile", file=sys.stderr)
        return 1
    if not _extension.built_with_cuda():
        print(
            f"tofa_fast's extension has no CUDA kernels: {_extension.LOAD_ERROR or 'built without CUDA'}",
            file=sys.stderr,
        )
        return 1
    ops = torch.ops.tofa_fast
    dtype = DTYPES[args.dtype]
    for channels, size, stride, kernel in args.cases:
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1

        x = _channels_last(args.batch, channels, size, size, dtype=dtype)
        grad_y = _channels_last(args.batch, channels, out, out, dtype=dtype)
        weight = torch.randn(channels, 1, kernel, kernel, device="cuda")  # float32 master weight
        for _ in range(2):
            _forward_backward(ops, x, grad_y, weight, kernel, stride)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        _forward_backward(ops, x, grad_y, weight, kernel, stride)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(
            f"profiled C{channels} {size}x{size} s{stride} k{kernel} {args.dtype}, batch {args.batch}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
