"""OFA's own training step on its own supernet, for benchmarks of ``tofa_fast.accelerate`` (no tests here).

* :func:`make_ofa_mbv3` — a seeded ``OFAMobileNetV3`` (kernels {3,5,7}, expands {3,4,6}, depths {2,3,4}).
* :func:`ofa_sandwich_archs` — the four settings of one sandwich step: max, min, two random ones
  drawn by the model's own ``sample_active_subnet``.
* :func:`ofa_sandwich_step` — what ofa's progressive-shrinking loop does per batch
  (``ofa/imagenet_classification/elastic_nn/training/progressive_shrinking.py``, without distillation):
  for each setting ``set_active_subnet``, forward, cross-entropy, backward, gradients accumulating
  over the settings; the optimizer step is the caller's (left out: it is the same for both models).

Usage::

    from bench.ofa_step import make_ofa_mbv3, ofa_sandwich_archs, ofa_sandwich_step   # or sys.path
    model = make_ofa_mbv3()
    settings = ofa_sandwich_archs(model, random.Random(0))
    ofa_sandwich_step(model, images, settings, labels)
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KS_LIST", "EXPAND_LIST", "DEPTH_LIST", "make_ofa_mbv3", "ofa_sandwich_archs", "ofa_sandwich_step"]

KS_LIST = [3, 5, 7]
EXPAND_LIST = [3, 4, 6]
DEPTH_LIST = [2, 3, 4]


def make_ofa_mbv3(
    width_mult: float = 1.2, n_classes: int = 1000, seed: int = 0, dropout_rate: float = 0.1
) -> nn.Module:
    """A freshly initialised ``OFAMobileNetV3`` (ofa's defaults but the elastic lists), in train mode.

    Seeded (``torch.manual_seed(seed)`` around the construction), so two calls give equal weights.
    """
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OFAMobileNetV3(
            n_classes=n_classes,
            dropout_rate=dropout_rate,
            width_mult=width_mult,
            ks_list=KS_LIST,
            expand_ratio_list=EXPAND_LIST,
            depth_list=DEPTH_LIST,
        )
    return model.train()


def ofa_sandwich_archs(ofa_model: nn.Module, rng: random.Random) -> list[dict]:
    """[max, min, random, random] as ``set_active_subnet`` keyword dicts (``ks``, ``e``, ``d``).

    max: the largest kernel, expand and depth; min: ks 3, e 3, d 2 (the smallest of the lists above);
    the two random ones come from the model's own ``sample_active_subnet`` (which draws from Python's
    global ``random``), run on ``rng``'s stream: the global state is set from ``rng`` and restored
    afterwards, and ``rng`` advances, so the same ``rng`` seed gives the same settings. The model is
    left on the last random setting (``sample_active_subnet`` activates what it samples).
    """
    settings = [
        dict(ks=max(KS_LIST), e=max(EXPAND_LIST), d=max(DEPTH_LIST)),
        dict(ks=min(KS_LIST), e=min(EXPAND_LIST), d=min(DEPTH_LIST)),
    ]
    saved = random.getstate()
    try:
        random.setstate(rng.getstate())
        for _ in range(2):
            sample = ofa_model.sample_active_subnet()
            settings.append({key: list(value) for key, value in sample.items()})
        rng.setstate(random.getstate())
    finally:
        random.setstate(saved)
    return settings


def ofa_sandwich_step(
    ofa_model: nn.Module, images: torch.Tensor, settings: list[dict], labels: torch.Tensor
) -> torch.Tensor:
    """One sandwich step of OFA training, no optimizer step: per setting, activate, forward, CE, backward.

    Gradients accumulate in ``.grad`` over the settings (zero them between steps, as ofa's loop does
    with ``optimizer.zero_grad()``). Returns the summed loss (detached).
    """
    total = images.new_zeros(())
    for setting in settings:
        ofa_model.set_active_subnet(**setting)
        loss = F.cross_entropy(ofa_model(images), labels)
        loss.backward()
        total += loss.detach()
    return total
