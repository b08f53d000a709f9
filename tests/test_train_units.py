"""TOFA loss terms, sandwich set and the zero-cost selection rule on hand-made inputs (SPEC §7)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import tofa_fast
from tofa_fast.train import SelectionIndex, TrainConfig, losses, select_subnet


def test_supervised_loss_is_label_smoothed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    p = torch.softmax(logits, 1)[0]
    # ε = 0.1 over 3 classes: target 0.9 + 0.1/3 on the label, 0.1/3 elsewhere
    target = torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    expected = -(target * p.log()).sum()
    assert losses.supervised_loss(logits, torch.tensor([0]), 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pseudo_labels_threshold_and_argmax():
    teacher = torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 5.0]])
    pseudo = losses.pseudo_labels(teacher, threshold=0.95)
    assert pseudo.labels.tolist() == [0, 0, 1]
    assert pseudo.mask.tolist() == [1.0, 0.0, 1.0]  # softmax(0.1, 0) ≈ 0.525 < τ; softmax(0, 5) ≈ 0.9933 ≥ τ
    torch.testing.assert_close(pseudo.probs.sum(1), torch.ones(3))


def test_fixmatch_loss_masks_and_averages_over_all_samples():
    pseudo = losses.PseudoLabels(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    strong = torch.tensor([[0.0, 0.0], [3.0, -3.0]])
    # sample 0: CE = ln 2, kept; sample 1 masked out; mean over 2 samples
    assert losses.fixmatch_loss(strong, pseudo).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_distillation_loss_is_kl_teacher_to_student():
    q = torch.tensor([[0.75, 0.25]])
    pseudo = losses.PseudoLabels(q, torch.tensor([0]), torch.tensor([1.0]))
    student = torch.tensor([[0.0, 0.0]])  # p = (0.5, 0.5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.distillation_loss(student, pseudo).item() == pytest.approx(expected, rel=1e-6)
    assert losses.distillation_loss(q.log(), pseudo).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "loss, terms",
    [("sup", (False, False)), ("sup+kd", (False, True)), ("sup+fm", (True, False)), ("sup+fm+kd", (True, True))],
)
def test_loss_variants(loss, terms):
    assert losses.variant_terms(loss) == terms


def test_unknown_loss_variant_is_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.variant_terms("sup+magic")
    with pytest.raises(ValueError, match="strategy must be one of"):
        TrainConfig(strategy="magic").resolved()
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        TrainConfig(epochs=0).resolved()


def test_selection_index_follows_algorithm_2():
    space = tofa_fast.spaces.get("digits")
    a, b, c = space.max_arch(), space.min_arch(), space.sample(1)
    index = SelectionIndex(space)
    index.update([a, b, c], 1)  # I(a)=1, I(b)=1, I(c)=1
    index.update([a, b], 2)  # I(a)=3, I(b)=3
    index.update([a, c], 3)  # I(a)=6, I(c)=4
    assert (index[a], index[b], index[c]) == (6, 3, 4)
    flops = {str(a): 100.0, str(b): 10.0, str(c): 50.0}

    def metric(archs):
        return [flops[str(x)] for x in archs]

    assert index.select(metric, 1000) == a
    assert index.select(metric, 60) == c  # I(c)=4 > I(b)=3
    assert index.select(metric, 20) == b
    with pytest.raises(ValueError, match="smallest available is 10"):
        index.select(metric, 5)
    restored = SelectionIndex(space, index.state_dict())
    assert restored.state_dict() == index.state_dict()
    with pytest.raises(ValueError, match="iteration is 1-based"):
        index.update([a], 0)


def test_select_subnet_handles_the_fixed_sandwich_members():
    space = tofa_fast.spaces.get("digits")
    big, small = space.max_arch(), space.min_arch()
    mid_old, mid_new, mid_bigger = space.sample(1), space.sample(2), space.sample(3)
    flops = {str(big): 100.0, str(small): 10.0, str(mid_old): 40.0, str(mid_new): 45.0, str(mid_bigger): 70.0}

    def metric(archs):
        return [flops[str(x)] for x in archs]

    index = SelectionIndex(space)
    index.update([mid_old, mid_bigger], 1)
    index.update([mid_new, mid_old], 2)  # I: old 3, new 2, bigger 1
    assert select_subnet(index, metric, 150) == big
    assert select_subnet(index, metric, 99) == mid_old  # highest index that fits
    assert select_subnet(index, metric, 42) == mid_old
    assert select_subnet(index, metric, 39) == small  # nothing sampled fits; a_min does
    with pytest.raises(ValueError, match="smallest available is 10"):
        select_subnet(index, metric, 9)
    index.update([mid_new], 3)  # new: 5 > old: 3
    assert select_subnet(index, metric, 99) == mid_new


def test_sandwich_set_composition():
    from tofa_fast.train.strategies import build_strategy

    space = tofa_fast.spaces.get("digits")
    strategy = build_strategy("tofa", space, 10, 5, TrainConfig().resolved())
    rng = random.Random(0)
    sets = [strategy.plan(rng).archs for _ in range(20)]
    assert all(s[0] == space.max_arch() and s[1] == space.min_arch() and len(s) == 4 for s in sets)
    assert len({str(s[2]) for s in sets} | {str(s[3]) for s in sets}) > 20  # random members vary
