"""SubnetEvaluator against the slow oracle (extract + recalibrate + Trainer.evaluate), SPEC §7."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tolerance
from search_fixtures import one_thread, tiny_run

from tofa_fast.search import SubnetEvaluator
from tofa_fast.train.evaluation import eval_transform_for
from tofa_fast.train.loaders import resize


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("evaluator"))


def _oracle(record, arch, images):
    sub = record.calibrated_subnet(arch)
    tf = eval_transform_for(record.splits, record.space)
    x = torch.stack([tf(images.image(i)) for i in range(len(images))])
    with torch.no_grad():
        logits = sub(resize(x, arch.resolution))
    return record.evaluate(sub, arch.resolution, images), logits


def test_agrees_with_the_extracted_subnet_oracle(record):
    space = record.space
    rng = random.Random(7)
    archs = [space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(4)]
    evaluator = SubnetEvaluator.from_run(record)
    for split in ("val", "test"):
        images = getattr(record.splits, split)
        fast = evaluator.accuracy(archs, split)
        for arch, accuracy in zip(archs, fast):
            expected, logits = _oracle(record, arch, images)
            assert accuracy == expected, (split, str(arch))
            torch.testing.assert_close(evaluator.logits(arch, split), logits, **tolerance(torch.float32))


def test_leaves_the_network_untouched(record):
    net = record.net
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    active = net.active_arch
    evaluator = SubnetEvaluator.from_run(record)
    evaluator.accuracy([record.space.min_arch(), record.space.sample(3)], "val")
    evaluator.logits(record.space.sample(4), "test")
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert net.active_arch == active
    assert all(m.training for m in net.modules())


def test_memoises_by_arch_and_split_and_takes_codes(record):
    space = record.space
    evaluator = SubnetEvaluator.from_run(record)
    archs = [space.sample(i) for i in range(3)]
    first = evaluator.accuracy(archs + archs[:1], "val")
    assert first[0] == first[3] and evaluator.evaluations == 3
    again = evaluator.accuracy(space.encode(archs), "val")  # int codes, all memoised
    assert evaluator.evaluations == 3 and np.array_equal(again, first[:3])
    evaluator.accuracy(archs[:1], "test")
    assert evaluator.evaluations == 4
    assert evaluator.accuracy(archs[0], "val").shape == (1,)


def test_bad_splits_are_explained(record):
    evaluator = SubnetEvaluator.from_run(record, ("test",))
    with pytest.raises(ValueError, match="split must be one of"):
        evaluator.accuracy([record.space.max_arch()], "val")
    saved, record.splits.val = record.splits.val, None
    try:
        evaluator = SubnetEvaluator.from_run(record)
        with pytest.raises(ValueError, match="--val-per-class"):
            evaluator.accuracy([record.space.max_arch()], "val")
    finally:
        record.splits.val = saved
    with pytest.raises(ValueError, match="splits must name labelled splits"):
        SubnetEvaluator.from_run(record, ("unlabelled",))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        SubnetEvaluator.from_run(record, batch_size=0)


def test_small_evaluation_batches_give_the_same_accuracy(record):
    archs = [record.space.sample(i) for i in range(3)]
    big = SubnetEvaluator.from_run(record).accuracy(archs, "test")
    small = SubnetEvaluator.from_run(record, batch_size=7, cache_resolutions=1).accuracy(archs, "test")
    assert np.array_equal(big, small)


def test_batch_statistics_recalibration_matches_recalibrate_bn(record):
    from tofa_fast.nn import recalibrate_bn
    from tofa_fast.search.evaluator import recalibrate_from_batch_statistics

    arch = record.space.sample(11)
    batches = record.calibration_batches(arch.resolution, batch_size=16)  # several, of unequal size
    reference, fast = record.net.extract(arch), record.net.extract(arch)
    recalibrate_bn(reference, batches)
    with torch.inference_mode():
        recalibrate_from_batch_statistics(fast, batches)
    assert not any(m.training for m in fast.modules())
    bns = [(a, b) for a, b in zip(reference.modules(), fast.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert bns and all(b.momentum == a.momentum for a, b in bns)
    for a, b in bns:
        torch.testing.assert_close(b.running_mean, a.running_mean, **tolerance(torch.float32))
        torch.testing.assert_close(b.running_var, a.running_var, **tolerance(torch.float32))
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate_from_batch_statistics(fast, [])


def test_results_do_not_depend_on_the_layout_the_weights_are_in(record):
    """Training leaves the weights channels-last; a checkpoint loads them contiguous. The evaluator
    computes in its own layout either way, so both give the same logits, bit for bit."""
    arch = record.space.sample(5)
    net = record.net
    try:
        net.to(memory_format=torch.channels_last)
        from_channels_last = SubnetEvaluator.from_run(record).logits(arch, "test")
        assert not all(p.is_contiguous() for p in net.parameters())  # some really are channels-last
        net.to(memory_format=torch.contiguous_format)
        from_contiguous = SubnetEvaluator.from_run(record).logits(arch, "test")
    finally:
        net.to(memory_format=torch.contiguous_format)
    assert torch.equal(from_channels_last, from_contiguous)
