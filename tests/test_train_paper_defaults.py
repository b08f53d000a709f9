"""Strategy defaults follow their papers (issue 15, item 4): the knobs each paper turns default, per
strategy, to the values of ``STRATEGY_DEFAULTS``; explicit values win; the README shows that table."""

from __future__ import annotations

import os
import re
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
from test_train_run import tiny_config, tiny_digits

from tofa_fast.cli import build_parser, main
from tofa_fast.train import TrainConfig, Trainer
from tofa_fast.train.config import STRATEGIES, STRATEGY_DEFAULTS, STRATEGY_KNOB_FLAGS, strategy_defaults_table

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_every_strategy_names_every_knob_and_none_means_the_strategys_value():
    knobs = set(STRATEGY_DEFAULTS["tofa"])
    assert set(STRATEGY_DEFAULTS) == set(STRATEGIES)
    assert all(set(values) == knobs for values in STRATEGY_DEFAULTS.values())
    assert all(f.default is None for f in fields(TrainConfig) if f.name in knobs)
    for strategy, values in STRATEGY_DEFAULTS.items():
        resolved = TrainConfig(strategy=strategy).resolved()
        assert {k: getattr(resolved, k) for k in knobs} == values, strategy


def test_rss_and_ps_take_their_papers_values():
    rss = TrainConfig(strategy="rss").resolved()  # RSS §6.1
    assert (rss.lr, rss.batch_size, rss.momentum, rss.label_smoothing, rss.warmup_epochs) == (0.01, 64, 0.9, 0, 0)
    assert (rss.weight_decay, rss.nesterov, rss.dropout, rss.drop_connect) == (3e-5, True, 0.1, 0)  # OFA's
    assert rss.epoch_unit == "labelled" and rss.lr_schedule == "cosine"
    ps = TrainConfig(strategy="ps").resolved()  # OFA's train_ofa_net.py
    assert (ps.lr, ps.batch_size, ps.momentum, ps.nesterov, ps.weight_decay) == (0.03, 64, 0.9, True, 3e-5)
    assert (ps.label_smoothing, ps.dropout, ps.drop_connect, ps.epoch_unit) == (0.1, 0.1, 0, "labelled")
    tofa = TrainConfig().resolved()  # unchanged: SPEC §7
    assert (tofa.lr, tofa.batch_size, tofa.weight_decay, tofa.label_smoothing, tofa.drop_connect) == (
        0.05,
        32,
        5e-4,
        0.1,
        0.05,
    )
    assert tofa.epoch_unit == "unlabelled"


def test_explicit_values_win():
    explicit = dict(
        lr=0.2, batch_size=16, nesterov=False, label_smoothing=0.2, warmup_epochs=3, epoch_unit="unlabelled"
    )
    c = TrainConfig(strategy="rss", **explicit).resolved()
    assert {k: getattr(c, k) for k in explicit} == explicit
    assert c.weight_decay == 3e-5  # the knobs left alone still take the paper's value
    assert TrainConfig(strategy="tofa", label_smoothing=0.0).resolved().label_smoothing == 0.0


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(epoch_unit="epoch"), "epoch_unit must be one of"),
        (dict(lr_schedule="step"), "lr_schedule must be one of"),
        (dict(momentum=0.0), "nesterov needs momentum > 0"),
        (dict(nesterov="yes"), "nesterov must be True or False"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_knobs_are_refused_by_name(kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        TrainConfig(strategy="rss", **kw).resolved()
    assert TrainConfig(strategy="rss", momentum=0.0, nesterov=False).resolved().momentum == 0.0


def test_the_readme_table_is_the_data_table():
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Strategies") :]
    section = section[: section.index("\n## ", 1)]
    start = section.index("| knob |")
    table = section[start : section.index("\n\n", start)]
    assert table == strategy_defaults_table()
    assert [line.split(" | ")[0][3:-1] for line in table.splitlines()[2:-1]] == list(STRATEGY_KNOB_FLAGS.values())


@pytest.mark.parametrize("unit,pool", [("labelled", "labelled"), ("unlabelled", "unlabelled")])
def test_steps_per_epoch_follow_the_epoch_unit(unit, pool):
    splits = tiny_digits()  # 20 labelled images, 40 unlabelled
    config = TrainConfig(strategy="rss", batch_size=8, epoch_unit=unit).resolved()
    trainer = SimpleNamespace(config=config, splits=splits)
    assert Trainer._steps_per_epoch(trainer) == len(getattr(splits, pool)) // 8
    splits.unlabelled = None  # no pool: a pass over the labelled images whatever the unit
    assert Trainer._steps_per_epoch(trainer) == len(splits.labelled) // 8


def test_rss_counts_labelled_passes_and_records_what_it_resolved(tmp_path):
    trainer = Trainer(replace(tiny_config(tmp_path, strategy="rss"), epochs=1), splits=tiny_digits())
    assert trainer.steps_per_epoch == len(trainer.splits.labelled) // 8 == 2
    recorded = trainer.state_dict()["config"]
    assert recorded["lr"] == 0.01 and recorded["epoch_unit"] == "labelled" and recorded["label_smoothing"] == 0.0
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * trainer.strategy.lr_factor(0))


def test_a_checkpoint_from_before_epoch_unit_keeps_counting_unlabelled_passes():
    old = TrainConfig(strategy="rss").resolved().to_dict()
    del old["epoch_unit"]
    assert TrainConfig.from_dict(old).resolved().epoch_unit == "unlabelled"


def test_the_cli_leaves_the_knobs_to_the_strategy(tmp_path, monkeypatch, capsys):
    args = build_parser().parse_args(["train"])
    assert all(getattr(args, name) is None for name in STRATEGY_DEFAULTS["tofa"])
    seen = []
    monkeypatch.setattr("tofa_fast.train.run.train", lambda config, resume=False: seen.append(config.resolved()))
    assert main(["train", "--out", str(tmp_path), "--strategy", "rss"]) == 0
    assert (
        main(["train", "--out", str(tmp_path), "--strategy", "rss", "--lr", "0.1", "--epoch-unit", "unlabelled"]) == 0
    )
    assert (seen[0].lr, seen[0].batch_size, seen[0].epoch_unit) == (0.01, 64, "labelled")
    assert (seen[1].lr, seen[1].batch_size, seen[1].epoch_unit) == (0.1, 64, "unlabelled")
    assert "the strategy's (see README)" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()
