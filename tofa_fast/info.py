"""``tofa-fast info``: version, backends, and why any backend is missing (all from :mod:`.backends`)."""

from __future__ import annotations

import platform

import torch

from . import __version__, backends
from .host_memory import describe_policy
from .ops import bn_act_dwconv, packed_batch_norm
from .ops.eager_path import EAGER_PATH_LINE
from .ops.elastic_dwconv_dispatch import describe_dispatch


def info_text() -> str:
    lines = [
        f"tofa_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "backends:",
    ]
    for status in backends.statuses():
        mark = "yes" if status.available else "no "
        lines.append(f"  {status.name:<7} {mark}  {status.detail}")
    estimator = backends.estimator_status()
    lines.append(f"estimator (FLOPs / params / latency table sums): {estimator.detail}")
    lines.append("elastic_dwconv2d dispatch (per device, the first backend without a reason to refuse serves):")
    lines.extend(f"  {line}" for line in describe_dispatch())
    lines.append("packed_batch_norm_act dispatch (the fused step's batch norm):")
    lines.extend(f"  {line}" for line in packed_batch_norm.describe_dispatch())
    lines.append(f"MBConv expansion batch norm + activation before the depthwise conv: {bn_act_dwconv.describe()}")
    lines.append(f"op calls: {EAGER_PATH_LINE}")
    lines.append(f"host memory freed by the commands' steps: {describe_policy()}")
    from .train.step import describe_step_backends  # the training layer: imported only here

    lines.append("training step (--step; auto takes the first entry that serves where it is measured faster):")
    lines.extend(f"  {line}" for line in describe_step_backends())
    return "\n".join(lines)
