"""Object storage for real: runs, commits and errors against an S3 HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from batchinfer import readers, runner
from batchinfer.atomic import read_pinned
from batchinfer.config import StorageConfig
from batchinfer.plan import list_inputs, make_plan
from batchinfer.readers.parquet import ParquetReader
from batchinfer.run_store import RunStore
from batchinfer.storage import InputChanged, StorageError
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import BUCKET, REPO, hold_run, ids_of, make_config, write_yaml
from tests.flaky_proxy import FlakyProxy
from tests.test_run_store import part_bytes


def s3_config(tmp_path, s3, endpoint=None, **sections):
    sections.setdefault("input", {})
    sections["input"].setdefault("path", s3.url("prompts/"))
    sections.setdefault("output", {"path": s3.url("out/run/")})
    sections.setdefault("storage", {"endpoint_url": endpoint or s3.endpoint})
    return make_config(tmp_path, **sections)


def upload_prompts(tmp_path, s3, files=2, rows=10, key="prompts/", row_group_size=10):
    write_sample_prompts(str(tmp_path / "local-prompts"), files=files, rows_per_file=rows,
                         row_group_size=row_group_size)
    return s3.upload_dir(tmp_path / "local-prompts", key)


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the run gets as far as Ray (and so any engine)."""
    def refuse(cfg):
        raise AssertionError("the run reached Ray before failing")
    monkeypatch.setattr(runner, "_connect_ray", refuse)


def test_s3_prompts_to_s3_results(tmp_path, s3, ray_cluster):
    upload_prompts(tmp_path, s3, files=2, rows=15)
    cfg = s3_config(tmp_path, s3, input={"passthrough_columns": ["category"]})
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("completed", 0)

    df = s3.read("out/run/")
    assert sorted(df.id) == ids_of(30)
    assert df.output.str.len().min() > 0
    keys = s3.keys("out/run/")
    assert "out/run/_SUCCESS" in keys and "out/run/_batchinfer/manifest.json" in keys
    assert not [k for k in keys if "staging" in k]  # S3 commits need no staging area
    manifest = json.loads(s3.fs.cat_file(f"{BUCKET}/out/run/_batchinfer/manifest.json"))
    assert manifest["rows"]["ok"] == 30 and manifest["output"] == s3.url("out/run")
    plan = json.loads(s3.fs.cat_file(f"{BUCKET}/out/run/_batchinfer/plan.json"))
    assert all(f["version"].startswith("etag:") for f in plan["files"])

    again = runner.run(cfg, progress=False)
    assert not again.did_work and again.exit_code == 0


def _commit_on_s3(args):
    endpoint, url, generation, worker, barrier = args
    data, summary = part_bytes(3, worker)
    store = RunStore(url, StorageConfig(endpoint_url=endpoint))
    barrier.wait()
    return worker, store.commit("part-000003.parquet", data, summary, generation)


def test_same_shard_committed_concurrently_on_s3_exactly_one_wins(s3):
    url = s3.url("race/run")
    generation = hold_run(url, StorageConfig(endpoint_url=s3.endpoint))
    n = 8
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(n)
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            outcomes = pool.map(_commit_on_s3, [(s3.endpoint, url, generation, i, barrier)
                                                for i in range(n)])
    winners = [worker for worker, won in outcomes if won]
    assert len(winners) == 1
    df = s3.read("race/run")
    assert len(df) == 5 and set(df.output) == {f"worker-{winners[0]}"}
    # No orphan: the only objects are the winner's part and its commit record.
    assert s3.keys("race/") == ["race/run/_batchinfer/commits/part-000003.json",
                                "race/run/_batchinfer/driver.json", "race/run/part-000003.parquet"]
    assert RunStore(url, StorageConfig(endpoint_url=s3.endpoint)).committed()[3].worker == winners[0]


def test_storage_throttling_and_server_errors_are_retried(tmp_path, s3, ray_cluster):
    upload_prompts(tmp_path, s3, files=2, rows=6, row_group_size=3)
    with FlakyProxy(s3.endpoint) as proxy:
        cfg = s3_config(tmp_path, s3, endpoint=proxy.endpoint, run={"rows_per_shard": 3})
        report = runner.run(cfg, progress=False)
    assert report.exit_code == 0, report.manifest
    assert proxy.injected[503] > 5 and proxy.injected[500] > 5, proxy.injected
    df = s3.read("out/run/")
    assert sorted(df.id) == ids_of(12)


def test_planning_many_files_on_s3(tmp_path, s3):
    local = tmp_path / "many"
    write_sample_prompts(str(local), files=120, rows_per_file=3, row_group_size=3)
    s3.upload_dir(local, "many/")
    cfg = s3_config(tmp_path, s3, input={"path": s3.url("many/")}, run={"rows_per_shard": 3})
    plan = make_plan(cfg)
    assert len(plan.files) == 120 and len(plan.shards) == 120 and plan.total_rows == 360
    assert plan.files[0].url == s3.url("many/prompts-000.parquet")


def planning_requests(tmp_path, s3, key):
    """make_plan of the prompts under `key` (listed first), and the requests it sent."""
    with FlakyProxy(s3.endpoint, flaky=False) as proxy:
        cfg = s3_config(tmp_path, s3, endpoint=proxy.endpoint, input={"path": s3.url(key)})
        infos = list_inputs(cfg)
        proxy.forwarded.clear()
        plan = make_plan(cfg, infos)
    return plan, proxy.forwarded


def test_planning_fetches_each_small_file_whole_in_one_request(tmp_path, s3):
    """Footer and ids from one GET a file (If-Match its listed ETag), where reading them by
    ranges took a HEAD and a GET for the footer and again for the ids (issue 11)."""
    upload_prompts(tmp_path, s3, files=4, rows=6, key="few/", row_group_size=2)
    plan, sent = planning_requests(tmp_path, s3, "few/")
    assert plan.total_rows == 24 and [f.row_groups for f in plan.files] == [(2, 2, 2)] * 4
    assert sorted((method, path.split("?")[0]) for method, path in sent) == [
        ("GET", f"/{BUCKET}/few/prompts-{i:03d}.parquet") for i in range(4)]


def test_a_larger_file_is_read_by_ranges_in_one_open(tmp_path, s3, monkeypatch):
    upload_prompts(tmp_path, s3, files=2, rows=6, key="big/", row_group_size=2)
    whole, _ = planning_requests(tmp_path, s3, "big/")
    monkeypatch.setattr(readers.base, "WHOLE_FILE_BYTES", 0)
    ranged, sent = planning_requests(tmp_path, s3, "big/")
    assert ranged.files == whole.files and ranged.shards == whole.shards
    for i in range(2):
        methods = [m for m, path in sent if path.split("?")[0].endswith(f"/big/prompts-{i:03d}.parquet")]
        assert methods.count("HEAD") == 1 and 1 <= methods.count("GET") <= 2, methods


@pytest.mark.parametrize("change, says", [
    (lambda fs, path: fs.pipe_file(path, fs.cat_file(path.replace("001", "000"))),
     r"changed \(version etag:\w+ -> etag:\w+\)"),
    (lambda fs, path: fs.rm_file(path), "was deleted"),
])
def test_a_file_changed_after_listing_is_refused_while_planning(tmp_path, s3, change, says):
    upload_prompts(tmp_path, s3, files=2)
    cfg = s3_config(tmp_path, s3)
    infos = list_inputs(cfg)
    change(s3.fs, f"{BUCKET}/prompts/prompts-001.parquet")
    with pytest.raises(InputChanged, match=f"prompts-001.parquet' {says} while the plan was being made"):
        make_plan(cfg, infos)


def test_an_existing_prefix_with_glob_characters_is_that_prefix(tmp_path, s3):
    """Issue 9, item 8: `runs[1]/` is that prefix, not a pattern that matches nothing; a run
    directory under it is still skipped, and the output may sit beside it."""
    upload_prompts(tmp_path, s3, key="runs[1]/")
    upload_prompts(tmp_path, s3, files=1, key="runs[1]/out/")
    s3.fs.pipe_file(f"{BUCKET}/runs[1]/out/_batchinfer/plan.json", b"{}")
    for path in (s3.url("runs[1]/"), s3.url("runs[1]")):
        cfg = s3_config(tmp_path, s3, input={"path": path}, output={"path": s3.url("runs")})
        runner.preflight(cfg)
        plan = make_plan(cfg)
        assert [f.url for f in plan.files] == [s3.url("runs[1]/prompts-000.parquet"),
                                               s3.url("runs[1]/prompts-001.parquet")]
        first = plan.files[0]  # the workers' pinned read, too, takes the name as it is
        assert read_pinned(first.url, first.version, cfg.storage,
                           ParquetReader(storage=cfg.storage).facts).num_rows == 10
    with pytest.raises(StorageError, match=r"\(taken as a glob pattern"):
        make_plan(s3_config(tmp_path, s3, input={"path": s3.url("runs[2]/")}))


# --------------------------------------------------------------------------- storage errors


@pytest.mark.parametrize("input_path, message", [
    ("s3://no-such-bucket/prompts/",
     "input.path 's3://no-such-bucket/prompts/': bucket 'no-such-bucket' does not exist; "
     "check the bucket name, storage.endpoint_url and storage.region"),
    (f"s3://{BUCKET}/missing/", f"input path 's3://{BUCKET}/missing/' does not exist"),
    (f"s3://{BUCKET}/prompts/*.csv", f"no Parquet files matched 's3://{BUCKET}/prompts/*.csv' "
     "(taken as a glob pattern, as no file or folder has that name; "),
    (f"s3://{BUCKET}/notes/", f"no Parquet files matched 's3://{BUCKET}/notes/'"),
])
def test_input_storage_errors(tmp_path, s3, no_engine, input_path, message):
    upload_prompts(tmp_path, s3)
    s3.fs.pipe_file(f"{BUCKET}/notes/readme.txt", b"not parquet")
    with pytest.raises(StorageError) as e:
        runner.run(s3_config(tmp_path, s3, input={"path": input_path}), progress=False)
    assert message in str(e.value)


def test_missing_output_bucket(tmp_path, s3, no_engine):
    upload_prompts(tmp_path, s3)
    cfg = s3_config(tmp_path, s3, output={"path": "s3://no-such-bucket/out/"})
    with pytest.raises(StorageError, match="output.path 's3://no-such-bucket/out/': bucket "
                                           "'no-such-bucket' does not exist"):
        runner.run(cfg, progress=False)


def test_unreachable_endpoint(tmp_path, s3, no_engine):
    cfg = s3_config(tmp_path, s3, storage={"endpoint_url": "http://127.0.0.1:9", "retries": 1})
    with pytest.raises(StorageError, match="input.path 's3://batchinfer-test/prompts/': cannot reach "
                                           "the storage endpoint; check storage.endpoint_url"):
        runner.run(cfg, progress=False)


def auth_config(tmp_path, server, key, secret, output_key="out/run/"):
    endpoint = server[0]
    return make_config(
        tmp_path, input={"path": f"s3://{BUCKET}/prompts/"},
        output={"path": f"s3://{BUCKET}/{output_key}"},
        storage={"endpoint_url": endpoint, "options": {"key": key, "secret": secret}})


@pytest.fixture(scope="module")
def auth_prompts(s3_auth_server, tmp_path_factory):
    import s3fs

    endpoint, key, secret = s3_auth_server[:3]
    local = tmp_path_factory.mktemp("auth-prompts")
    write_sample_prompts(str(local), files=1, rows_per_file=4)
    fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint},
                           skip_instance_cache=True)
    fs.put_file(str(local / "prompts-000.parquet"), f"{BUCKET}/prompts/prompts-000.parquet")
    return s3_auth_server


def test_bad_credentials(tmp_path, auth_prompts, no_engine):
    cfg = auth_config(tmp_path, auth_prompts, "AKIANOTAREALKEY00000", "wrong-secret")
    with pytest.raises(StorageError) as e:
        runner.run(cfg, progress=False)
    assert str(e.value) == (
        f"input.path 's3://{BUCKET}/prompts/': the storage credentials were refused; check "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, storage.profile or the instance role")
    assert "wrong-secret" not in str(e.value)


def test_wrong_secret_for_a_real_key(tmp_path, auth_prompts, no_engine):
    cfg = auth_config(tmp_path, auth_prompts, auth_prompts[1], "not-the-secret")
    with pytest.raises(StorageError, match="the storage credentials were refused"):
        runner.run(cfg, progress=False)


def test_access_denied(tmp_path, auth_prompts, no_engine):
    _, _, _, nobody_key, nobody_secret = auth_prompts
    cfg = auth_config(tmp_path, auth_prompts, nobody_key, nobody_secret)
    with pytest.raises(StorageError) as e:
        runner.run(cfg, progress=False)
    assert str(e.value) == (
        f"input.path 's3://{BUCKET}/prompts/': access denied: the credentials in use lack "
        "permission (s3:ListBucket and s3:GetObject on the inputs)")


def test_no_credentials_at_all(tmp_path, s3):
    upload_prompts(tmp_path, s3)
    config = write_yaml(tmp_path / "c.yaml", s3_config(tmp_path, s3))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "batchinfer.cli", "run", str(config),
                           "--set", "run.ray_address=127.0.0.1:1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "input.path 's3://batchinfer-test/prompts/': no storage credentials found" in proc.stderr


def test_secrets_never_reach_logs_plan_or_manifest(tmp_path, auth_prompts, ray_cluster):
    endpoint, key, secret = auth_prompts[:3]
    cfg = auth_config(tmp_path, auth_prompts, key, secret, output_key="secret-run/")
    config = write_yaml(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    cli = [sys.executable, "-m", "batchinfer.cli"]
    outputs = []
    for args in (["validate", str(config)], ["plan", str(config)], ["run", str(config), "--no-progress"],
                 ["status", f"s3://{BUCKET}/secret-run/", "--config", str(config)]):
        proc = subprocess.run([*cli, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    assert "options: {key: '***', secret: '***'}" in outputs[0]
    import s3fs

    fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint},
                           skip_instance_cache=True)
    written = [fs.cat_file(p) for p in fs.find(f"{BUCKET}/secret-run/")]
    assert len(written) >= 5
    for blob in [o.encode() for o in outputs] + written:
        assert secret.encode() not in blob and key.encode() not in blob
