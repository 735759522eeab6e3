"""Packages: what a runtime install holds, and what a missing fsspec implementation says
(issue 9, item 7). A URL whose protocol needs a package that is not installed (gs:// without
gcsfs) stops before Ray with exit 2 and the pip command, for `run`, `plan` and `validate`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from batchinfer import runner, storage
from tests.conftest import REPO, make_config, write_yaml

tomllib = pytest.importorskip("tomllib")


def absent(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is not None,
                              reason=f"{module} is installed here")


def runtime_requirements() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower(): d for d in deps}


@pytest.mark.parametrize("package", ["s3fs", "pandas", "fsspec", "pyarrow"])
def test_runtime_dependencies_read_object_storage_and_the_results(package):
    """s3fs: prompts on s3:// are the main job; pandas: the demo and the summary say
    `pandas.read_parquet` reads the results."""
    assert package in runtime_requirements()


def cli(tmp_path, command: str, **sections) -> subprocess.CompletedProcess:
    sections.setdefault("input", {"path": str(tmp_path / "prompts")})
    config = str(write_yaml(tmp_path / "job.yaml", make_config(tmp_path, **sections)))
    return subprocess.run([sys.executable, "-m", "batchinfer.cli", command, config],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@absent("gcsfs")
@pytest.mark.parametrize("command", ["run", "plan", "validate"])
def test_input_on_gs_without_gcsfs(tmp_path, command):
    done = cli(tmp_path, command, input={"path": "gs://bucket/x"})
    assert done.returncode == 2, done.stderr
    assert ("input.path 'gs://bucket/x': the gs:// protocol needs a package that is not "
            "installed") in done.stderr
    assert done.stderr.rstrip().endswith("pip install gcsfs")
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr


@absent("adlfs")
@pytest.mark.parametrize("command", ["run", "plan", "validate"])
def test_output_on_abfs_without_adlfs(tmp_path, command):
    (tmp_path / "prompts").mkdir()
    done = cli(tmp_path, command, output={"path": "abfs://container/out/"})
    assert done.returncode == 2, done.stderr
    assert "output.path 'abfs://container/out/': the abfs:// protocol needs" in done.stderr
    assert done.stderr.rstrip().endswith("pip install adlfs")
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr


@absent("paramiko")
def test_a_builtin_implementation_names_the_module_it_lacks(tmp_path):
    """fsspec's own sftp:// lives in fsspec and needs paramiko: the pip command says paramiko."""
    cfg = make_config(tmp_path, input={"path": "sftp://host/prompts/"})
    with pytest.raises(storage.MissingImplementation, match=r"sftp://.*: pip install paramiko$"):
        runner.preflight(cfg)


@absent("gcsfs")
def test_chained_urls_are_checked_link_by_link(tmp_path):
    with pytest.raises(storage.MissingImplementation, match="pip install gcsfs"):
        storage.locate("simplecache::gs://bucket/x")
    storage.check_installed("simplecache::s3://bucket/x", "input.path")  # s3fs is a core dependency


def test_an_unknown_protocol_is_a_usage_error(tmp_path):
    with pytest.raises(storage.StorageError, match="output.path 'nope://x/': unknown protocol 'nope'"):
        runner.preflight(make_config(tmp_path, output={"path": "nope://x/"}))
