"""Version-pinned input reads: a worker reads exactly the version of a file the plan recorded.

Pure storage tests on local files (the S3 member, a deleted object read with If-Match,
is in tests/test_exactly_once.py).
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import atomic, storage


def write(path, ids) -> None:
    pq.write_table(pa.table({"id": ids, "prompt": [f"p{i}" for i in ids]}), path)


def recorded(path) -> str:
    return storage.version_tag(storage.locate(str(path)).fs.info(str(path)))


def read_ids(path, version):
    return atomic.read_pinned(str(path), version, None,
                              lambda source: pq.read_table(source).column("id").to_pylist())


def test_the_recorded_version_is_read(tmp_path):
    write(tmp_path / "a.parquet", ["a", "b"])
    assert read_ids(tmp_path / "a.parquet", recorded(tmp_path / "a.parquet")) == ["a", "b"]


def test_a_file_replaced_with_the_same_size_and_mtime_is_refused(tmp_path):
    """rsync -t or cp -p through a temp file: same size, same mtime, another inode."""
    path = tmp_path / "a.parquet"
    write(path, ["a", "b"])
    version, st = recorded(path), path.stat()
    write(tmp_path / "new.tmp", ["x", "y"])
    assert (tmp_path / "new.tmp").stat().st_size == st.st_size
    os.utime(tmp_path / "new.tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "new.tmp", path)
    with pytest.raises(storage.InputChanged, match=r"a\.parquet' changed \(version size:"):
        read_ids(path, version)


@pytest.mark.parametrize("change, says", [
    (lambda p: write(p, ["a", "b", "c"]), "changed"),            # appended / rewritten
    (lambda p: os.remove(p), "was deleted"),
])
def test_appended_or_deleted_files_are_refused(tmp_path, change, says):
    path = tmp_path / "a.parquet"
    write(path, ["a", "b"])
    version = recorded(path)
    change(path)
    with pytest.raises(storage.InputChanged, match=f"a.parquet' {says}.* during the run"):
        read_ids(path, version)
