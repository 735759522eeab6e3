"""Bad input, case by case: what stops the run before any engine starts (with the file, column
or row named) and what becomes a row error. The README's table lists the same cases.

Cases covered elsewhere: missing or wrongly typed prompt/messages/id column, files whose
types disagree, not Parquet at all (test_plan.py); null/empty prompts (test_worker.py);
malformed chat messages and OpenAI content parts (test_run.py, test_prompts.py); prompt
too long (test_run.py); non-UTF-8 bytes in a binary prompt column (test_prompts.py);
nothing matched, missing bucket/prefix (test_plan.py, test_s3.py); string layouts and
dictionary encoding, files from different writers, empty files of any schema, null ids
(test_input_types.py).
"""

from __future__ import annotations

import os
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchinfer import cli, runner
from batchinfer.plan import InputError, make_plan
from batchinfer.prompts import check_sample
from tests.conftest import make_config, write_yaml


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
    from batchinfer.config_loader import config_from_dict

    assert config_from_dict({}).engine.trust_remote_code is False


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def chat_rows(n, *extra):
    return [[{"role": "user", "content": [{"type": "text", "text": f"What is in picture {i}?"}, IMAGE]},
             *extra] for i in range(n)]


def refuses(tmp_path, cfg, expected):
    """`run` stops with InputError before Ray starts and before the plan is recorded, and
    `batchinfer plan` refuses with the same message (exit 2)."""
    started = time.monotonic()
    with pytest.raises(InputError) as e:
        runner.run(cfg, progress=False, install_signal_handlers=False)  # no ray_cluster here
    assert time.monotonic() - started < 60
    assert expected in str(e.value)
    assert not (tmp_path / "out" / "_batchinfer" / "plan.json").exists()  # a fixed rerun starts afresh
    result = CliRunner().invoke(cli.main, ["plan", str(write_yaml(tmp_path / "c.yaml", cfg))])
    assert result.exit_code == 2
    assert f"error: {e.value}" in result.output


def test_a_column_of_image_messages_stops_the_run_before_any_engine(tmp_path, model_folder):
    write(tmp_path / "prompts" / "a.parquet", id=[f"r{i}" for i in range(20)], messages=chat_rows(20))
    cfg = make_config(tmp_path, input={"prompt_column": None, "messages_column": "messages"})
    refuses(tmp_path, cfg,
            "input file 'a.parquet': none of the first 8 rows of column 'messages' becomes a prompt, all "
            "fail with unsupported_content (first row: message 0 has a content part of type 'image_url'; "
            "this model takes text only)")


def test_a_prompt_column_of_empty_strings_stops_the_run(tmp_path, model_folder):
    write(tmp_path / "prompts" / "a.parquet", id=["a", "b", "c"], prompt=["", "  ", "\n"])
    refuses(tmp_path, make_config(tmp_path),
            "none of the first 3 rows of column 'prompt' becomes a prompt, all fail with empty_prompt "
            "(first row: prompt is empty)")


def test_messages_that_all_end_with_the_assistant_stop_the_run(tmp_path, model_folder):
    rows = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 10
    write(tmp_path / "prompts" / "a.parquet", id=[f"r{i}" for i in range(10)], messages=rows)
    cfg = make_config(tmp_path, input={"prompt_column": None, "messages_column": "messages"})
    refuses(tmp_path, cfg, "all fail with bad_messages (first row: the last message is from the assistant")


def test_a_later_file_that_fails_throughout_is_named(tmp_path, model_folder):
    text = [[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]]
    # a.parquet: one good row among its first 8 is enough; its bad rows become row errors
    write(tmp_path / "prompts" / "a.parquet", id=[f"a{i}" for i in range(8)], messages=chat_rows(7) + text)
    # c.parquet: its rows fail in different ways, so it is no single systematic problem
    write(tmp_path / "prompts" / "c.parquet", id=["c0", "c1"],
          messages=[[{"role": "user", "content": [{"type": "text", "text": "q"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]]
          + chat_rows(1))
    cfg = make_config(tmp_path, input={"prompt_column": None, "messages_column": "messages"})
    check_sample(cfg, make_plan(cfg))
    write(tmp_path / "prompts" / "b.parquet", id=[f"b{i}" for i in range(3)], messages=chat_rows(3))
    with pytest.raises(InputError, match="^input file 'b.parquet': none of the first 3 rows"):
        check_sample(cfg, make_plan(cfg))
