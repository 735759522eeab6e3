"""The import contracts in pyproject.toml ([tool.importlinter]) hold: one test per contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]

# `python -c` puts the working directory first on sys.path, so the contracts read this
# checkout's batchinfer/ even where the venv's editable install points at another one.
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


@pytest.mark.parametrize("contract", [c["id"] for c in CONTRACTS])
def test_import_contract(contract):
    proc = subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--contract", contract],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:]


def test_the_package_is_this_checkout_only():
    """The contracts read this checkout's modules, not another checkout's."""
    code = ("import batchinfer, grimp; print(list(batchinfer.__path__)); "
        "print(sorted(grimp.build_graph('batchinfer', cache_dir=None).modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == repr([str(REPO / "batchinfer")])
    assert "'batchinfer.runner'" in proc.stdout
