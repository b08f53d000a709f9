"""TensorFlow ``SAME`` padding (``SearchSpace.padding="tf_same"``), needed by EfficientNet-Lite: the
supernet's symmetric-padding kernels reproduce it, extracted subnets spell it out, and the estimator
and profiler see the same layers. TensorFlow's rule itself (``F.pad`` + unpadded conv) is the oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance
from transfer_checks import assert_estimator_matches_extracted, extracted_subnet_error, sample_archs

import tofa_fast
from tofa_fast.nn import ElasticConv2d, ElasticDepthwiseConv2d
from tofa_fast.nn.padding import TFSamePad2d, tf_same_pads
from tofa_fast.spaces import SearchSpace


def tf_conv_reference(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """TensorFlow's SAME convolution, written out: total padding max((⌈n/s⌉−1)s + k − n, 0), extra after."""
    k = weight.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)


@pytest.mark.parametrize("size", [(8, 8), (9, 9), (8, 7), (7, 10), (1, 1), (2, 3)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel, active", [(5, 5), (5, 3), (3, 3), (7, 1)])
def test_elastic_depthwise_conv_pads_like_tensorflow(size, stride, kernel, active):
    conv = ElasticDepthwiseConv2d(12, sorted({1, 3, active, kernel}), stride, padding="tf_same")
    x = torch.randn(2, 8, *size)
    expected = tf_conv_reference(x, conv.active_filter(8, active), stride, groups=8)
    with torch.no_grad():
        assert torch.allclose(conv(x, active), expected, **tolerance(torch.float32))
        assert torch.allclose(conv.extract(8, active)(x), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("size", [(224, 224), (225, 225), (30, 31)])
def test_dense_stem_conv_pads_like_tensorflow(size):
    conv = ElasticConv2d(3, 16, 3, 2, padding="tf_same")
    x = torch.randn(1, 3, *size)
    expected = tf_conv_reference(x, conv.weight[:12], 2)
    with torch.no_grad():
        assert torch.allclose(conv(x, 12), expected, **tolerance(torch.float32))
        assert torch.allclose(conv.extract(3, 12)(x), expected, **tolerance(torch.float32))


def test_pads_of_the_tensorflow_rule():
    assert tf_same_pads(224, 3, 2) == (0, 1)
    assert tf_same_pads(224, 5, 2) == (1, 2)
    assert tf_same_pads(225, 5, 2) == (2, 2)
    assert tf_same_pads(7, 5, 1) == (2, 2)
    assert tf_same_pads(8, 1, 2) == (0, 0)
    assert repr(TFSamePad2d(3, 2)) == "TFSamePad2d(kernel_size=3, stride=2)"


@pytest.fixture(scope="module")
def tf_same_net():
    """The digits preset (kernels 3/5/7 with transforms, SE, elastic widths) padded the TensorFlow way."""
    space = dataclasses.replace(tofa_fast.spaces.get("digits"), padding="tf_same", resolutions=(24, 28, 31))
    net = tofa_fast.Supernet(space, 10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, tofa_fast.nn.ElasticBatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.bias.normal_(0, 0.1)
    return net.eval()


def test_tf_same_supernet_extracts_to_the_same_function(tf_same_net):
    extracted_subnet_error(tf_same_net, 8, seed=1, odd=False)
    extracted_subnet_error(tf_same_net, 8, seed=2, odd=True)


def test_tf_same_differs_from_symmetric_where_it_should(tf_same_net):
    symmetric = tofa_fast.Supernet(dataclasses.replace(tf_same_net.space, padding="symmetric"), 10).eval()
    symmetric.load_state_dict(tf_same_net.state_dict())
    with torch.no_grad():
        odd = torch.randn(1, 3, 31, 31)  # 31 → 16 → 8: later strided layers see even sides
        even = torch.randn(1, 3, 28, 28)
        assert not torch.allclose(symmetric(even), tf_same_net(even))
        assert not torch.allclose(symmetric(odd), tf_same_net(odd))


def test_tf_same_estimator_and_profiler_match_the_extracted_subnets(tf_same_net):
    assert_estimator_matches_extracted(tf_same_net, sample_archs(tf_same_net.space, 2, seed=3))


def test_padding_is_validated_and_round_trips():
    space = dataclasses.replace(tofa_fast.spaces.get("digits"), padding="tf_same", input_mean=(0.5, 0.5, 0.5))
    assert SearchSpace.from_json(space.to_json()) == space
    # Spaces that keep the defaults keep their JSON (latency tables are keyed by its hash).
    for name in tofa_fast.spaces.names():
        text = tofa_fast.spaces.get(name).to_json()
        assert not any(key in text for key in ('"padding"', '"input_mean"', '"input_std"', '"feature_mix"'))
    with pytest.raises(ValueError, match=r"padding must be one of \['symmetric', 'tf_same'\], got 'valid'"):
        dataclasses.replace(space, padding="valid")
