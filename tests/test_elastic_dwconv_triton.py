"""Runs the Triton checks (elastic_dwconv_triton_checks.py: the kernels against the reference;
elastic_dwconv_triton_training_checks.py: the kernels inside a few supernet training steps) where they
can run.

* GPU present, or the whole run started with TRITON_INTERPRET=1: in this process.
* Otherwise: in a pytest subprocess with TRITON_INTERPRET=1 set before anything imports triton
  (Triton fixes interpreter vs compiler mode at import), on CPU tensors.
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
        env = dict(os.environ, TRITON_INTERPRET="1")
        checks = [os.path.join(HERE, name) for name in CHECKS]
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *checks],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            cwd=os.path.dirname(HERE),
        )
        print(result.stdout[-4000:])
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
