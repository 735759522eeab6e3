"""Per-row request settings and structured output on the real model, through a real run
(issue 12): local Ray, SmolLM2 on the CPU, Parquet in and out."""

from __future__ import annotations

import json

import jsonschema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import runner
from tests.conftest import make_config

pytestmark = pytest.mark.slow

STORY = "Write a long story about a dragon who learns to bake bread."
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def run(tmp_path, rows: list[tuple[str, str, object]], **sections) -> pd.DataFrame:
    """Rows of (id, prompt, settings: a dict as JSON text, or None) through a real run; the
    results by id."""
    (tmp_path / "prompts").mkdir(exist_ok=True)
    settings = [None if s is None else s if isinstance(s, str) else json.dumps(s) for _, _, s in rows]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                             "settings": pa.array(settings, pa.string())}),
                   tmp_path / "prompts" / "p.parquet", row_group_size=4)
    sections.setdefault("input", {})["sampling_column"] = "settings"
    cfg = make_config(tmp_path, run={"num_workers": 2, "rows_per_shard": 4}, **sections)
    report = runner.run(cfg, progress=False)
    assert report.exit_code in (0, 3), report
    return pd.read_parquet(tmp_path / "out").set_index("id")


def test_each_row_gets_the_max_tokens_temperature_seed_and_stop_it_asked_for(tmp_path, tokenizer):
    rows = [
        ("greedy", STORY, None),
        ("short", STORY, {"max_tokens": 3}),
        ("stop", STORY, {"stop": [" "]}),
        ("seeded-a", STORY, {"temperature": 0.9, "seed": 1234}),
        ("filler-1", "Say hello.", None),
        ("filler-2", "Name a colour.", {"max_tokens": 2}),
        ("seeded-b", STORY, {"temperature": 0.9, "seed": 1234}),  # another shard, batch and worker
        ("seeded-c", STORY, {"temperature": 0.9, "seed": 99}),
        ("bad-max", STORY, {"max_tokens": -1}),
        ("bad-temp", STORY, '{"temperature": "hot"}'),
        ("bad-top-p", STORY, {"top_p": 2}),
        ("bad-key", STORY, {"frequency_penalty": 1}),
    ]
    df = run(tmp_path, rows, sampling={"max_tokens": 16})
    assert sorted(df.index) == sorted(r[0] for r in rows)  # every row answered, the bad ones too

    assert df.completion_tokens["greedy"] == 16 and df.finish_reason["greedy"] == "length"
    assert df.completion_tokens["short"] == 3 and df.finish_reason["short"] == "length"
    assert df.completion_tokens["filler-2"] <= 2
    # stop " " on one row only: that row is the greedy text up to its first space
    assert df.output["stop"] == df.output["greedy"].split(" ")[0] and df.finish_reason["stop"] == "stop"
    assert " " in df.output["greedy"]
    # a row's own seed: the same text wherever the row ran; another seed, another text
    assert df.output["seeded-a"] == df.output["seeded-b"]
    assert df.output["seeded-a"] != df.output["seeded-c"] and df.output["seeded-a"] != df.output["greedy"]

    assert df.error["bad-max"] == "bad_sampling: max_tokens: got -1; expected greater than or equal to 1"
    assert df.error["bad-temp"] == "bad_sampling: temperature: got 'hot'; expected a valid number"
    assert df.error["bad-top-p"] == "bad_sampling: top_p: got 2; expected less than or equal to 1"
    assert df.error["bad-key"].startswith("bad_sampling: unknown setting 'frequency_penalty'")
    assert df.error.notna().sum() == 4 and df.output[df.error.notna()].isna().all()
    manifest = json.loads((tmp_path / "out" / "_batchinfer" / "manifest.json").read_text())
    assert manifest["status"] == "partial" and manifest["errors"] == {"bad_sampling": 4}


def test_json_schema_rows_validate_or_say_the_json_is_incomplete(tmp_path):
    """A global JSON schema on the real model: every completed row parses and validates against
    it; a row cut by its own max_tokens says the JSON is incomplete; rows may bring their own
    format (a choice) or a bad schema (that row's bad_schema)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    people = ["a sailor", "a baker", "a pilot", "a painter", "a doctor", "a farmer"]
    rows = [(f"p{i}", f"Invent {who}. Give their name and age as JSON.", None) for i, who in enumerate(people)]
    rows += [
        ("cut", "Invent a teacher. Give their name and age as JSON.", {"max_tokens": 4}),
        ("label", "Is 'I loved it' positive or negative?",
         {"response_format": {"type": "choice", "choice": ["positive", "negative"]}}),
        ("free", "Say hello.", {"response_format": {"type": "text"}, "max_tokens": 8}),
        ("bad-schema", "Invent a cook.", {"response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}),
    ]
    df = run(tmp_path, rows, sampling={"max_tokens": 48, "response_format": fmt})

    valid = [f"p{i}" for i in range(len(people))]
    done = [i for i in valid if pd.isna(df.error[i])]
    assert len(done) >= 4, df.loc[valid, ["output", "error"]]
    for i in valid:
        if i in done:
            jsonschema.validate(json.loads(df.output[i]), PERSON)
            assert df.finish_reason[i] == "stop"
        else:  # only a completion cut short may fail, and it says so
            assert df.finish_reason[i] == "length" and df.error[i].startswith("incomplete_json: ")
    assert df.finish_reason["cut"] == "length" and df.completion_tokens["cut"] == 4
    assert df.error["cut"] == ("incomplete_json: the completion reached its max_tokens (4) before the "
                               "JSON value was complete")
    assert df.output["cut"]  # the partial text is kept for inspection
    assert df.output["label"] in ("positive", "negative") and pd.isna(df.error["label"])
    assert pd.isna(df.error["free"]) and not df.output["free"].lstrip().startswith("{")
    assert df.error["bad-schema"].startswith("bad_schema: json_schema.schema at type: 'objekt'")
