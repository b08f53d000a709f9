"""`--init SOURCE` strings (tofa-fast train): load_init builds the pretrained supernet, re-headed."""

from __future__ import annotations

import os

import pytest
import torch
from test_transfer_ofa import make_ofa
from test_transfer_torchvision import make_torchvision
from torchvision.models import MobileNet_V3_Small_Weights

from tofa_fast.transfer import CheckpointMismatchError, from_ofa, load_init


def _assert_same_except_classifier(net, reference, num_classes):
    assert net.num_classes == num_classes
    assert net.classifier.weight.shape == (num_classes, reference.classifier.weight.shape[1])
    theirs = reference.state_dict()
    for key, value in net.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, theirs[key]), key


def test_ofa_path_loads_a_checkpoint_file(tmp_path):
    ofa = make_ofa(1.0, seed=4)
    path = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ofa.state_dict().items()}}, path)
    net = load_init(f"ofa:{path}", num_classes=10)
    _assert_same_except_classifier(net, from_ofa(ofa), 10)


def test_ofa_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_init(f"ofa:{tmp_path / 'nope.pth'}", 10)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, foreign)  # pickles a module: refused weights-only
    with pytest.raises(ValueError, match="is not a weights-only PyTorch checkpoint"):
        load_init(f"ofa:{foreign}", 10)
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(CheckpointMismatchError, match="missing key 'first_conv.conv.weight'"):
        load_init(f"ofa:{wrong}", 10)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_torchvision_without_weights(name):
    net = load_init(f"torchvision:{name}", num_classes=4)
    assert net.space.name == f"torchvision_{name}"
    assert net.classifier.weight.shape[0] == 4


def test_torchvision_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not in the local cache .*mobilenet_v3_small-"):
        load_init("torchvision:mobilenet_v3_small:IMAGENET1K_V1", 10)
    # Stand-in for the real ImageNet file (offline): torchvision reads whatever the cache holds.
    pretrained = make_torchvision("small", seed=5)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(pretrained.state_dict(), cache / os.path.basename(MobileNet_V3_Small_Weights.IMAGENET1K_V1.url))
    net = load_init("torchvision:mobilenet_v3_small:IMAGENET1K_V1", 10)
    assert torch.equal(net.final_expand_conv.weight, pretrained.features[-1][0].weight)
    assert torch.equal(net.feature_mix_conv.weight[:, :, 0, 0], pretrained.classifier[0].weight)
    assert net.classifier.weight.shape == (10, 1024)


@pytest.mark.parametrize(
    "source, message",
    [
        ("imagenet", r"must be ofa:PATH or torchvision:NAME\[:WEIGHTS\]"),
        ("timm:resnet50", r"unknown kind 'timm'"),
        ("ofa:", r"needs a path"),
        ("torchvision:resnet50", r"unknown model; supported: \['mobilenet_v3_large', 'mobilenet_v3_small'\]"),
        ("torchvision:mobilenet_v3_small:IMAGENET9K", r"unknown weights; available: \['IMAGENET1K_V1', 'DEFAULT'\]"),
    ],
)
def test_malformed_sources_are_explained(source, message):
    with pytest.raises(ValueError, match=message):
        load_init(source, 10)


def test_num_classes_is_validated():
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        load_init("torchvision:mobilenet_v3_small", 0)


def test_cached_torchvision_weights_are_loaded_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path = cache / os.path.basename(MobileNet_V3_Small_Weights.IMAGENET1K_V1.url)
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="could not load torchvision weights"):
        load_init("torchvision:mobilenet_v3_small:IMAGENET1K_V1", 10)
    torch.save({"features.0.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not hold MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        load_init("torchvision:mobilenet_v3_small:IMAGENET1K_V1", 10)
