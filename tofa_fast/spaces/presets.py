"""Preset search spaces (SPEC §2): ``tofa``, ``ofa_mbv3``, ``rss`` and ``digits``."""

from __future__ import annotations

import math

from .space import HeadSpec, SearchSpace, StageSpec, StemSpec, make_divisible

# The TOFA paper searches the input resolution but its resolution set was lost in extraction.
# With the paper's Table 1 widths/depths and ImageNet strides (stem 2; stages 1,2,2,2,1,2,1),
# fvcore on extracted subnets (1000 classes) gives, for the min / max arch:
#   192 px: 103.0 / 888.4   224 px: 138.6 / 1203.8   256 px: 179.7 / 1567.7
#   272 px: 209.2 / 1819.7  288 px: 226.2 / 1980.1   320 px: 278.2 / 2441.1   (MFLOPs)
# so the paper's constraint (smallest subnet > 200 MFLOPs, largest < 2500 MFLOPs) holds exactly for
# resolutions 272–320; we search them in steps of 8. tests/test_spaces_flops.py re-proves it.
TOFA_RESOLUTIONS = tuple(range(272, 321, 8))


def tofa() -> SearchSpace:
    """The TOFA paper's Table 1 (FBNetV3-like), stage granularity.

    Strides: stem 2, then stages 1, 2, 2, 2, 1, 2, 1 (ImageNet layout: overall stride 32).
    Activations: ReLU in stages 1–3, h-swish from stage 4 on, h-swish in stem and head.
    """
    return SearchSpace(
        name="tofa",
        resolutions=TOFA_RESOLUTIONS,
        stem=StemSpec(widths=(16, 24), stride=2, act="hswish"),
        stages=(
            StageSpec((16, 24), (1, 2), (3, 5), (1,), stride=1, se=False, act="relu"),
            StageSpec((24, 32), (3, 4, 5), (3, 5), (2, 4, 6), stride=2, se=False, act="relu"),
            StageSpec((32, 40), (3, 4, 5, 6), (3, 5), (2, 4, 6), stride=2, se=True, act="relu"),
            StageSpec((64, 72), (3, 4, 5, 6), (3, 5), (2, 4, 6), stride=2, se=False, act="hswish"),
            StageSpec((112, 128), tuple(range(3, 9)), (3, 5), (2, 4, 6), stride=1, se=True, act="hswish"),
            StageSpec((192, 216), tuple(range(3, 9)), (3, 5), (2, 4, 6), stride=2, se=True, act="hswish"),
            StageSpec((216, 224), (1, 2), (3, 5), (2, 4, 6), stride=1, se=True, act="hswish"),
        ),
        head=HeadSpec(widths=(1792, 1984), expand=6, act="hswish", dropout=0.1),
        granularity="stage",
        kernel_transform=False,
    )


def ofa_mbv3(width_mult: float = 1.2, resolutions: tuple[int, ...] | None = None) -> SearchSpace:
    """OFA's MobileNetV3 space exactly as the ``ofa`` package builds ``OFAMobileNetV3``.

    ``stages[0]`` is OFA's fixed first block (3×3 depthwise, expand 1, no SE); ``stages[1:]`` are
    its five elastic stages (kernel {3,5,7}, expand {3,4,6}, depth {2,3,4}). Channel counts follow
    ``make_divisible(base * width_mult, 8)`` as in ``ofa.imagenet_classification.elastic_nn.networks``.
    """
    if (
        isinstance(width_mult, bool)
        or not isinstance(width_mult, (int, float))
        or not math.isfinite(width_mult)
        or width_mult <= 0
    ):
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    base = [16, 16, 24, 40, 80, 112, 160]
    widths = [make_divisible(b * width_mult, 8) for b in base]
    final_expand = make_divisible(960 * width_mult, 8)
    last_channel = make_divisible(1280 * width_mult, 8)
    strides = [1, 2, 2, 2, 1, 2]
    acts = ["relu", "relu", "relu", "hswish", "hswish", "hswish"]
    ses = [False, False, True, False, True, True]
    stages = [StageSpec((widths[1],), (1,), (3,), (1,), stride=strides[0], se=ses[0], act=acts[0])]
    for w, s, a, se in zip(widths[2:], strides[1:], acts[1:], ses[1:]):
        stages.append(StageSpec((w,), (2, 3, 4), (3, 5, 7), (3, 4, 6), stride=s, se=se, act=a))
    # OFA's final expand width is 6x the (fixed) last stage width; keep that as a ratio.
    expand = final_expand / widths[-1]
    return SearchSpace(
        name="ofa_mbv3" if width_mult == 1.2 else f"ofa_mbv3_w{width_mult:g}",
        resolutions=resolutions if resolutions is not None else tuple(range(128, 225, 4)),
        stem=StemSpec(widths=(widths[0],), stride=2, act="hswish"),
        stages=tuple(stages),
        head=HeadSpec(widths=(last_channel,), expand=expand, act="hswish", dropout=0.1),
        granularity="layer",
        kernel_transform=True,
    )


def rss() -> SearchSpace:
    """The RSS paper's space: OFA MobileNetV3 w1.0 on 32×32 inputs (CIFAR/MNIST size)."""
    space = ofa_mbv3(width_mult=1.0, resolutions=(32,))
    return SearchSpace(**{**_fields(space), "name": "rss"})


def digits() -> SearchSpace:
    """Small space for the embedded default run: 8×8 digits upsampled to 24–32 pixels.

    Sized to train in minutes on two CPU cores while still spanning more than 3× in FLOPs.
    """
    return SearchSpace(
        name="digits",
        resolutions=(24, 28, 32),
        stem=StemSpec(widths=(16,), stride=1, act="hswish"),
        stages=(
            StageSpec((16,), (1,), (3,), (1,), stride=1, se=False, act="relu"),
            StageSpec((16, 24), (1, 2), (3, 5), (2, 3, 4), stride=2, se=False, act="relu"),
            StageSpec((24, 32), (1, 2, 3), (3, 5), (2, 3, 4), stride=2, se=True, act="hswish"),
            StageSpec((32, 48), (1, 2), (3, 5), (2, 3, 4), stride=2, se=True, act="hswish"),
        ),
        head=HeadSpec(widths=(128, 192), expand=4, act="hswish", dropout=0.1),
        granularity="layer",
        kernel_transform=True,
    )


def _fields(space: SearchSpace) -> dict:
    return {
        name: getattr(space, name)
        for name in (
            "name",
            "resolutions",
            "stem",
            "stages",
            "head",
            "granularity",
            "kernel_transform",
            "in_channels",
            "bn_momentum",
            "bn_eps",
            "se_reduction",
            "channel_divisor",
        )
    }
