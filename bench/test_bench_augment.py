"""CPU benchmark of the training loader's augmentation: batched (train/augment.py) vs per image.

Cases: a batch of 32 uint8 images at 32 px (the default digits run: each step augments 32 weak
labelled views, and 32 weak + 32 strong unlabelled views) and at 128 px (an ImageNet-style transfer
run), weak (α: random resized crop, flip, colour jitter) and strong (𝒜: α + AutoAugment) views,
two threads.

Implementations:

* ``tofa_fast`` — :class:`tofa_fast.train.augment.BatchAugment`: every image's choices drawn from
  its seed, then applied to the batch at once;
* ``torchvision`` — what the loader did before: torchvision's v2 pipeline with the same
  distribution (``augment_reference.torchvision_pipeline``) image by image, torch's generator
  reseeded from the image's seed around each call.

``test_target`` fails the run when the batched augmentation is below its target against the
per-image one: ≥ 3× at 32 px, where torchvision's per-image cost is Python and dispatch (the
default run's case), ≥ 1.5× at 128 px, where its uint8 kernels do real work on 1 byte a pixel and
ours run in float32 (≈ 15 passes over a 6 MB batch for crop + jitter).

Run: ``python -m pytest bench/test_bench_augment.py -p no:cacheprovider``
"""

from __future__ import annotations

import pytest
import torch

from tofa_fast.train.augment import BatchAugment
from tofa_fast.train.augment_reference import torchvision_pipeline

SUITE = "augment_cpu"
THREADS = 2
BATCH = 32
SIZES = (32, 128)
MODES = ("weak", "strong")
IMPLS = ("tofa_fast", "torchvision")
TARGETS = {32: 3.0, 128: 1.5}  # × the per-image pipeline, by image size
TIME_PER_BENCH, MIN_ROUNDS, MAX_ROUNDS = 2.0, 5, 200


def _case(size: int) -> str:
    return f"batch of {BATCH} uint8 images at {size} px"


def _per_image(transform, images: torch.Tensor, seeds) -> torch.Tensor:
    generator = torch.default_generator
    views = []
    for image, seed in zip(images, seeds):
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            views.append(transform(image))
        finally:
            generator.set_state(state)
    return torch.stack(views)


@pytest.fixture(scope="module", autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_augment_cpu(benchmark, bench_registry, size, mode, impl):
    for s in SIZES:
        for m in MODES:
            for name in IMPLS:
                bench_registry.expect(SUITE, _case(s), m, name)
    bench_registry.REGISTRY[SUITE]["meta"]["description"] = (
        f"Weak / strong views of a batch of {BATCH} uint8 images, {THREADS} threads: tofa_fast = BatchAugment "
        "(batched), torchvision = the same distribution with torchvision's v2 transforms image by image (the loader "
        "before). Run: python -m pytest bench/test_bench_augment.py -p no:cacheprovider"
    )
    g = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=g)
    seeds = list(range(1000, 1000 + BATCH))
    augment = BatchAugment(size, flip=True, strong=mode == "strong")
    if impl == "tofa_fast":

        def fn():
            return augment(images, seeds)
    else:
        transform = torchvision_pipeline(augment)

        def fn():
            return _per_image(transform, images, seeds)

    assert fn().shape == (BATCH, 3, size, size)
    bench_registry.measure(
        benchmark,
        fn,
        SUITE,
        _case(size),
        mode,
        impl,
        time_per_bench=TIME_PER_BENCH,
        min_rounds=MIN_ROUNDS,
        max_rounds=MAX_ROUNDS,
    )


def test_target(bench_registry):
    """Fails the run when the batched augmentation misses its target (TARGETS) in a case."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or --benchmark-disable)")
    speedups = bench_registry.speedups(SUITE)
    ratios = {f"{_case(s)} {m}": speedups[(_case(s), m)]["torchvision"] for s in SIZES for m in MODES}
    bench_registry.REGISTRY[SUITE]["meta"]["speedups"] = ratios
    print(f"\n{SUITE}: " + ", ".join(f"{k}: {v:.2f}×" for k, v in ratios.items()))
    missed = {
        f"{_case(s)} {m}": f"{ratios[f'{_case(s)} {m}']:.2f}× < {TARGETS[s]}×"
        for s in SIZES
        for m in MODES
        if ratios[f"{_case(s)} {m}"] < TARGETS[s]
    }
    assert not missed, f"batched augmentation below its target vs per image: {missed}"
