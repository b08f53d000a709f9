"""The CUDA configuration — bf16 autocast with fp32 master weights, channels_last — run end to end
on the CPU: train, resume, select, export, evaluate, population evaluation and search, for the
``tofa`` and ``ps`` strategies. Nothing the GPU path does that a CPU can do goes untested."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from search_fixtures import tiny_val_splits
from test_train_run import tiny_config

from tofa_fast.cli import main
from tofa_fast.train import Run, Trainer, load_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("strategy,epochs", [("tofa", 2), ("ps", 6)])
def test_bf16_channels_last_training_end_to_end(tmp_path, capsys, strategy, epochs):
    out = tmp_path / "run"
    config = replace(
        tiny_config(out, strategy=strategy, precision="bf16", channels_last=True, val_per_class=2), epochs=epochs
    )
    splits = tiny_val_splits()
    first = Trainer(config, splits=splits)
    assert first.config.precision == "bf16" and first.config.channels_last
    assert all(p.dtype == torch.float32 for p in first.net.parameters())  # master weights stay fp32
    first.fit(max_epochs=epochs // 2)
    resumed = Trainer(tiny_config(out), splits=splits, resume=True)  # the checkpoint's config wins
    assert resumed.config.precision == "bf16" and resumed.config.channels_last
    resumed.fit()
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    assert all(math.isfinite(r[k]) for r in log for k in ("sup", "kd") if k in r)
    weight = resumed.net.stem_conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.dtype == torch.float32
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["config"]["precision"] == "bf16" and state["config"]["channels_last"] is True

    run = Run.open(str(out), device="cpu")
    largest = run.net.space.max_arch()
    capsys.readouterr()
    assert main(["select", str(out), "--max-mflops", "1000"]) == 0
    assert run.space.arch_from_json(capsys.readouterr().out.strip()) in (largest, *run.selection.archs())
    assert main(["export", str(out), "--max-mflops", "1000", "-o", str(tmp_path / "model.pt")]) == 0
    assert torch.export.load(str(tmp_path / "model.pt")) is not None
    assert main(["evaluate", str(out)]) == 0
    assert main(["evaluate", str(out), "--population", "2", "--targets", "2", "--band", "0.3"]) == 0
    assert main(["search", str(out), "--budgets", "2", "--population", "4", "--generations", "1"]) == 0
    (targets,) = json.load(open(out / "population.json"))["runs"].values()
    assert len(targets) == 2 and all(0.0 <= t["mean"] <= 1.0 for t in targets)
