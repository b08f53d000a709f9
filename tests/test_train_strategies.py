"""Strategies rss, ps and single (SPEC §7): what each trains, its schedule, resume, selection."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

import pytest
import torch
from test_train_run import tiny_config, tiny_digits

import tofa_fast
from tofa_fast.train import TrainConfig, Trainer, load_checkpoint
from tofa_fast.train.loaders import epoch_seed
from tofa_fast.train.palette import build_palette
from tofa_fast.train.run import _estimator
from tofa_fast.train.strategies import PS_PHASES, build_strategy, restrict, share_epochs


def _config(out, strategy, epochs, **kw) -> TrainConfig:
    return replace(tiny_config(out, strategy=strategy, **kw), epochs=epochs)


def _record_steps(trainer):
    """Wrap train_step to record the archs of every step."""
    seen, original = [], trainer.train_step

    def spy(labelled, unlabelled, plan):
        seen.append((trainer.epoch, plan.archs))
        return original(labelled, unlabelled, plan)

    trainer.train_step = spy
    return seen


def test_rss_trains_one_random_subnet_per_epoch_with_ce_only(tmp_path):
    trainer = Trainer(_config(tmp_path, "rss", 3), splits=tiny_digits())
    assert trainer.config.loss == "sup" and not trainer.strategy.use_fm
    seen = _record_steps(trainer)
    trainer.fit()
    per_epoch = {}
    for epoch, archs in seen:
        assert len(archs) == 1
        per_epoch.setdefault(epoch, set()).add(str(archs[0]))
    assert all(len(v) == 1 for v in per_epoch.values())  # one subnet for the whole epoch
    assert len(set().union(*per_epoch.values())) == 3  # a new draw every epoch
    # the epoch's subnet is the first draw of the epoch's RNG
    space = trainer.space
    for epoch, keys in per_epoch.items():
        assert keys == {str(space.sample(random.Random(epoch_seed(trainer.config.seed, epoch))))}
    # Algorithm 2 index: every step of an epoch adds its 1-based iteration to that epoch's subnet
    spe = trainer.steps_per_epoch
    for epoch, keys in per_epoch.items():
        (key,) = keys
        assert trainer.selection[key] == sum(range(epoch * spe + 1, (epoch + 1) * spe + 1))


def test_strategies_refuse_losses_they_do_not_train_with(tmp_path):
    with pytest.raises(ValueError, match="loss 'sup\\+fm' is not available with strategy 'rss'"):
        TrainConfig(strategy="rss", loss="sup+fm").resolved()
    with pytest.raises(ValueError, match="strategy 'ps'"):
        TrainConfig(strategy="ps", loss="sup+kd").resolved()
    with pytest.raises(ValueError, match="strategy 'single'"):
        TrainConfig(strategy="single", loss="sup+fm+kd").resolved()
    with pytest.raises(ValueError, match="arch fixes the subnet of strategy 'single'"):
        TrainConfig(strategy="tofa", arch="whatever").resolved()
    assert TrainConfig(strategy="single").resolved().loss == "sup+fm"  # digits has unlabelled data
    assert TrainConfig(strategy="ps").resolved().loss == "sup"
    with pytest.raises(ValueError, match="epochs must be at least 6 for strategy 'ps'"):
        Trainer(_config(tmp_path, "ps", 5), splits=tiny_digits())


def test_share_epochs_keeps_ofa_proportions():
    assert share_epochs(590) == [180, 120, 25, 120, 25, 120]
    assert share_epochs(25) == [8, 5, 1, 5, 1, 5]
    for total in range(6, 80):
        counts = share_epochs(total)
        assert sum(counts) == total and min(counts) >= 1


def test_progressive_shrinking_phases_sample_their_subspaces():
    space = tofa_fast.spaces.get("digits")
    strategy = build_strategy("ps", space, 12, 4, TrainConfig(strategy="ps").resolved())
    rng = random.Random(0)
    top = {
        "kernels": lambda st, k: sorted(st.kernels)[-k:],
        "depths": lambda st, k: sorted(st.depths)[-k:],
    }
    for index, phase in enumerate(strategy.phases):
        strategy.phase_index = index
        resolutions_seen = set()
        for _ in range(30):
            archs = strategy.plan(rng).archs
            assert len(archs) == phase.subnets == (1, 1, 2, 2, 4, 4)[index]
            assert len({a.resolution for a in archs}) == 1  # OFA: one image size per step
            resolutions_seen.add(archs[0].resolution)
            for arch in archs:
                assert space.check(arch) == arch
                if phase.resolutions == 1:
                    assert arch.resolution == max(space.resolutions)
                for st, sa in zip(space.stages, arch.stages):
                    if phase.kernels is not None:
                        assert set(sa.kernel) <= set(top["kernels"](st, phase.kernels))
                    if phase.depths is not None:
                        assert sa.depth in top["depths"](st, phase.depths)
                    if phase.expands is not None:
                        assert all(e in sorted(st.expands)[-phase.expands :] for e in sa.expand)
                    if phase.widths is not None:
                        assert sa.width in sorted(st.widths)[-phase.widths :]
        assert resolutions_seen == (set(space.resolutions) if phase.resolutions is None else {max(space.resolutions)})
    # the last phase reaches every choice: the min arch is in its sub-space
    assert restrict(space, PS_PHASES[-1]) == space
    assert restrict(space, PS_PHASES[0]).max_arch() == space.max_arch()
    assert restrict(space, PS_PHASES[0]).min_arch() == space.max_arch()


def test_progressive_shrinking_schedule_teacher_and_resume(tmp_path):
    splits = tiny_digits()
    # epochs of passes over the 40 unlabelled images: 5 steps, enough for each phase's cosine to decay
    unit = "unlabelled"
    straight = Trainer(_config(tmp_path / "a", "ps", 6, epoch_unit=unit), splits=splits)
    # per-phase schedule: a fresh cosine per phase, scaled by OFA's LR ratios
    spe = straight.steps_per_epoch
    factors = [straight.strategy.lr_factor(s) for s in range(6 * spe)]
    for phase in straight.strategy.phases:
        first = phase.start * spe
        # warm-up where OFA has one: config.warmup_epochs in the full phase, 5/120 of the phase
        # (here less than a step: one step) in the kernel, depth-2 and expand-2 phases
        warmup_steps = spe if phase.start == 0 else 1
        expected = phase.lr_scale * (1.0 / warmup_steps if phase.warmup else 1.0)
        assert phase.warmup == (phase.name in ("full", "kernel", "depth-2", "expand-2"))
        assert factors[first] == pytest.approx(expected)
        assert factors[first + phase.epochs * spe - 1] < factors[first] or phase.start == 0
    seen = _record_steps(straight)
    straight.fit()
    assert straight.strategy.teacher() is not None
    # the full phase trains only the max subnet at the largest resolution
    assert all(archs == [straight.space.max_arch()] for epoch, archs in seen if epoch == 0)
    # KD from the frozen full net is logged from the kernel phase on
    state = load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    assert "teacher" in state["strategy"]
    teacher_at_end = straight.strategy.teacher().state_dict()
    # resume across phase boundaries (teacher copy, channel re-sort, optimizer reset) is exact
    first = Trainer(_config(tmp_path / "b", "ps", 6, epoch_unit=unit), splits=splits)
    first.fit(max_epochs=4)  # stops after depth-2, right before the first channel re-sort
    resumed = Trainer(_config(tmp_path / "b", "ps", 6, epoch_unit=unit), splits=splits, resume=True)
    resumed.fit()
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    for key, value in teacher_at_end.items():
        assert torch.equal(value, resumed.strategy.teacher().state_dict()[key]), key
    assert resumed.selection.state_dict() == straight.selection.state_dict()


def test_single_trains_one_arch_and_its_palette_is_that_arch(tmp_path):
    space = tofa_fast.spaces.get("digits")
    arch = space.sample(5)
    trainer = Trainer(_config(tmp_path, "single", 1, arch=arch.to_json()), splits=tiny_digits())
    seen = _record_steps(trainer)
    trainer.fit()
    assert all(archs == [arch] for _, archs in seen)
    assert trainer.selection.archs() == [arch]
    palette = build_palette(trainer.run(), _estimator(trainer.run()), progress=False)
    assert [e["arch"] for e in palette] == [arch.to_dict()]
    # the canonical string form works too; a foreign arch is refused with the space named
    assert Trainer(_config(tmp_path / "s", "single", 1, arch=str(arch)), splits=tiny_digits()).strategy.arch == arch
    with pytest.raises(ValueError, match="is not a subnet of space 'digits'"):
        Trainer(_config(tmp_path / "t", "single", 1, arch="r999-nonsense"), splits=tiny_digits())


def test_freeze_bn_keeps_running_statistics(tmp_path):
    trainer = Trainer(_config(tmp_path, "rss", 1, loss="sup", freeze_bn=True), splits=tiny_digits())
    before = {k: v.clone() for k, v in trainer.net.state_dict().items() if "running" in k}
    trainer.fit()
    after = trainer.net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_cli_strategies_search_and_population_on_an_image_folder(tmp_path, capsys):
    from test_train_run import _write_folder

    from tofa_fast.cli import main

    data = _write_folder(tmp_path / "data", per_class=8)
    common = ["--data", data, "--space", "digits", "--batch-size", "4", "--device", "cpu", "--val-per-class", "2"]
    ps_run, single_run = str(tmp_path / "ps"), str(tmp_path / "single")
    assert main(["train", "--strategy", "ps", "--epochs", "6", "--out", ps_run, *common]) == 0
    arch = tofa_fast.spaces.get("digits").sample(3)
    assert (
        main(["train", "--strategy", "single", "--arch", str(arch), "--epochs", "1", "--out", single_run, *common]) == 0
    )
    assert json.load(open(os.path.join(single_run, "palette.json")))[0]["arch"] == arch.to_dict()
    capsys.readouterr()

    argv = ["search", ps_run, "--budgets", "2", "--population", "4", "--generations", "1"]
    assert main(argv) == 0
    assert "evolution" in capsys.readouterr().out
    assert os.path.getsize(os.path.join(ps_run, "search.json")) > 0

    argv = ["evaluate", ps_run, "--population", "2", "--targets", "2", "--band", "0.2"]
    assert main(argv) == 0
    assert "mean" in capsys.readouterr().out
    for name in ("population.json", "population.md", "population.png"):
        assert os.path.getsize(os.path.join(ps_run, name)) > 0

    # a run without a validation split cannot be searched on validation accuracy
    plain = str(tmp_path / "plain")
    assert main(["train", "--strategy", "rss", "--epochs", "1", "--out", plain, *common[:-2]]) == 0
    capsys.readouterr()
    assert main(["search", plain]) == 2
    assert "--val-per-class" in capsys.readouterr().err


def test_progressive_shrinking_warms_up_and_teaches_as_ofa():
    space = tofa_fast.spaces.get("digits")
    strategy = build_strategy("ps", space, 590, 1, TrainConfig(strategy="ps").resolved())
    phases = {p.name: p for p in strategy.phases}  # 180 / 120 / 25 / 120 / 25 / 120 epochs of 1 step
    kernel = phases["kernel"].start
    assert [strategy.lr_factor(kernel + i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert strategy.lr_factor(phases["depth-1"].start) == pytest.approx(phases["depth-1"].lr_scale)  # no warm-up
    assert strategy.lr_factor(phases["expand-2"].start) == pytest.approx(phases["expand-2"].lr_scale / 5)
    # the frozen teacher normalises with batch statistics (OFA never sets it to eval), without dropout
    net = tofa_fast.Supernet(space, 10)
    strategy.on_epoch_start(kernel, random.Random(0), net, torch.optim.SGD(net.parameters(), lr=0.1))
    teacher = strategy.teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        a, b = teacher(x), teacher(x[:3])
    assert not torch.allclose(a[:3], b)  # batch statistics: the batch matters
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # nothing updated
    assert not any(p.requires_grad for p in teacher.parameters())
