"""tofa_fast.accelerate on the `ofa` package's own supernet: patched vs unpatched OFAMobileNetV3.

The oracle is an unpatched deep copy of the same model (ofa's ``get_active_filter`` + ``F.conv2d``).
Every comparison runs four models side by side — patched and unpatched, in float32 and float64 — on
the same subnet, mode and batch:

* float64: output and every parameter gradient of the patched model equal ofa's to 1e-10 (the math
  is the same, transform matrices included);
* float32, eval: the same to 1e-5;
* float32, train: the forward to 1e-5; the gradients are held to ofa's *own* float32 accuracy
  instead (no further from the float64 gradients than ofa's float32 gradients are, ×3): with
  batch-statistics BN at batch 2 and 3×3 final maps, float32 backprop through 20 blocks amplifies
  rounding so much that ofa's float32 gradients are themselves 5e-5 … 1e-4 away from its float64
  ones (ours: the same order), so a 1e-5 patched-vs-unpatched bound would test the conditioning,
  not the op.

Gradient errors are per tensor, ``max|a − b| / max(max|b|, 1e-3 · the largest gradient)``: the
floor covers gradients that are zero in exact arithmetic (BN biases feeding a batch-statistics BN),
whose float noise has no scale of its own.
"""

from __future__ import annotations

import copy
import io
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

pytest.importorskip("ofa")  # a test extra; the GPU machine runs `pytest -m gpu tests` without it
from ofa.imagenet_classification.elastic_nn.modules.dynamic_op import DynamicSeparableConv2d  # noqa: E402
from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3  # noqa: E402
from ofa.utils import MyConv2d  # noqa: E402
from test_transfer_ofa import make_ofa  # noqa: E402

import tofa_fast
from tofa_fast.accelerate_ofa import AccelerateSummary, FastDynamicSeparableConv2d

N_CLASSES = 17
RESOLUTION = 66  # small and odd: odd maps at every stride-2 layer
BATCH = 2
NUM_DEPTHWISE = 20  # OFAMobileNetV3 blocks after the first
FP32, FP64 = TOLERANCES[torch.float32][0], TOLERANCES[torch.float64][0]
FLOOR = 1e-3  # of the largest gradient: the scale for gradients that are zero in exact arithmetic
FP32_TRAIN_GRAD_SLACK = 3.0  # × ofa's own float32 error (vs float64) in train mode


def make_model(seed: int = 0) -> OFAMobileNetV3:
    """test_transfer_ofa's OFAMobileNetV3 (non-trivial BN statistics/affines, biases and transform
    matrices), w1.2, without dropout: the same masks in float32 and float64 would need care; not the
    op's business. Each test sets the mode it runs in."""
    return make_ofa(1.2, seed, n_classes=N_CLASSES, dropout_rate=0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads wait on each other for
    seconds per layer whenever one is descheduled; one thread keeps the file near 15 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models():
    """{(patched, dtype): model}, all four from one OFA model; the patched ones through accelerate."""
    base = make_model()
    out = {}
    for dtype in (torch.float32, torch.float64):
        ofa = copy.deepcopy(base).to(dtype)
        fast = copy.deepcopy(ofa)
        returned, summary = tofa_fast.accelerate(fast)
        assert returned is fast and summary.num_patched == NUM_DEPTHWISE and not summary.skipped
        out[(False, dtype)], out[(True, dtype)] = ofa, fast
    return out


def run(model, setting: dict, train: bool, x: torch.Tensor, labels: torch.Tensor):
    model.train(train)
    model.set_active_subnet(**setting)
    model.zero_grad(set_to_none=True)
    logits = model(x.to(next(model.parameters()).dtype))
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    b = b.to(a.dtype)
    return ((a - b).abs().max() / max(b.abs().max().item(), floor, 1e-300)).item()


def grad_errors(grads: dict, oracle: dict) -> dict[str, float]:
    assert grads.keys() == oracle.keys()
    none = {n for n, g in oracle.items() if g is None}
    assert none == {n for n, g in grads.items() if g is None}, "different parameters got gradients"
    scale = max(g.abs().max().item() for g in oracle.values() if g is not None)
    return {n: rel(grads[n], oracle[n], FLOOR * scale) for n in oracle if n not in none}


def worst(errors: dict[str, float]) -> tuple[str, float]:
    return max(errors.items(), key=lambda kv: kv[1])


SETTINGS = {"max": dict(ks=7, e=6, d=4), "min": dict(ks=3, e=3, d=2)}


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the patched forwards that reach elastic_dwconv2d (rather than falling back to ofa's)."""
    accelerate_module = sys.modules["tofa_fast.accelerate_ofa"]
    calls = []
    op = accelerate_module.elastic_dwconv2d

    def counted(x, weight, kernel_size, stride=1, transforms=None):
        calls.append((kernel_size, len(transforms or [])))
        return op(x, weight, kernel_size, stride, transforms)

    monkeypatch.setattr(accelerate_module, "elastic_dwconv2d", counted)
    return calls


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("subnet", ["max", "min", "random"])
def test_patched_computes_what_ofa_computes(models, subnet, train, op_calls):
    seed = 10 + 2 * ["max", "min", "random"].index(subnet) + train
    if subnet == "random":  # drawn by the model's own sampler, then set on all four
        state = random.getstate()
        random.seed(seed)
        setting = models[(True, torch.float32)].sample_active_subnet()
        random.setstate(state)
    else:
        setting = SETTINGS[subnet]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, dtype=torch.float64, generator=g)
    labels = torch.randint(0, N_CLASSES, (BATCH,), generator=g)
    out = {key: run(model, setting, train, x, labels) for key, model in models.items()}
    active_blocks = sum(models[(True, torch.float32)].runtime_depth)
    assert len(op_calls) == 2 * active_blocks  # every active depthwise conv of both patched models
    if subnet != "max":  # the 7→5(→3) chain is exercised
        assert any(n > 0 for _, n in op_calls)

    (fast64, fast64_g), (ofa64, ofa64_g) = out[(True, torch.float64)], out[(False, torch.float64)]
    (fast32, fast32_g), (ofa32, ofa32_g) = out[(True, torch.float32)], out[(False, torch.float32)]
    assert rel(fast64, ofa64) <= FP64
    name, err = worst(grad_errors(fast64_g, ofa64_g))
    assert err <= FP64, f"float64 gradient of {name}: {err:.2e}"

    assert rel(fast32, ofa32) <= FP32
    if not train:
        name, err = worst(grad_errors(fast32_g, ofa32_g))
        assert err <= FP32, f"float32 gradient of {name}: {err:.2e}"
    else:
        ours, ofas = grad_errors(fast32_g, ofa64_g), grad_errors(ofa32_g, ofa64_g)
        bound = FP32_TRAIN_GRAD_SLACK * max(ofas.values()) + FP32
        name, err = worst(ours)
        assert err <= bound, f"float32 gradient of {name}: {err:.2e} from float64, ofa's own worst {bound:.2e}"


def test_parameters_state_dict_and_ofa_api_unchanged():
    ofa = make_model(1)
    params = dict(ofa.named_parameters())
    keys = list(ofa.state_dict())
    depthwise = [m for m in ofa.modules() if isinstance(m, DynamicSeparableConv2d)]
    model, summary = tofa_fast.accelerate(ofa)
    assert model is ofa and isinstance(summary, AccelerateSummary) and summary.num_patched == NUM_DEPTHWISE
    assert summary.patched == [n for n, m in ofa.named_modules() if isinstance(m, DynamicSeparableConv2d)]
    assert list(ofa.state_dict()) == keys
    assert all(p is params[n] for n, p in ofa.named_parameters()) and len(params) == len(list(ofa.parameters()))
    assert all(type(m) is FastDynamicSeparableConv2d and isinstance(m, DynamicSeparableConv2d) for m in depthwise)
    assert [m for m in ofa.modules() if isinstance(m, DynamicSeparableConv2d)] == depthwise
    assert "7to5_matrix" in dict(depthwise[0].named_parameters()) and depthwise[0].active_kernel_size == 7

    # an old checkpoint loads strictly; ofa's API runs and gives what the unpatched model gives
    reference = make_model(1)
    ofa.load_state_dict(reference.state_dict(), strict=True)
    ofa.set_active_subnet(ks=5, e=4, d=3)
    reference.set_active_subnet(ks=5, e=4, d=3)
    assert all(block.conv.active_kernel_size == 5 for block in ofa.blocks[1:])  # copied down at forward
    x = torch.randn(1, 3, RESOLUTION, RESOLUTION)
    sub, ref_sub = ofa.get_active_subnet(preserve_weight=True).eval(), reference.get_active_subnet().eval()
    assert not any(isinstance(m, DynamicSeparableConv2d) for m in sub.modules())
    with torch.no_grad():
        assert rel(sub(x), ref_sub(x)) <= FP32
        assert rel(sub(x), ofa.eval()(x)) <= FP32  # the extracted subnet computes the active one
    ofa.re_organize_middle_weights()
    reference.re_organize_middle_weights()
    ofa_sd, ref_sd = ofa.state_dict(), reference.state_dict()
    assert all(torch.equal(ofa_sd[k], ref_sd[k]) for k in ref_sd)
    assert all(p is params[n] for n, p in ofa.named_parameters())  # re-organising keeps the Parameters

    # an optimizer made before the call updates the weights the patched forward reads
    opt = torch.optim.SGD(ofa.parameters(), lr=0.1)
    ofa.train().set_active_subnet(ks=3, e=3, d=2)
    before = depthwise[0].conv.weight.detach().clone()
    F.cross_entropy(ofa(x), torch.tensor([1])).backward()
    opt.step()
    assert not torch.equal(depthwise[0].conv.weight, before)

    # copies and whole-model pickles stay accelerated
    assert type(copy.deepcopy(ofa).blocks[1].conv.depth_conv.conv) is FastDynamicSeparableConv2d
    buffer = io.BytesIO()
    torch.save(ofa, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False).blocks[1].conv.depth_conv.conv) is FastDynamicSeparableConv2d


def test_idempotent_and_no_op_cases():
    ofa = make_model(2)
    tofa_fast.accelerate(ofa)
    _, again = tofa_fast.accelerate(ofa)
    assert again.num_patched == 0 and len(again.already_accelerated) == NUM_DEPTHWISE and not again.skipped
    assert "20 already accelerated" in str(again)

    net = tofa_fast.Supernet("digits", 10)
    keys = list(net.state_dict())
    model, summary = tofa_fast.accelerate(net)
    assert model is net and summary.num_patched == 0 and "Supernet" in summary.note
    assert list(net.state_dict()) == keys

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, groups=3))
    _, summary = tofa_fast.accelerate(plain)
    assert summary.num_patched == 0 and "nothing to do" in summary.note
    assert type(plain[0]) is torch.nn.Conv2d


@pytest.mark.parametrize("bad", [None, "model", 3, torch.zeros(2), [torch.nn.Linear(1, 1)]])
def test_bad_input_is_a_type_error_naming_model(bad):
    with pytest.raises(TypeError, match="model"):
        tofa_fast.accelerate(bad)


class _Subclassed(DynamicSeparableConv2d):
    pass


def test_what_the_fast_path_does_not_cover_stays_ofa():
    model = torch.nn.ModuleDict(
        {
            "ok": DynamicSeparableConv2d(8, [3, 5, 7], stride=2),
            "dilated": DynamicSeparableConv2d(8, [3, 5], dilation=2),
            "even": DynamicSeparableConv2d(8, [2, 4]),
            "sub": _Subclassed(8, [3, 5]),
        }
    )
    _, summary = tofa_fast.accelerate(model)
    assert summary.patched == ["ok"]
    assert set(summary.skipped) == {"dilated", "even", "sub"}
    assert "dilation" in summary.skipped["dilated"] and "odd" in summary.skipped["even"]
    assert "subclass" in summary.skipped["sub"]
    assert type(model["dilated"]) is DynamicSeparableConv2d and type(model["sub"]) is _Subclassed
    assert "left alone: dilated: dilation 2" in str(summary)


@pytest.mark.parametrize("kernel_size", [7, 5, 3, 1])
@pytest.mark.parametrize("transform_mode", [1, None])
def test_single_module_matches_get_active_filter(kernel_size, transform_mode, monkeypatch):
    """One module, float64: every kernel (1: no ofa chain reaches it, so ofa's forward serves it),
    stride 2, fewer channels than C_max, with and without KERNEL_TRANSFORM_MODE (read per call)."""
    torch.manual_seed(kernel_size)
    ofa = DynamicSeparableConv2d(12, [3, 5, 7], stride=2).double()
    with torch.no_grad():
        for name in ("7to5_matrix", "5to3_matrix"):
            getattr(ofa, name).add_(0.2 * torch.randn_like(getattr(ofa, name)))
    fast = copy.deepcopy(ofa)
    tofa_fast.accelerate(fast)
    monkeypatch.setattr(DynamicSeparableConv2d, "KERNEL_TRANSFORM_MODE", transform_mode)
    x = torch.randn(2, 9, 13, 13, dtype=torch.float64)
    grad_out = None
    results = []
    for module in (fast, ofa):
        module.active_kernel_size = kernel_size
        xi = x.clone().requires_grad_()
        y = module(xi)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        y.backward(grad_out)
        results.append([y, xi.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*results):
        assert (a is None) == (b is None)  # matrices off the chain get no gradient in either
        assert a is None or rel(a, b) <= FP64


def test_calls_the_op_does_not_serve_fall_back_to_ofa():
    """A kernel ofa's chain does not reach (5 with kernel_size_list [3, 7]) and weight
    standardization run ofa's own forward, so the result is still ofa's."""
    torch.manual_seed(0)
    ofa = DynamicSeparableConv2d(6, [3, 7])
    fast = copy.deepcopy(ofa)
    tofa_fast.accelerate(fast)
    x = torch.randn(1, 6, 9, 9)
    with torch.no_grad():
        assert torch.equal(fast(x, 5), ofa(x, 5))
        assert rel(fast(x, 3), ofa(x, 3)) <= FP32
        for module in (fast, ofa):
            module.conv.__class__ = MyConv2d  # ofa's Conv2d with weight standardization
            module.conv.WS_EPS = 1e-5
        assert torch.equal(fast(x, 3), ofa(x, 3))


def test_mixed_precision_only_under_autocast():
    """Under CPU autocast (bf16) the patched module agrees with ofa to bf16 precision; a bf16 x with
    fp32 weights outside autocast is refused as ofa refuses it (ofa's forward runs and raises)."""
    torch.manual_seed(0)
    ofa = DynamicSeparableConv2d(12, [3, 5, 7])
    fast = copy.deepcopy(ofa)
    tofa_fast.accelerate(fast)
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in (7, 3):
            y_fast, y_ofa = fast(x, k), ofa(x, k)
            assert y_fast.dtype == y_ofa.dtype == torch.bfloat16
            assert rel(y_fast.float(), y_ofa.float()) <= TOLERANCES[torch.bfloat16][0]
    with pytest.raises(RuntimeError):
        ofa(x.bfloat16(), 3)
    with pytest.raises(RuntimeError):
        fast(x.bfloat16(), 3)
