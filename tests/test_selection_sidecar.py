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


def _full_path(run: str, budget: float):
    try:
        return select_from_checkpoint(run, budget)
    except ValueError as exc:
        return str(exc)


def _fast_path(run: str, budget: float):
    try:
        return select_from_sidecar(run, budget)
    except ValueError as exc:
        return str(exc)


def test_the_sidecar_answers_every_budget_as_the_checkpoint_does(run):
    data = json.load(open(os.path.join(run, FILENAME)))
    assert data["sandwich"] is open_run(run, device="cpu").sandwich_selection
    assert set(data["index"]) <= set(data["flops"]) and len(data["index"]) > 1
    values = sorted(set(data["flops"].values()))
    # every indexed subnet's FLOPs exactly, just below each, between neighbours, and beyond both ends
    budgets = {v / 1e6 for v in values} | {v / 1e6 * (1 - 1e-9) for v in values}
    budgets |= {(a + b) / 2e6 for a, b in zip(values, values[1:])} | {values[0] / 2e6, values[-1] * 2e-6}
    for budget in sorted(budgets):
        assert _fast_path(run, budget) == _full_path(run, budget), budget


def test_select_imports_no_torch(run):
    code = (
        "import sys; from tofa_fast.cli import main; "
        f"code = main(['select', {run!r}, '--max-mflops', '100']); "
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
