"""ONNX export works from a plain install (issue 16 item 1).

The README's first command, ``bash scripts/setup_env.sh && .venv/bin/tofa-fast train``, installs the
project with its main dependencies only. These tests read the metadata pip sees when it installs the
project (built from ``pyproject.toml`` exactly as pip builds it) and check the error path: when an
exporter package is missing, the message names the package and how to install it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tofa_fast.cli import main
from tofa_fast.train import onnx_requirements
from tofa_fast.train.onnx_requirements import (
    ONNX_EXPORT_REQUIREMENTS,
    MissingDependencyError,
    missing_onnx_requirements,
    require_onnx_export,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def requires_dist(tmp_path_factory) -> list[str]:
    """``Requires-Dist`` lines of the wheel metadata setuptools builds for pip (no compilation)."""
    out = tmp_path_factory.mktemp("metadata")
    code = (
        "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metadata = (out / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def _floor(requirements: list[str], package: str) -> str | None:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(package)}\s*>=\s*([\w.]+)", requirement)
        if match:
            return match.group(1)
    return None


def test_a_plain_install_brings_the_onnx_exporter(requires_dist):
    plain = [r for r in requires_dist if "extra ==" not in r]
    for package, floor in ONNX_EXPORT_REQUIREMENTS.items():
        assert _floor(plain, package) == floor, f"{package}>={floor} must be a main dependency, not an extra"


def test_the_readme_first_command_installs_the_main_dependencies():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    assert first.strip() == "bash scripts/setup_env.sh && .venv/bin/tofa-fast train"
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    # with no argument the script installs the project itself (hence its main dependencies), no extras
    assert re.search(r'extras=""\n\[ "\$\{1:-\}" = "test" \] && extras="\[test\]"', script)
    assert re.search(r'pip_install --no-build-isolation -e "\.\$\{extras\}"', script)


def test_this_environment_can_export():
    assert missing_onnx_requirements() == []
    require_onnx_export()


@pytest.mark.parametrize("package", sorted(ONNX_EXPORT_REQUIREMENTS))
def test_a_missing_exporter_package_is_named(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    requirement = f"{package}>={ONNX_EXPORT_REQUIREMENTS[package]}"
    assert missing_onnx_requirements() == [requirement]
    with pytest.raises(MissingDependencyError) as info:
        require_onnx_export()
    message = str(info.value)
    assert message.startswith(f"ONNX export needs {requirement} (missing or too old here)")
    assert f"pip install '{requirement}'" in message
    assert info.value.name == package
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


def test_a_too_old_exporter_package_is_named(monkeypatch):
    real = onnx_requirements._installed_version
    monkeypatch.setattr(onnx_requirements, "_installed_version", lambda p: "0.5.4" if p == "onnxscript" else real(p))
    assert missing_onnx_requirements() == [f"onnxscript>={ONNX_EXPORT_REQUIREMENTS['onnxscript']}"]


@pytest.mark.parametrize(
    ("version", "floor", "old"),
    [
        ("0.5.4", "0.6", True),
        ("0.6.0", "0.6", False),
        ("1.17.0rc1", "1.17", False),
        ("0.10", "0.6", False),
        ("2.0+cpu", "1.17", False),
    ],
)
def test_version_comparison(version, floor, old):
    assert (onnx_requirements._version_tuple(version) < onnx_requirements._version_tuple(floor)) is old


def test_cli_export_names_the_missing_package_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    output = tmp_path / "model.onnx"
    # The run folder does not even exist: the dependency is checked first, in one line, no traceback.
    assert main(["export", str(tmp_path / "run"), "--max-mflops", "3", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tofa-fast export: error: ONNX export needs onnxscript>=")
    assert "pip install 'onnxscript>=" in err and "Traceback" not in err
    assert not output.exists()
