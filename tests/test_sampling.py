"""Per-row request settings, response formats and OpenAI batch request lines, without Ray or a
model (issue 12): every bad value is that row's error naming the field, value and bound."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer.config import ConfigError
from batchinfer.config_loader import config_from_dict
from batchinfer.errors import RowError
from batchinfer.openai_batch import Completion, Row, parse_request, result_line
from batchinfer.plan import InputError, make_plan
from batchinfer.rows import RowRequestBuilder
from batchinfer.sampling import Sampling, output_problem, parse_response_format, resolve

DEFAULTS = Sampling(max_tokens=64, temperature=0.0, top_p=1.0, stop=())
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def schema_format(schema=PERSON):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


# --------------------------------------------------------------------------- settings


def test_a_row_overrides_only_what_it_sets():
    s = resolve(DEFAULTS, {"max_tokens": 5, "temperature": 0.7, "top_p": 0.5, "seed": 9, "stop": ["\n"],
                           "response_format": None})
    assert s == Sampling(max_tokens=5, temperature=0.7, top_p=0.5, stop=("\n",), seed=9)
    assert resolve(DEFAULTS, {"temperature": None}) is DEFAULTS  # null: the config's value
    assert resolve(DEFAULTS, None) is DEFAULTS
    assert resolve(DEFAULTS, {"stop": "END"}).stop == ("END",)  # one string, as OpenAI allows
    assert resolve(DEFAULTS, {"temperature": 1}).temperature == 1.0  # an int is a number
    assert hash(resolve(DEFAULTS, {"response_format": {"type": "json_object"}}))  # groupable, cacheable


@pytest.mark.parametrize("overrides, message", [
    ({"max_tokens": 0}, "max_tokens: got 0; expected greater than or equal to 1"),
    ({"max_tokens": 2.5}, "max_tokens: got 2.5; expected a valid integer"),
    ({"max_tokens": True}, "max_tokens: got True; expected a valid integer"),
    ({"temperature": -1}, "temperature: got -1; expected greater than or equal to 0"),
    ({"temperature": "hot"}, "temperature: got 'hot'; expected a valid number"),
    ({"top_p": 1.5}, "top_p: got 1.5; expected less than or equal to 1"),
    ({"top_p": 0}, "top_p: got 0; expected greater than 0"),
    ({"seed": -3}, "seed: got -3; expected greater than or equal to 0"),
    ({"temperature": 1e308}, "temperature: got 1e+308; expected less than or equal to 2"),
    ({"stop": [""]}, "stop: got ['']; expected: string should have at least 1 character"),
    ({"seed": 2**64}, "seed: got 18446744073709551616; expected less than or equal to 9223372036854775807"),
    ({"stop": [1]}, "stop: got [1]; expected a valid string"),
    ({"n": 2}, "unknown setting 'n'; expected any of max_tokens, temperature, top_p, seed, stop, response_format"),
])
def test_a_bad_setting_is_the_rows_bad_sampling_error(overrides, message):
    with pytest.raises(RowError) as e:
        resolve(DEFAULTS, overrides)
    assert (e.value.code, e.value.message) == ("bad_sampling", message)


# --------------------------------------------------------------------------- response formats


def test_response_formats_in_openai_shape():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).kind == "json_object"
    fmt = parse_response_format(schema_format())
    assert (fmt.kind, fmt.name, json.loads(fmt.schema)) == ("json_schema", "person", PERSON)
    assert parse_response_format(json.dumps(schema_format())) == fmt  # a JSON string column
    assert parse_response_format({"type": "regex", "regex": "[0-9]+"}).pattern == "[0-9]+"
    choice = parse_response_format({"type": "choice", "choice": ["yes", "no", "yes"]})
    assert choice.choices == ("yes", "no") and choice.grammar() == 'root ::= "yes" | "no"'


@pytest.mark.parametrize("value, says", [
    ({"type": "xml"}, "response_format type 'xml'; expected one of text, json_object, json_schema, regex, choice"),
    ({"type": "json_schema"}, "response_format json_schema: got None; expected"),
    (schema_format({"type": "objekt"}), "json_schema.schema at type: 'objekt' is not valid"),
    (schema_format({"type": "object", "properties": {"a": {"minimum": "zero"}}}), "json_schema.schema at properties/a/minimum"),
    ({"type": "regex", "regex": "("}, "regex '(': missing ), unterminated subpattern"),
    ({"type": "choice", "choice": []}, "response_format choice: got []; expected a non-empty list"),
    ("{not json", "response_format is not valid JSON"),
    (["json_object"], "response_format is list; expected an object"),
])
def test_a_bad_response_format_is_bad_schema(value, says):
    with pytest.raises(RowError) as e:
        parse_response_format(value)
    assert e.value.code == "bad_schema" and says in e.value.message, e.value.message


def test_xgrammar_is_the_judge_of_what_both_backends_accept():
    """A schema JSON Schema allows but the grammar compiler both backends use cannot build is
    refused the same way (xgrammar here; TensorRT-LLM compiles guides with it too)."""
    pytest.importorskip("xgrammar")
    with pytest.raises(RowError) as e:
        parse_response_format(schema_format({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}))
    assert e.value.message == ("json_schema is not supported by the grammar compiler (xgrammar): Regex parsing error "
                               "at position 3: Lookbehind is not supported yet.")


def test_a_bad_global_response_format_stops_the_config():
    with pytest.raises(ConfigError, match="sampling.response_format: json_schema.schema at type"):
        config_from_dict({"sampling": {"response_format": schema_format({"type": 5})}})


@pytest.mark.parametrize("text, finish, fmt, error", [
    ('{"name": "Ann", "age": 3}', "stop", schema_format(), None),
    ('{"name": "Ann"', "length", schema_format(), "incomplete_json: the completion reached its max_tokens (7)"),
    ('{"name": "Ann", "age": "3"}', "stop", schema_format(), "schema_mismatch: at age: '3' is not of type 'integer'"),
    ('{"name": "Ann"', "stop", schema_format(), "invalid_json: the completion is not valid JSON"),
    ("[1, 2]", "stop", {"type": "json_object"}, "invalid_json: the completion is a JSON list, expected an object"),
    ("maybe", "stop", {"type": "choice", "choice": ["yes", "no"]}, "invalid_choice: 'maybe' is not one of ['yes', 'no']"),
    ("ye", "length", {"type": "choice", "choice": ["yes", "no"]}, "incomplete_output: the completion reached its max_tokens (7)"),
    ("yes", "length", {"type": "choice", "choice": ["yes", "no"]}, None),  # complete on its last token
    ('{"name": "Ann", "age": 3}', "length", schema_format(), None),
    ("555-1234", "stop", {"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"}, None),
    ("555-12", "stop", {"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"}, "pattern_mismatch: '555-12' does not match"),
    ("555-12", "length", {"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"}, "incomplete_output"),
])
def test_outputs_are_checked_against_their_format(text, finish, fmt, error):
    found = output_problem(text, finish, 7, parse_response_format(fmt))
    assert (found is None) if error is None else found.startswith(error), found


# --------------------------------------------------------------------------- OpenAI batch request lines


def line(body, url="/v1/chat/completions", **extra):
    return json.dumps({"custom_id": "r1", "method": "POST", "url": url, "body": body, **extra}).encode()


def test_a_chat_request_becomes_messages_and_settings():
    r = parse_request(line({"model": "gpt-4o-mini", "messages": [{"role": "developer", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hi"}],
                            "max_completion_tokens": 7, "temperature": 0.5, "seed": 1, "stop": "\n",
                            "response_format": {"type": "json_object"}, "logprobs": True}), 1)
    assert (r.custom_id, r.kind, r.model) == ("r1", "chat", "gpt-4o-mini")
    assert r.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert r.settings == {"max_tokens": 7, "temperature": 0.5, "seed": 1, "stop": "\n",
                          "response_format": {"type": "json_object"}}  # logprobs: reported by the plan


def test_a_byte_order_mark_and_null_fields_are_what_openai_makes_of_them():
    r = parse_request("\ufeff".encode() + line({"messages": [{"role": "user", "content": "x"}], "n": None,
                                                   "model": None, "temperature": None}), 1)
    assert (r.custom_id, r.model, r.settings) == ("r1", None, {})


def test_a_completions_request_is_its_prompt_text_without_a_template():
    r = parse_request(line({"model": "m", "prompt": ["Once upon"], "max_tokens": 3}, url="/v1/completions"), 4)
    assert (r.kind, r.prompt, r.settings) == ("completion", Completion("Once upon"), {"max_tokens": 3})


@pytest.mark.parametrize("raw, says", [
    (b'{"custom_id": "a", "body": ', "line 9: not valid JSON"),
    (b"\xff\xfe", "line 9: not valid UTF-8"),
    (b"[1, 2]", "line 9: a JSON list; expected an object"),
    (line({"messages": []}), "line 9: body.messages is []; expected a non-empty list"),
    (line({"messages": [{"role": "user", "content": "x"}]}, url="/v1/embeddings"),
     'line 9: url is "/v1/embeddings"; expected /v1/chat/completions or /v1/completions'),
    (line({"messages": [{"role": "user", "content": "x"}]}, method="GET"), 'line 9: method is "GET"; expected "POST"'),
    (line({"messages": [{"role": "user", "content": "x"}], "n": 3}), "line 9: body.n is 3; batchinfer returns one choice"),
    (line({"prompt": ["a", "b"]}, url="/v1/completions"), "line 9: body.prompt is [\"a\", \"b\"]; expected a string"),
    (line({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4}),
     "line 9: body.max_tokens (3) and max_completion_tokens (4) disagree"),
    (json.dumps({"custom_id": 5, "url": "/v1/completions", "body": {}}).encode(), "line 9: custom_id is 5; expected a non-empty string"),
])
def test_a_bad_line_is_bad_request_with_its_line_number(raw, says):
    with pytest.raises(RowError) as e:
        parse_request(raw, 9)
    assert e.value.code == "bad_request" and str(e.value).startswith(f"bad_request: {says}"), str(e.value)


def test_output_lines_have_the_batch_api_shape_and_stable_ids():
    ok = Row("r1", "chat", "gpt-4o-mini", "Hello", "stop", 5, 2, None)
    first = result_line(ok, "sha256:abc", "smollm2-135m", created=1)
    assert first == result_line(ok, "sha256:abc", "smollm2-135m", created=1)  # a rerun writes the same ids
    assert first["response"]["status_code"] == 200 and first["error"] is None
    body = first["response"]["body"]
    assert (body["object"], body["model"], body["choices"][0]["message"]["content"]) == ("chat.completion", "gpt-4o-mini", "Hello")
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    failed = result_line(Row("r2", None, None, None, "error", None, None, "bad_request: line 3: x"), "f", "m")
    assert failed["response"] is None and failed["error"] == {"code": "bad_request", "message": "line 3: x"}
    cut = result_line(Row("r3", "completion", None, '{"a"', "length", 1, 4, "incomplete_json: cut"), "f", "m")
    assert cut["response"]["body"]["choices"][0]["text"] == '{"a"' and cut["error"]["code"] == "incomplete_json"


# --------------------------------------------------------------------------- rows of a Parquet input


def config(tmp_path, **input_cfg):
    return config_from_dict({"input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", **input_cfg},
                             "output": {"path": str(tmp_path / "out")}})


def test_struct_json_and_named_columns_give_each_row_its_settings(tmp_path):
    table = pa.table({
        "id": ["a", "b", "c", "d", "e"],
        "prompt": ["p"] * 5,
        "opts": pa.array([{"max_tokens": 3, "stop": ["x"]}, None, {"max_tokens": None, "stop": None},
                          {"max_tokens": -1, "stop": None}, {"max_tokens": 5, "stop": None}]),
        "limit": [None, 9, None, None, 7],
    })
    rows = RowRequestBuilder(config(tmp_path, sampling_column="opts",
                                    sampling_columns={"max_tokens": "limit"})).build(table)
    defaults = Sampling.from_config(config(tmp_path).sampling)
    assert rows.sampling[0] == Sampling(3, 0.0, 1.0, ("x",))
    assert rows.sampling[1].max_tokens == 9 and rows.sampling[2] == defaults
    assert isinstance(rows.cells[3], RowError) and rows.cells[3].code == "bad_sampling"
    assert rows.sampling[4].max_tokens == 7  # the named column wins over the struct
    as_json = pa.table({"id": ["a", "b", "c"], "prompt": ["p"] * 3,
                        "opts": ['{"temperature": 0.5, "seed": 4}', "not json", '["a"]']})
    rows = RowRequestBuilder(config(tmp_path, sampling_column="opts")).build(as_json)
    assert (rows.sampling[0].temperature, rows.sampling[0].seed) == (0.5, 4)
    assert [c.message.split(";")[0] for c in rows.cells[1:]] == [
        "the sampling column is not valid JSON (Expecting value at 0)", "the sampling column holds a list"]


@pytest.mark.parametrize("column, input_cfg, says", [
    (pa.array([1, 2]), {"sampling_column": "opts"}, "sampling column 'opts' has type int64; expected a struct"),
    (pa.array([{"temp": 1.0}, None]), {"sampling_column": "opts"}, "sampling column 'opts' has field 'temp'"),
    (pa.array([{"max_tokens": "5"}, None]), {"sampling_column": "opts"}, "field 'max_tokens' has type string; expected integer"),
    (pa.array(["5", "6"]), {"sampling_columns": {"max_tokens": "opts"}}, "column 'opts' (input.sampling_columns.max_tokens) has type string; expected integer"),
    (pa.array([1.5, 2.0]), {"sampling_columns": {"stop": "opts"}}, "has type double; expected string or list<string>"),
])
def test_a_sampling_column_of_the_wrong_type_is_refused_at_plan_time(tmp_path, column, input_cfg, says):
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "opts": column}), tmp_path / "in.parquet")
    with pytest.raises(InputError) as e:
        make_plan(config(tmp_path, **input_cfg))
    assert says in str(e.value), str(e.value)


def test_openai_batch_input_refuses_column_settings():
    with pytest.raises(ConfigError, match="input.format openai_batch takes each row's id, prompt and settings "
                                          "from its line .* remove input.id_column, input.sampling_column"):
        config_from_dict({"input": {"format": "openai_batch", "id_column": "id", "sampling_column": "s"}})
    with pytest.raises(ConfigError, match="input.sampling_columns: unknown setting"):
        config_from_dict({"input": {"sampling_columns": {"n": "x"}}})
    with pytest.raises(ConfigError, match=r"input.passthrough_columns \['topic'\]: output.format openai_batch "
                                          "writes the OpenAI Batch API's line shape"):
        config_from_dict({"input": {"passthrough_columns": ["topic"]}, "output": {"format": "openai_batch"}})


# --------------------------------------------------------------------------- checks before any engine


def batch_plan(tmp_path, lines: list[str]):
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "batch.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config_from_dict({"input": {"path": str(tmp_path / "in"), "format": "openai_batch"},
                            "output": {"path": str(tmp_path / "out")}})
    return cfg, make_plan(cfg)


def test_a_file_of_bad_requests_runs_but_a_file_of_no_requests_is_refused(tmp_path):
    """Requests malformed one by one (n: 2 on every sampled line) are their rows' bad_request
    errors, and the run goes on; a file none of whose lines is a request at all (another
    JSONL format) is the wrong input, refused before any engine starts."""
    from batchinfer.prompts import check_sample

    bad_n = [line({"messages": [{"role": "user", "content": "hi"}], "n": 2}).decode().replace('"r1"', f'"r{i}"')
             for i in range(10)]
    check_sample(*batch_plan(tmp_path, bad_n))
    other = [json.dumps({"id": i, "prompt": "hi"}) for i in range(10)]
    with pytest.raises(InputError) as e:
        check_sample(*batch_plan(tmp_path, other))
    assert str(e.value).startswith(
        "input file 'batch.jsonl': none of the first 8 lines is an OpenAI batch request "
        '{"custom_id", "method", "url", "body"} (first: line 1: custom_id is null; expected a non-empty string)')
