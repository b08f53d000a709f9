"""The RSS paper's ablations (its Figs. 5–7) as options of strategy ``rss`` (issue 15, item 5):
each option is checked for exactly what the strategy's plans sample, epoch by epoch, step by step."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from test_train_preemption import _final, _signal_at
from test_train_run import tiny_config, tiny_digits

import tofa_fast
from tofa_fast.cli import main
from tofa_fast.train import TrainConfig, Trainer
from tofa_fast.train.loaders import epoch_seed
from tofa_fast.train.preemption import TrainingStopped
from tofa_fast.train.strategies import build_strategy, middle_arch

SPACE = tofa_fast.spaces.get("digits")
SEED, EPOCHS, STEPS = 3, 5, 4


def _rss(**options):
    config = TrainConfig(strategy="rss", seed=SEED, epochs=EPOCHS, **options).resolved()
    return build_strategy("rss", SPACE, EPOCHS, STEPS, config)


def _sampled(strategy) -> list[list[list]]:
    """The archs of every step's plan, per epoch, as the trainer draws them (the epoch's RNG)."""
    net = torch.nn.Linear(1, 1)  # rss touches neither the network nor the optimizer
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    epochs = []
    for epoch in range(EPOCHS):
        rng = random.Random(epoch_seed(SEED, epoch))
        strategy.on_epoch_start(epoch, rng, net, optimizer)
        plans = [strategy.plan(rng) for _ in range(STEPS)]
        assert all(m.sup and m.indexed and not (m.fm or m.kd or m.teacher_kd) for p in plans for m in p.members)
        epochs.append([p.archs for p in plans])
    return epochs


def _uniform_draws(epoch: int, n: int) -> list:
    rng = random.Random(epoch_seed(SEED, epoch))
    return [SPACE.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("subnets", [1, 2])
def test_per_epoch_draws_train_the_same_subnets_all_epoch(subnets):
    sampled = _sampled(_rss(rss_subnets=subnets))
    for epoch, steps in enumerate(sampled):
        assert all(archs == _uniform_draws(epoch, subnets) for archs in steps)  # the epoch RNG's first draws
    assert len({str(steps[0]) for steps in sampled}) == EPOCHS


@pytest.mark.parametrize("subnets", [1, 2])
def test_per_batch_draws_differ_step_by_step_and_follow_seed_epoch_step(subnets):
    sampled = _sampled(_rss(rss_every="batch", rss_subnets=subnets))
    for epoch, steps in enumerate(sampled):
        draws = _uniform_draws(epoch, STEPS * subnets)  # step s takes the epoch RNG's draws after step s-1's
        assert steps == [draws[s * subnets : (s + 1) * subnets] for s in range(STEPS)]
        assert len({str(archs) for archs in steps}) == STEPS
    assert sampled == _sampled(_rss(rss_every="batch", rss_subnets=subnets))


@pytest.mark.parametrize(
    "scheme,largest_in",
    [
        ("largest", {0, 1, 2, 3, 4}),
        ("smallest", set()),
        ("max-then-min", {0, 1, 2}),  # epochs e < E/2 = 2.5
        ("min-then-max", {3, 4}),
        ("alternating", {0, 2, 4}),
    ],
)
def test_fixed_schemes_train_max_or_min_by_epoch(scheme, largest_in):
    for epoch, steps in enumerate(_sampled(_rss(rss_scheme=scheme))):
        expected = SPACE.max_arch() if epoch in largest_in else SPACE.min_arch()
        assert all(archs == [expected] for archs in steps), (scheme, epoch)


def test_middle_is_the_middle_choice_of_every_dimension():
    assert all(archs == [middle_arch(SPACE)] for steps in _sampled(_rss(rss_scheme="middle")) for archs in steps)
    space = tofa_fast.spaces.get("ofa_mbv3")  # the paper's space: kernel 5, expand 4, depth 3
    arch = middle_arch(space)
    elastic = [sa for st, sa in zip(space.stages, arch.stages) if len(st.depths) > 1]  # not the fixed first
    assert len(elastic) == 5 and all(
        sa.depth == 3 and set(sa.kernel) == {5} and set(sa.expand) == {4} for sa in elastic
    )
    assert arch.resolution == sorted(space.resolutions)[len(space.resolutions) // 2]
    digits = middle_arch(SPACE)
    for st, sa in zip(SPACE.stages, digits.stages):
        assert sa.depth == sorted(st.depths)[len(st.depths) // 2]
        assert sa.width == sorted(st.widths)[len(st.widths) // 2]


def test_constant_learning_rate_is_flat_after_the_warm_up():
    rss = _rss(lr_schedule="constant", warmup_epochs=1)
    assert [rss.lr_factor(s) for s in range(EPOCHS * STEPS)] == [0.25, 0.5, 0.75] + [1.0] * (EPOCHS * STEPS - 3)
    assert _rss().lr_factor(EPOCHS * STEPS - 1) < 0.1  # the default decays (cosine)
    ps = build_strategy("ps", SPACE, 590, 1, TrainConfig(strategy="ps", lr_schedule="constant").resolved())
    for phase in ps.phases:  # each phase flat at its OFA ratio once warmed up
        assert ps.lr_factor(phase.start + phase.epochs - 1) == pytest.approx(phase.lr_scale)


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(strategy="tofa", rss_every="batch"), "rss_every is an option of strategy 'rss'"),
        (dict(strategy="ps", rss_scheme="smallest"), "rss_scheme is an option of strategy 'rss'"),
        (dict(strategy="single", rss_subnets=2), "rss_subnets is an option of strategy 'rss'"),
        (dict(strategy="rss", rss_scheme="largest", rss_subnets=2), "rss_subnets > 1 needs rss_scheme 'random'"),
        (dict(strategy="rss", rss_scheme="alternating", rss_every="batch"), "rss_every 'batch' needs rss_scheme"),
        (dict(strategy="rss", rss_scheme="max"), "rss_scheme must be one of"),
        (dict(strategy="rss", rss_every="step"), "rss_every must be one of"),
        (dict(strategy="rss", rss_subnets=0), "rss_subnets must be a positive integer"),
    ],
)
def test_options_are_refused_where_they_mean_nothing(kw, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kw).resolved()


def test_the_cli_records_the_options(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("tofa_fast.train.run.train", lambda config, resume=False: seen.append(config.resolved()))
    flags = "--strategy rss --rss-every batch --rss-subnets 2 --lr-schedule constant"
    assert main(["train", "--out", str(tmp_path), *flags.split()]) == 0
    (c,) = seen
    assert (c.rss_every, c.rss_subnets, c.rss_scheme, c.lr_schedule) == ("batch", 2, "random", "constant")
    assert main(["train", "--out", str(tmp_path), "--rss-scheme", "smallest"]) == 2  # strategy tofa
    assert "rss_scheme is an option of strategy 'rss'" in capsys.readouterr().err


def test_per_batch_draws_resume_mid_epoch_exactly(tmp_path):
    splits = tiny_digits()  # 2 steps per epoch (labelled passes of 8)
    config = replace(tiny_config(tmp_path / "a", strategy="rss", rss_every="batch", rss_subnets=2), epochs=1)
    straight = Trainer(config, splits=splits)
    straight.fit()
    stopped = Trainer(replace(config, out=str(tmp_path / "b")), splits=splits)
    _signal_at(stopped, 1)  # mid-epoch: step 2's draws come from the RNG state in the checkpoint
    with pytest.raises(TrainingStopped):
        stopped.fit()
    resumed = Trainer(replace(config, out=str(tmp_path / "b")), splits=splits, resume=True)
    resumed.fit()
    a, b = _final(straight), _final(resumed)
    assert a["step"] == b["step"] == 2 and a["selection"] == b["selection"]
    assert len(a["selection"]) == 4  # 2 steps of 2 fresh subnets each
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
