"""The ``graphed`` step (tofa_fast/train/member_graphs.py): a_max, a_min and the pseudo-label pass
replayed from recordings train exactly what the sequential step trains.

On the CPU the recordings are :class:`EagerRecorder`'s (re-execution into static buffers: the CUDA
recorder's contract), so everything but the capture is checked here — keys, the state a recording
must not change (running statistics, RNG), static buffers that replays overwrite, gradients
accumulated across replays — bit for bit against ``sequential``. The ``gpu`` tests run the CUDA
graphs themselves against ``sequential`` on a GPU.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import tofa_fast
from tofa_fast.ops import packed_batch_norm
from tofa_fast.train.config import TrainConfig
from tofa_fast.train.member_graphs import EagerRecorder
from tofa_fast.train.step import (
    ComputeFormat,
    GraphedStep,
    LossSettings,
    StepBatch,
    choose_step_backend,
    describe_step_backends,
    train_step,
)
from tofa_fast.train.strategies import build_strategy

CPU = torch.device("cpu")


class Run:
    """A digits supernet, its TOFA plans and images; ``steps`` optimizer steps of a backend."""

    def __init__(
        self, regularised: bool, steps: int = 3, labelled: int = 6, seed: int = 0, device=CPU, space: str = "digits"
    ):
        torch.manual_seed(seed)
        space = tofa_fast.spaces.get(space, resolutions=(128,)) if space == "ofa_mbv3" else tofa_fast.spaces.get(space)
        self.net = tofa_fast.Supernet(space, 10).to(device).train()
        config = TrainConfig(strategy="tofa", space=space.name).resolved()
        if regularised:
            self.net.set_regularization(dropout=config.dropout, drop_connect=config.drop_connect)
        else:
            self.net.set_regularization(dropout=0.0, drop_connect=0.0)
        strategy = build_strategy("tofa", space, 25, 10, config)
        rng = random.Random(seed)
        self.plans = [strategy.plan(rng) for _ in range(steps)]
        g = torch.Generator().manual_seed(seed)
        x, u_weak, u_strong = (torch.randn(labelled, 3, 32, 32, generator=g) for _ in range(3))
        self.images = (x, torch.randint(0, 10, (labelled,), generator=g)), (u_weak, u_strong)
        # a low threshold: some pseudo-labels pass, so the FixMatch term is not all zeros
        self.settings = LossSettings(config.label_smoothing, 0.2)
        self.device = device

    def train(self, backend, fmt: ComputeFormat, zero_grad: bool = True, seed: int = 0):
        """Trains a copy of the network; returns it and each step's loss terms."""
        net = copy.deepcopy(self.net).to(memory_format=fmt.memory_format)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        batch = StepBatch.to_device(*self.images, self.device, fmt)
        torch.manual_seed(seed)  # the dropout and drop-connect masks
        terms = []
        for plan in self.plans:
            if zero_grad:
                optimizer.zero_grad(set_to_none=True)
            terms.append(train_step(net, plan, batch, self.settings, fmt, backend))
            optimizer.step()
        return net, terms


def assert_same_training(a, b, exact: bool = True, rtol: float = 0.0, atol: float = 0.0):
    (net_a, terms_a), (net_b, terms_b) = a, b
    for step, (ta, tb) in enumerate(zip(terms_a, terms_b)):
        assert ta.keys() == tb.keys()
        for name in ta:
            torch.testing.assert_close(ta[name], tb[name], rtol=rtol, atol=atol, msg=f"step {step} term {name}")
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=f"parameter {name}")
        if pa.grad is None or pb.grad is None:
            assert pa.grad is None and pb.grad is None, name
        else:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=atol, msg=f"gradient {name}")
    for (name, ba), bb in zip(net_a.named_buffers(), net_b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=rtol, atol=atol, msg=f"buffer {name}")


def graphed_on_cpu() -> GraphedStep:
    return GraphedStep(recorder=EagerRecorder())


FORMATS = {
    "fp32 channels_last": ComputeFormat("fp32", True),
    "fp32 nchw": ComputeFormat("fp32", False),
    "bf16 autocast": ComputeFormat("bf16", True),
}


@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "dropout+drop_connect"])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_graphed_trains_what_sequential_trains(fmt_name, regularised):
    """Terms, parameters after SGD steps, gradients, running statistics: equal bit for bit (the
    recordings' warm-up passes leave no trace: dropout masks and running statistics included)."""
    run = Run(regularised)
    fmt = FORMATS[fmt_name]
    graphed = graphed_on_cpu()
    ours = run.train(graphed, fmt)
    assert_same_training(ours, run.train(choose_step_backend("sequential", run.net, CPU), fmt))
    graphs = graphed.graphs_of(ours[0], CPU)
    assert len(graphs._members) == 3, "one recording each for the pseudo-label pass, a_max and a_min"
    layers_used = sum(a.stages[i].depth for plan in run.plans for a in plan.archs[2:] for i in range(len(a.stages)))
    # the random members' layers and heads: distinct configurations only
    assert 0 < len(graphs._layer_recordings) <= layers_used + 2 * len(run.plans)
    assert graphs.recorded == len(graphs._members) + len(graphs._layer_recordings)


def test_gradients_accumulate_across_steps():
    """Without zero_grad between steps, a replay must not overwrite an accumulated gradient (the
    static gradient buffers are never adopted as ``.grad``)."""
    run = Run(regularised=False)
    fmt = FORMATS["fp32 channels_last"]
    ours = run.train(graphed_on_cpu(), fmt, zero_grad=False)
    assert_same_training(ours, run.train(choose_step_backend("sequential", run.net, CPU), fmt, zero_grad=False))


def test_a_recording_is_made_per_key():
    run = Run(regularised=False, steps=1)
    fmt = FORMATS["fp32 channels_last"]
    net = copy.deepcopy(run.net).to(memory_format=fmt.memory_format)
    graphed = graphed_on_cpu()
    batch = StepBatch.to_device(*run.images, CPU, fmt)
    graphs = graphed.graphs_of(net, CPU)

    def step(batch=batch) -> int:
        """Recordings made by one step."""
        before = graphs.recorded
        net.zero_grad(set_to_none=True)
        train_step(net, run.plans[0], batch, run.settings, fmt, graphed)
        return graphs.recorded - before

    def settle(batch=batch) -> int:
        """Recordings made until a step makes none (a layer is recorded when met a second time)."""
        made = [step(batch) for _ in range(3)]
        assert made[-1] == 0, f"still recording after {made}"
        return sum(made)

    everything = settle()
    assert len(graphs._members) == 3 and everything > 3
    assert step() == 0, "a replay with the same key recorded again"
    net.set_regularization(dropout=0.3)
    # a_max, a_min and the random members' heads read the dropout rate; the pseudo-label pass and the
    # MBConv layers do not
    assert 2 < settle() < everything
    with packed_batch_norm.use_backend("reference"):
        assert settle() == everything, "a pinned backend is baked into every recording"
    half = StepBatch(batch.x[:4], batch.y[:4], batch.u_weak[:4], batch.u_strong[:4])
    assert settle(half) == everything, "another batch size is another shape"


def test_layer_recordings_stop_when_the_table_is_full(monkeypatch):
    from tofa_fast.train import member_graphs

    monkeypatch.setattr(member_graphs, "MAX_LAYER_RECORDINGS", 4)
    run = Run(regularised=False, steps=3)
    fmt = FORMATS["fp32 channels_last"]
    graphed = graphed_on_cpu()
    ours = run.train(graphed, fmt)
    assert len(graphed.graphs_of(ours[0], CPU)._layer_recordings) == 4
    assert_same_training(ours, run.train(choose_step_backend("sequential", run.net, CPU), fmt))


def test_layerwise_member_equals_forward():
    """A random member replayed layer by layer computes Supernet.forward's logits and gradients
    (input gradients through every layer recording included)."""
    run = Run(regularised=False, steps=1)
    net = run.net
    graphs = graphed_on_cpu().graphs_of(net, CPU)
    arch = net.space.sample(random.Random(5))
    x = torch.randn(5, 3, arch.resolution, arch.resolution, requires_grad=True)
    for _ in range(3):  # eager (met once), recorded and replayed, replayed
        got = graphs.layerwise(arch, x)
        (gx,) = torch.autograd.grad(got.square().sum(), x)
    assert len(graphs._layer_recordings) == sum(s.depth for s in arch.stages) + 2  # the stem, layers and head
    net.set_active(arch)
    expected = net(x)
    (ex,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(gx, ex, rtol=0, atol=0)


def test_forward_with_gradients_stays_eager():
    """Outside the step's own forward-backward pairs, a forward with gradients records nothing (its
    activations would live in a recording that the next replay overwrites)."""
    run = Run(regularised=False, steps=1)
    net = run.net
    graphed = graphed_on_cpu()
    x = torch.randn(3, 3, 32, 32)
    archs = [net.space.max_arch(), net.space.max_arch()]
    logits = graphed.forward_members(net, archs, [x, x])
    assert graphed.graphs_of(net, CPU).recorded == 0
    expected = choose_step_backend("sequential", net, CPU).forward_members(net, archs, [x, x])
    for a, b in zip(logits, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        first = graphed.forward_members(net, archs[:1], [x])[0]
        second = graphed.forward_members(net, archs[:1], [2 * x])[0]
    assert graphed.graphs_of(net, CPU).recorded == 1
    assert not torch.equal(first, second), "a returned result must not be the recording's static output"


def test_graphed_step_needs_cuda():
    net = tofa_fast.Supernet("digits", 10)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        choose_step_backend("graphed", net, CPU)
    assert choose_step_backend("auto", net, CPU).name != "graphed"
    assert any(line.startswith("graphed") and "auto: nowhere yet" in line for line in describe_step_backends())


def test_graphed_is_a_train_flag(tmp_path):
    from tofa_fast.cli import build_parser

    args = build_parser().parse_args(["train", "--step", "graphed", "--out", str(tmp_path)])
    assert args.step == "graphed"


# ------------------------------------------------------------------------------------------------
# The CUDA graphs themselves
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "space, fmt_name, regularised",
    [
        ("digits", "fp32 nchw", False),
        ("digits", "fp32 nchw", True),
        ("digits", "bf16 autocast", True),
        ("ofa_mbv3", "bf16 autocast", True),
    ],
)
def test_cuda_graphs_train_what_sequential_trains(space, fmt_name, regularised):
    """Real CUDA graphs: the plans twice over, so that the second pass replays every recording."""
    cuda = torch.device("cuda")
    run = Run(regularised, steps=2, labelled=16 if space == "digits" else 4, device=cuda, space=space)
    run.plans = run.plans * 2
    fmt = FORMATS[fmt_name]
    backend = choose_step_backend("graphed", run.net, cuda)
    ours = run.train(backend, fmt)
    reference = run.train(choose_step_backend("sequential", run.net, cuda), fmt)
    # The same kernels, replayed; cuDNN's and our grad-filter reductions may add in another order.
    tol = dict(rtol=1e-4, atol=1e-5) if fmt.precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    assert_same_training(ours, reference, **tol)
    graphs = backend.graphs_of(ours[0], cuda)
    assert len(graphs._members) == 3 and len(graphs._layer_recordings) > 0


def test_the_trainer_with_graphed_trains_what_sequential_trains(tmp_path, monkeypatch):
    """A whole run (two epochs, the default regularisation: dropout and drop-connect on), then a
    graphed run resumed with ``--step sequential``: every parameter and buffer equals the
    sequential run's, bit for bit (the table's graphed entry re-executes on the CPU)."""
    from test_train_run import tiny_config, tiny_digits

    from tofa_fast.train import step as step_module
    from tofa_fast.train.trainer import Trainer

    entry = next(b for b in step_module.STEP_TABLE if b.name == "graphed")
    monkeypatch.setattr(entry, "_recorder", EagerRecorder())
    splits = tiny_digits()
    runs = {}
    for name in ("graphed", "sequential"):
        trainer = Trainer(tiny_config(tmp_path / name, step=name), splits=splits)
        assert trainer.step_backend.name == name
        trainer.fit()
        runs[name] = trainer.net
    assert len(entry.graphs_of(runs["graphed"], CPU)._layer_recordings) > 0
    switched = Trainer(tiny_config(tmp_path / "switched", step="graphed"), splits=splits)
    switched.fit(max_epochs=1)
    resumed = Trainer(tiny_config(tmp_path / "switched", step="sequential"), splits=splits, resume=True)
    resumed.fit()
    for net in (runs["graphed"], resumed.net):
        for (name, a), b in zip(runs["sequential"].state_dict().items(), net.state_dict().values()):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_trainer_with_cuda_graphs_trains_what_sequential_trains(tmp_path):
    """A whole run on the GPU (bf16 autocast + channels_last, dropout and drop-connect on)."""
    from dataclasses import replace

    from test_train_run import tiny_config, tiny_digits

    from tofa_fast.train.trainer import Trainer

    splits = tiny_digits()
    nets = {}
    for name in ("graphed", "sequential"):
        trainer = Trainer(replace(tiny_config(tmp_path / name, step=name), device="cuda"), splits=splits)
        assert trainer.step_backend.name == name and trainer.compute_format.precision == "bf16"
        trainer.fit()
        nets[name] = trainer.net
    for (name, a), b in zip(nets["sequential"].state_dict().items(), nets["graphed"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=name)


def test_layer_recordings_stop_at_the_memory_budget():
    """Once the layer recordings hold the recorder's budget, the other configurations run eagerly,
    and the training is still the sequential one's."""
    run = Run(regularised=False, steps=2)
    run.plans = run.plans * 2
    fmt = FORMATS["fp32 channels_last"]
    unbounded = graphed_on_cpu()
    ours = run.train(unbounded, fmt)
    everything = unbounded.graphs_of(ours[0], CPU)
    assert len(everything._layer_recordings) > 4 and everything.recording_bytes > 0
    budget = everything.recording_bytes // 3
    bounded = GraphedStep(recorder=EagerRecorder(memory_budget=budget))
    ours = run.train(bounded, fmt)
    graphs = bounded.graphs_of(ours[0], CPU)
    assert 0 < len(graphs._layer_recordings) < len(everything._layer_recordings)
    # it stops at the first recording that reaches the budget
    assert budget <= graphs.recording_bytes < 2 * budget
    reference = run.train(choose_step_backend("sequential", run.net, CPU), fmt)
    assert_same_training(ours, reference)
    nothing = GraphedStep(recorder=EagerRecorder(memory_budget=0))
    ours = run.train(nothing, fmt)
    assert nothing.graphs_of(ours[0], CPU).recorded == 0
    assert_same_training(ours, reference)


def test_layerwise_keys_every_choice():
    """Two members that differ in stem width, head width and every layer choice, alternating on a
    space with TensorFlow padding, no feature-mix conv and relu6 / swish stages: each replay is
    that member's Supernet.forward."""
    import dataclasses

    from test_forward_many import _variant_space

    space = dataclasses.replace(_variant_space(), bn_momentum=0.1)
    torch.manual_seed(0)
    net = tofa_fast.Supernet(space, 10).train()
    net.set_regularization(dropout=0.0)  # the two networks would draw the masks in turn
    graphs = graphed_on_cpu().graphs_of(net, CPU)
    big = space.max_arch().to_dict()
    # at one resolution: only the stem width, the head width or the layer choices tell them apart
    archs = [
        space.arch_from_dict(d)
        for d in (big, {**big, "stem": 8}, {**big, "head": 64}, {**space.min_arch().to_dict(), "resolution": 32})
    ]
    assert len({a.resolution for a in archs}) == 1
    reference = copy.deepcopy(net)
    for _ in range(3):  # eager, recorded, replayed
        for arch in archs:
            x = torch.randn(3, 3, arch.resolution, arch.resolution)
            got = graphs.layerwise(arch, x)
            grads = torch.autograd.grad(got.square().sum(), list(net.parameters()), allow_unused=True)
            reference.set_active(arch)
            expected = reference(x)
            ref_grads = torch.autograd.grad(expected.square().sum(), list(reference.parameters()), allow_unused=True)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            for g, r in zip(grads, ref_grads):
                assert (g is None) == (r is None) and (g is None or torch.equal(g, r))
    assert sum(1 for key in graphs._layer_recordings if key[0] == "stem") == 2
