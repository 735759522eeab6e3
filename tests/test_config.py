"""Config loading and validation: every message names the key, the value and what is allowed."""

import dataclasses

import pytest

from batchinfer.config import (
    Config,
    ConfigError,
    config_from_dict,
    field_docs,
    load_config,
    to_commented_yaml,
)


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.engine.backend == "transformers"
    assert cfg.sampling.max_tokens == 64
    assert cfg.run.num_workers == 2


def test_every_field_has_a_default_and_a_description():
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_shipped_local_config_loads():
    cfg = load_config("configs/local.yaml")
    assert cfg.input.id_column == "id"
    assert "# Most tokens generated per row." in to_commented_yaml(cfg)


@pytest.mark.parametrize("raw, message", [
    ({"sampling": {"temprature": 0.5}},
     "unknown key 'temprature' at sampling; did you mean 'temperature'?"),
    ({"samplng": {}}, "unknown key 'samplng' at top level; did you mean 'sampling'?"),
    ({"sampling": {"temperature": -1}}, "sampling.temperature: got -1 (int); expected a number >= 0"),
    ({"sampling": {"top_p": 0}}, "sampling.top_p: got 0 (int); expected a number > 0 and <= 1"),
    ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens: got 0 (int); expected an integer >= 1"),
    ({"sampling": {"max_tokens": 1.5}}, "sampling.max_tokens: got 1.5 (float); expected an integer >= 1"),
    ({"sampling": {"max_tokens": True}}, "sampling.max_tokens: got True (bool); expected an integer >= 1"),
    ({"sampling": {"stop": "###"}}, "sampling.stop: got '###' (str); expected a list of strings"),
    ({"run": {"num_workers": "two"}}, "run.num_workers: got 'two' (str); expected an integer >= 1"),
    ({"engine": {"dtype": "fp8"}},
     "engine.dtype: got 'fp8' (str); expected one of 'auto', 'float32', 'bfloat16', 'float16'"),
    ({"engine": {"max_model_len": 1}},
     "engine.max_model_len: got 1 (int); expected an integer >= 2 or null"),
    ({"engine": {"trust_remote_code": "yes"}},
     "engine.trust_remote_code: got 'yes' (str); expected true or false"),
    ({"input": {"path": 3}}, "input.path: got 3 (int); expected a string"),
    ({"input": "data/"}, "input: expected a mapping of keys, got 'data/' (str)"),
    ({"input": {"messages_column": "messages"}}, "set exactly one of prompt_column and messages_column"),
    ({"input": {"prompt_column": None}}, "set exactly one of prompt_column and messages_column"),
    ({"input": {"passthrough_columns": ["output"]}},
     "input.passthrough_columns: ['output'] would overwrite result columns"),
])
def test_bad_config_message(raw, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert message in str(e.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"sampling": {"temperature": -1, "max_tokens": 0}, "run": {"bogus": 1}})
    text = str(e.value)
    assert text.startswith("3 problems in the config:")
    assert "sampling.temperature" in text and "sampling.max_tokens" in text and "'bogus'" in text


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  max_tokens: 10\n")
    cfg = load_config(path, ["sampling.max_tokens=32", "sampling.stop=[END, '###']",
                             "engine.max_model_len=null", "input.system_prompt=Be brief: 1 line"])
    assert cfg.sampling.max_tokens == 32
    assert cfg.sampling.stop == ["END", "###"]
    assert cfg.engine.max_model_len is None
    assert cfg.input.system_prompt == "Be brief: 1 line"


@pytest.mark.parametrize("item", ["sampling.max_tokens", "max_tokens=3", "a.b.c=1", ".x=1"])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config(None, [item])


def test_override_of_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'max_tokns' at sampling"):
        load_config(None, ["sampling.max_tokns=3"])


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(listy)


def test_yaml_is_data_not_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("input: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(evil)
