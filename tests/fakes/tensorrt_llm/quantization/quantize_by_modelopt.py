"""TEST DOUBLE of get_calib_dataloader in tensorrt_llm/quantization/quantize_by_modelopt.py:
the same branches on the dataset path (pileval, scienceqa, cnn_dailymail -> name "3.0.0" and
the "article" column, a local folder -> the "text" column, else NotImplementedError) and
the first `calib_size` texts of the train split. Tokenizing and the modelopt calibration
forward passes are left out. `datasets` is not installed where the tests run, so
`load_dataset` is a small stand-in for a local folder (the real one is Hugging Face
`datasets.load_dataset`), raising the errors the real one raises for the layouts tested."""

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
             "test": ("test", "testing", "eval", "evaluation")}
_READERS = {".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt"}
_SKIP = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}


def get_calib_dataloader(dataset_name_or_dir="cnn_dailymail", tokenizer=None, batch_size=1,
                         calib_size=512, block_size=512, device=None, include_labels=False):
    if dataset_name_or_dir == "pileval":
        raise ConnectionError("Couldn't reach https://the-eye.eu/public/AI/pile/val.jsonl.zst")
    if "scienceqa" in dataset_name_or_dir.lower() or "science_qa" in dataset_name_or_dir.lower():
        raise NotImplementedError("TEST DOUBLE: multimodal calibration is not modelled")
    if "cnn_dailymail" in dataset_name_or_dir:
        dataset = load_dataset(dataset_name_or_dir, name="3.0.0", split="train", trust_remote_code=True)
        dataset = dataset["article"][:calib_size]
    elif os.path.isdir(dataset_name_or_dir):
        dataset = load_dataset(dataset_name_or_dir, split="train", trust_remote_code=True)
        dataset = dataset["text"][:calib_size]
    else:
        raise NotImplementedError(
            f"Unsupported dataset name or local repo directory: {dataset_name_or_dir}.")
    return [dataset[i:i + batch_size] for i in range(0, len(dataset), batch_size)]


class _Dataset:
    def __init__(self, table: pa.Table):
        self.table = table

    @property
    def column_names(self):
        return self.table.column_names

    def __getitem__(self, key: str):
        if key not in self.table.column_names:
            raise KeyError(f"Column {key} not in the dataset. Current columns in the dataset: "
                           f"{self.table.column_names}")
        return self.table.column(key).to_pylist()


def load_dataset(path, name=None, split=None, trust_remote_code=None, **kwargs):
    folder = Path(path)
    if not folder.is_dir():  # the hub would be asked; no network in the tests
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
    if (folder / "state.json").exists():
        raise ValueError("You are trying to load a dataset that was saved using `save_to_disk`. "
                         "Please use `load_from_disk` instead.")
    splits = _metadata_splits(folder, name) or _splits(folder)
    if split not in splits:
        raise ValueError(f'Unknown split "{split}". Should be one of {sorted(splits)}.')
    return _Dataset(pa.concat_tables([_read(f) for f in splits[split]]))


def _files(folder: Path):
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name not in _SKIP
            and not any(p.startswith((".", "__")) for p in f.relative_to(folder).parts)
            and f.suffix.lower() in _READERS]


def _splits(folder: Path) -> dict:
    files = _files(folder)
    if not files:
        raise FileNotFoundError(f"No (supported) data files found in {folder}")
    for part in (lambda f: f.relative_to(folder).parts[:-1], lambda f: (f.name,)):
        found: dict = {}
        for f in files:
            for split, words in _KEYWORDS.items():
                if any(re.search(rf"(^|[-._ 0-9]){w}([-._ 0-9]|$)", p) for w in words for p in part(f)):
                    found.setdefault(split, []).append(f)
                    break
        if found:
            return found
    return {"train": files}


def _metadata_splits(folder: Path, name):
    readme = folder / "README.md"
    m = re.match(r"^---\s*\n(.*?)\n---", readme.read_text(), re.S) if readme.is_file() else None
    configs = (yaml.safe_load(m[1]) or {}).get("configs") if m else None
    if not configs:
        return None
    by_name = {c.get("config_name", "default"): c for c in configs}
    if name is None:
        defaults = [n for n, c in by_name.items() if c.get("default")] or list(by_name)
        name = defaults[0]
    if name not in by_name:
        raise ValueError(f"BuilderConfig '{name}' not found. Available: {list(by_name)}")
    data_files = by_name[name]["data_files"]
    if isinstance(data_files, str):
        data_files = [{"split": "train", "path": data_files}]
    return {d["split"]: sorted(folder.glob(d["path"])) for d in data_files}


def _read(f: Path) -> pa.Table:
    ext = f.suffix.lower()
    if ext == ".parquet":
        return pq.read_table(f)
    if ext == ".arrow":
        with pa.memory_map(str(f)) as source:
            return pa.ipc.open_stream(source).read_all()
    if ext in (".csv", ".tsv"):
        return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ","))
    if ext == ".txt":
        return pa.table({"text": f.read_text().splitlines()})
    text = f.read_text().strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
    return pa.Table.from_pylist(rows)
