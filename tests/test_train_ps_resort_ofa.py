"""Progressive shrinking's channel re-sort equals the `ofa` package's (OFA is the oracle).

OFA trains each expand phase as a separate run whose network has that phase's expand list ([4, 6],
then [3, 4, 6]); ``train_elastic_expand`` re-organises the middle channels with
``expand_ratio_stage = len(list) - 2`` on that network before training. Our ``ps`` strategy does it
at the phase boundary. Both are run here on the same weights, at both expand phases, and every
tensor must come out the same."""

from __future__ import annotations

import random
import types
from dataclasses import replace

import pytest
import torch
from test_transfer_ofa import make_ofa

from tofa_fast.train import TrainConfig
from tofa_fast.train.strategies import build_strategy
from tofa_fast.transfer import from_ofa

pytest.importorskip("ofa")


def _ofa_expand_phase(ofa_weights: dict, expand_list: list[int]) -> torch.nn.Module:
    """OFA's own expand phase set-up (train_elastic_expand) on a network with ``expand_list``,
    stopped before training: the state it trains from."""
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3
    from ofa.imagenet_classification.elastic_nn.training import progressive_shrinking as ps

    net = OFAMobileNetV3(
        n_classes=17, width_mult=1.0, ks_list=[3, 5, 7], expand_ratio_list=expand_list, depth_list=[2, 3, 4]
    )
    net.load_state_dict(ofa_weights)
    manager = types.SimpleNamespace(net=net, start_epoch=0, write_log=lambda *a, **k: None)
    args = types.SimpleNamespace(resume=False, ofa_checkpoint_path=None)
    original = ps.load_models, ps.validate
    ps.load_models = lambda *a, **k: None  # the weights are already in place
    ps.validate = lambda *a, **k: (0.0, 0.0, 0.0, "")
    try:
        ps.train_elastic_expand(lambda *a, **k: None, manager, args, {})
    finally:
        ps.load_models, ps.validate = original
    return net


def test_the_expand_phase_resorts_equal_ofas():
    ofa = make_ofa(1.0, seed=3)
    net = from_ofa(ofa)
    config = replace(TrainConfig(strategy="ps", space="ofa_mbv3", data="digits").resolved(), epochs=12)
    strategy = build_strategy("ps", net.space, 12, 1, config)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    phases = {p.name: p for p in strategy.phases}
    weights = ofa.state_dict()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    for phase, expand_list in (("expand-1", [4, 6]), ("expand-2", [3, 4, 6])):
        strategy.on_epoch_start(phases[phase].start, random.Random(0), net, optimizer)
        oracle = _ofa_expand_phase(weights, expand_list)
        expected = from_ofa(oracle).state_dict()
        ours = net.state_dict()
        for key, value in expected.items():
            assert torch.equal(ours[key], value), f"{phase}: {key}"
        if phase == "expand-1":  # the first re-sort really moves channels (before the fix it kept
            # the e=4 prefix's channels where they were)
            assert sum(not torch.equal(ours[k], initial[k]) for k in ours) > 0
        weights = oracle.state_dict()
