"""Shared fixtures: one local Ray cluster per session, the real small model, config helpers.

Tiers: pure unit tests use no fixture here; engine tests use `tokenizer`/`engine_factory`
(the real SmolLM2 model on the CPU); integration tests use `ray_cluster`; tests marked
`slow` run `batchinfer` as real subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from batchinfer import models
from batchinfer.config import Config, config_from_dict

REPO = Path(__file__).resolve().parent.parent
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def model_folder() -> str:
    """The embedded model converted once into the local cache (about 30 s the first time)."""
    return models.materialize(models.resolve("smollm2-135m"), None)


@pytest.fixture(scope="session")
def ray_cluster(model_folder):
    """A local Ray cluster for the whole session; yields its address for subprocess drivers."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def make_config(tmp_path: Path, **sections) -> Config:
    """A config for the real small model with fast defaults, overridable per section."""
    raw = {
        "input": {"path": str(tmp_path / "prompts"), "id_column": "id"},
        "output": {"path": str(tmp_path / "out")},
        "engine": {"max_batch_size": 8},
        "sampling": {"max_tokens": 4},
        "run": {"num_workers": 1, "rows_per_shard": 20},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def write_yaml(path: Path, cfg: Config) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


class Driver:
    """A `batchinfer` subprocess in its own process group, stopped by its own pid."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchinfer.cli", *args], env=env, cwd=REPO,
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def driver(tmp_path, ray_cluster):
    """Start `batchinfer` subprocesses that join the session cluster; kill leftovers at teardown."""
    started: list[Driver] = []
    env = {**os.environ, **WORKER_ENV, "RAY_ADDRESS": ray_cluster}

    def start(*args: str) -> Driver:
        d = Driver(list(args), env, tmp_path / f"driver-{len(started)}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.kill_group()
            d.proc.wait(timeout=30)
