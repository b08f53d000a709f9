"""Weak (α) and strong (𝒜) augmentation of SPEC §7, applied to a whole batch at once.

α = random resized crop + horizontal flip (when the data set allows it) + colour jitter
(brightness, contrast, saturation ±0.3, in a random order); 𝒜 = α + AutoAugment's ImageNet policy
(FixMatch's strong view). Both take uint8 (N, 3, H, W) images and return normalised float32
(N, 3, size, size) views; the trainer resizes batches to each subnet's resolution. The
normalisation is the network's (``SearchSpace.input_mean`` / ``input_std``: ImageNet's, except for
EfficientNet-Lite's [-1, 1]).

Why batched: torchvision's per-image v2 transforms spent ≈ 85 ms of every default-run step (13% of
it, mostly Python per image and per op: ColorJitter 1.35 s, RandomResizedCrop 0.66 s, AutoAugment
0.62 s per epoch of 38 steps). Here every image's random choices are drawn first — from its own
seed (:mod:`.loaders` gives each image one per epoch position, which is what makes runs
reproducible and resumable) into a :class:`ViewParams` — and then applied to the batch in a few
tensor ops:

* crop + resize + flip is ``R_y · x · R_xᵀ``, where a row of R holds an output pixel's
  antialiased-bilinear weights over the image's crop (PyTorch's antialiasing filter, what
  ``interpolate(..., antialias=True)`` applies to the cropped image); R is banded — 2 taps a pixel
  when upsampling — so each product is one ``embedding_bag`` (gather + weighted sum) over all
  images' rows, the flip a reversal of R_x's rows;
* colour jitter runs once per order of its three operations (at most 6 groups), with per-image
  factors;
* AutoAugment runs each of a sub-policy's two slots once per (operation, magnitude) present in the
  batch, through torchvision's functionals (they take batches).

Everything is computed in float32 on [0, 1] images; the oracle is torchvision's functionals applied
image by image with the same parameters (:mod:`.augment_reference`). The random choices follow
torchvision's samplers (``RandomResizedCrop.make_params``, ``ColorJitter``, ``AutoAugment.forward``)
drawn from a ``random.Random`` per image.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..spaces import IMAGENET_MEAN, IMAGENET_STD

CROP_SCALE = (0.6, 1.0)  # share of the image's area
CROP_RATIO = (0.85, 1.18)  # width / height
JITTER = 0.3  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
JITTER_OPS = ("brightness", "contrast", "saturation")

#: AutoAugment's ImageNet policy (Cubuk et al. 2019; torchvision's ``AutoAugmentPolicy.IMAGENET``):
#: 25 sub-policies of two (operation, probability, magnitude bin) slots.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)

MAGNITUDE_BINS = 10


def _linspace(start: float, end: float) -> tuple[float, ...]:
    return tuple(float(v) for v in torch.linspace(start, end, MAGNITUDE_BINS))


def _posterize_bits() -> tuple[float, ...]:
    """Bits kept per bin: 8 down to 4."""
    return tuple(float(b) for b in (8 - torch.arange(MAGNITUDE_BINS) / ((MAGNITUDE_BINS - 1) / 4)).round())


#: operation → (magnitude per bin or None, signed: the magnitude's sign is drawn) — AutoAugment's space
MAGNITUDES: dict[str, tuple[tuple[float, ...] | None, bool]] = {
    "ShearX": (_linspace(0.0, 0.3), True),
    "Rotate": (_linspace(0.0, 30.0), True),
    "Color": (_linspace(0.0, 0.9), True),
    "Contrast": (_linspace(0.0, 0.9), True),
    "Sharpness": (_linspace(0.0, 0.9), True),
    "Posterize": (_posterize_bits(), False),
    "Solarize": (_linspace(1.0, 0.0), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
}


@dataclass(frozen=True)
class ViewParams:
    """One image's random choices: crop box (top, left, height, width) in the input image, flip,
    the jitter operations' order (indices into :data:`JITTER_OPS`) and factors, and for the strong
    view the AutoAugment operations applied, as (name, magnitude) in order."""

    box: tuple[int, int, int, int]
    flip: bool
    jitter_order: tuple[int, ...]
    jitter_factors: tuple[float, float, float]
    auto_augment: tuple[tuple[str, float], ...] = ()


def draw_crop(rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.make_params`` with :data:`CROP_SCALE` and :data:`CROP_RATIO`."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop closest to the allowed ratios
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_auto_augment(rng: random.Random) -> tuple[tuple[str, float], ...]:
    """``AutoAugment.forward``'s choices: a sub-policy, then per slot whether it applies and the
    sign of a signed magnitude."""
    applied = []
    for name, probability, bin_ in IMAGENET_POLICY[rng.randrange(len(IMAGENET_POLICY))]:
        if not rng.random() <= probability:
            continue
        magnitudes, signed = MAGNITUDES[name]
        magnitude = 0.0 if magnitudes is None else magnitudes[bin_]
        if signed and rng.random() <= 0.5:
            magnitude = -magnitude
        applied.append((name, magnitude))
    return tuple(applied)


class BatchAugment:
    """α (``strong=False``) or 𝒜 (``strong=True``) for batches of uint8 (N, 3, H, W) images.

    ``augment(images, seeds)`` draws image i's choices from ``seeds[i]`` (:meth:`draw`) and returns
    normalised float32 (N, 3, size, size) views on ``images``' device."""

    def __init__(self, size: int, flip: bool = True, strong: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size, self.flip, self.strong = size, flip, strong
        self.mean, self.std = tuple(mean), tuple(std)

    def __repr__(self) -> str:
        return f"BatchAugment(size={self.size}, flip={self.flip}, strong={self.strong})"

    def draw(self, seed: int, height: int, width: int) -> ViewParams:
        rng = random.Random(seed)
        box = draw_crop(rng, height, width)
        flip = self.flip and rng.random() < 0.5
        order = tuple(rng.sample(range(len(JITTER_OPS)), len(JITTER_OPS)))
        factors = tuple(rng.uniform(1 - JITTER, 1 + JITTER) for _ in JITTER_OPS)
        return ViewParams(box, flip, order, factors, draw_auto_augment(rng) if self.strong else ())

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {images.shape[0]} images")
        h, w = images.shape[-2:]
        return self.apply(images, [self.draw(int(s), h, w) for s in seeds])

    def apply(self, images: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
        """The views of ``images`` (uint8 or [0, 1] float) for the given choices."""
        x = crop_resize_flip(images, params, self.size)
        if images.dtype == torch.uint8:
            x = x.div_(255)  # the crop is linear: scaling after it is one pass over the smaller output
        x = color_jitter(x, params)
        if self.strong:
            x = auto_augment(x, params)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


def weak_augment(size: int, flip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> BatchAugment:
    return BatchAugment(size, flip, strong=False, mean=mean, std=std)


def strong_augment(size: int, flip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> BatchAugment:
    return BatchAugment(size, flip, strong=True, mean=mean, std=std)


# ------------------------------------------------------------------------------------------------
# The batched operations
# ------------------------------------------------------------------------------------------------


def interpolation_band(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resizing each image's [start, start + length) span of pixels to ``size`` pixels, as (N, size, K)
    input pixel indices and weights: output pixel o reads K consecutive input pixels. PyTorch's
    antialiased bilinear filter (``interpolate(..., antialias=True)``, align_corners=False): a
    triangle of half-width max(1, scale) around the output pixel's centre in input coordinates,
    clipped to the span, normalised; K = 2 when upsampling."""
    scale = length.double() / size  # input pixels per output pixel, per image
    support = scale.clamp(min=1.0)[:, None, None]
    centre = (scale[:, None] * (torch.arange(size, dtype=torch.float64, device=start.device) + 0.5))[..., None]
    taps = int(torch.ceil(2 * support.max()))  # the open triangle holds at most ⌈2·support⌉ pixel centres
    first = (centre - support + 0.5).floor().clamp(min=0)  # (N, size, 1), relative to the span
    rel = first + torch.arange(taps, dtype=torch.float64, device=start.device)  # (N, size, K)
    inside = rel < length[:, None, None]
    weights = (1 - ((rel + 0.5 - centre) / support).abs()).clamp(min=0) * inside
    weights = weights / weights.sum(-1, keepdim=True)
    # Taps past the span have weight 0; their index is clamped into it so that the gather stays in bounds.
    index = torch.minimum(rel.long(), (length - 1)[:, None, None]) + start[:, None, None]
    return index, weights.float()


def _resample_rows(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, L, R) rows → (N, S, R): output row s of image n = Σ_k weights[n, s, k] · x[n, index[n, s, k]].
    One ``embedding_bag`` (a weighted sum of gathered rows, in one pass) over all images' rows."""
    n, length, width = x.shape
    rows = index + torch.arange(n, device=x.device)[:, None, None] * length
    taps = index.shape[-1]
    out = F.embedding_bag(
        rows.view(-1, taps), x.reshape(n * length, width), per_sample_weights=weights.view(-1, taps), mode="sum"
    )
    return out.view(n, -1, width)


def crop_resize_flip(images: torch.Tensor, params: Sequence[ViewParams], size: int) -> torch.Tensor:
    """Each image's crop box resized to (size, size), mirrored where ``flip``: R_y · x · R_xᵀ as two
    passes of weighted row gathers, columns first. Each pass needs the resampled axis to index rows,
    so the input is transposed before the first (in the copy that converts it to float32) and the
    intermediate before the second; the output comes out in order. Returns float32."""
    n, c, h, w = images.shape
    boxes = torch.tensor([p.box for p in params], device=images.device)
    flips = torch.tensor([p.flip for p in params], device=images.device)[:, None, None]
    # A mirrored image's output column o is the unmirrored one's column size - 1 - o.
    col_index, col_weights = (
        torch.where(flips, t.flip(1), t) for t in interpolation_band(boxes[:, 1], boxes[:, 3], size)
    )
    row_index, row_weights = interpolation_band(boxes[:, 0], boxes[:, 2], size)

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(c, dim=0)

    columns = images.transpose(2, 3).to(torch.float32, memory_format=torch.contiguous_format).view(n * c, w, h)
    y = _resample_rows(columns, per_channel(col_index), per_channel(col_weights))  # (N·C, size_x, H)
    y = y.transpose(1, 2).contiguous()  # (N·C, H, size_x)
    y = _resample_rows(y, per_channel(row_index), per_channel(row_weights))  # (N·C, size_y, size_x)
    return y.view(n, c, size, size)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def adjust(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    """``TF.adjust_<op>`` for a batch, factor (N, 1, 1, 1) per image. torchvision's blend
    x·f + other·(1 − f) is written as one ``lerp(other, x, f)``, then clamped to [0, 1] in place."""
    if op == "brightness":
        return torch.mul(x, factor).clamp_(0, 1)
    if op == "contrast":
        return torch.lerp(_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True).expand_as(x), x, factor).clamp_(0, 1)
    if op == "saturation":
        return torch.lerp(_grayscale(x).expand_as(x), x, factor).clamp_(0, 1)
    raise ValueError(f"unknown colour operation {op!r}")


def color_jitter(x: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    """ColorJitter with each image's order and factors: once per order present in the batch."""
    factors = torch.tensor([p.jitter_factors for p in params], dtype=x.dtype, device=x.device)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[p.jitter_order].append(i)
    out = torch.empty_like(x)
    for order, members in groups.items():
        index = torch.tensor(members, device=x.device)
        y, f = x.index_select(0, index), factors.index_select(0, index)
        for op in order:
            y = adjust(y, JITTER_OPS[op], f[:, op].view(-1, 1, 1, 1))
        out.index_copy_(0, index, y)
    return out


def apply_auto_augment_op(x: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """One AutoAugment operation on [0, 1] float images (torchvision's ``AutoAugment`` mapping:
    nearest interpolation, zero fill)."""
    if name == "ShearX":
        shear = [math.degrees(math.atan(magnitude)), 0.0]
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    if name == "Rotate":
        return TF.rotate(x, angle=magnitude)
    if name == "Color":
        return TF.adjust_saturation(x, 1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(x, 1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(x, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(x, bits=int(magnitude))
    if name == "Solarize":
        return TF.solarize(x, threshold=magnitude)  # the threshold in units of the [0, 1] range
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return TF.invert(x)
    raise ValueError(f"unknown AutoAugment operation {name!r}")


def auto_augment(x: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    """Each image's AutoAugment operations, slot by slot, once per (operation, magnitude) present."""
    x = x.clone(memory_format=torch.contiguous_format)  # written group by group below
    for slot in range(max((len(p.auto_augment) for p in params), default=0)):
        groups: dict[tuple[str, float], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            if slot < len(p.auto_augment):
                groups[p.auto_augment[slot]].append(i)
        for (name, magnitude), members in groups.items():
            index = torch.tensor(members, device=x.device)
            x.index_copy_(0, index, apply_auto_augment_op(x.index_select(0, index), name, magnitude))
    return x


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The un-augmented view of one uint8 (3, H, W) image: resize, centre crop, normalise."""
    from torchvision.transforms import v2

    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *finish])
