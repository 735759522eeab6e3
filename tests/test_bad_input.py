"""Bad input, case by case: what stops the run before any engine starts (with the file, column
or row named) and what becomes a row error. The README's table lists the same cases.

Cases covered elsewhere: missing or wrongly typed prompt/messages/id column, files whose
types disagree, not Parquet at all (test_plan.py); null/empty prompts (test_worker.py);
malformed chat messages (test_run.py, test_prompts.py); prompt too long (test_run.py);
non-UTF-8 bytes in a binary prompt column (test_prompts.py); nothing matched, missing
bucket/prefix (test_plan.py, test_s3.py); string layouts and dictionary encoding, files from
different writers, empty files of any schema, null ids (test_input_types.py).
"""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import runner
from batchinfer.plan import InputError, make_plan
from tests.conftest import make_config


def write(path, **columns):
    os.makedirs(path.parent, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_an_empty_file_contributes_no_shard(tmp_path):
    write(tmp_path / "prompts" / "a.parquet", id=pa.array([], pa.string()), prompt=pa.array([], pa.string()))
    write(tmp_path / "prompts" / "b.parquet", id=["x"], prompt=["hi"])
    plan = make_plan(make_config(tmp_path))
    assert [f.num_rows for f in plan.files] == [0, 1] and len(plan.shards) == 1


def test_only_empty_files_is_refused(tmp_path):
    write(tmp_path / "prompts" / "a.parquet", id=pa.array([], pa.string()), prompt=pa.array([], pa.string()))
    with pytest.raises(InputError, match="every input file under .* is empty \\(0 rows\\); nothing to do"):
        make_plan(make_config(tmp_path))


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    write(tmp_path / "prompts" / "good.parquet", id=["a"], prompt=["hi"])
    data = (tmp_path / "prompts" / "good.parquet").read_bytes()
    (tmp_path / "prompts" / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        make_plan(make_config(tmp_path))
    assert "cut.parquet' is not a readable Parquet file" in str(e.value)
    assert "expected a complete Parquet file" in str(e.value)


def test_duplicate_ids_are_refused_naming_them(tmp_path):
    write(tmp_path / "prompts" / "a.parquet", id=["a", "b", "c"], prompt=["1", "2", "3"])
    write(tmp_path / "prompts" / "b.parquet", id=["d", "b"], prompt=["4", "5"])
    with pytest.raises(InputError) as e:
        make_plan(make_config(tmp_path))
    assert str(e.value) == (
        "input.id_column 'id' repeats 1 value(s), e.g. 'b' (in a.parquet, b.parquet); each row "
        "needs its own id for exactly-once results. Fix the inputs, or set "
        "input.allow_duplicate_ids: true to accept them")


def test_duplicate_ids_can_be_allowed(tmp_path, ray_cluster):
    write(tmp_path / "prompts" / "a.parquet", id=["a", "a"], prompt=["Say hi.", "Say bye."])
    cfg = make_config(tmp_path, input={"allow_duplicate_ids": True}, sampling={"max_tokens": 2})
    assert runner.run(cfg, progress=False).exit_code == 0
    df = pd.read_parquet(tmp_path / "out")
    assert list(df.id) == ["a", "a"] and df.output.str.len().min() > 0


def test_ids_are_data_never_paths(tmp_path, ray_cluster):
    evil = ["../../escape", "/etc/passwd", "part-000000.parquet"]
    write(tmp_path / "prompts" / "a.parquet", id=evil, prompt=["a", "b", "c"])
    cfg = make_config(tmp_path, sampling={"max_tokens": 1})
    assert runner.run(cfg, progress=False).exit_code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["_SUCCESS", "_batchinfer", "part-000000.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["out", "prompts"]  # nothing written outside the run
    assert sorted(pd.read_parquet(tmp_path / "out").id) == sorted(evil)


def test_trust_remote_code_is_off_unless_set():
    from batchinfer.config import config_from_dict

    assert config_from_dict({}).engine.trust_remote_code is False
