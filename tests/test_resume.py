"""Crash and resume: `batchinfer run` SIGKILLed mid-run, rerun, every input row exactly once;
and what `batchinfer status` says of the run at each step (running, stale, completed).

The same test runs on a local run directory and on the loopback S3 server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from scripts.sample_prompts import write_sample_prompts
from tests.conftest import BUCKET, REPO, assert_exactly_once, make_config, wait_for, write_yaml

pytestmark = pytest.mark.slow


class LocalRun:
    rows = 300  # a few hundred prompts

    def __init__(self, tmp_path):
        self.out = tmp_path / "out"
        self.input = str(tmp_path / "prompts")
        self.output = str(self.out)
        self.storage = {}

    def prepare(self, tmp_path):
        write_sample_prompts(self.input, files=3, rows_per_file=self.rows // 3, row_group_size=10)

    def parts(self) -> dict[str, tuple]:
        """part name -> (inode, mtime_ns, sha256) of every visible part."""
        found = {}
        for name in sorted(os.listdir(self.out)) if self.out.exists() else []:
            if name.startswith("part-"):
                st = os.stat(self.out / name)
                found[name] = (st.st_ino, st.st_mtime_ns,
                               hashlib.sha256((self.out / name).read_bytes()).hexdigest())
        return found

    def read(self) -> pd.DataFrame:
        return pd.read_parquet(self.out)

    def manifest(self) -> dict:
        return json.loads((self.out / "_batchinfer" / "manifest.json").read_text())

    def exists(self, name: str) -> bool:
        return (self.out / name).exists()


class S3Run:
    rows = 150  # the same test on S3, smaller: every request goes through the S3 server

    def __init__(self, s3):
        self.s3 = s3
        self.input = s3.url("prompts/")
        self.output = s3.url("out/run/")
        self.storage = {"endpoint_url": s3.endpoint}

    def prepare(self, tmp_path):
        write_sample_prompts(str(tmp_path / "local"), files=3, rows_per_file=self.rows // 3, row_group_size=10)
        self.s3.upload_dir(tmp_path / "local", "prompts/")

    def parts(self) -> dict[str, tuple]:
        """part name -> (ETag, LastModified) of every visible part."""
        self.s3.fs.invalidate_cache()
        try:
            infos = self.s3.fs.ls(f"{BUCKET}/out/run/", detail=True)
        except FileNotFoundError:  # nothing written yet
            infos = []
        return {i["name"].rsplit("/", 1)[1]: (i["ETag"], i["LastModified"])
                for i in infos if i["name"].rsplit("/", 1)[1].startswith("part-")}

    def read(self) -> pd.DataFrame:
        return self.s3.read("out/run/")

    def manifest(self) -> dict:
        return json.loads(self.s3.fs.cat_file(f"{BUCKET}/out/run/_batchinfer/manifest.json"))

    def exists(self, name: str) -> bool:
        return f"out/run/{name}" in self.s3.keys("out/run/")


def status(where, config: str, *options: str) -> subprocess.CompletedProcess:
    """`batchinfer status OUT --json` from another process, as a scheduler would call it."""
    return subprocess.run([sys.executable, "-m", "batchinfer.cli", "status", where.output, "--json",
                           "--config", config, *options], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def states(proc: subprocess.CompletedProcess) -> list[tuple[str, int]]:
    """(state, exit_code) of every JSON object `status` printed (one per line with --watch)."""
    try:
        infos = [json.loads(proc.stdout)]  # one object, indented
    except json.JSONDecodeError:
        infos = [json.loads(line) for line in proc.stdout.splitlines()]
    return [(info["state"], info["exit_code"]) for info in infos]


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return LocalRun(tmp_path)
    return S3Run(request.getfixturevalue("s3"))


def test_sigkill_then_rerun_answers_every_row_exactly_once(tmp_path, driver, where):
    where.prepare(tmp_path)
    cfg = make_config(tmp_path, input={"path": where.input}, output={"path": where.output},
                      storage=where.storage, run={"num_workers": 2, "rows_per_shard": 10},
                      sampling={"max_tokens": 2})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))

    first = driver("run", config)
    shards = where.rows // 10
    wait_for(lambda: len(where.parts()) >= 6, 300, "6 committed shards", first.proc)
    running = status(where, config)
    info = json.loads(running.stdout)
    assert (info["state"], running.returncode, info["exit_code"]) == ("running", 4, 4), running.stderr
    assert info["rows"]["total"] == where.rows and 6 <= info["shards"]["done"] < where.rows // 10
    # rows and tokens come from the driver's status record, rewritten on commits at most every 5 s
    wait_for(lambda: json.loads(status(where, config).stdout)["rows"]["done"] >= 60, 60,
             "the status record to count 60 rows", first.proc)
    assert info["driver"]["pid"] == first.proc.pid and not info["terminal"]
    first.kill_group()  # SIGKILL the whole process group: no handler, no cleanup
    first.wait(timeout=30)
    survived = where.parts()
    assert 6 <= len(survived) < shards, f"{len(survived)} parts at kill time"
    assert not where.exists("_SUCCESS")
    killed = status(where, config)  # its pid is gone from this host: stale at once
    assert (states(killed), killed.returncode) == ([("stale", 1)], 1), killed.stdout + killed.stderr
    assert "rerun to resume" in json.loads(killed.stdout)["detail"]

    second = driver("run", config, "--no-progress")
    wait_for(lambda: states(status(where, config))[0][0] in ("planning", "running"), 120,
             "the rerun to hold the run", second.proc)
    # a scheduler waiting on the run: one JSON line per refresh, until the state is final
    watch = subprocess.Popen([sys.executable, "-m", "batchinfer.cli", "status", where.output, "--json",
                              "--watch", "--interval", "0.5", "--config", config], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert second.wait(timeout=600) == 0, second.output()
        out, err = watch.communicate(timeout=120)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    seen = states(subprocess.CompletedProcess([], watch.returncode, out, err))
    assert (seen[-1], watch.returncode) == (("completed", 0), 0), out + err
    assert {s for s, _ in seen[:-1]} <= {"planning", "running"} and ("running", 4) in seen, seen
    assert "batchinfer: completed" in second.output()
    done = status(where, config)
    assert (states(done), done.returncode) == ([("completed", 0)], 0)
    assert json.loads(done.stdout)["rows"] == {"done": where.rows, "total": where.rows, "ok": where.rows,
                                               "failed": 0}

    df = assert_exactly_once(where.read(), where.rows)
    assert df.output.str.len().min() > 0

    after = where.parts()
    assert len(after) == shards
    for name, stat in survived.items():  # committed before the kill: never recomputed
        assert after[name] == stat, f"{name} was rewritten"

    manifest = where.manifest()
    assert manifest["status"] == "completed"
    assert manifest["rows"] == {"total": where.rows, "ok": where.rows, "failed": 0, "missing": 0}
    assert manifest["shards"] == {"total": shards, "committed": shards, "failed": 0}
    assert manifest["tokens"]["completion"] == df.completion_tokens.sum()
    assert manifest["this_run"]["shards"] <= shards - len(survived)
    assert sum(s["rows"] for s in manifest["shard_summaries"]) == where.rows
