"""A backend defined in this folder only runs a whole job through `batchinfer run`, its
settings are validated and shown by `batchinfer validate`, and its fingerprint part guards a
resume (issue 10, "Done when" 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from scripts.sample_prompts import write_sample_prompts
from tests.conftest import REPO, WORKER_ENV, assert_exactly_once, ids_of

BACKEND = "tests.backends.echo:EchoEngine"


def write_config(tmp_path, **options):
    config = {
        "input": {"path": str(tmp_path / "prompts"), "id_column": "id"},
        "output": {"path": str(tmp_path / "out")},
        "engine": {"backend": BACKEND, "max_batch_size": 4,
                   "options": {"prefix": "hi", "repeat": 2, **options}},
        "run": {"num_workers": 2, "rows_per_shard": 10},
    }
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cli(*args, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **WORKER_ENV, **({"RAY_ADDRESS": ray_address} if ray_address else {})}
    return subprocess.run([sys.executable, "-m", "batchinfer.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_validate_shows_the_backends_settings_with_their_docs_and_refuses_unknown_ones(tmp_path):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=4)
    shown = cli("validate", write_config(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert "    prefix: hi  # Text that starts every answer." in shown.stdout
    assert "    step_delay_s: 0.0  # Seconds each batch takes, to stand in for a slow GPU." in shown.stdout

    typo = cli("validate", write_config(tmp_path, prefx="x"))
    assert typo.returncode == 2
    assert "unknown key 'prefx' at engine.options; did you mean 'prefix'?" in typo.stderr
    assert "Traceback" not in typo.stderr

    too_long = cli("validate", write_config(tmp_path, prefix="x" * 150))
    assert too_long.returncode == 2
    assert "engine.options.prefix x repeat: got 300 characters; expected at most 200" in too_long.stderr

    build = cli("build-engine", write_config(tmp_path))
    assert build.returncode == 2 and "has no build step" in build.stderr


@pytest.mark.slow
def test_a_backend_in_one_folder_runs_a_whole_job_and_guards_its_resume(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=15, row_group_size=5)
    config = write_config(tmp_path)
    done = cli("run", config, "--no-progress", ray_address=ray_cluster)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "out", ids_of(30))
    df = pd.read_parquet(tmp_path / "out")
    assert df.output.str.fullmatch(r"hi hi \d+").all() and set(df.finish_reason) == {"stop"}

    # Its own fingerprint part: another prefix is another run, refused on resume (exit 2).
    other = cli("run", write_config(tmp_path, prefix="bye"), "--no-progress", ray_address=ray_cluster)
    assert other.returncode == 2
    assert "engine.options.prefix: 'hi' -> 'bye'" in other.stderr
    # A setting it declares neutral is the same run: nothing to do, exit 0.
    same = cli("run", write_config(tmp_path, step_delay_s=0.01), "--no-progress", ray_address=ray_cluster)
    assert same.returncode == 0, same.stderr


def test_an_installed_package_registers_the_backend_by_name_through_its_entry_point(monkeypatch):
    """`[project.entry-points."batchinfer.engines"] echo = "...:EchoEngine"` in a package's
    pyproject.toml makes `engine.backend: echo` work (importlib.metadata entry points)."""
    from importlib.metadata import EntryPoint

    from batchinfer import registry
    from batchinfer.config_loader import config_from_dict

    installed = [EntryPoint("echo", BACKEND, registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry.importlib.metadata, "entry_points",
                        lambda group: [e for e in installed if e.group == group])
    assert "echo" in registry.names()
    cfg = config_from_dict({"engine": {"backend": "echo", "options": {"prefix": "yo"}}})
    assert registry.engine_class("echo").name == "echo" and cfg.engine.options.prefix == "yo"
