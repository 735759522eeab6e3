"""FP8 calibration data: batchinfer's layout check (engines/trtllm/calibration.py) against the
branches of TensorRT-LLM's get_calib_dataloader, and the test double's calibration step."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest

from batchinfer.config_loader import config_from_dict
from batchinfer.engines.trtllm.calibration import check_calib_dataset
from batchinfer.engines.trtllm.engine import check_config

TEXT = {"text": ["The quick brown fox.", "Jumps over the lazy dog."]}
CNN_README = """---
configs:
- config_name: {name}
  data_files:
  - split: train
    path: {name}/train-*
---
# cnn_dailymail
"""


def parquet(path, columns=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(TEXT if columns is None else columns).to_parquet(path)


ARTICLE = {"article": TEXT["text"], "highlights": ["a", "b"]}


def _jsonl(folder):
    (folder / "train").mkdir()
    (folder / "train" / "part.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT["text"]))


def _arrow_stream(folder):
    table = pa.table(TEXT)
    with pa.OSFile(str(folder / "train.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def _cnn_readme(config):
    def make(folder):
        (folder / "README.md").write_text(CNN_README.format(name=config))
        parquet(folder / config / "train-00000-of-00001.parquet", ARTICLE)
    return make


def _save_to_disk(folder):
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(b"")


def _save_to_disk_dict(folder):
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (folder / "train").mkdir()
    (folder / "train" / "state.json").write_text("{}")


LAYOUTS = {
    "empty": lambda folder: None,
    "train_parquet": lambda folder: parquet(folder / "train.parquet"),
    "sharded": lambda folder: [parquet(folder / "data" / f"{s}-00000-of-00001.parquet") for s in ("train", "test")],
    "train_dir_jsonl": _jsonl,
    "unsplit_csv": lambda folder: pd.DataFrame(TEXT).to_csv(folder / "corpus.csv", index=False),
    "txt": lambda folder: (folder / "lines.txt").write_text("one line\nanother line\n"),
    "arrow_stream": _arrow_stream,
    "cnn_plain": lambda folder: parquet(folder / "train.parquet", ARTICLE),
    "cnn_readme": _cnn_readme("3.0.0"),
    "cnn_readme_other_config": _cnn_readme("1.0.0"),
    "cnn_text_column": lambda folder: parquet(folder / "train.parquet"),
    "validation_only": lambda folder: parquet(folder / "validation.parquet"),
    "no_text_column": lambda folder: parquet(folder / "train.parquet", {"body": TEXT["text"]}),
    "save_to_disk": _save_to_disk,
    "save_to_disk_dict": _save_to_disk_dict,
    "images_only": lambda folder: (folder / "a.png").write_bytes(b"\x89PNG"),
    "file_path": lambda folder: parquet(folder / "train.parquet"),
}


def layout(root, name):
    """Build the layout `name` under root; return the calib_dataset path."""
    folder = root / ("cnn_dailymail" if name.startswith("cnn") else "calib")
    folder.mkdir(parents=True)
    LAYOUTS[name](folder)
    return folder / "train.parquet" if name == "file_path" else folder


OK = ["train_parquet", "sharded", "train_dir_jsonl", "unsplit_csv", "txt", "arrow_stream", "cnn_plain",
      "cnn_readme"]
REFUSED = {
    "empty": "no data files found (expected parquet, arrow, csv, json/jsonl or txt files)",
    "validation_only": "no train split (found splits: validation)",
    "no_text_column": "the train split has no 'text' column (found: body); a local folder is read "
                      "through its 'text' column",
    "cnn_text_column": "the train split has no 'article' column (found: text); a path containing "
                       "'cnn_dailymail' is read as cnn_dailymail 3.0.0",
    "cnn_readme_other_config": "README.md declares configs ['1.0.0'], not '3.0.0'",
    "save_to_disk": "found a save_to_disk folder",
    "save_to_disk_dict": "found a save_to_disk folder",
    "images_only": "the train split has no text data files (found .png",
    "file_path": "is a file; TensorRT-LLM's get_calib_dataloader loads a local dataset folder",
}


@pytest.mark.parametrize("name", OK)
def test_layouts_tensorrt_llm_loads_pass(tmp_path, name):
    assert check_calib_dataset(str(layout(tmp_path, name))) == []


@pytest.mark.parametrize("name, message", sorted(REFUSED.items()))
def test_layouts_tensorrt_llm_refuses_are_explained(tmp_path, name, message):
    path = str(layout(tmp_path, name))
    [problem] = check_calib_dataset(path)
    assert problem.startswith(f"engine.options.calib_dataset: {path!r}") and message in problem, problem


def test_missing_hub_names_and_multimodal_paths_are_refused(tmp_path):
    assert check_calib_dataset(str(tmp_path / "nope")) == [f"engine.options.calib_dataset: {str(tmp_path / 'nope')!r} "
                                                            "does not exist"]
    (tmp_path / "scienceqa").mkdir()
    [problem] = check_calib_dataset(str(tmp_path / "scienceqa"))
    assert "pileval/ScienceQA calibration" in problem


def test_empty_parquet_train_split_is_refused(tmp_path):
    parquet(tmp_path / "calib" / "train.parquet", {"text": pd.Series([], dtype=str)})
    [problem] = check_calib_dataset(str(tmp_path / "calib"))
    assert "the train split has no rows" in problem


@pytest.mark.parametrize("name", OK + sorted(REFUSED))
def test_the_double_calibrates_exactly_on_the_layouts_batchinfer_accepts(tmp_path, trtllm_double, name):
    from tensorrt_llm.quantization.quantize_by_modelopt import get_calib_dataloader

    path = str(layout(tmp_path, name))
    accepted = check_calib_dataset(path) == []
    try:
        batches = get_calib_dataloader(path, batch_size=1, calib_size=512)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, ConnectionError, pa.ArrowInvalid) as e:
        assert not accepted, f"the double refused a layout batchinfer accepts: {e!r}"
        return
    assert accepted and batches and all(isinstance(b[0], str) for b in batches)


def test_the_double_follows_the_real_branches(tmp_path, trtllm_double):
    from tensorrt_llm.quantization.quantize_by_modelopt import get_calib_dataloader

    with pytest.raises(NotImplementedError, match="Unsupported dataset name or local repo directory"):
        get_calib_dataloader(str(tmp_path / "missing"))
    with pytest.raises(ConnectionError):  # the default, cnn_dailymail, is a hub name
        get_calib_dataloader("cnn_dailymail")
    with pytest.raises(KeyError, match="Column text not in the dataset"):
        get_calib_dataloader(str(layout(tmp_path, "no_text_column")))
    with pytest.raises(ValueError, match=r'Unknown split "train"'):
        get_calib_dataloader(_validation_only(tmp_path))
    with pytest.raises(ValueError, match="Please use `load_from_disk` instead"):
        get_calib_dataloader(str(layout(tmp_path / "s", "save_to_disk")))
    assert get_calib_dataloader(str(layout(tmp_path / "c", "cnn_readme")), calib_size=1) == [[TEXT["text"][0]]]


def _validation_only(tmp_path):
    parquet(tmp_path / "v" / "validation.parquet")
    return str(tmp_path / "v")


def trt(tmp_path, model_folder, **trtllm):
    return config_from_dict({
        "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
        "engine": {"backend": "trtllm", "model": model_folder, "max_model_len": 512,
                   "options": {"max_input_len": 400, "max_num_tokens": 1024, "build_on_miss": True, **trtllm}},
        "run": {"gpus_per_worker": 1}})


def test_check_config_checks_the_layout_when_an_fp8_build_could_happen(tmp_path, model_folder):
    bad = layout(tmp_path, "no_text_column")
    problems = check_config(trt(tmp_path, model_folder, quantization="fp8", calib_dataset=str(bad)))
    assert any("the train split has no 'text' column (found: body)" in p for p in problems), problems
    good = tmp_path / "good"
    parquet(good / "train.parquet")
    assert check_config(trt(tmp_path, model_folder, quantization="fp8", calib_dataset=str(good))) == []
    # No FP8 build: the data is not read, so its layout does not matter.
    assert check_config(trt(tmp_path, model_folder, quantization="none", calib_dataset=str(bad))) == []
