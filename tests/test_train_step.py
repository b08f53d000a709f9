"""The step seam (train/plan.py, train/step.py): roles are explicit, the step makes no host sync,
the members' logits come from one table, and old checkpoints still resume."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from test_train_run import tiny_config, tiny_digits

import tofa_fast
from tofa_fast.train import Member, Run, StepPlan, TrainConfig, Trainer, load_checkpoint
from tofa_fast.train.checkpoint import save_atomic
from tofa_fast.train.step import STEP_TABLE, choose_step_backend, describe_step_backends, forward_members
from tofa_fast.train.strategies import build_strategy

SPACE = tofa_fast.spaces.get("digits")


def _strategy(name: str, loss: str | None = None, epochs: int = 12):
    return build_strategy(name, SPACE, epochs, 4, TrainConfig(strategy=name, loss=loss, epochs=epochs).resolved())


@pytest.mark.parametrize("loss", ["sup", "sup+kd", "sup+fm", "sup+fm+kd"])
def test_tofa_plan_names_each_members_role(loss):
    plan = _strategy("tofa", loss).plan(random.Random(0))
    fm, kd = "fm" in loss, "kd" in loss
    assert plan.archs[:2] == [SPACE.max_arch(), SPACE.min_arch()] and len(plan.members) == 4
    assert all(m.sup and m.fm == fm and not m.teacher_kd for m in plan.members)
    assert [m.kd for m in plan.members] == [False, False, kd, kd]  # only the random members distil
    assert plan.indexed_archs == plan.archs[2:]  # a_max and a_min are handled apart (selection.py)
    assert plan.pseudo_label_teacher == (SPACE.max_arch() if fm or kd else None)


def test_other_strategies_plans():
    single = _strategy("single").plan(random.Random(0))  # digits has unlabelled data: sup+fm
    (member,) = single.members
    assert member.fm and not member.kd and single.pseudo_label_teacher == member.arch == SPACE.max_arch()
    assert _strategy("single", "sup").plan(random.Random(0)).pseudo_label_teacher is None

    ps = _strategy("ps")
    net = tofa_fast.Supernet(SPACE, 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    ps.on_epoch_start(0, random.Random(0), net, optimizer)
    assert not any(m.teacher_kd for m in ps.plan(random.Random(0)).members)  # no teacher in the full phase
    ps.on_epoch_start(ps.phases[1].start, random.Random(0), net, optimizer)
    plan = ps.plan(random.Random(0))
    assert ps.teacher() is not None and all(m.teacher_kd and m.indexed for m in plan.members)
    assert plan.pseudo_label_teacher is None


def test_step_plan_validates_roles():
    with pytest.raises(ValueError, match="at least one member"):
        StepPlan(())
    with pytest.raises(ValueError, match="need a pseudo_label_teacher"):
        StepPlan((Member(SPACE.min_arch(), fm=True),))


def test_step_table_and_forward_members():
    net = tofa_fast.Supernet(SPACE, 10).eval()
    # auto takes an entry only where it was measured faster: the shared step on the CPU, the
    # fused one nowhere yet; the sequential step everywhere else.
    assert choose_step_backend("auto", net, torch.device("cpu")).name == "shared"
    sequential = choose_step_backend("auto", net, torch.device("cuda"))
    assert sequential.name == "sequential" and choose_step_backend("sequential", net, torch.device("cpu")) is sequential
    backend = choose_step_backend("fused", net, torch.device("cpu"))
    assert backend is STEP_TABLE[0] and backend.name == "fused"
    with pytest.raises(ValueError, match="step must be 'auto' or one of"):
        choose_step_backend("warp", net, torch.device("cpu"))
    assert {line.split()[0] for line in describe_step_backends()} == {"fused", "shared", "graphed", "sequential"}
    archs = [SPACE.max_arch(), SPACE.min_arch(), SPACE.sample(3)]
    images = [torch.randn(2 + i, 3, a.resolution, a.resolution) for i, a in enumerate(archs)]
    with torch.no_grad():
        got = forward_members(net, archs, images, sequential)
        for arch, x, logits in zip(archs, images, got):
            net.set_active(arch)
            assert torch.equal(net(x), logits)
        fused = forward_members(net, archs, images, backend)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(fused, got))
    with pytest.raises(ValueError, match="same length"):
        forward_members(net, archs, images[:1])


class _HostSyncCounter:
    """Counts the ways a tensor reaches a Python scalar (each one a device → host sync on CUDA)."""

    names = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.names:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("strategy", ["tofa", "ps"])
def test_the_step_makes_no_host_sync(tmp_path, monkeypatch, strategy):
    epochs = 6 if strategy == "ps" else 1
    trainer = Trainer(replace(tiny_config(tmp_path, strategy=strategy), epochs=epochs), splits=tiny_digits())
    rng = random.Random(0)
    trainer.strategy.on_epoch_start(
        trainer.strategy.phases[1].start if strategy == "ps" else 0, rng, trainer.net, trainer.optimizer
    )
    trainer._train_mode()
    from tofa_fast.train.loaders import epoch_loaders

    lab, unl = epoch_loaders(
        trainer.splits, 0, 1, 8, 1, trainer.strategy.use_fm or trainer.strategy.use_kd, trainer.dist
    )
    labelled, unlabelled = next(iter(lab)), next(iter(unl))
    plan = trainer.strategy.plan(rng)
    assert strategy != "ps" or plan.members[0].teacher_kd
    counter = _HostSyncCounter(monkeypatch)
    terms = trainer.train_step(labelled, unlabelled, plan)
    assert counter.calls == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values())
    expected = {"sup", "fm", "kd", "mask"} if strategy == "tofa" else {"sup", "kd"}
    assert set(terms) == expected


def test_a_checkpoint_from_before_the_step_seam_resumes(tmp_path):
    """Checkpoints written before precision / channels_last / step / log_every existed have no such
    config fields: they resume as they trained (fp32 + contiguous on the CPU), not with today's
    channels-last default."""
    splits = tiny_digits()
    straight = Trainer(tiny_config(tmp_path / "a", channels_last=False), splits=splits)
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", channels_last=False), splits=splits)
    first.fit(max_epochs=1)
    path = str(tmp_path / "b" / "checkpoint.pt")
    state = load_checkpoint(path)
    for key in ("precision", "channels_last", "step", "log_every", "skip_bad_images"):
        state["config"].pop(key, None)
    save_atomic(state, path)
    resumed = Trainer(tiny_config(tmp_path / "b"), splits=splits, resume=True)
    assert resumed.config.precision == "fp32" and resumed.config.channels_last is False
    resumed.fit()
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    record = Run.open(str(tmp_path / "b"))
    assert record.selection.state_dict() == straight.selection.state_dict()


def test_the_pseudo_label_pass_has_no_noise_and_updates_no_statistics():
    """The FixMatch teacher sees batch statistics as the members do, without dropout or
    drop-connect, and leaves BN running statistics to the members (one update per member)."""
    net = tofa_fast.Supernet(SPACE, 10).train()
    net.set_regularization(dropout=0.5, drop_connect=0.5)
    net.set_active(SPACE.max_arch())
    x = torch.randn(6, 3, 32, 32)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    with torch.no_grad(), net.pseudo_label_pass():
        a, b = net(x), net(x)
    assert torch.equal(a, b)  # no dropout / drop-connect noise
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())  # counters included
    quiet = tofa_fast.Supernet(SPACE, 10).train()
    quiet.load_state_dict(net.state_dict())
    quiet.set_regularization(dropout=0.0, drop_connect=0.0)
    quiet.set_active(SPACE.max_arch())
    with torch.no_grad():
        torch.testing.assert_close(quiet(x), a)  # batch statistics, as a train-mode forward without noise
    assert net.dropout.p == 0.5 and net.stages[1][0].drop_connect_rate == 0.5  # restored
    with torch.no_grad():
        net(x)
    assert not torch.equal(net.stem_bn.running_mean, buffers["stem_bn.running_mean"])  # members still update


@pytest.mark.parametrize("first_mode,second_mode", [("sequential", "fused"), ("shared", "sequential")])
def test_resume_switches_step_mode(tmp_path, first_mode, second_mode):
    """--step is how members are computed, not what is trained: a run written with one mode resumes
    with another (the checkpoint's other settings still win)."""
    splits = tiny_digits()
    first = Trainer(tiny_config(tmp_path, step=first_mode), splits=splits)
    assert first.step_backend.name == first_mode
    first.fit(max_epochs=1)
    resumed = Trainer(replace(tiny_config(tmp_path, step=second_mode), epochs=5), splits=splits, resume=True)
    assert resumed.step_backend.name == second_mode and resumed.config.step == second_mode
    assert resumed.config.epochs == 2 and resumed.step == first.step
    resumed.fit()
    assert resumed.epoch == 2
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["config"]["step"] == second_mode
