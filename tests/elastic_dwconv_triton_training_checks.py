"""The Triton kernels inside real training (collected by test_elastic_dwconv_triton.py, as the kernel checks).

Two SGD steps of the digits supernet — the max subnet (5×5 filters) and the min one (3×3 filters
taken from them through the kernel transforms), one step each, CE loss — with elastic_dwconv2d pinned to the Triton backend, in float32 and under bf16 autocast,
against the same steps on the reference backend. Both are measured against an oracle, the same
steps in float64 on the reference: per parameter group, the relative L2 error of the weight updates
(after − before), and the rule is tests/conftest.py's at the scale of a whole model — the Triton
run's error at most twice the reference's in that precision plus a floor per precision
(:data:`UPDATE_RTOL`). Cheap on purpose (the interpreter runs every program in Python, ~10 s a
step): batch 2, 24-pixel inputs, 2 steps. A random subnet's step would only mix the same filter
sizes (the kernel checks cover every k, stride and layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

import tofa_fast
from tofa_fast.ops.elastic_dwconv_dispatch import use_backend

pytest.importorskip("triton")
KERNELS = importlib.import_module("tofa_fast.triton_kernels.elastic_dwconv")
DEVICE = "cpu" if KERNELS.INTERPRETED else "cuda"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

BATCH, RESOLUTION, LR, MOMENTUM = 2, 24, 0.1, 0.9
# Floor of the rule per precision. float32: an activation within rounding of a ReLU/hswish kink lands
# on either side in any two float32 runs, and one such flip (seen here once, in a random subnet's
# step: one element of a BN output 1e-6 from zero) moves the updates by ~1e-3 relative; 1e-2 allows a
# few and still catches a kernel that is off by a percent (without a flip both runs are at ~5e-6).
# bfloat16: conftest's rtol — the runs' own error (~0.1 after 2 steps, flips everywhere) dominates
# the bound anyway.
UPDATE_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-2, torch.bfloat16: TOLERANCES[torch.bfloat16][0]}
# Parameter groups compared separately: the op's own outputs (depthwise weights and the kernel
# transforms) would drown in the rest of the network's parameters.
GROUPS = {"depthwise": lambda name: ".dw_conv." in name, "all": lambda name: True}


def _archs(space) -> list:
    """max and min subnets, at the smallest resolution (the interpreter's cost)."""
    return [dataclasses.replace(a, resolution=RESOLUTION) for a in (space.max_arch(), space.min_arch())]


def train_updates(backend: str, dtype: torch.dtype, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Parameter updates (after − before) of len(_archs) SGD steps, one subnet per step."""
    torch.manual_seed(0)
    net = tofa_fast.Supernet("digits", num_classes=10).to(DEVICE, dtype).train()
    net.set_regularization(dropout=0.0, drop_connect=0.0)  # no random masks: runs differ by arithmetic only
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    data = torch.Generator().manual_seed(1)
    for arch in _archs(net.space):
        images = torch.randn(BATCH, 3, arch.resolution, arch.resolution, generator=data, dtype=torch.float64)
        labels = torch.randint(0, 10, (BATCH,), generator=data)
        net.set_active(arch)
        region = torch.autocast(DEVICE, dtype=autocast) if autocast else contextlib.nullcontext()
        with use_backend(backend):
            with region:
                loss = F.cross_entropy(net(images.to(DEVICE, dtype)), labels.to(DEVICE))
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    return {name: (p.detach() - before[name]).double().cpu() for name, p in net.named_parameters()}


def relative_error(updates: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], group) -> float:
    names = [name for name in oracle if group(name)]
    diff = torch.cat([(updates[n] - oracle[n]).flatten() for n in names])
    return (diff.norm() / torch.cat([oracle[n].flatten() for n in names]).norm()).item()


@pytest.fixture(scope="module")
def oracle() -> dict[str, torch.Tensor]:
    return train_updates("reference", torch.float64, None)


@pytest.mark.slow
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_triton_training_steps_match_reference(oracle, precision):
    autocast = precision if precision != torch.float32 else None
    ours = train_updates("Triton", torch.float32, autocast)
    theirs = train_updates("reference", torch.float32, autocast)
    rtol = UPDATE_RTOL[precision]
    for group_name, group in GROUPS.items():
        ours_error, theirs_error = relative_error(ours, oracle, group), relative_error(theirs, oracle, group)
        print(f"{precision} {group_name}: Triton {ours_error:.3g}, reference {theirs_error:.3g} (vs float64)")
        assert ours_error <= 2 * theirs_error + rtol, (
            f"{group_name} updates: Triton's relative error {ours_error:.3g} > 2 × the reference's "
            f"{theirs_error:.3g} + {rtol}"
        )
