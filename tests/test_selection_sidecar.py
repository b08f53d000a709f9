"""RUN/selection.json: `tofa-fast select` answers from it without torch, and exactly as the checkpoint would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from test_train_run import tiny_config, tiny_digits

from tofa_fast.cli import main
from tofa_fast.train import Trainer
from tofa_fast.train.run import open_run, select_from_checkpoint
from tofa_fast.train.selection_sidecar import FILENAME, select_from_sidecar


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(replace(tiny_config(out), epochs=1), splits=tiny_digits())
    trainer.fit()
    return str(out)


def _full_path(run: str, budget: float, metric: str = "max_mflops"):
    try:
        return select_from_checkpoint(run, **{metric: budget})
    except ValueError as exc:
        return str(exc)


def _fast_path(run: str, budget: float, metric: str = "max_mflops"):
    try:
        return select_from_sidecar(run, **{metric: budget})
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize("metric, key, unit", [("max_mflops", "flops", 1e6), ("max_params", "params", 1)])
def test_the_sidecar_answers_every_budget_as_the_checkpoint_does(run, metric, key, unit):
    data = json.load(open(os.path.join(run, FILENAME)))
    assert data["sandwich"] is open_run(run, device="cpu").sandwich_selection
    assert set(data["index"]) <= set(data[key]) and len(data["index"]) > 1
    values = sorted(set(data[key].values()))
    # every indexed subnet's value exactly, just below each, between neighbours, and beyond both ends
    budgets = {v / unit for v in values} | {v / unit * (1 - 1e-9) for v in values}
    budgets |= {(a + b) / 2 / unit for a, b in zip(values, values[1:])} | {values[0] / 2 / unit, values[-1] * 2 / unit}
    for budget in sorted(budgets):
        assert _fast_path(run, budget, metric) == _full_path(run, budget, metric), budget


def test_a_sidecar_without_parameter_counts_sends_a_parameter_budget_to_the_checkpoint(run, tmp_path):
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)  # copy2 keeps the checkpoint's mtime: the sidecar still matches
    sidecar = os.path.join(copy, FILENAME)
    data = json.load(open(sidecar))
    del data["params"]  # as written before parameter budgets existed
    with open(sidecar, "w") as f:
        json.dump(data, f)
    assert select_from_sidecar(copy, max_params=1e9) is None
    assert select_from_sidecar(copy, max_mflops=100) is not None  # FLOPs budgets still answer from it


@pytest.mark.parametrize("budget", [["--max-mflops", "100"], ["--max-params", "1e9"]])
def test_select_imports_no_torch(run, budget):
    code = (
        "import sys; from tofa_fast.cli import main; "
        f"code = main(['select', {run!r}, *{budget!r}]); "
        "assert 'torch' not in sys.modules, 'select imported torch'; sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resolution"] > 0


@pytest.mark.parametrize("damage", ["missing", "stale", "corrupt", "foreign"])
def test_a_sidecar_that_does_not_describe_the_checkpoint_is_ignored(run, tmp_path, damage, capsys):
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)  # copy2 keeps the checkpoint's mtime: the sidecar still matches
    assert select_from_sidecar(copy, 100) is not None
    sidecar = os.path.join(copy, FILENAME)
    if damage == "missing":
        os.remove(sidecar)
    elif damage == "stale":  # a checkpoint written after its sidecar (the process died in between)
        stat = os.stat(os.path.join(copy, "checkpoint.pt"))
        os.utime(os.path.join(copy, "checkpoint.pt"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    elif damage == "corrupt":
        with open(sidecar, "w") as f:
            f.write('{"format": "tofa_fast-selection-1", "checkpo')
    else:
        with open(sidecar, "w") as f:
            json.dump({"format": "something-else"}, f)
    assert select_from_sidecar(copy, 100) is None
    capsys.readouterr()
    assert main(["select", copy, "--max-mflops", "100"]) == 0  # through the checkpoint
    assert json.loads(capsys.readouterr().out) == _full_path(run, 100).to_dict()
