"""Trainer end to end on tiny data: resume exactness, run folder, CLI, export, bad input (SPEC §7, §10)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from tofa_fast.cli import main
from tofa_fast.train import TrainConfig, Trainer, load_checkpoint
from tofa_fast.train.data import ImageSet, load_data, load_digits


def tiny_digits():
    splits = load_digits(labels_per_class=2, seed=0, size=32)
    splits.unlabelled = splits.unlabelled.subset(range(40))
    splits.test = splits.test.subset(range(0, 360, 12))
    return splits


def tiny_config(out, **kw) -> TrainConfig:
    return TrainConfig(
        out=str(out), epochs=2, batch_size=8, seed=1, palette_size=2, calibration_images=40, device="cpu", **kw
    )


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    splits = tiny_digits()
    straight = Trainer(tiny_config(tmp_path / "a"), splits=splits)
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b"), splits=splits)
    first.fit(max_epochs=1)
    assert first.epoch == 1 and first.step == first.steps_per_epoch
    resumed = Trainer(tiny_config(tmp_path / "b"), splits=splits, resume=True)
    assert resumed.step == first.step and resumed.selection.state_dict() == first.selection.state_dict()
    resumed.fit()
    assert resumed.step == straight.step == 2 * straight.steps_per_epoch
    assert resumed.selection.state_dict() == straight.selection.state_dict()
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in open(tmp_path / "b" / "train_log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2] and {"sup", "fm", "kd", "mask"} <= set(log[0])


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, loss="sup+fm"), splits=tiny_digits())
    trainer.fit(max_epochs=1)
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert {"model", "optimizer", "scheduler", "selection_index", "config", "epoch", "step", "space"} <= set(state)
    assert state["config"]["loss"] == "sup+fm"
    # the two sampled members of every sandwich are indexed (selection.py explains why not a_max/a_min)
    assert sum(state["selection_index"].values()) == sum(2 * t for t in range(1, trainer.step + 1))


def _write_folder(root, classes=("cat", "dog", "owl"), per_class=6, test_per_class=3, unlabelled=8, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)

    def save(path, c):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        img[:, :, c % 3] += np.uint8(120)  # class signal in one colour channel
        Image.fromarray(img).save(path)

    for c, name in enumerate(classes):
        for i in range(per_class):
            save(os.path.join(root, "train", name, f"{i}.png"), c)
        for i in range(test_per_class):
            save(os.path.join(root, "test", name, f"{i}.png"), c)
    for i in range(unlabelled):
        save(os.path.join(root, "unlabelled", f"u{i}.png"), i)
    return str(root)


def test_cli_train_select_export_evaluate_on_an_image_folder(tmp_path, capsys):
    import onnxruntime as ort

    data = _write_folder(tmp_path / "data")
    run = str(tmp_path / "run")
    argv = [
        "train",
        "--data",
        data,
        "--space",
        "digits",
        "--out",
        run,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    for name in ("checkpoint.pt", "palette.json", "report.md", "pareto.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    palette = json.load(open(os.path.join(run, "palette.json")))
    assert palette and all(set(e) == {"budget_mflops", "arch", "flops", "params", "accuracy"} for e in palette)
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in palette)
    assert [e["flops"] for e in palette] == sorted(e["flops"] for e in palette)

    capsys.readouterr()
    budget = palette[-1]["flops"] / 1e6 + 0.01
    assert main(["select", run, "--max-mflops", str(budget)]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen == palette[-1]["arch"]

    onnx_path = str(tmp_path / "model.onnx")
    assert main(["export", run, "--max-mflops", str(budget), "-o", onnx_path]) == 0
    from tofa_fast.train.run import open_run

    record = open_run(run, device="cpu")
    arch = record.space.arch_from_dict(chosen)
    sub = record.calibrated_subnet(arch)
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, sub(x).detach().numpy(), rtol=1e-4, atol=1e-5)

    pt_path = str(tmp_path / "model.pt")
    assert main(["export", run, "--max-mflops", str(budget), "-o", pt_path]) == 0
    program = torch.export.load(pt_path)
    torch.testing.assert_close(program.module()(x), sub(x), rtol=1e-4, atol=1e-5)

    assert main(["evaluate", run]) == 0
    assert "MFLOPs" in capsys.readouterr().out

    # A subnet named instead of a budget (a validation search's pick, `select`'s saved output): the
    # same model as the budget's, and the palette's accuracy for it.
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(chosen))
    named_pt = str(tmp_path / "named.pt")
    assert main(["export", run, "--arch", str(arch_file), "-o", named_pt]) == 0
    assert torch.equal(torch.export.load(named_pt).module()(x), program.module()(x))
    capsys.readouterr()
    assert main(["evaluate", run, "--arch", str(arch), "--arch", json.dumps(palette[0]["arch"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [float(line.split("accuracy ")[1].split("%")[0]) for line in lines] == [
        round(100 * e["accuracy"], 2) for e in (palette[0], palette[-1])
    ]
    assert main(["export", run, "--arch", "missing.json", "-o", named_pt]) == 2
    assert "--arch file 'missing.json' does not exist" in capsys.readouterr().err
    assert main(["evaluate", run, "--arch", "r8-not-an-arch"]) == 2
    assert "is not a subnet of space" in capsys.readouterr().err

    # Budgets in parameters and in predicted latency (TOFA Algorithm 2's other metrics).
    from tofa_fast.estimator import Estimator
    from tofa_fast.estimator.profile import ProfileSettings, profile_space
    from tofa_fast.train.selection import select_subnet

    estimator = Estimator(record.space, num_classes=record.num_classes)
    params_budget = float(estimator.params([arch])[0])
    assert main(["select", run, "--max-params", str(params_budget)]) == 0
    by_params = record.space.arch_from_dict(json.loads(capsys.readouterr().out))
    assert by_params == select_subnet(record.selection, estimator.params, params_budget, "params")
    assert estimator.params([by_params])[0] <= params_budget
    table = str(tmp_path / "latency.json")
    fast = {"min_time_s": 0.001, "repeats": 2, "calibration": 3, "passes": 2, "cold_bytes": 1}
    settings = ProfileSettings(device=torch.device("cpu"), num_classes=record.num_classes, threads=1, **fast)
    profile_space(record.space, table, settings, log=lambda _: None)
    timed = Estimator(record.space, num_classes=record.num_classes, latency_table=table)
    latency_budget = float(timed.latency([arch])[0]) * 1.001
    assert main(["select", run, "--max-latency-ms", str(latency_budget), "--latency-table", table]) == 0
    by_latency = record.space.arch_from_dict(json.loads(capsys.readouterr().out))
    assert by_latency == select_subnet(record.selection, timed.latency, latency_budget, "latency")
    latency_pt = str(tmp_path / "latency.pt")
    assert (
        main(["export", run, "--max-latency-ms", str(latency_budget), "--latency-table", table, "-o", latency_pt]) == 0
    )
    assert str(by_latency) in capsys.readouterr().out
    assert main(["select", run, "--max-latency-ms", "1"]) == 2
    assert "needs a latency table" in capsys.readouterr().err
    assert main(["select", run, "--max-params", "1", "--latency-table", table]) == 2
    assert "is for a latency budget" in capsys.readouterr().err
    assert main(["select", run, "--max-params", "1"]) == 2
    assert "no trained subnet fits params" in capsys.readouterr().err

    assert main(["select", run, "--max-mflops", "0.0001"]) == 2
    assert "smallest available" in capsys.readouterr().err


# -- bad input ----------------------------------------------------------------------------------


def test_bad_data_folders(tmp_path):
    with pytest.raises(ValueError, match="neither 'digits'"):
        load_data(str(tmp_path / "missing"), 32, None, 0)
    root = tmp_path / "d"
    (root / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains no images"):
        load_data(str(root), 32, None, 0)
    _write_folder(tmp_path / "e")
    os.rename(tmp_path / "e" / "test" / "owl", tmp_path / "e" / "test" / "emu")
    with pytest.raises(ValueError, match="do not match the training classes"):
        load_data(str(tmp_path / "e"), 32, None, 0)
    _write_folder(tmp_path / "f")
    with pytest.raises(ValueError, match="labels_per_class=10 but class 0 has only 6"):
        load_data(str(tmp_path / "f"), 32, 10, 0)


def test_torchvision_sets_are_not_downloaded_unless_asked(tmp_path):
    with pytest.raises(ValueError, match="cifar10 not found under .*pass --download"):
        load_data("cifar10", 32, None, 0, root=str(tmp_path))
    with pytest.raises(ValueError, match="FGVCAircraft not found under .*pass --download"):
        load_data("FGVCAircraft", 32, None, 0, root=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing was fetched


def test_bad_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(str(garbage))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a tofa_fast checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "x", "obj": ImageSet}, unsafe)  # a class: refused by weights_only
    with pytest.raises(ValueError, match="not a tofa_fast checkpoint: it pickles Python objects"):
        load_checkpoint(str(unsafe))
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(replace(tiny_config(tmp_path / "none")), resume=True)


def test_supervised_only_needs_no_unlabelled_data(tmp_path):
    splits = tiny_digits()
    splits.unlabelled = None
    with pytest.raises(ValueError, match="needs unlabelled data"):
        Trainer(tiny_config(tmp_path, loss="sup+fm"), splits=splits)
    trainer = Trainer(tiny_config(tmp_path, loss="sup"), splits=splits)
    trainer.fit(max_epochs=1)
    assert trainer.step == len(splits.labelled) // 8


def test_loss_variants_train_the_same_number_of_steps(tmp_path):
    splits = tiny_digits()
    steps = {
        loss: Trainer(tiny_config(tmp_path, loss=loss), splits=splits).steps_per_epoch for loss in ("sup", "sup+fm+kd")
    }
    assert steps["sup"] == steps["sup+fm+kd"] == len(splits.unlabelled) // 8


def test_init_from_torchvision_trains_and_resumes_from_the_saved_space(tmp_path):
    splits = tiny_digits()
    splits.unlabelled = splits.unlabelled.subset(range(8))
    config = replace(tiny_config(tmp_path, init="torchvision:mobilenet_v3_small", loss="sup"), epochs=1)
    trainer = Trainer(config, splits=splits)
    assert trainer.space.name != "digits" and trainer.net.classifier.out_features == 10
    trainer.fit()
    resumed = Trainer(tiny_config(tmp_path), splits=splits, resume=True)  # no --init needed any more
    assert resumed.space == trainer.space
    for key, value in trainer.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
