"""`--init SOURCE` strings (tofa-fast train): load_init builds the pretrained supernet, re-headed."""

from __future__ import annotations

import os

import pytest
import torch
from test_transfer_ofa import make_ofa
from test_transfer_torchvision import make_torchvision
from torchvision.models import MobileNet_V3_Small_Weights

from tofa_fast.transfer import CheckpointMismatchError, from_ofa, from_torchvision, load_init


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


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2"])
def test_torchvision_without_weights(name):
    net = load_init(f"torchvision:{name}", num_classes=4, resolutions=(64,))
    assert net.space.resolutions == (64,)
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
        ("imagenet", r"must be ofa:PATH, torchvision:NAME\[:WEIGHTS or PATH\] .* or efficientnet_lite:NAME\[:PATH\]"),
        ("timm:resnet50", r"unknown kind 'timm'"),
        ("ofa:", r"needs a path"),
        (
            "torchvision:resnet50",
            r"unknown model; supported: \['mobilenet_v3_large', 'mobilenet_v3_small', 'mobilenet_v2'\]",
        ),
        ("torchvision:mobilenet_v3_small:IMAGENET9K", r"unknown weights; available: \['IMAGENET1K_V1', 'DEFAULT'\]"),
        (
            "efficientnet_lite:efficientnet-b0",
            r"unknown model; supported: \['efficientnet-lite0', .*'efficientnet-lite4'\]",
        ),
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


def test_torchvision_weights_from_a_local_file(tmp_path):
    pretrained = make_torchvision("v2", seed=6)
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    state = pretrained.state_dict()
    # Files saved by old PyTorch versions lack BN's num_batches_tracked; they load all the same.
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    net = load_init(f"torchvision:mobilenet_v2:{path}", num_classes=10, resolutions=(64, 96))
    _assert_same_except_classifier(net, from_torchvision(pretrained, resolutions=(64, 96)), 10)
    assert net.space.name == "torchvision_mobilenet_v2" and net.space.resolutions == (64, 96)


def test_wrong_or_foreign_weights_files_say_what_differs(tmp_path):
    state = make_torchvision("v2", seed=6).state_dict()
    source = f"torchvision:mobilenet_v2:{tmp_path / 'w.pth'}"
    with pytest.raises(FileNotFoundError, match=r"torchvision mobilenet_v2 weights file .*w\.pth' does not exist"):
        load_init(source, 10)
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="is not a weights-only PyTorch checkpoint"):
        load_init(source, 10)
    v3 = make_torchvision("small").state_dict()
    torch.save(v3, tmp_path / "w.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(\d+\): \[classifier\.1\.bias.*unexpected keys"):
        load_init(source, 10)
    wrong = dict(state)
    wrong["features.1.conv.1.weight"] = torch.zeros(16, 24, 1, 1)
    torch.save(wrong, tmp_path / "w.pth")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape mismatch \(1\): \['features\.1\.conv\.1\.weight': checkpoint has \(16, 24, 1, 1\), expected \(16, 32, 1, 1\)",
    ):
        load_init(source, 10)
    torch.save({"state_dict": state}, tmp_path / "w.pth")  # the common wrapper is unwrapped
    assert load_init(source, 10, resolutions=(64,)).num_classes == 10


def test_efficientnet_lite_from_a_local_file(tmp_path):
    package = pytest.importorskip("efficientnet_lite_pytorch")
    from test_transfer_efficientnet_lite import make_lite

    from tofa_fast.transfer import from_efficientnet_lite

    pretrained = make_lite(seed=2)
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save(pretrained.state_dict(), path)
    net = load_init(f"efficientnet_lite:efficientnet-lite0:{path}", num_classes=5, resolutions=(64,))
    _assert_same_except_classifier(net, from_efficientnet_lite(pretrained, resolutions=(64,)), 5)
    assert net.space.name == "efficientnet_lite0" and net.space.padding == "tf_same"
    torch.save(package.EfficientNet.from_name("efficientnet-lite1").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(\d+\): \[_blocks\.16\."):
        load_init(f"efficientnet_lite:efficientnet-lite0:{path}", 5)


def test_resolutions_do_not_apply_to_ofa(tmp_path):
    with pytest.raises(ValueError, match="resolutions apply to torchvision and efficientnet_lite sources"):
        load_init(f"ofa:{tmp_path / 'x.pth'}", 10, resolutions=(128,))
