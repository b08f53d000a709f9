"""Batched weak/strong augmentation (train/augment.py) against torchvision, image by image."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tofa_fast.train import augment
from tofa_fast.train.augment import BatchAugment, apply_auto_augment_op, draw_crop
from tofa_fast.train.augment_reference import views_reference
from tofa_fast.train.data import ImageSet
from tofa_fast.train.loaders import LabelledViews, UnlabelledViews


def _images(n: int, size: int, seed: int = 0, width: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, width or size), dtype=torch.uint8, generator=g)


# input (height, width) → output size: equal (the trainer's case), upsampled, downsampled
# (antialiasing), odd, not square
@pytest.mark.parametrize("strong", [False, True], ids=["weak", "strong"])
@pytest.mark.parametrize(
    "sizes", [(32, 32, 32), (13, 13, 17), (40, 40, 23), (24, 31, 20)], ids=lambda s: f"{s[0]}x{s[1]}to{s[2]}"
)
def test_batched_views_equal_torchvisions_functionals_image_by_image(strong, sizes):
    height, width, size = sizes
    aug = BatchAugment(size, flip=True, strong=strong, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    images, seeds = _images(48, height, width=width), list(range(7, 7 + 48))
    params = [aug.draw(s, height, width) for s in seeds]
    assert any(p.flip for p in params) and not all(p.flip for p in params)
    assert len({p.jitter_order for p in params}) == 6
    if strong:
        assert len({op for p in params for op, _ in p.auto_augment}) >= 8
    got = aug(images, seeds)
    assert got.shape == (48, 3, size, size) and got.dtype == torch.float32
    expected = views_reference(aug, images, params)
    if not strong:
        torch.testing.assert_close(got, expected, rtol=0, atol=3e-5)
        return
    # AutoAugment quantises (posterize, equalize, solarize's threshold): a value within float
    # rounding of a level boundary may land on the other side in one of the two computations.
    assert ((got - expected).abs() > 3e-5).float().mean() < 1e-3
    # From the same input, the batched operations equal torchvision's image by image exactly.
    weak = BatchAugment(size, True, False, mean=(0.0,) * 3, std=(1.0,) * 3).apply(images, params)
    one_by_one = torch.stack([augment.auto_augment(v[None], [p])[0] for v, p in zip(weak, params)])
    torch.testing.assert_close(augment.auto_augment(weak.clone(), params), one_by_one, rtol=0, atol=1e-6)


def test_a_view_depends_on_its_seed_only():
    aug = BatchAugment(24, strong=True)
    images = _images(6, 24)
    alone = torch.cat([aug(images[i : i + 1], [100 + i]) for i in range(6)])
    torch.testing.assert_close(aug(images, list(range(100, 106))), alone, rtol=0, atol=1e-6)
    assert not torch.equal(aug(images, [1] * 6), aug(images, [2] * 6))


def test_no_flip_when_the_data_set_forbids_it():
    aug = BatchAugment(16, flip=False)
    assert not any(aug.draw(s, 16, 16).flip for s in range(200))


def test_crops_follow_random_resized_crops_sampler():
    """Scale (0.6, 1) of the area, ratio (0.85, 1.18), every position reachable; torchvision's own
    sampler gives the same distribution of areas (two-sample comparison of means)."""
    rng = random.Random(0)
    boxes = [draw_crop(rng, 32, 32) for _ in range(4000)]
    areas = [h * w / 1024 for _, _, h, w in boxes]
    for top, left, h, w in boxes:
        assert 0 <= top <= 32 - h and 0 <= left <= 32 - w
        assert 0.85 - 0.08 <= w / h <= 1.18 + 0.08  # rounding to whole pixels
    assert 0.55 <= min(areas) and max(areas) <= 1.0
    crop = v2.RandomResizedCrop(32, scale=augment.CROP_SCALE, ratio=augment.CROP_RATIO)
    torch.manual_seed(0)
    theirs = []
    for _ in range(4000):
        p = crop.make_params([torch.zeros(3, 32, 32)])
        theirs.append(p["height"] * p["width"] / 1024)
    mean, their_mean = sum(areas) / len(areas), sum(theirs) / len(theirs)
    assert abs(mean - their_mean) < 0.01


def test_auto_augment_choices_follow_the_imagenet_policy():
    """Each operation's share of applied slots matches the policy's expectation."""
    expected: Counter = Counter()
    for policy in augment.IMAGENET_POLICY:
        for name, probability, _ in policy:
            expected[name] += probability / len(augment.IMAGENET_POLICY)
    rng, draws = random.Random(0), 20000
    seen = Counter(name for _ in range(draws) for name, _ in augment.draw_auto_augment(rng))
    for name, share in expected.items():
        assert abs(seen[name] / draws - share) < 0.02, name
    signs = [m for _ in range(5000) for name, m in augment.draw_auto_augment(rng) if name == "Rotate"]
    assert 0.4 < sum(m < 0 for m in signs) / len(signs) < 0.6


def test_policy_and_magnitudes_are_torchvisions():
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    policies = getattr(tv, "_policies", None)
    space = getattr(tv, "_AUGMENTATION_SPACE", None)
    if policies is None or space is None:
        pytest.skip("this torchvision keeps its AutoAugment tables elsewhere")
    assert tuple(tuple(p) for p in policies) == augment.IMAGENET_POLICY
    for name, (magnitudes, signed) in augment.MAGNITUDES.items():
        theirs, their_signed = space[name]
        values = theirs(augment.MAGNITUDE_BINS, 32, 32)
        assert signed == their_signed
        assert (magnitudes is None) == (values is None)
        if values is not None:
            assert magnitudes == pytest.approx([float(v) for v in values])


@pytest.mark.parametrize(
    "name, magnitude",
    [("ShearX", -0.2), ("Rotate", 26.7), ("Color", 0.5), ("Contrast", -0.8), ("Sharpness", 0.7), ("Posterize", 5.0),
     ("Solarize", 0.44), ("AutoContrast", 0.0), ("Equalize", 0.0), ("Invert", 0.0)],
)  # fmt: skip
def test_auto_augment_operations_are_torchvisions(name, magnitude):
    """Each operation as torchvision's AutoAugment applies it (its private mapping, when present),
    and batched equals image by image."""
    x = TF.to_dtype(_images(5, 19, seed=3), torch.float32, scale=True)
    got = apply_auto_augment_op(x, name, magnitude)
    one_by_one = torch.stack([apply_auto_augment_op(img, name, magnitude) for img in x])
    torch.testing.assert_close(got, one_by_one, rtol=0, atol=1e-6)
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    if not hasattr(tv, "_apply_image_or_video_transform"):
        pytest.skip("this torchvision has no AutoAugment operation mapping to compare with")
    theirs = tv._apply_image_or_video_transform(x, name, magnitude, interpolation=tv.interpolation, fill=tv._fill)
    torch.testing.assert_close(got, theirs, rtol=0, atol=1e-6)


def test_bad_batches_are_named():
    aug = BatchAugment(8)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match="seeds"):
        aug(_images(2, 8), [0])
    with pytest.raises(ValueError, match="size"):
        BatchAugment(0)


def test_views_data_sets_augment_a_shard_at_once():
    images = _images(10, 12)
    labelled = ImageSet(images, torch.arange(10), 12)
    aug, strong = BatchAugment(12), BatchAugment(12, strong=True)
    keys = [(3, 40), (7, 42), (3, 44)]
    views, labels = LabelledViews(labelled, aug)[keys]
    assert labels.tolist() == [3, 7, 3] and labels.dtype == torch.long
    torch.testing.assert_close(views, aug(images[[3, 7, 3]], [40, 42, 44]))
    weak, strong_views = UnlabelledViews(ImageSet(images, None, 12), aug, strong)[keys]
    torch.testing.assert_close(weak, views)
    torch.testing.assert_close(strong_views, strong(images[[3, 7, 3]], [41, 43, 45]))


def test_interpolation_taps_sum_to_one_and_stay_in_the_crop():
    start, length = torch.tensor([0, 5, 2, 0]), torch.tensor([10, 3, 17, 20])
    index, weights = augment.interpolation_band(start, length, 7)  # up- and downsampling
    assert index.shape == weights.shape and index.shape[:2] == (4, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 7))
    assert (index >= start[:, None, None]).all() and (index < (start + length)[:, None, None]).all()
    assert augment.interpolation_band(start[1:2], length[1:2], 7)[0].shape[-1] == 2  # upsampling: 2 taps
    index, weights = augment.interpolation_band(torch.tensor([5]), torch.tensor([3]), 7)
    assert int(index[0, 0, 0]) == 5 and math.isclose(float(weights[0, 0, 0]), 1.0)  # the crop's first pixel


def test_an_epochs_batches_do_not_depend_on_worker_processes():
    from test_train_run import tiny_digits

    from tofa_fast.train.distributed import DistContext
    from tofa_fast.train.loaders import epoch_loaders

    splits, dist = tiny_digits(), DistContext()
    batches = {}
    for workers in (0, 1):
        lab, unl = epoch_loaders(splits, 3, 2, 8, 2, True, dist, num_workers=workers, skip=1)
        batches[workers] = [(x, y, weak, strong) for (x, y), (weak, strong) in zip(lab, unl)]
    assert len(batches[0]) == 1 and batches[0][0][0].shape == (8, 3, 32, 32) and batches[0][0][2].shape[0] == 16
    for ours, theirs in zip(batches[0], batches[1]):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
