"""Credentials that rotate during a run: every S3 read and write signs with the current ones.

The S3 server here enforces IAM (the module's `s3_auth_server`, see conftest): a request
signed with a deleted access key is refused with InvalidAccessKeyId. moto checks that a
key exists and the signature matches (moto/iam/access_control.py, `IAMUserAccessKey`), not
a key's Active/Inactive status, so a key is revoked here by deleting it.

Credentials come from a `credential_process` in an AWS config profile (storage.profile)
that prints the current key with an Expiration a few seconds ahead. botocore holds such
credentials as RefreshableCredentials and renews them once they are within 15 minutes of
expiring (botocore/credentials.py, `ProcessProvider.load`, `RefreshableCredentials`), so
here on every request. A rotation makes a new key current, waits until every expiry handed
out for the old key has passed, as an STS or IRSA rotation does, and then deletes the old key.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from batchinfer import atomic, faults, readers, runner, storage
from batchinfer.config import StorageConfig
from batchinfer.plan import make_plan
from batchinfer.readers.parquet import open_parquet
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import BUCKET, REPO, assert_exactly_once, ids_of, make_config

TTL_S = 2
"""Lifetime of the credentials the process hands out."""

CREDENTIAL_PROCESS = """#!/bin/sh
# Prints the key in $1 in the credential_process format, expiring $2 seconds from now.
read -r key secret < "$1"
expires=$(date -u -d "+$2 seconds" +%Y-%m-%dT%H:%M:%SZ)
printf '{"Version": 1, "AccessKeyId": "%s", "SecretAccessKey": "%s", "Expiration": "%s"}\\n' \\
  "$key" "$secret" "$expires"
"""


class RotatingKeys:
    """An IAM user whose current access key a credential_process hands out, and rotates."""

    def __init__(self, endpoint: str, admin_key: str, admin_secret: str, folder: Path):
        import boto3

        self.endpoint = endpoint
        self.iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                                aws_access_key_id=admin_key, aws_secret_access_key=admin_secret)
        # Unique per test: botocore sessions and s3fs instances are cached per profile.
        self.user = self.profile = f"rotating-{uuid.uuid4().hex[:8]}"
        self.iam.create_user(UserName=self.user)
        self.iam.put_user_policy(UserName=self.user, PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.current_file = folder / "current-key"
        script = folder / "credential-process.sh"
        script.write_text(CREDENTIAL_PROCESS)
        self.config_file = folder / "aws-config"
        self.config_file.write_text(f"[profile {self.profile}]\ncredential_process = /bin/sh "
                                    f"{script} {self.current_file} {TTL_S}\n")
        self.env = {"AWS_CONFIG_FILE": str(self.config_file),
                    "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-credentials-file")}
        self.keys = [self._new_key()]
        self._make_current(self.keys[0])

    def _new_key(self) -> dict[str, str]:
        return self.iam.create_access_key(UserName=self.user)["AccessKey"]

    def _make_current(self, key: dict[str, str]) -> None:
        tmp = self.current_file.with_suffix(".tmp")
        tmp.write_text(f"{key['AccessKeyId']} {key['SecretAccessKey']}\n")
        os.replace(tmp, self.current_file)

    def rotate(self) -> None:
        """A new key becomes current; once the old one's last expiry has passed, it is deleted."""
        old, new = self.keys[-1], self._new_key()
        self.keys.append(new)
        self._make_current(new)
        time.sleep(TTL_S + 1)
        self.iam.delete_access_key(UserName=self.user, AccessKeyId=old["AccessKeyId"])

    def refused(self, key: dict[str, str]) -> bool:
        """Whether the server now refuses a request signed with `key` (it was revoked)."""
        import boto3
        import botocore.exceptions

        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
        try:
            s3.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
            return False
        except botocore.exceptions.ClientError as e:
            return e.response["Error"]["Code"] == "InvalidAccessKeyId"


@pytest.fixture
def rotating(s3_auth_server, tmp_path, monkeypatch):
    endpoint, admin_key, admin_secret = s3_auth_server[:3]
    keys = RotatingKeys(endpoint, admin_key, admin_secret, tmp_path)
    for name, value in keys.env.items():
        monkeypatch.setenv(name, value)
    return keys


@pytest.fixture
def admin_fs(s3_auth_server):
    import s3fs

    endpoint, key, secret = s3_auth_server[:3]
    return s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


def upload(tmp_path: Path, fs, prefix: str, files: int, rows: int) -> str:
    local = tmp_path / "local-prompts"
    write_sample_prompts(str(local), files=files, rows_per_file=rows, row_group_size=rows)
    for f in sorted(local.iterdir()):
        fs.put_file(str(f), f"{BUCKET}/{prefix}/{f.name}")
    return f"s3://{BUCKET}/{prefix}/"


def test_pyarrow_and_s3fs_follow_a_rotated_key(tmp_path, rotating, admin_fs):
    """One process, one config: reads through pyarrow and s3fs, a rotation, then reads and
    writes again; the revoked key is really refused."""
    prefix = f"direct-{rotating.user}"
    root = upload(tmp_path, admin_fs, prefix, files=1, rows=5)
    cfg = StorageConfig(endpoint_url=rotating.endpoint, profile=rotating.profile)
    url = root + "prompts-000.parquet"
    loc = storage.locate(root, cfg)

    def read_all() -> list[str]:
        with storage.errors(url, "input.path"), open_parquet(url, cfg) as pf:
            ids = pf.read(columns=["id"]).column(0).to_pylist()
        assert loc.fs.cat_file(loc.child("prompts-000.parquet").path)[:4] == b"PAR1"
        return ids

    assert read_all() == ids_of(5)
    loc.fs.pipe_file(loc.child("before").path, b"1")
    rotating.rotate()
    assert rotating.refused(rotating.keys[0]) and not rotating.refused(rotating.keys[1])
    assert read_all() == ids_of(5)
    loc.fs.pipe_file(loc.child("after").path, b"2")
    assert admin_fs.cat_file(f"{BUCKET}/{prefix}/after") == b"2"


def test_planning_follows_a_key_rotated_between_two_files(tmp_path, rotating, admin_fs, monkeypatch):
    """Planning fetches small files whole through s3fs (atomic.fetch_pinned): a rotation,
    and the old key's revocation, between one file and the next is followed."""
    root = upload(tmp_path, admin_fs, f"plan-{rotating.user}", files=3, rows=5)
    real_fetch, fetched = atomic.fetch_pinned, []

    def fetch_and_rotate(url, version, cfg, **kwargs):
        fetched.append(url)
        if len(fetched) == 2:
            rotating.rotate()
        return real_fetch(url, version, cfg, **kwargs)

    monkeypatch.setattr(atomic, "fetch_pinned", fetch_and_rotate)
    monkeypatch.setattr(readers.base, "FACTS_READ_THREADS", 1)  # one file after the other
    cfg = make_config(tmp_path, input={"path": root},
                      storage={"endpoint_url": rotating.endpoint, "profile": rotating.profile})
    plan = make_plan(cfg)
    assert len(fetched) == 3 and plan.total_rows == 15
    assert [rotating.refused(k) for k in rotating.keys] == [True, False]


def test_a_run_survives_keys_rotated_while_planning_and_while_generating(
        tmp_path, rotating, admin_fs, ray_cluster, monkeypatch):
    """A full run on the real model: the key is rotated (and the old one revoked) once in
    the middle of planning, where the driver opens inputs through pyarrow (the prompt check
    reads first rows; small files' footers and ids come through s3fs, see the test above),
    and once while the worker is between two commits; every row is committed exactly once."""
    files, rows = 4, 5
    prefix = f"run-{rotating.user}"
    inputs = upload(tmp_path, admin_fs, f"{prefix}/prompts", files=files, rows=rows)

    # Rotation 1: inside planning, between the first input opened through pyarrow and the next.
    real_open, opened = storage.arrow_file, []

    def open_and_rotate(url, cfg=None):
        opened.append(url)
        if len(opened) == 2:
            rotating.rotate()
        return real_open(url, cfg)

    monkeypatch.setattr(storage, "arrow_file", open_and_rotate)

    # Rotation 2: when the driver sees the first part committed (fault point `committed`,
    # batchinfer/faults.py); the driver hands out no shard meanwhile, so later ones are read
    # and written after it.
    out_key = f"{prefix}/out"
    mid_run: dict[str, int] = {}

    def parts() -> int:
        admin_fs.invalidate_cache()
        return len([p for p in admin_fs.find(f"{BUCKET}/{out_key}") if "/part-" in p])

    real_point = faults.point

    def point_and_rotate(name: str) -> None:
        real_point(name)
        if name == "committed" and not mid_run:
            rotating.rotate()
            mid_run["parts_at_revocation"] = parts()

    monkeypatch.setattr(faults, "point", point_and_rotate)

    cfg = make_config(
        tmp_path, input={"path": inputs}, output={"path": f"s3://{BUCKET}/{out_key}/"},
        storage={"endpoint_url": rotating.endpoint, "profile": rotating.profile},
        # two shards held at a time, so that shards are still to be read and written after
        # the first commit (left automatic, the worker would take all four at once)
        run={"num_workers": 1, "rows_per_shard": rows, "shards_per_worker": 2,
             "runtime_env": {"env_vars": {**rotating.env, "PYTHONPATH": str(REPO)}}},
        sampling={"max_tokens": 2})
    report = runner.run(cfg, progress=False)

    assert (report.status, report.exit_code) == ("completed", 0)
    assert len(opened) > 2, "planning read inputs through storage.arrow_file after the rotation"
    assert 0 < mid_run["parts_at_revocation"] < parts(), f"the second rotation was not mid-run: {mid_run}"
    assert [rotating.refused(k) for k in rotating.keys] == [True, True, False]
    import pandas as pd

    admin_fs.invalidate_cache()
    df = pd.read_parquet(f"{BUCKET}/{out_key}/", filesystem=admin_fs)
    assert_exactly_once(df, ids_of(files * rows))
