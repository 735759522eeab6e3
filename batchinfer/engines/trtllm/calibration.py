"""Will TensorRT-LLM's FP8 calibration load `engine.options.calib_dataset`? Checked before any GPU.

An FP8 engine build calibrates on text read by `get_calib_dataloader` in TensorRT-LLM's
`tensorrt_llm/quantization/quantize_by_modelopt.py`, which picks one of these branches by
the dataset path (docs/trtllm-api.md has the source):

- `== "pileval"`: a JSON file downloaded from the-eye.eu;
- contains `scienceqa` / `science_qa`: multimodal calibration (needs an image processor);
- contains `cnn_dailymail`: `load_dataset(path, name="3.0.0", split="train")["article"]`;
- an existing folder: `load_dataset(path, split="train")["text"]`;
- anything else (a file, a missing path): `NotImplementedError`.

`load_dataset` on a local folder (Hugging Face `datasets`, `load.py`
`LocalDatasetModuleFactoryWithoutScript` and `data_files.py`) reads the data files in it:
the `configs` of a README.md YAML header when it has one, else the files whose folder or
file name says the split (`train/`, `train-*.parquet`, `data/train-00000-of-00001.parquet`),
else every file as the train split; the builder is chosen by the most common extension
(parquet, arrow, csv/tsv, json/jsonl or txt here). A `save_to_disk` folder is not a
`load_dataset` folder (`state.json`: "Please use `load_from_disk` instead"; a
`dataset_dict.json` folder is misread), so it is refused too.

`datasets` is not a batchinfer dependency, so the layout is read here with pyarrow and the
standard library, the way `load_dataset` would see it.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import re
from collections import Counter
from pathlib import Path

import yaml

FIELD = "engine.options.calib_dataset"
CNN_CONFIG = "3.0.0"
# `datasets` data_files.py: split keywords, the separators around them, files it skips.
SPLIT_KEYWORDS = {"train": ["train", "training"], "validation": ["validation", "valid", "dev", "val"],
                  "test": ["test", "testing", "eval", "evaluation"]}
SEP = r"[-._ 0-9]"
IGNORED = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip",
           "dataset_dict.json"}
SHARDED = re.compile(r"^data/(?P<split>\w+)-\d{5}-of-\d{5}[^/]*\.[^/]+$")
# Extension -> packaged builder (datasets packaged_modules `_EXTENSION_TO_MODULE`), the text ones.
TEXT_MODULES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json",
                ".jsonl": "json", ".txt": "text"}
OTHER_DATA = {".zip", ".tar", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".wav",
              ".mp3", ".flac", ".ogg", ".mp4", ".pdf", ".h5", ".hdf5", ".xml", ".lance", ".npy"}


class LayoutProblem(Exception):
    """One thing `load_dataset` or the calibration loop would refuse; the message says what."""


def calib_branch(path: str) -> tuple[str | None, str] | None:
    """(config name, column) that get_calib_dataloader reads for `path`, or None for the
    branches batchinfer cannot use (hub download, multimodal, not a folder)."""
    if "cnn_dailymail" in path:
        return CNN_CONFIG, "article"
    if Path(path).is_dir() and path != "pileval" and not re.search("scienceqa|science_qa", path.lower()):
        return None, "text"
    return None


def check_calib_dataset(path: str) -> list[str]:
    """Problems that would stop an FP8 calibration on `path`, each saying found vs expected."""
    folder = Path(path)
    if not folder.exists():
        return [f"{FIELD}: {path!r} does not exist"]
    if path == "pileval" or re.search("scienceqa|science_qa", path.lower()):
        return [f"{FIELD}: {path!r} selects TensorRT-LLM's pileval/ScienceQA calibration (a download "
                "or multimodal data); use a local folder of text with a train split and a text column"]
    if not folder.is_dir():
        return [f"{FIELD}: {path!r} is a file; TensorRT-LLM's get_calib_dataloader loads a local "
                "dataset folder (load_dataset(folder, split='train')) and refuses other paths with "
                "NotImplementedError: put the file in a folder and point calib_dataset at the folder"]
    config, column = calib_branch(path)
    try:
        files = train_files(folder, config)
        found = columns(files)
    except LayoutProblem as e:
        return [f"{FIELD}: {path!r}: {e}"]
    if column not in found:
        why = (f"a path containing 'cnn_dailymail' is read as cnn_dailymail {CNN_CONFIG}: its "
               "'article' column" if config else "a local folder is read through its 'text' column")
        return [f"{FIELD}: {path!r}: the train split has no {column!r} column (found: "
                f"{', '.join(found) or 'none'}); {why}"]
    return []


# --------------------------------------------------------------------------- which files are "train"


def train_files(folder: Path, config: str | None) -> list[Path]:
    """The files of the train split `load_dataset(folder, name=config, split="train")` reads,
    filtered to the one builder it would pick."""
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        raise LayoutProblem("found a save_to_disk folder (state.json / dataset_dict.json); "
                            "load_dataset cannot read it (\"use load_from_disk\"): export the train "
                            "split with Dataset.to_parquet(folder/'train.parquet') instead")
    candidates = data_files(folder)
    splits = metadata_splits(folder, candidates, config)
    if splits is None:
        splits = default_splits(candidates, folder)
    if not splits:
        raise LayoutProblem("no data files found (expected parquet, arrow, csv, json/jsonl or txt files)")
    if "train" not in splits:
        raise LayoutProblem(f"no train split (found splits: {', '.join(sorted(splits))}); name the "
                            "file or folder train (train.parquet, train/), or keep one split of files")
    modules = {split: module_of(files) for split, files in splits.items()}
    module = modules["train"]
    if module is None:
        names = ", ".join(sorted({f.suffix or f.name for f in splits["train"]}))
        raise LayoutProblem(f"the train split has no text data files (found {names}; expected "
                            ".parquet, .arrow, .csv/.tsv, .json/.jsonl or .txt)")
    if len(set(modules.values())) > 1:
        raise LayoutProblem(f"splits hold different file formats ({modules}); load_dataset needs one")
    return [f for f in splits["train"] if TEXT_MODULES.get(_ext(f)) == module]


def data_files(folder: Path) -> list[Path]:
    """Files load_dataset would consider: not hidden, not under __dirs, not its metadata files."""
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).parts
        if not f.is_file() or f.name in IGNORED or any(p.startswith((".", "__")) for p in rel):
            continue
        if _ext(f) in TEXT_MODULES or _ext(f) in OTHER_DATA:
            out.append(f)
    return out


def _ext(f: Path) -> str:
    return f.suffix.lower()


def default_splits(files: list[Path], root: Path) -> dict[str, list[Path]]:
    """Split names from the files, in datasets' order: data/{split}-NNNNN-of-NNNNN.*, then split
    keywords in folder names, then in file names, else everything is train."""
    rel = {f: f.relative_to(root).as_posix() for f in files}
    sharded: dict[str, list[Path]] = {}
    for f, r in rel.items():
        m = SHARDED.match(r)
        if m:
            sharded.setdefault(m["split"], []).append(f)
    if sharded:
        return sharded
    for in_dir in (True, False):
        found: dict[str, list[Path]] = {}
        for f, r in rel.items():
            split = _split_of(r, in_dir)
            if split:
                found.setdefault(split, []).append(f)
        if found:
            return found
    return {"train": files} if files else {}


def _split_of(rel: str, in_dir: bool) -> str | None:
    *dirs, name = rel.split("/")
    for split, words in SPLIT_KEYWORDS.items():
        for w in words:
            if in_dir and any(re.fullmatch(rf"(.*{SEP})?{w}({SEP}.*)?", d) for d in dirs):
                return split
            if not in_dir and re.match(rf"^(.*{SEP})?{w}{SEP}", name):
                return split
    return None


def metadata_splits(folder: Path, files: list[Path], config: str | None) -> dict[str, list[Path]] | None:
    """Splits of the README.md `configs` entry load_dataset picks for `config`; None if the
    README declares no configs (then a name such as 3.0.0 is accepted as given)."""
    configs = readme_configs(folder)
    if not configs:
        return None
    names = [c.get("config_name", "default") for c in configs]
    if config is None:
        config = _default_config(configs, names)
    if config not in names:
        raise LayoutProblem(f"README.md declares configs {names}, not {config!r} (load_dataset "
                            f"raises \"BuilderConfig '{config}' not found\")")
    entry = configs[names.index(config)]
    base = folder / entry.get("data_dir", "")
    patterns = entry.get("data_files")
    if patterns is None:
        return default_splits([f for f in files if base in f.parents], base)
    return {split: _glob(base, pats) for split, pats in _sanitize(patterns).items()}


def readme_configs(folder: Path) -> list[dict]:
    readme = folder / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    try:
        meta = yaml.safe_load(m[1]) if m else None
    except yaml.YAMLError as e:
        raise LayoutProblem(f"README.md has a YAML header that does not parse: {e}") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _default_config(configs: list[dict], names: list[str]) -> str:
    flagged = [n for c, n in zip(configs, names, strict=True) if c.get("default")]
    if flagged:
        return flagged[0]
    if "default" in names or len(names) == 1:
        return "default" if "default" in names else names[0]
    raise LayoutProblem(f"README.md declares configs {names} and none is the default; "
                        "load_dataset(folder, split='train') asks for a config name")


def _sanitize(patterns) -> dict[str, list[str]]:
    if isinstance(patterns, str):
        return {"train": [patterns]}
    if isinstance(patterns, list) and patterns and all(isinstance(p, dict) for p in patterns):
        return {str(p["split"]): p["path"] if isinstance(p["path"], list) else [p["path"]] for p in patterns}
    if isinstance(patterns, dict):
        return {str(k): v if isinstance(v, list) else [v] for k, v in patterns.items()}
    return {"train": list(patterns)}


def _glob(base: Path, patterns: list[str]) -> list[Path]:
    files = [f for f in sorted(base.rglob("*")) if f.is_file()]
    rel = {f: f.relative_to(base).as_posix() for f in files}
    return [f for f in files if any(fnmatch.fnmatch(rel[f], p) for p in patterns)]


def module_of(files: list[Path]) -> str | None:
    """The builder load_dataset picks: most common extension; parquet, jsonl, json, csv win draws."""
    counts = Counter(_ext(f) for f in files)
    ranked = sorted(counts.items(), key=lambda ec: (ec[1], ec[0] == ".parquet", ec[0] == ".jsonl",
                                                     ec[0] == ".json", ec[0] == ".csv", ec[0]), reverse=True)
    for ext, _ in ranked:
        if ext in TEXT_MODULES:
            return TEXT_MODULES[ext]
        if ext in OTHER_DATA:
            return None
    return None


# --------------------------------------------------------------------------- which columns


def columns(files: list[Path]) -> list[str]:
    """Column names of the train split, read from its first file; refuse an empty split."""
    first = files[0]
    ext = _ext(first)
    if ext == ".txt":
        return ["text"]
    if ext == ".parquet":
        return _parquet_columns(files)
    if ext == ".arrow":
        return _arrow_columns(first)
    if ext in (".csv", ".tsv"):
        with open(first, newline="", errors="replace") as f:
            header = next(csv.reader(f, delimiter="\t" if ext == ".tsv" else ","), None)
        if header is None:
            raise LayoutProblem(f"{first.name} is empty (expected a header row and text rows)")
        return header
    return _json_columns(first)


def _parquet_columns(files: list[Path]) -> list[str]:
    import pyarrow.parquet as pq

    try:
        metas = [pq.read_metadata(f) for f in files]
    except Exception as e:  # noqa: BLE001 - any unreadable file is a layout problem
        raise LayoutProblem(f"a train file is not readable Parquet ({e})") from None
    if sum(m.num_rows for m in metas) == 0:
        raise LayoutProblem("the train split has no rows")
    return list(metas[0].schema.to_arrow_schema().names)


def _arrow_columns(path: Path) -> list[str]:
    import pyarrow as pa

    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as source:
                return list(opener(source).schema.names)
        except pa.ArrowInvalid:
            continue
    raise LayoutProblem(f"{path.name} is not an Arrow IPC file or stream")


def _json_columns(path: Path) -> list[str]:
    text = path.read_text(errors="replace").strip()
    if not text:
        raise LayoutProblem(f"{path.name} is empty (expected JSON Lines records with the text)")
    try:
        if text.startswith("["):
            records = json.loads(text)
            record = records[0] if records else None
        else:
            record = json.loads(text.splitlines()[0])
    except (ValueError, IndexError) as e:
        raise LayoutProblem(f"{path.name} is not JSON Lines or a JSON list of records ({e})") from None
    if not isinstance(record, dict):
        raise LayoutProblem(f"{path.name}: the first record is {type(record).__name__}, expected an object")
    return list(record)
