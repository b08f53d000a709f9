"""Backend status in one place (tofa_fast.backends): the op dispatch, the estimator and `info` agree.

Also that the elastic_dwconv2d modules depend one way (reference ← dispatch ← operator): no import
circle between them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import torch

from tofa_fast import _extension, backends
from tofa_fast.estimator import Estimator, cpp_estimator_available
from tofa_fast.info import info_text
from tofa_fast.ops import elastic_dwconv_dispatch as dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = os.path.join(ROOT, "tofa_fast", "ops")


def test_estimator_and_dispatch_read_the_same_reasons():
    assert cpp_estimator_available() == (not backends.estimator_reasons())
    assert Estimator("digits", 10).backend == ("cpp" if cpp_estimator_available() else "python")
    problem = dispatch.DwconvProblem("cpu", torch.float32, 3, 7, 1, 2)
    extension = backends.extension_reasons(*dispatch.CPP.OPS)
    assert all(reason in dispatch.CPP.not_supported_reasons(problem) for reason in extension)
    cuda_problem = dispatch.DwconvProblem("cuda", torch.float32, 3, 7, 1, 2)
    assert all(r in dispatch.CUDA.not_supported_reasons(cuda_problem) for r in backends.cuda_build_reasons())
    triton = backends.triton_package_reasons() or backends.triton_device_reasons("cuda")
    assert all(r in dispatch.TRITON.not_supported_reasons(cuda_problem) for r in triton)


def test_info_shows_the_estimator_backend():
    status = backends.estimator_status()
    assert status.available == cpp_estimator_available()
    assert f"estimator (FLOPs / params / latency table sums): {status.detail}" in info_text()


def test_a_stale_build_is_named():
    if not _extension.available():
        assert backends.extension_reasons("estimator_sum") == [_extension.LOAD_ERROR]
        return
    (reason,) = backends.extension_reasons("estimator_sum", "no_such_kernel")
    assert "no_such_kernel" in reason and "stale build" in reason and "estimator_sum" not in reason


def test_without_the_extension_every_reader_says_why():
    script = textwrap.dedent(
        """
        from tofa_fast import backends
        from tofa_fast.estimator import Estimator
        from tofa_fast.info import info_text
        assert Estimator("digits", 10).backend == "python"
        text = info_text()
        assert "estimator (FLOPs / params / latency table sums): NumPy reference" in text, text
        assert text.count("disabled by TOFA_FAST_DISABLE_EXTENSION=1") >= 3, text
        print(backends.estimator_status().detail)
        """
    )
    env = dict(os.environ, TOFA_FAST_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "disabled by TOFA_FAST_DISABLE_EXTENSION=1" in result.stdout


def _imported_modules(path: str) -> set[str]:
    """Modules of tofa_fast.ops a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tofa_fast.ops."):
            names.add(node.module.removeprefix("tofa_fast.ops."))
    return names


def test_elastic_dwconv_modules_depend_one_way():
    reference = _imported_modules(os.path.join(OPS, "elastic_dwconv_reference.py"))
    dispatch_imports = _imported_modules(os.path.join(OPS, "elastic_dwconv_dispatch.py"))
    assert not reference & {"elastic_dwconv", "elastic_dwconv_dispatch"}
    assert "elastic_dwconv" not in dispatch_imports and "elastic_dwconv_reference" in dispatch_imports
    assert "elastic_dwconv_dispatch" in _imported_modules(os.path.join(OPS, "elastic_dwconv.py"))
