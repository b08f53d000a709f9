"""Defaults that fit the data and the machine (issue: long runs survive, item 7): the space follows
the images' size and the run says so; the run reports its pace and, when it takes hours on a CPU,
which flags shorten it; skipped bad images stay skipped when the run is reopened."""

from __future__ import annotations

import warnings

import pytest
from test_data_validation import _tree, _truncate

from tofa_fast.cli import main
from tofa_fast.train import Run, TrainConfig, Trainer
from tofa_fast.train.data import DataWarning


@pytest.mark.parametrize("side,space", [(28, "digits"), (48, "rss"), (120, "tofa")])
def test_the_default_space_follows_the_image_size(tmp_path, side, space):
    root = _tree(tmp_path, side=side)
    assert TrainConfig(data=root).resolved().space == space
    assert TrainConfig(data=root, space="rss").resolved().space == "rss"  # --space still wins


def test_a_small_image_folder_trains_in_a_small_space_skipping_a_bad_image(tmp_path, capsys):
    root = tmp_path / "data"
    _tree(root, per_class=6, side=28)
    _truncate(root / "train" / "cat" / "0.png")
    out = str(tmp_path / "run")
    argv = ["train", "--data", str(root), "--out", out, "--epochs", "1", "--batch-size", "4", "--skip-bad-images"]
    with pytest.warns(DataWarning, match="skipping 1 unreadable images") as caught:
        assert main(argv) == 0
    printed = capsys.readouterr()
    assert "space 'digits' for 28 px images, stored at 32 px (--space to choose another)" in printed.out
    assert "s/step: about" in printed.err + printed.out
    warning = next(w for w in caught if w.category is DataWarning)  # as the CLI prints it: one line
    line = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
    assert line.startswith("tofa-fast: warning: skipping 1 unreadable images") and "data.py" not in line
    run = Run.open(out, device="cpu")
    with pytest.warns(DataWarning, match="skipping 1 unreadable images"):  # the data, loaded when first read
        assert run.config.skip_bad_images and len(run.splits.labelled) == 11  # reopened without the bad file


def test_a_run_of_hours_on_the_cpu_says_what_shortens_it(tmp_path, capsys):
    from test_train_run import tiny_config, tiny_digits

    trainer = Trainer(tiny_config(tmp_path), splits=tiny_digits())
    trainer._report_pace(1.0)
    assert "for the rest of the run" in capsys.readouterr().out
    trainer._report_pace(500.0)  # 10 steps of 500 s
    message = capsys.readouterr().out
    assert "83.3 min for the rest of the run" in message and "--space" in message and "--epochs" in message


def test_the_papers_knobs_are_flags_recorded_in_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def record(config, resume=False):
        seen["config"] = config.resolved()
        return []

    monkeypatch.setattr("tofa_fast.train.run.train", record)
    flags = "--label-smoothing 0 --threshold 0.9 --mu 3 --weight-decay 1e-4 --momentum 0.8 --no-nesterov"
    flags += " --dropout 0.2 --drop-connect 0 --warmup-epochs 0"
    assert main(["train", "--out", str(tmp_path), *flags.split()]) == 0
    c = seen["config"]
    assert (c.label_smoothing, c.threshold, c.mu, c.weight_decay, c.momentum, c.nesterov) == (
        0,
        0.9,
        3,
        1e-4,
        0.8,
        False,
    )
    assert (c.dropout, c.drop_connect, c.warmup_epochs) == (0.2, 0, 0)
    for bad, words in (
        ("--momentum 1", "momentum must be in"),
        ("--dropout -0.1", "dropout must be in"),
        ("--warmup-epochs -1", "warmup_epochs must be"),
    ):
        assert main(["train", "--out", str(tmp_path), *bad.split()]) == 2
        assert words in capsys.readouterr().err


def test_init_networks_take_the_datas_resolutions_and_their_normalisation(tmp_path, monkeypatch):
    from dataclasses import replace

    from test_train_run import tiny_config, tiny_digits

    import tofa_fast
    import tofa_fast.train.augment as augment

    config = replace(tiny_config(tmp_path, init="torchvision:mobilenet_v2", loss="sup"), epochs=1)
    trainer = Trainer(config, splits=tiny_digits())
    assert trainer.space.resolutions == tofa_fast.spaces.get("digits").resolutions  # 8 px digits: 24–32
    assert trainer.config.image_size == 32  # recorded: a reopened run reads images as training did
    seen = []
    weak = augment.weak_augment
    monkeypatch.setattr(augment, "weak_augment", lambda *args: seen.append(args) or weak(*args))
    half = (0.5, 0.5, 0.5)
    trainer.space = replace(trainer.space, input_mean=half, input_std=half)  # e.g. EfficientNet-Lite's
    trainer.fit()
    assert seen and seen[0][2:] == (half, half)
    run = trainer.run()
    assert run.calibration_batches(32)[0].min() >= -1.0 - 1e-6  # (x - 0.5) / 0.5 stays in [-1, 1]
