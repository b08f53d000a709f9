"""Command line: the contract names exist and `info` explains the backends."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tofa_fast.cli import build_parser, main


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tofa_fast 0.1.0" in out
    for backend in ("C++", "CUDA", "Triton"):
        assert backend in out
    assert "training step (--step" in out and "sequential" in out  # train/step.py's table
    assert "packed_batch_norm_act dispatch" in out and "cpu, float32: served by" in out


def test_python_dash_m_is_the_same_program():
    result = subprocess.run([sys.executable, "-m", "tofa_fast", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in result.stdout


def test_info_explains_a_missing_extension():
    env = {**os.environ, "TOFA_FAST_DISABLE_EXTENSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tofa_fast", "info"], capture_output=True, text=True, check=True, env=env
    )
    assert "disabled by TOFA_FAST_DISABLE_EXTENSION=1" in result.stdout


def test_package_works_without_the_extension():
    code = (
        "import torch, tofa_fast; assert not tofa_fast._extension.available();"
        "net = tofa_fast.Supernet('digits', 10).eval(); a = net.space.min_arch();"
        "x = torch.randn(1, 3, a.resolution, a.resolution); net.set_active(a);"
        "assert torch.allclose(net(x), net.extract(a).eval()(x), atol=1e-6)"
    )
    env = {**os.environ, "TOFA_FAST_DISABLE_EXTENSION": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_train_accepts_the_contract_flags():
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "digits",
            "--out",
            "r",
            "--epochs",
            "2",
            "--strategy",
            "rss",
            "--loss",
            "sup+fm+kd",
            "--labels-per-class",
            "5",
            "--init",
            "ofa:x.pt",
            "--seed",
            "3",
            "--resume",
            "--device",
            "cpu",
        ]
    )
    assert args.strategy == "rss" and args.labels_per_class == 5 and args.resume


@pytest.mark.parametrize("argv", [["train", "--strategy", "magic"], ["train", "--epochs", "0"], ["select", "run"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
