"""OpenAI Batch API files in and out, end to end (issue 12): the shipped example file
(tests/data/openai_batch.jsonl: chat and completions requests, JSON schema and choice formats,
one broken line) run from a local path (killed with SIGKILL and resumed) and from the loopback
S3 server (gzipped); the output lines read with the `openai` package's own types."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batchinfer import runner
from tests.conftest import REPO, make_config, wait_for, write_yaml

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "tests" / "data" / "openai_batch.jsonl"
BROKEN_LINE = 21
REQUESTS = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip().endswith("}")]


def openai_config(tmp_path: Path, input_path: str, output_path: str, **sections):
    sections.setdefault("run", {}).update({"num_workers": 1, "rows_per_shard": 4})
    return make_config(tmp_path, input={"path": input_path, "format": "openai_batch", "id_column": None,
                                        **sections.pop("input", {})},
                       output={"path": output_path, "format": "openai_batch"}, **sections)


def check_output(parts: dict[str, bytes], errors: dict[str, bytes], source: str) -> dict[str, dict]:
    """Every request answered exactly once, in the Batch API's output shape; returns the lines
    by custom_id. The broken line, which has no custom_id, is answered as "<source>:<line>"."""
    broken_id = f"{source}:{BROKEN_LINE}"
    lines = [json.loads(raw) for data in parts.values() for raw in data.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines) == len(REQUESTS) + 1, "one line per request, none twice"
    assert set(by_id) == {r["custom_id"] for r in REQUESTS} | {broken_id}
    for request in REQUESTS:
        line = by_id[request["custom_id"]]
        assert set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_")
        if line["response"] is None:
            continue
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        kind = ChatCompletion if request["url"] == "/v1/chat/completions" else Completion
        parsed = kind.model_validate(body)  # the openai package's own type of the body
        assert parsed.model == "gpt-4o-mini" and parsed.usage.total_tokens > 0
        limit = request["body"].get("max_tokens") or request["body"].get("max_completion_tokens")
        assert parsed.usage.completion_tokens <= limit
        text = parsed.choices[0].message.content if kind is ChatCompletion else parsed.choices[0].text
        fmt = request["body"].get("response_format")
        if fmt and fmt["type"] == "json_schema" and line["error"] is None:
            jsonschema.validate(json.loads(text), fmt["json_schema"]["schema"])
        if fmt and fmt["type"] == "choice" and line["error"] is None:
            assert text in fmt["choice"]
        if line["error"] is not None:  # output kept, but cut by max_tokens before its format was complete
            assert line["error"]["code"] in ("incomplete_json", "incomplete_output")
            assert parsed.choices[0].finish_reason == "length"
    bad_role = by_id["bad-role"]  # a request whose messages the chat template cannot take
    assert bad_role["response"] is None and bad_role["error"] == {
        "code": "bad_messages", "message": "line 36: message 0 has role 'robot', expected one of system, user, "
                                           "assistant, tool"}
    broken = by_id[broken_id]
    assert broken["response"] is None and broken["error"]["code"] == "bad_request"
    assert broken["error"]["message"].startswith(f"line {BROKEN_LINE}: not valid JSON")
    failed = [json.loads(raw) for data in errors.values() for raw in data.splitlines()]
    assert sorted(f["custom_id"] for f in failed) == sorted(i for i, line in by_id.items() if line["error"])
    return by_id


class Local:
    """The example file in a local folder, results in a local run directory."""

    source = EXAMPLE.name

    def __init__(self, tmp_path: Path):
        (tmp_path / "in").mkdir()
        shutil.copy(EXAMPLE, tmp_path / "in" / EXAMPLE.name)
        self.input, self.out, self.storage = str(tmp_path / "in"), tmp_path / "out", {}
        self.output = str(self.out)

    def files(self, folder: str = "") -> dict[str, bytes]:
        """name -> bytes of the part files (in `folder`, e.g. errors/)."""
        return {p.name: p.read_bytes() for p in sorted((self.out / folder).glob("part-*.jsonl"))}

    def stats(self) -> dict[str, tuple]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in self.out.glob("part-*.jsonl")}

    def manifest(self) -> dict:
        return json.loads((self.out / "_batchinfer" / "manifest.json").read_text())


class S3Batch:
    """The example file gzipped on the loopback S3 server, results to S3."""

    source = "input.jsonl.gz"

    def __init__(self, s3):
        self.s3 = s3
        s3.fs.pipe_file(f"{s3.bucket}/batches/{self.source}", gzip.compress(EXAMPLE.read_bytes()))
        self.input, self.output = s3.url("batches/"), s3.url("out/run/")
        self.storage = {"endpoint_url": s3.endpoint}

    def _infos(self, folder: str) -> list[dict]:
        self.s3.fs.invalidate_cache()
        try:
            infos = self.s3.fs.ls(f"{self.s3.bucket}/out/run/{folder}", detail=True)
        except FileNotFoundError:
            return []
        return [i for i in infos if re.fullmatch(r"part-\d{6}\.jsonl", i["name"].rsplit("/", 1)[1])]

    def files(self, folder: str = "") -> dict[str, bytes]:
        return {i["name"].rsplit("/", 1)[1]: self.s3.fs.cat_file(i["name"]) for i in self._infos(folder)}

    def stats(self) -> dict[str, tuple]:
        return {i["name"].rsplit("/", 1)[1]: (i["ETag"], i["LastModified"]) for i in self._infos("")}

    def manifest(self) -> dict:
        return json.loads(self.s3.fs.cat_file(f"{self.s3.bucket}/out/run/_batchinfer/manifest.json"))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    return Local(tmp_path) if request.param == "local" else S3Batch(request.getfixturevalue("s3"))


def test_a_batch_file_killed_mid_run_resumes_to_exactly_once(tmp_path, driver, where):
    cfg = openai_config(tmp_path, where.input, where.output, storage=where.storage)
    config = str(write_yaml(tmp_path / "job.yaml", cfg))

    first = driver("run", config, "--no-progress")
    wait_for(lambda: len(where.stats()) >= 2, 300, "2 committed parts", first.proc, details=first.output)
    first.kill_group()  # SIGKILL the whole process group: no handler, no cleanup
    first.wait(timeout=30)
    survived = where.stats()
    assert 2 <= len(survived) < 9, f"{len(survived)} parts at kill time"

    second = driver("run", config, "--no-progress")
    assert second.wait(timeout=600) == 3, second.output()  # partial: the broken line is a failed row
    log = second.output() + first.output()
    assert "batchinfer: partial" in second.output()
    assert "_errors/: failed requests" in second.output()
    assert "body fields not applied by batchinfer" in log and "logprobs (6 requests)" in log
    parts = where.files()
    assert len(parts) == 9
    after = where.stats()
    for name, stat in survived.items():  # committed before the kill: never recomputed
        assert after[name] == stat, f"{name} was rewritten"
    by_id = check_output(parts, where.files("_errors"), where.source)
    assert sum(1 for line in by_id.values() if line["response"]) >= len(REQUESTS) - 3
    manifest = where.manifest()
    assert manifest["rows"]["total"] == len(REQUESTS) + 1 and manifest["rows"]["missing"] == 0
    assert manifest["errors"]["bad_request"] == 1 and manifest["errors"]["bad_messages"] == 1


def test_an_openai_batch_file_to_parquet_results(tmp_path, ray_cluster):
    """Either format converts: JSONL requests in, one Parquet table out (custom_id as id)."""
    import pandas as pd

    lines = EXAMPLE.read_text().splitlines()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "few.jsonl").write_text("\n".join([*lines[:3], lines[-15], lines[BROKEN_LINE - 1]]) + "\n")
    cfg = openai_config(tmp_path, str(tmp_path / "in"), str(tmp_path / "out"))
    cfg.output.format = "parquet"
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("partial", 3)
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    assert sorted(df.index) == sorted([json.loads(x)["custom_id"] for x in [*lines[:3], lines[-15]]] + ["few.jsonl:5"])
    assert df.error["few.jsonl:5"].startswith("bad_request: line 5: not valid JSON")
    assert df.error.notna().sum() == 1 and (df.completion_tokens[df.error.isna()] > 0).all()


def test_a_repeated_custom_id_or_an_unserved_model_stops_before_any_engine(tmp_path):
    (tmp_path / "in").mkdir()
    lines = EXAMPLE.read_text().splitlines()
    (tmp_path / "in" / "dup.jsonl").write_text("\n".join([*lines, lines[3]]) + "\n")
    cfg = openai_config(tmp_path, str(tmp_path / "in"), str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-m", "batchinfer.cli", "run", str(write_yaml(tmp_path / "a.yaml", cfg))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "custom_id repeats 1 value(s), e.g. 'chat-03'" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "in" / "dup.jsonl").write_text("\n".join(lines) + "\n")
    cfg = openai_config(tmp_path, str(tmp_path / "in"), str(tmp_path / "out"), input={"models": ["llama"]})
    done = subprocess.run([sys.executable, "-m", "batchinfer.cli", "run", str(write_yaml(tmp_path / "b.yaml", cfg))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "asks for body.model 'gpt-4o-mini' (35 requests); this job serves ['llama']" in done.stderr
    assert not (tmp_path / "out" / "_batchinfer" / "plan.json").exists()
