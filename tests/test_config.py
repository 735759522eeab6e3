"""Config loading and validation: every message names the key, the value and what is allowed."""

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from batchinfer import registry
from batchinfer.config import Config, ConfigError, EngineConfig
from batchinfer.config_loader import config_from_dict, load_config, to_commented_yaml


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.engine.backend == "transformers"
    assert cfg.sampling.max_tokens == 64
    assert cfg.run.num_workers == 2


def sections() -> list[tuple[str, type[BaseModel]]]:
    """Every config model: the sections, and each registered backend's options."""
    found = [(name, f.annotation) for name, f in Config.model_fields.items()]
    return found + [(f"engine.options ({name})", registry.engine_class(name).Options)
                    for name in registry.names()]


def test_every_field_has_a_default_and_a_description():
    for where, model in sections():
        for name, f in model.model_fields.items():
            assert f.description, f"{where}.{name} has no docstring"
            assert f.default is not PydanticUndefined or f.default_factory is not None, f"{where}.{name}"


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
    ({"engine": {"backend": "trtllm", "options": {"quantisation": "fp8"}}},
     "unknown key 'quantisation' at engine.options; did you mean 'quantization'?"),
    ({"engine": {"backend": "trtllm", "options": {"calib_batches": 0}}},
     "engine.options.calib_batches: got 0 (int); expected an integer >= 1"),
    ({"engine": {"options": {"device": "tpu"}}},
     "engine.options.device: got 'tpu' (str); expected one of 'auto', 'cpu', 'cuda'"),
    ({"engine": {"options": "cpu"}}, "engine.options: expected a mapping of keys, got 'cpu' (str)"),
    ({"engine": {"backend": "vllm"}}, "engine.backend: unknown engine backend 'vllm'"),
    ({"engine": {"backend": "trtlm"}}, "unknown engine backend 'trtlm'; did you mean 'trtllm'?"),
    ({"engine": {"device": "cpu"}}, "it moved to engine.options.device"),
    ({"trtllm": {"mode": "engine"}}, "unknown key 'trtllm' at top level"),
    ({"engine": {"backend": "json:JSONDecoder"}},
     "engine.backend: 'json:JSONDecoder' is not an engine backend (expected a subclass of batchinfer.engines.Engine"),
    ({"trtllm": {"mode": "engine"}}, "it moved to engine.options (with engine.backend: trtllm)"),
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


def test_backend_options_are_set_and_overridden():
    cfg = load_config(None, ["engine.backend=trtllm", "engine.options.max_input_len=300",
                             "engine.options.calib_dataset=/data/cnn_dailymail"])
    assert (cfg.engine.options.max_input_len, cfg.engine.options.mode) == (300, "engine")
    assert cfg.engine.options.calib_dataset == "/data/cnn_dailymail"
    assert config_from_dict(cfg.to_dict()) == cfg
    text = to_commented_yaml(cfg)
    assert "  options:  # The backend's own settings" in text
    assert "    max_input_len: 300  # Longest prompt the engine accepts" in text


def test_override_messages_show_the_value_and_empty_sections_take_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\nsampling:\n")
    assert load_config(path, ["engine.options.device=cpu", "sampling.seed=3"]).engine.options.device == "cpu"
    with pytest.raises(ConfigError) as e:
        load_config(path, ["engine.options=3"])
    assert str(e.value) == "engine.options: expected a mapping of keys, got 3 (int)"
    with pytest.raises(ConfigError) as e:  # an unknown backend's options are not checked too
        load_config(path, ["engine.backend=vllm", "engine.options.mode=x"])
    assert "unknown engine backend 'vllm'" in str(e.value) and "engine.options" not in str(e.value)


def test_a_config_built_in_code_holds_its_backends_option_defaults():
    assert type(Config().engine.options).__name__ == "TransformersOptions"
    assert EngineConfig(backend="trtllm").options.quantization == "fp8"
    assert Config().engine.options == config_from_dict({}).engine.options


def test_secrets_are_hidden_in_print_and_kept_for_use():
    cfg = config_from_dict({"storage": {"options": {"key": "AKIA1", "secret": "s3cr3t",
                                                    "client_kwargs": {"region_name": "x"}}}})
    assert "s3cr3t" not in to_commented_yaml(cfg) and "AKIA1" not in repr(cfg)
    assert cfg.storage.fsspec_options() == {"key": "AKIA1", "secret": "s3cr3t",
                                            "client_kwargs": {"region_name": "x"}}


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
