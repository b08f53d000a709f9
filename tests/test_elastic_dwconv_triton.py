"""Runs the Triton checks (elastic_dwconv_triton_checks.py: the kernels against the reference;
elastic_dwconv_triton_training_checks.py: the kernels inside a few supernet training steps) where they
can run.

* GPU present, or the whole run started with TRITON_INTERPRET=1: in this process.
* Otherwise: in pytest subprocesses (one per file, side by side) with TRITON_INTERPRET=1 set before
  anything imports triton (Triton fixes interpreter vs compiler mode at import), on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ("elastic_dwconv_triton_checks.py", "elastic_dwconv_triton_training_checks.py")
IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or (
    torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
)

if IN_PROCESS:
    from elastic_dwconv_triton_checks import *  # noqa: F403  (pytest collects the imported tests)
    from elastic_dwconv_triton_training_checks import *  # noqa: F403
else:

    @pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
    def test_triton_kernels_under_interpreter():
        """Both check files at once, one pytest process each: the interpreter runs Python on one
        core, and this test is often the last one left running (about 50 s each)."""
        env = dict(os.environ, TRITON_INTERPRET="1")
        runs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-p",
                    "no:randomly",
                    os.path.join(HERE, name),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=os.path.dirname(HERE),
            )
            for name in CHECKS
        ]
        failures = []
        for name, run in zip(CHECKS, runs):
            stdout, stderr = run.communicate(timeout=1200)
            print(stdout[-4000:])
            if run.returncode != 0:
                failures.append(f"{name}:\n{stdout[-8000:]}{stderr[-4000:]}")
        assert not failures, "\n\n".join(failures)
